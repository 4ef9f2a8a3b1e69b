"""Every attention policy keeps its index tensors on the KV pool's device: checked on the CPU under
strict_devices() (a tensor made without a device would sit on "meta" and clash with the pool),
and on CUDA, when there is a GPU, against the same decode on the CPU."""
import pytest
import torch

from kvserve.attention.policy import parse_attention
from kvserve.attention.sparse import magicpig
from kvserve.attention.sparse.backend import PolicyAttention
from kvserve.attention.torch_ref import TorchRefAttention
from kvserve.kv.pool import PagePool
from strict_devices import DeviceMixError, strict_devices

H, HKV, D, LAYERS = 4, 2, 16, 3
POLICIES = ["streaming:sink=4,window=20", "topk:k=9,window=8,dense_layers=0",
            "magicpig:K=4,L=40,window=8,dense_layers=0"]


class Seq:
    def __init__(self, pages, policy, prompt):
        self.tables, self.policy, self.num_prompt_tokens, self.attn_state = [pages], parse_attention(policy), prompt, None


def _setup(device, page_size=4, kv_lens=(90, 77, 101), dtype=torch.float32):
    """A pool with random K/V and one decode per policy over scattered pages (the same on every device)."""
    g = torch.Generator().manual_seed(5)
    need = [-(-n // page_size) for n in kv_lens]
    pool = PagePool(LAYERS, sum(need) + 2, page_size, HKV, D, dtype, device)
    free = pool.allocate(sum(need) + 2)
    order = torch.randperm(len(free), generator=g).tolist()
    free = [free[i] for i in order]
    tables = [[free.pop() for _ in range(n)] for n in need]
    pool.k.copy_(torch.randn(pool.k.shape, generator=g))
    pool.v.copy_(torch.randn(pool.v.shape, generator=g))
    rows = len(kv_lens)
    q = torch.randn(LAYERS, rows, H, D, generator=g).to(device, dtype)
    k, v = (torch.randn(LAYERS, rows, HKV, D, generator=g).to(device, dtype) for _ in range(2))
    seqs = [Seq(t, p, n - 1) for t, p, n in zip(tables, POLICIES, kv_lens)]
    decodes = [(i, s, n) for i, (s, n) in enumerate(zip(seqs, kv_lens))]
    return pool, seqs, decodes, (q, k, v)


def _decode(pool, decodes, qkv, steps=2):
    """Two decode steps of every layer (the second reuses MagicPIG's tables) -> outputs per step and layer."""
    backend = PolicyAttention(TorchRefAttention(pool, H, D), pool, H, D)
    q, k, v = qkv
    outs = []
    for _ in range(steps):
        backend.plan([None], [torch.zeros(0, dtype=torch.long, device=pool.k.device)], decodes)
        outs.append(torch.stack([backend.run(layer, q[layer], k[layer], v[layer]) for layer in range(LAYERS)]))
    return outs, backend


@pytest.mark.parametrize("native", [True, False])
def test_policies_make_their_indices_on_the_pool_device(native, monkeypatch):
    if not native:
        monkeypatch.setattr(magicpig, "_kernel", lambda name: None)
    pool, _, decodes, qkv = _setup("cpu")
    expected, _ = _decode(pool, decodes, qkv)
    pool, _, decodes, qkv = _setup("cpu")
    with strict_devices():
        got, backend = _decode(pool, decodes, qkv)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    assert backend.sampled_pairs > 0 and backend.keys_read < backend.keys_total


def test_strict_devices_catches_an_index_made_on_the_default_device():
    cache = torch.randn(2, 8, 4)
    with strict_devices(), pytest.raises(DeviceMixError):
        cache.index_select(1, torch.tensor([1, 2]))
    with strict_devices():  # made on the cache's device: fine
        cache.index_select(1, torch.tensor([1, 2], device=cache.device))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_policy_decode_on_cuda_matches_the_cpu(dtype):
    """The same pool contents, tables and seeds on both devices: the same outputs (MagicPIG samples
    the same keys, barring a hash bit within rounding of zero)."""
    cpu, cuda = (_setup(device, dtype=dtype) for device in ("cpu", "cuda"))
    (cpu_outs, cpu_backend), (gpu_outs, gpu_backend) = _decode(*cpu[::2], cpu[3]), _decode(*cuda[::2], cuda[3])
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    for a, b in zip(cpu_outs, gpu_outs):
        assert b.device.type == "cuda"
        assert (a.float() - b.float().cpu()).abs().max() < tol
    assert abs(cpu_backend.sampled_pairs - gpu_backend.sampled_pairs) <= 0.01 * cpu_backend.sampled_pairs
