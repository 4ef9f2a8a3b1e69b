"""Sliding windows, softcapping and the score scale in the reference backend, against attention
written out in float64: per layer windows, a ragged step (decodes, chunks after a cached prefix,
whole prompts), and pages before every window freed (-1) to show windowed layers never read them."""
import random

import pytest
import torch

from kvserve.attention.metadata import AttentionMetadata
from kvserve.attention.torch_ref import TorchRefAttention
from kvserve.kv.pool import PagePool
from kvserve.native import paged_attention

H, HKV, D = 4, 2, 16
SCALE = 0.3


def naive(q, k, v, num_cached, window, softcap):
    """q [L, H, D] are the last L positions of k/v [S, HKV, D]; causal, windowed, softcapped."""
    q, k, v = q.double(), k.double().repeat_interleave(H // HKV, 1), v.double().repeat_interleave(H // HKV, 1)
    scores = torch.einsum("lhd,shd->hls", q, k) * SCALE
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    q_pos, kv_pos = num_cached + torch.arange(q.shape[0]), torch.arange(k.shape[0])
    allowed = kv_pos[None, :] <= q_pos[:, None]
    if window is not None:
        allowed &= kv_pos[None, :] > q_pos[:, None] - window
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hls,shd->lhd", scores.softmax(-1), v).float()


def ragged_step(page_size, seed, windows, softcap, free_outside=None):
    """Runs every layer over one step; free_outside: a window whose earlier pages are dropped."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    cases = [(rng.randint(0, 40), rng.choice([1, 1, rng.randint(2, 30)])) for _ in range(6)]
    cases = [(c, q) for c, q in cases if c + q > 0] + [(0, 9), (0, 9), (37, 1)]
    total_pages = sum(-(-(c + q) // page_size) for c, q in cases) + 5
    pool = PagePool(len(windows), total_pages, page_size, HKV, D)
    free = pool.allocate(total_pages)
    rng.shuffle(free)
    tables, keys, values = [], [], []
    for cached, q_len in cases:
        tables.append([free.pop() for _ in range(-(-(cached + q_len) // page_size))])
        keys.append(torch.randn(len(windows), cached + q_len, HKV, D))
        values.append(torch.randn(len(windows), cached + q_len, HKV, D))
    meta = AttentionMetadata.build([q for _, q in cases], tables, [c + q for c, q in cases], page_size)
    for layer in range(len(windows)):
        for i, (cached, _) in enumerate(cases):
            slots = meta.token_slots(i, 0, cached)
            pool.k[layer][:, slots] = keys[i][layer, :cached].transpose(0, 1)
            pool.v[layer][:, slots] = values[i][layer, :cached].transpose(0, 1)
    if free_outside is not None:  # the pages no query of the step can see any more
        for table, (cached, _) in zip(tables, cases):
            for p in range(max(0, cached - free_outside + 1) // page_size):
                table[p] = -1
        meta = AttentionMetadata.build([q for _, q in cases], tables, [c + q for c, q in cases], page_size)
    attn = TorchRefAttention(pool, H, D, SCALE, windows=windows, softcap=softcap)
    attn.plan(meta)
    for layer, window in enumerate(windows):
        queries = [torch.randn(q, H, D) for _, q in cases]
        out = attn.run(layer, torch.cat(queries), torch.cat([k[layer, c:] for k, (c, _) in zip(keys, cases)]),
                       torch.cat([v[layer, c:] for v, (c, _) in zip(values, cases)]))
        expected = torch.cat([naive(q, k[layer], v[layer], c, window, softcap)
                              for q, k, v, (c, _) in zip(queries, keys, values, cases)])
        assert (out - expected).abs().max().item() < 1e-5, (layer, window)


@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize("softcap", [None, 1.5])
@pytest.mark.parametrize("seed", range(2))
def test_windows_and_softcap_in_a_ragged_step(page_size, softcap, seed):
    ragged_step(page_size, seed, [None, 5, 12, 1], softcap)


@pytest.mark.parametrize("page_size", [1, 4])
def test_windowed_layers_never_read_pages_before_their_window(page_size):
    ragged_step(page_size, 0, [6, 6], None, free_outside=6)


def test_plain_layers_keep_the_c_decode_kernel_beside_windowed_ones():
    """Gemma 3's mix: full layers decode through paged_attention.c, sliding ones through torch."""
    if not paged_attention.available(torch.empty(1)):
        pytest.skip("paged_attention.c not built here (no C compiler)")
    ragged_step(4, 3, [7, None], None)
    pool = PagePool(2, 4, 4, HKV, D)
    attn = TorchRefAttention(pool, H, D, windows=[7, None])
    attn.plan(AttentionMetadata.build([1], [[0, 1]], [5], 4))
    assert attn.native_decode is not None and set(attn.banded) == {7}
