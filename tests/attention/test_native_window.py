"""kvserve/native: sliding windows and logit soft-capping in the paged decode kernel (against SDPA
with an explicit mask) and in decode.c's whole step (decode rows and prompt blocks)."""
import random

import pytest
import torch
import torch.nn.functional as F

from kvserve.native import paged_attention

H, HKV, D = 4, 2, 16


def reference(q, k, v, window, softcap, scale, sink=0):
    """One query (the last position) over k/v [n, HKV, D] in float64: SDPA with an explicit mask,
    or the scores written out where they are soft-capped; sink: the first positions kept too."""
    n = k.shape[0]
    keep = torch.ones(n, dtype=torch.bool) if window is None else torch.arange(n) > n - 1 - window
    keep |= torch.arange(n) < sink
    q = q.double()[None, :, None]  # [1, H, 1, D]
    k, v = (x.double().transpose(0, 1)[None].repeat_interleave(H // HKV, 1) for x in (k, v))  # [1, H, n, D]
    if softcap is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[None, None, None], scale=scale)
    else:
        scores = softcap * torch.tanh(q @ k.transpose(-1, -2) * scale / softcap)
        out = scores.masked_fill(~keep, float("-inf")).softmax(-1) @ v
    return out[0, :, 0].float()  # [H, D]


@pytest.mark.skipif(not paged_attention.available(torch.empty(1)), reason="paged_attention.c not built here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize("window, softcap, sink", [(None, None, 0), (5, None, 0), (16, None, 0), (1, None, 0),
                                                   (None, 2.0, 0), (7, 3.0, 0), (1000, None, 0),
                                                   (5, None, 3), (16, None, 4), (1, None, 1), (7, 3.0, 6),
                                                   (700, None, 5), (700, 3.0, 0)])
def test_paged_decode_window_and_softcap_match_sdpa(dtype, page_size, window, softcap, sink):
    """sink (StreamingLLM): the first positions too, the pages between them and the window -1.
    Sequences longer than PIECE_KEYS (512) are attended in pieces merged by their log-sum-exp."""
    rng = random.Random(page_size)
    torch.manual_seed(0)
    lens = [1, 3, 17, 40, 33, 1100, 513, 512]
    need = sum(-(-n // page_size) for n in lens)
    num_pages = need + 4
    k_cache = torch.randn(HKV, num_pages * page_size, D).to(dtype)
    v_cache = torch.randn(HKV, num_pages * page_size, D).to(dtype)
    free = list(range(num_pages))
    rng.shuffle(free)
    tables, keys, values = [], [], []
    for n in lens:
        table = [free.pop() for _ in range(-(-n // page_size))]
        slots = torch.tensor([table[t // page_size] * page_size + t % page_size for t in range(n)])
        keys.append(k_cache[:, slots].transpose(0, 1).float())
        values.append(v_cache[:, slots].transpose(0, 1).float())
        if window is not None:  # what is before the window is never read: NaN there would show
            first = max(0, n - window)
            k_cache[:, slots[sink:first]] = float("nan")
            v_cache[:, slots[sink:first]] = float("nan")
            # pages wholly before it (after the sinks' pages) may have gone back to the pool (-1)
            table = [-1 if i * page_size >= sink and (i + 1) * page_size <= first else p for i, p in enumerate(table)]
        tables.append(table)
    q = torch.randn(len(lens), H, D)
    page_table = torch.tensor([p for t in tables for p in t], dtype=torch.int32)
    starts = torch.tensor([0] + [len(t) for t in tables[:-1]]).cumsum(0)
    scale = 0.3
    out = paged_attention.decode(q, k_cache, v_cache, page_table, starts, torch.tensor(lens), page_size, scale,
                                 window=window, softcap=softcap, sink=sink)
    expected = torch.stack([reference(q[i], keys[i], values[i], window, softcap, scale, sink if window else 0)
                            for i in range(len(lens))])
    assert not out.isnan().any()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_defaults_keep_full_attention():
    """decode(..., window=None, softcap=None) is the call TorchRefAttention made before windows."""
    if not paged_attention.available(torch.empty(1)):
        pytest.skip("paged_attention.c not built here")
    torch.manual_seed(1)
    k_cache, v_cache = torch.randn(HKV, 64, D), torch.randn(HKV, 64, D)
    q, table = torch.randn(1, H, D), torch.arange(4, dtype=torch.int32)
    args = (q, k_cache, v_cache, table, torch.tensor([0]), torch.tensor([50]), 16, D ** -0.5)
    expected = reference(q[0], k_cache[:, :50].transpose(0, 1), v_cache[:, :50].transpose(0, 1), None, None, D ** -0.5)
    torch.testing.assert_close(paged_attention.decode(*args)[0], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(paged_attention.decode(*args, window=50)[0], expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(paged_attention.decode(*args, window=49)[0], expected, atol=1e-3)


class DenseWindowed:
    """The attention of a whole sequence run one token per step, on dense K/V: each new row sees the
    last `window` positions (itself included). The reference for decode.c's windowed layers."""

    def __init__(self, windows):
        self.windows, self.k, self.v = windows, {}, {}

    def run(self, layer, q, k, v):
        ks = self.k[layer] = torch.cat([self.k.get(layer, k[:0]), k])
        vs = self.v[layer] = torch.cat([self.v.get(layer, v[:0]), v])
        n, t = ks.shape[0], q.shape[0]
        pos = torch.arange(n - t, n)[:, None]
        keep = torch.arange(n)[None, :] <= pos
        if self.windows[layer] is not None:
            keep &= torch.arange(n)[None, :] > pos - self.windows[layer]
        q, ks, vs = (x.transpose(0, 1)[None] for x in (q, ks, vs))
        out = F.scaled_dot_product_attention(q, ks, vs, attn_mask=keep, enable_gqa=True)
        return out[0].transpose(0, 1)


@pytest.mark.parametrize("chunk", [1, 7, 40])  # decode rows; prompt blocks (attend_block), windows inside a block
def test_native_step_applies_each_layer_s_window(tmp_path, chunk):
    from kvserve.native.decode import NativeDecoder
    from model.paged_forward import paged_logits
    from tiny_models import make_hf_model, write_gguf
    from kvserve.model.llama import LlamaForCausalLM
    from kvserve.model.loader import load_checkpoint
    hf = make_hf_model("llama", hidden_size=128, intermediate_size=256, num_hidden_layers=2)
    cfg, weights = load_checkpoint(str(write_gguf(hf, tmp_path / "tiny.gguf", "Q4_0")), "auto")
    model = LlamaForCausalLM.from_weights(cfg, weights, torch.float32)
    if not NativeDecoder.supports(model):
        pytest.skip("no native decode kernel here (no C compiler or no AVX2)")
    windows = [6, 19]
    model.config.layer_windows = lambda: windows  # per layer, beyond what sliding_window + layer_types say
    ids = torch.randint(3, 256, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    ref = DenseWindowed(windows)
    with torch.inference_mode():
        expected = torch.cat([model.compute_logits(model(torch.tensor([t]), torch.tensor([i]), ref))
                              for i, t in enumerate(ids)])
    got = paged_logits(model, ids, page_size=4, chunk=chunk, native_decode=True)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    torch.testing.assert_close(got, expected, atol=1e-2, rtol=1e-2)
    model.config.layer_windows = lambda: [None, None]  # the windows matter: full attention gives other logits past them
    full = paged_logits(model, ids, page_size=4, chunk=chunk, native_decode=True)
    assert (full[20:] - got[20:]).abs().max() > 1e-2
