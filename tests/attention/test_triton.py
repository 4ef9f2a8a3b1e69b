"""The Triton backend against attention written out in float64 (and against TorchRefAttention).

Without a GPU the kernels run under triton's interpreter (set in conftest.py, before triton is
first imported). The interpreter's tl.dot is wrong in bfloat16, so the CPU runs float16 and
float32; the CUDA tests add bfloat16."""
import random

import pytest
import torch

pytest.importorskip("triton")

from kvserve.attention.metadata import AttentionMetadata  # noqa: E402
from kvserve.attention.torch_ref import TorchRefAttention  # noqa: E402
from kvserve.attention.triton import TritonAttention  # noqa: E402
from kvserve.attention.triton.config import Tiles  # noqa: E402
from kvserve.attention.triton.plan import choose_kv_chunk, split_kv  # noqa: E402
from kvserve.kv.pool import PagePool  # noqa: E402

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}
# small tiles: the interpreter's time goes with the number of programs and loop trips
SMALL = dict(tiles=Tiles(decode_block_n=16, prefill_block_m=16, prefill_block_n=16))


class Step:
    """A step over scattered pages: cases are (cached tokens, new tokens) per request; the cached
    prefix is in the pool, the new tokens' q/k/v are the step's inputs."""

    def __init__(self, cases, page_size, hkv, group, d, dtype, device="cpu", seed=0, shared=0):
        rng = random.Random(seed)
        torch.manual_seed(seed)
        self.h, self.hkv, self.d, self.cases = hkv * group, hkv, d, cases
        kv_lens = [c + q for c, q in cases]
        shared_pages = shared // page_size  # whole pages common to every request (a system prompt)
        total = shared_pages + sum(-(-n // page_size) - shared_pages for n in kv_lens) + 3
        self.pool = PagePool(1, total, page_size, hkv, d, dtype, device)
        free = self.pool.allocate(total)
        rng.shuffle(free)
        common = [free.pop() for _ in range(shared_pages)]
        tables = [common + [free.pop() for _ in range(-(-n // page_size) - shared_pages)] for n in kv_lens]
        self.meta = AttentionMetadata.build([q for _, q in cases], tables, kv_lens, page_size)
        prefix_k, prefix_v = torch.randn(shared, hkv, d), torch.randn(shared, hkv, d)
        self.keys = [torch.cat([prefix_k, torch.randn(n - shared, hkv, d)]).to(dtype) for n in kv_lens]
        self.values = [torch.cat([prefix_v, torch.randn(n - shared, hkv, d)]).to(dtype) for n in kv_lens]
        for i, (cached, _) in enumerate(cases):
            slots = self.meta.token_slots(i, 0, cached).to(device)
            self.pool.k[0][:, slots] = self.keys[i][:cached].transpose(0, 1).to(device)
            self.pool.v[0][:, slots] = self.values[i][:cached].transpose(0, 1).to(device)
        self.queries = [torch.randn(q, self.h, d).to(dtype) for _, q in cases]
        self.q = torch.cat(self.queries).to(device)
        self.k = torch.cat([k[c:] for k, (c, _) in zip(self.keys, cases)]).to(device)
        self.v = torch.cat([v[c:] for v, (c, _) in zip(self.values, cases)]).to(device)

    def expected(self):
        return torch.cat([naive(q, k, v, c) for q, k, v, (c, _) in
                          zip(self.queries, self.keys, self.values, self.cases)])

    def run(self, **kwargs):
        attn = TritonAttention(self.pool, self.h, self.d, **kwargs)
        attn.plan(self.meta)
        return attn, attn.run(0, self.q, self.k, self.v)


def naive(q, k, v, num_cached):
    """q [L, H, D] are the last L positions of k/v [S, Hkv, D]; causal; float64."""
    group = q.shape[1] // k.shape[1]
    q, k, v = q.double(), k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    scores = torch.einsum("lhd,shd->hls", q, k) / q.shape[-1] ** 0.5
    allowed = torch.arange(k.shape[0])[None, :] <= (num_cached + torch.arange(q.shape[0]))[:, None]
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hls,shd->lhd", scores.softmax(-1), v)


def assert_close(out, expected, dtype):
    err = (out.double().cpu() - expected).abs().max().item()
    assert err < TOL[dtype], f"max error {err}"


# decodes (a 1-token prompt too), a chunk after a cached prefix, whole prompts
MIXED = [(0, 1), (37, 1), (70, 1), (21, 19), (0, 23), (0, 9)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("group,d", [(1, 64), (4, 128), (8, 64)])
def test_mixed_step(group, d, page_size, dtype):
    step = Step(MIXED, page_size, 2 if group < 8 else 1, group, d, dtype)
    attn, out = step.run(**SMALL)
    assert attn.plan_info.num_decodes == 3 and not attn.plan_info.split
    assert out.dtype == dtype and out.shape == step.q.shape
    assert_close(out, step.expected(), dtype)


def test_head_dim_and_group_not_powers_of_two():
    """Head dim 80 (Phi-2's) runs in 128-wide tiles with the extra columns masked off; a group of
    3 query heads per KV head (Qwen2-7B has 7) packs into tile rows all the same."""
    step = Step(MIXED, 16, 2, 3, 80, torch.float32)
    _, out = step.run(kv_chunk_size=32, **SMALL)
    assert_close(out, step.expected(), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("page_size", [1, 16])
def test_split_kv_decodes(page_size, dtype):
    """Forced splits of 16 tokens: up to 7 partial states per decode merged by LSE, ragged lengths."""
    step = Step([(100, 1), (3, 1), (16, 1), (47, 1)], page_size, 2, 4, 64, dtype)
    attn, out = step.run(kv_chunk_size=16, **SMALL)
    assert attn.plan_info.split and attn.plan_info.num_items == 7 + 1 + 2 + 3
    assert_close(out, step.expected(), dtype)


def test_split_kv_in_a_mixed_step():
    step = Step(MIXED, 16, 2, 4, 64, torch.float16, seed=1)
    attn, out = step.run(kv_chunk_size=32, **SMALL)
    assert attn.plan_info.split
    # the step's int arrays are views of one buffer, each 128-byte aligned (no new kernel variants)
    assert all((v.data_ptr() - attn._ints.data_ptr()) % 128 == 0 for v in attn.buf.values())
    assert_close(out, step.expected(), torch.float16)


@pytest.mark.parametrize("page_size", [1, 16])
def test_chunked_prefill_after_a_cached_prefix(page_size):
    """Chunks of several query tiles whose causal diagonal is offset by a prefix that ends
    mid-page; the same request chunk by chunk."""
    for cached, q_len in [(0, 20), (20, 33), (53, 17)]:
        step = Step([(cached, q_len)], page_size, 2, 4, 64, torch.float32, seed=cached)
        _, out = step.run(**SMALL)
        assert_close(out, step.expected(), torch.float32)


@pytest.mark.parametrize("split", [None, 16])
@pytest.mark.parametrize("page_size", [1, 16])
def test_cascade_reads_the_shared_prefix_once(page_size, split):
    """Decodes whose page lists start with the same pages: the shared part goes through one
    non-causal pass over all of them, merged by LSE with each one's own pages."""
    step = Step([(48 + n, 1) for n in (0, 5, 30, 17)], page_size, 2, 4, 64, torch.float16, shared=48)
    attn, out = step.run(cascade_min_len=16, kv_chunk_size=split, **SMALL)
    assert attn.plan_info.shared_len == 48
    assert_close(out, step.expected(), torch.float16)


def test_writes_the_pool_as_the_reference_does():
    """Same slots, same values (cast to the pool's dtype), from strided q/k/v views as the model
    passes them (split off one fused projection)."""
    step = Step(MIXED, 16, 2, 4, 64, torch.float16)
    fused = torch.cat([step.q.flatten(1), step.k.flatten(1), step.v.flatten(1)], 1)
    hd, kd = step.h * step.d, step.hkv * step.d
    q, k, v = (x.view(-1, n // step.d, step.d) for x, n in zip(fused.split([hd, kd, kd], 1), (hd, kd, kd)))
    assert not q.is_contiguous()
    before_k, before_v = step.pool.k.clone(), step.pool.v.clone()
    ref = TorchRefAttention(step.pool, step.h, step.d)
    ref.plan(step.meta)
    expected = ref.run(0, q.float(), k, v)
    ref_k, ref_v = step.pool.k.clone(), step.pool.v.clone()
    step.pool.k.copy_(before_k), step.pool.v.copy_(before_v)
    attn = TritonAttention(step.pool, step.h, step.d, **SMALL)
    attn.plan(step.meta)
    out = attn.run(0, q, k, v)
    assert torch.equal(step.pool.k, ref_k) and torch.equal(step.pool.v, ref_v)
    assert (out.float() - expected).abs().max() < 3e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rope_fused_into_the_kv_write(dtype):
    """run_with_rope over unrotated q/k heads equals RotaryEmbedding.apply then run, pool included."""
    from kvserve.model.layers import RotaryEmbedding, rope_inv_freq
    step = Step(MIXED, 16, 2, 4, 64, dtype)
    rope = RotaryEmbedding(256, rope_inv_freq(64, 10000.0, None, None))
    positions = torch.cat([torch.arange(c, c + q) for c, q in MIXED])
    cos, signed_sin = rope.table(positions, dtype)
    qk = torch.cat([step.q, step.k], 1)
    before_k, before_v = step.pool.k.clone(), step.pool.v.clone()
    attn = TritonAttention(step.pool, step.h, step.d, **SMALL)
    attn.plan(step.meta)
    q, k = RotaryEmbedding.apply(qk, cos, signed_sin).split([step.h, step.hkv], 1)
    expected = attn.run(0, q, k, step.v)
    expected_k, expected_v = step.pool.k.clone(), step.pool.v.clone()
    step.pool.k.copy_(before_k), step.pool.v.copy_(before_v)
    out = attn.run_with_rope(0, qk, step.v, cos, signed_sin)
    tol = TOL[dtype] if dtype == torch.float32 else 1e-2  # fp32 math here, fp16 ops in apply()
    assert (step.pool.k.float() - expected_k.float()).abs().max() < tol
    assert torch.equal(step.pool.v, expected_v)
    assert (out.float() - expected.float()).abs().max() < tol


def random_llama(vocab=256, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, ffn=128):
    """Random weights under Hugging Face names (no transformers import: it takes seconds)."""
    from kvserve.model.llama import LlamaForCausalLM
    from kvserve.model.loader import hf_config
    cfg = hf_config(dict(architectures=["LlamaForCausalLM"], vocab_size=vocab, hidden_size=hidden,
                         intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, head_dim=head_dim))
    torch.manual_seed(0)
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        pre = f"model.layers.{i}."
        shapes |= {pre + "input_layernorm.weight": (hidden,), pre + "post_attention_layernorm.weight": (hidden,),
                   pre + "self_attn.q_proj.weight": (heads * head_dim, hidden),
                   pre + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
                   pre + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
                   pre + "self_attn.o_proj.weight": (hidden, heads * head_dim),
                   pre + "mlp.gate_proj.weight": (ffn, hidden), pre + "mlp.up_proj.weight": (ffn, hidden),
                   pre + "mlp.down_proj.weight": (hidden, ffn)}
    weights = {n: 1 + 0.1 * torch.randn(s) if "norm" in n else 0.1 * torch.randn(s) for n, s in shapes.items()}
    return LlamaForCausalLM.from_weights(cfg, weights)


def test_drop_in_for_the_reference_in_a_model():
    """A 2-layer Llama run chunk by chunk then decoding over the same pages: logits as with
    TorchRefAttention."""
    model = random_llama()
    cfg, page = model.config, 4
    ids = torch.randint(3, 250, (30,))
    logits = {}
    for name, backend in (("ref", TorchRefAttention), ("triton", TritonAttention)):
        pool = PagePool(cfg.num_layers, 12, page, cfg.num_kv_heads, cfg.head_dim)
        pages = pool.allocate(12)
        random.Random(0).shuffle(pages)
        attn, out = backend(pool, cfg.num_heads, cfg.head_dim), []
        with torch.inference_mode():
            for start, end in ((0, 11), (11, 26), (26, 27), (27, 28), (28, 30)):
                attn.plan(AttentionMetadata.build([end - start], [pages], [end], page))
                out.append(model.compute_logits(model(ids[start:end], torch.arange(start, end), attn)))
        logits[name] = torch.cat(out)
    assert (logits["ref"] - logits["triton"]).abs().max() < 1e-4


def test_plan_splits_to_fill_the_gpu():
    """One long stream is cut into enough items for every SM; a large batch is left whole."""
    sms, hkv = 132, 8
    chunk = choose_kv_chunk(torch.tensor([32768]), hkv, sms, 64)
    assert chunk is not None and 32768 // chunk * hkv >= 2 * sms
    assert choose_kv_chunk(torch.full((256,), 300), hkv, sms, 64) is None
    assert choose_kv_chunk(torch.tensor([100, 200]), hkv, sms, 64) is None  # too short to split
    chunk = choose_kv_chunk(torch.tensor([4096] * 8), hkv, sms, 64)
    assert chunk is not None and 8 * (4096 // chunk) * hkv >= 2 * sms
    lens = torch.tensor([1, 100, 257, 4000, 4096])
    req, start, end, indptr = split_kv(torch.zeros_like(lens), lens, 256, 64)
    assert bool((end > start).all()) and bool((end - start <= 256).all())
    for i, n in enumerate(lens.tolist()):  # each sequence covered exactly, in order
        s, e = start[indptr[i]:indptr[i + 1]], end[indptr[i]:indptr[i + 1]]
        assert s[0] == 0 and e[-1] == n and bool((s[1:] == e[:-1]).all())


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("group,d", [(1, 64), (4, 128), (8, 128)])
def test_cuda_mixed_step(group, d, page_size, dtype):
    step = Step(MIXED + [(300, 1), (1000, 130)], page_size, 2, group, d, dtype, device="cuda")
    _, out = step.run()
    assert_close(out, step.expected(), dtype)


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_long_stream_splits_by_itself(dtype):
    step = Step([(8191, 1)], 16, 8, 4, 128, dtype, device="cuda")
    attn, out = step.run()
    assert attn.plan_info.split and attn.plan_info.num_items > 16
    assert_close(out, step.expected(), dtype)


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_cascade_and_chunks(dtype):
    step = Step([(512 + n, 1) for n in range(0, 64, 3)], 16, 8, 4, 128, dtype, device="cuda", shared=512)
    attn, out = step.run()
    assert attn.plan_info.shared_len == 512
    assert_close(out, step.expected(), dtype)
    step = Step([(700, 300), (0, 900)], 16, 8, 4, 128, dtype, device="cuda")
    _, out = step.run()
    assert_close(out, step.expected(), dtype)
