"""Sliding windows and logit soft-capping in the Triton backends, against SDPA with an explicit mask
(scores written out where they are soft-capped), in float64.

Positions a query may not read are poisoned with NaN, and pages wholly before a request's window
are -1 in its page table (as after the engine gave them back): a kernel that reads them fails."""
import random

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from kvserve.attention.metadata import AttentionMetadata  # noqa: E402
from kvserve.attention.static_decode import StaticDecodeAttention  # noqa: E402
from kvserve.attention.triton import TritonAttention  # noqa: E402
from kvserve.attention.triton.config import Tiles  # noqa: E402
from kvserve.kv.pool import PagePool  # noqa: E402

TOL = {torch.float32: 2e-5, torch.float16: 3e-3}
SMALL = dict(tiles=Tiles(decode_block_n=16, prefill_block_m=16, prefill_block_n=16))
HKV, D = 2, 16


def reference(q, k, v, cached, window, softcap, scale):
    """q [L, H, D] are the last L positions of k/v [S, HKV, D]; causal, windowed; float64."""
    group = q.shape[1] // k.shape[1]
    q, k, v = (x.double().transpose(0, 1)[None] for x in (q, k, v))  # [1, heads, len, D]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    row = cached + torch.arange(q.shape[2])[:, None]
    col = torch.arange(k.shape[2])[None, :]
    keep = col <= row
    if window is not None:
        keep &= col > row - window
    if softcap is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale)
    else:
        scores = softcap * torch.tanh(q @ k.transpose(-1, -2) * scale / softcap)
        out = scores.masked_fill(~keep, float("-inf")).softmax(-1) @ v
    return out[0].transpose(0, 1)


