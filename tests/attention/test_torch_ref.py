"""The reference backend against attention written out in float64 over contiguous K/V."""
import random

import pytest
import torch

from kvserve.attention.metadata import AttentionMetadata
from kvserve.attention.torch_ref import TorchRefAttention
from kvserve.kv.pool import PagePool
from kvserve.native import paged_attention

H, HKV, D = 4, 2, 16


@pytest.fixture(params=["native", "torch"])
def decode_kernel(request, monkeypatch):
    """Decodes through kvserve/native/paged_attention.c, or through its PyTorch twin."""
    if request.param == "torch":
        monkeypatch.setattr(paged_attention, "available", lambda cache: False)
    elif not paged_attention.available(torch.empty(1)):
        pytest.skip("paged_attention.c not built here (no C compiler)")
    return request.param


def naive(q, k, v, num_cached):
    """q [L, H, D] are the last L positions of k/v [S, HKV, D]; causal."""
    q, k, v = q.double(), k.double().repeat_interleave(H // HKV, 1), v.double().repeat_interleave(H // HKV, 1)
    scores = torch.einsum("lhd,shd->hls", q, k) / D ** 0.5
    allowed = torch.arange(k.shape[0])[None, :] <= (num_cached + torch.arange(q.shape[0]))[:, None]
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hls,shd->lhd", scores.softmax(-1), v).float()


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("seed", range(3))
def test_ragged_step_over_scattered_pages(page_size, seed, decode_kernel):
    """One step mixing decodes, chunks after a cached prefix and whole prompts."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    cases = [(rng.randint(0, 40), rng.choice([1, 1, rng.randint(2, 30)])) for _ in range(6)]
    cases = [(c, q) for c, q in cases if c + q > 0] + [(0, 9), (0, 9)]  # equal whole prompts batch together
    total_pages = sum(-(-(c + q) // page_size) for c, q in cases) + 5
    pool = PagePool(1, total_pages, page_size, HKV, D)
    free = pool.allocate(total_pages)
    rng.shuffle(free)
    tables, keys, values = [], [], []
    for cached, q_len in cases:
        n = -(-(cached + q_len) // page_size)
        tables.append([free.pop() for _ in range(n)])
        keys.append(torch.randn(cached + q_len, HKV, D))
        values.append(torch.randn(cached + q_len, HKV, D))
    meta = AttentionMetadata.build([q for _, q in cases], tables, [c + q for c, q in cases], page_size)
    for i, (cached, _) in enumerate(cases):  # the cached prefix is already in the pages
        slots = meta.token_slots(i, 0, cached)
        pool.k[0][:, slots], pool.v[0][:, slots] = keys[i][:cached].transpose(0, 1), values[i][:cached].transpose(0, 1)
    queries = [torch.randn(q, H, D) for _, q in cases]
    attn = TorchRefAttention(pool, H, D)
    attn.plan(meta)
    out = attn.run(0, torch.cat(queries), torch.cat([k[c:] for k, (c, _) in zip(keys, cases)]),
                   torch.cat([v[c:] for v, (c, _) in zip(values, cases)]))
    expected = torch.cat([naive(q, k, v, c) for q, k, v, (c, _) in zip(queries, keys, values, cases)])
    assert (out - expected).abs().max().item() < 1e-5


def test_metadata_is_csr():
    meta = AttentionMetadata.build([3, 1], [[7, 2], [5]], [20, 9], 16)
    assert meta.qo_indptr.tolist() == [0, 3, 4]
    assert meta.kv_indptr.tolist() == [0, 2, 3]
    assert meta.kv_indices.tolist() == [7, 2, 5]
    assert meta.kv_last_page_len.tolist() == [4, 9]
    assert meta.kv_lens().tolist() == [20, 9]
    assert meta.token_slots(0, 15, 17).tolist() == [7 * 16 + 15, 2 * 16]


@pytest.mark.parametrize("page_size", [1, 16])
def test_decodes_sharing_prefix_pages_use_cascade(page_size, decode_kernel):
    """Decodes whose page lists start with the same pages (a cached system prompt) equal plain attention."""
    torch.manual_seed(0)
    shared_len, own_lens = 3 * page_size, [5, 17, 30, 1]
    shared_pages = -(-shared_len // page_size)
    total = shared_pages + sum(-(-n // page_size) for n in own_lens) + 2
    pool = PagePool(1, total, page_size, HKV, D)
    free = pool.allocate(total)
    random.Random(1).shuffle(free)
    shared = [free.pop() for _ in range(shared_pages)]
    prefix_k, prefix_v = torch.randn(shared_len, HKV, D), torch.randn(shared_len, HKV, D)
    tables, keys, values = [], [], []
    for n in own_lens:
        tables.append(shared + [free.pop() for _ in range(-(-n // page_size))])
        keys.append(torch.cat([prefix_k, torch.randn(n, HKV, D)]))
        values.append(torch.cat([prefix_v, torch.randn(n, HKV, D)]))
    kv_lens = [shared_len + n for n in own_lens]
    meta = AttentionMetadata.build([1] * len(own_lens), tables, kv_lens, page_size)
    for i, n in enumerate(kv_lens):
        slots = meta.token_slots(i, 0, n - 1)
        pool.k[0][:, slots], pool.v[0][:, slots] = keys[i][:-1].transpose(0, 1), values[i][:-1].transpose(0, 1)
    attn = TorchRefAttention(pool, H, D)
    attn.plan(meta)
    if decode_kernel == "torch":  # the twin's plan; the C kernel reads pages as they are and plans none
        assert attn.shared_len == shared_pages * page_size
    queries = [torch.randn(1, H, D) for _ in own_lens]
    out = attn.run(0, torch.cat(queries), torch.cat([k[-1:] for k in keys]), torch.cat([v[-1:] for v in values]))
    expected = torch.cat([naive(q, k, v, n - 1) for q, k, v, n in zip(queries, keys, values, kv_lens)])
    assert (out - expected).abs().max().item() < 1e-5


def test_native_decode_reads_bf16_pages_as_the_torch_twin_does(monkeypatch):
    if not paged_attention.available(torch.empty(1)):
        pytest.skip("paged_attention.c not built here (no C compiler)")
    torch.manual_seed(0)
    lens, page_size = [3, 40, 17], 4
    pool = PagePool(1, 40, page_size, HKV, D, torch.bfloat16)
    pages = pool.allocate(40)
    random.Random(0).shuffle(pages)
    tables = [[pages.pop() for _ in range(-(-n // page_size))] for n in lens]
    pool.k.normal_(), pool.v.normal_()
    meta = AttentionMetadata.build([1] * len(lens), tables, lens, page_size)
    q, k, v = torch.randn(3, H, D).bfloat16(), torch.randn(3, HKV, D).bfloat16(), torch.randn(3, HKV, D).bfloat16()
    attn = TorchRefAttention(pool, H, D)
    attn.plan(meta)
    native = attn.run(0, q, k, v)
    monkeypatch.setattr(paged_attention, "available", lambda cache: False)
    attn.plan(meta)
    torch.testing.assert_close(native.float(), attn.run(0, q, k, v).float(), atol=2e-2, rtol=2e-2)


def test_merge_state_of_two_halves_equals_the_whole():
    from kvserve.attention.merge import attention_with_lse, merge_state
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 5, D), torch.randn(2, 3, 40, D), torch.randn(2, 3, 40, D)
    whole, lse = attention_with_lse(q, k, v, D ** -0.5)
    a, lse_a = attention_with_lse(q, k[..., :13, :], v[..., :13, :], D ** -0.5)
    b, lse_b = attention_with_lse(q, k[..., 13:, :], v[..., 13:, :], D ** -0.5)
    merged, merged_lse = merge_state(a, lse_a, b, lse_b)
    assert (merged - whole).abs().max() < 1e-5 and (merged_lse - lse).abs().max() < 1e-5
    reference = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert (whole - reference).abs().max() < 1e-5