class WindowedStep:
    """cases: (cached tokens, new tokens) per request over scattered pages of a pool of
    len(windows) layers; each layer's keys before its window are NaN (with poison), and pages before
    every layer's window are -1."""

    def __init__(self, cases, page_size, group, dtype, windows, seed=0, shared=0, poison=True):
        rng = random.Random(seed)
        torch.manual_seed(seed)
        self.cases, self.windows, self.h = cases, windows, HKV * group
        kv_lens = [c + q for c, q in cases]
        shared_pages = shared // page_size
        total = shared_pages + sum(-(-n // page_size) - shared_pages for n in kv_lens) + 3
        self.pool = PagePool(len(windows), total, page_size, HKV, D, dtype)
        free = self.pool.allocate(total - 1)  # one left for a scratch page
        rng.shuffle(free)
        common = [free.pop() for _ in range(shared_pages)]
        tables = [common + [free.pop() for _ in range(-(-n // page_size) - shared_pages)] for n in kv_lens]
        meta = AttentionMetadata.build([q for _, q in cases], tables, kv_lens, page_size)
        widest = None if None in windows else max(windows)
        prefix = torch.randn(len(windows), 2, shared, HKV, D)
        self.kv = [[torch.cat([prefix[layer, i], torch.randn(n - shared, HKV, D)]).to(dtype) for i in range(2)]
                   for layer in range(len(windows)) for n in kv_lens]
        for layer, window in enumerate(windows):
            for i, (cached, _) in enumerate(cases):
                k, v = self.kv[layer * len(cases) + i]
                slots = meta.token_slots(i, 0, cached)
                self.pool.k[layer][:, slots] = k[:cached].transpose(0, 1)
                self.pool.v[layer][:, slots] = v[:cached].transpose(0, 1)
                if window is not None and poison:
                    unread = meta.token_slots(i, 0, max(0, cached - window + 1))
                    self.pool.k[layer][:, unread] = float("nan")
                    self.pool.v[layer][:, unread] = float("nan")
        if widest is not None:  # pages no layer reads again go back to the pool: -1
            tables = [[-1 if (j + 1) * page_size <= c - widest + 1 else p for j, p in enumerate(t)]
                      for t, (c, _) in zip(tables, cases)]
        self.tables, self.kv_lens = tables, kv_lens
        self.meta = AttentionMetadata.build([q for _, q in cases], tables, kv_lens, page_size)
        self.queries = [[torch.randn(q, self.h, D).to(dtype) for _, q in cases] for _ in windows]

    def inputs(self, layer):
        kv = self.kv[layer * len(self.cases):(layer + 1) * len(self.cases)]
        return (torch.cat(self.queries[layer]), torch.cat([k[c:] for (k, _), (c, _) in zip(kv, self.cases)]),
                torch.cat([v[c:] for (_, v), (c, _) in zip(kv, self.cases)]))

    def expected(self, layer, softcap=None, scale=D ** -0.5):
        kv = self.kv[layer * len(self.cases):(layer + 1) * len(self.cases)]
        return torch.cat([reference(q, k, v, c, self.windows[layer], softcap, scale)
                          for q, (k, v), (c, _) in zip(self.queries[layer], kv, self.cases)])

    def check(self, attn, dtype, softcap=None, scale=D ** -0.5):
        attn.plan(self.meta)
        for layer in range(len(self.windows)):
            out = attn.run(layer, *self.inputs(layer))
            err = (out.double() - self.expected(layer, softcap, scale)).abs().max().item()
            assert err < TOL[dtype], f"layer {layer}: max error {err}"


# decodes, chunks after a cached prefix (windows starting inside, before and after a tile's
# rows), a whole prompt longer than the window
CASES = [(40, 1), (3, 1), (70, 1), (0, 37), (25, 20), (50, 3), (9, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("window", [1, 5, 20])
def test_windowed_mixed_step(window, page_size, dtype):
    step = WindowedStep(CASES, page_size, 2, dtype, [window])
    step.check(TritonAttention(step.pool, step.h, D, windows=[window], **SMALL), dtype)


@pytest.mark.parametrize("softcap", [2.0, 50.0])
def test_softcap_with_a_window_per_layer(softcap):
    """Layers with different windows (Gemma's local/global) in one step, a custom scale, soft-capped."""
    step = WindowedStep(CASES, 4, 4, torch.float32, [7, None, 30])
    attn = TritonAttention(step.pool, step.h, D, scale=0.4, windows=step.windows, softcap=softcap, **SMALL)
    step.check(attn, torch.float32, softcap, scale=0.4)


def test_split_decodes_start_at_the_window():
    """A long decode split into items: the items cover the window only."""
    step = WindowedStep([(300, 1), (90, 1), (17, 1)], 16, 2, torch.float32, [40])
    attn = TritonAttention(step.pool, step.h, D, windows=[40], kv_chunk_size=16, **SMALL)
    step.check(attn, torch.float32)
    assert attn.plan_info.split and attn.plan_info.num_items == 3 + 3 + 2  # 40, 40, 18 keys


def test_cascade_only_for_layers_without_a_window():
    """Decodes sharing prefix pages: the full layer reads the prefix once (cascade), the windowed
    layer reads its window only (its shared pages are poisoned before the window)."""
    step = WindowedStep([(80, 1), (100, 1), (90, 1)], 16, 2, torch.float32, [10, None], shared=64)
    attn = TritonAttention(step.pool, step.h, D, windows=[10, None], cascade_min_len=32, **SMALL)
    step.check(attn, torch.float32)
    assert attn._plans[None][0].shared_len == 64 and attn._plans[10][0].shared_len == 0


@pytest.mark.parametrize("cls", ["torch", "triton"])
@pytest.mark.parametrize("page_size", [1, 16])
def test_static_decode_windows_and_softcap(cls, page_size):
    """The static-buffer decode (the CUDA graph path and its CPU reference) with released pages. The
    reference gathers whole pages and masks scores, so it can't be given NaN to skip."""
    from kvserve.attention.triton.static import TritonStaticDecode
    windows, softcap = [6, None, 25], 3.0
    step = WindowedStep([(40, 1), (3, 1), (70, 1), (24, 1)], page_size, 2, torch.float32, windows,
                        poison=cls == "triton")
    scratch = step.pool.reserve()
    static = StaticDecodeAttention if cls == "torch" else TritonStaticDecode
    attn = static(step.pool, step.h, D, 8, 80 // page_size + 1, scratch, scale=0.3, windows=windows,
                  softcap=softcap)
    attn.plan([[t] for t in step.tables], step.kv_lens, 8)  # padded to a bucket of 8
    for layer in range(len(windows)):
        q, k, v = step.inputs(layer)
        pad = 8 - len(q)
        out = attn.run(layer, *(torch.cat([x, x.new_zeros(pad, *x.shape[1:])]) for x in (q, k, v)))
        err = (out[:len(q)].double() - step.expected(layer, softcap, 0.3)).abs().max().item()
        assert err < TOL[torch.float32], f"layer {layer}: max error {err}"
