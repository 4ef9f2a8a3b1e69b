"""The host side of a step: work lists for the kernels, from the CSR page table, in plain torch on
the CPU (no device work, no device-to-host copies). Everything here is testable without triton."""
from dataclasses import dataclass

import torch

from kvserve.attention.metadata import AttentionMetadata

# a decode split reads at least this many KV tokens: below it the merge costs more than it gains
MIN_KV_CHUNK = 256
# at most this many splits per sequence, so the merge holds every partial of a row in registers
MAX_SPLITS = 128


def cdiv(a, b):
    return -(-a // b)


def choose_kv_chunk(kv_lens: torch.Tensor, num_kv_heads: int, num_sms: int, block_n: int) -> int | None:
    """KV tokens per decode work item, or None where every decode stays one item.

    A decode program is one (item, KV head). Splitting pays only where the batch alone leaves SMs
    idle (fewer than ~2 programs per SM); then the step's KV tokens are cut into ~4 programs per
    SM, so one 32k stream spreads over the whole GPU while 256 short decodes are left whole."""
    b = len(kv_lens)
    if b == 0 or b * num_kv_heads >= 2 * num_sms:
        return None
    items = cdiv(4 * num_sms, num_kv_heads)
    longest = int(kv_lens.max())
    chunk = max(cdiv(int(kv_lens.sum()), items), MIN_KV_CHUNK, cdiv(longest, MAX_SPLITS))
    chunk = cdiv(chunk, block_n) * block_n
    return None if chunk >= longest else chunk


def split_kv(starts: torch.Tensor, ends: torch.Tensor, chunk: int | None, block_n: int):
    """Cut each range starts[i]:ends[i] into cdiv(length, chunk) near-equal non-empty items.
    -> (item_req, item_start, item_end, merge_indptr) as int64 tensors."""
    length = ends - starts
    if chunk is None:
        n = torch.ones_like(length)
    else:
        n = ((length + chunk - 1) // chunk).clamp(min=1)
    # near-equal sizes rounded to whole blocks where that stays <= chunk (so no item is empty)
    size = (length + n - 1) // n
    if chunk is not None:
        size = torch.minimum((size + block_n - 1) // block_n * block_n, torch.full_like(size, chunk))
    req = torch.repeat_interleave(torch.arange(len(length)), n)
    indptr = torch.zeros(len(length) + 1, dtype=torch.long)
    torch.cumsum(n, 0, out=indptr[1:])
    idx = torch.arange(len(req)) - indptr[:-1][req]
    item_start = starts[req] + idx * size[req]
    item_end = torch.minimum(item_start + size[req], ends[req])
    return req, item_start, item_end, indptr


def shared_prefix_pages(kv_indptr: torch.Tensor, kv_indices: torch.Tensor) -> int:
    """Leading pages that every request's page list starts with; each request keeps at least its
    last page (where its new token goes) out of the shared part."""
    num_pages = kv_indptr[1:] - kv_indptr[:-1]
    width = int(num_pages.min()) - 1
    if len(num_pages) < 2 or width < 1:
        return 0
    if not bool((kv_indices[kv_indptr[:-1]] == kv_indices[0]).all()):  # the usual case, cheaply
        return 0
    pages = kv_indices[kv_indptr[:-1, None] + torch.arange(width)]
    same = (pages == pages[:1]).all(0)
    return int(same.long().cumprod(0).sum())


@dataclass
class StepPlan:
    """Host int tensors of one step; the backend packs them into one int32 device buffer."""
    arrays: dict
    num_tokens: int
    num_decodes: int
    num_items: int  # decode work items
    split: bool  # decode items write partial states to merge
    max_parts: int  # most partial states of one decode (its items)
    shared_len: int  # cascade: KV tokens shared by all decodes, read once (0: no cascade)
    num_prefill_tiles: int
    num_cascade_tiles: int


def window_starts(kv_lens: torch.Tensor, window: int | None) -> torch.Tensor:
    """First KV position a query at kv_lens - 1 reads under a sliding window of `window` keys."""
    return torch.zeros_like(kv_lens) if window is None else (kv_lens - window).clamp(min=0)


def plan_step(meta: AttentionMetadata, num_kv_heads: int, group: int, num_sms: int, *, block_m: int,
              block_n: int, kv_chunk_size: int | None = None, cascade_min_len: int = 256,
              window: int | None = None) -> StepPlan:
    """kv_chunk_size forces decode splits of that many tokens (tests, benchmarks); cascade is used
    where every request is a decode and they share at least cascade_min_len tokens of pages.
    window: the layers' sliding window; decodes start at it (no cascade: a window leaves the shared
    prefix behind, and its pages may be gone)."""
    page = meta.page_size
    q_lens, kv_lens = meta.q_lens(), meta.kv_lens()
    # kv_indices stays int32: it is the largest array, uploaded as it is
    qo_indptr, kv_indptr, kv_indices = meta.qo_indptr.long(), meta.kv_indptr.long(), meta.kv_indices
    b = meta.batch_size
    # pool slot of every new token: its request's page at its position
    req = torch.repeat_interleave(torch.arange(b), q_lens)
    pos = kv_lens[req] - q_lens[req] + torch.arange(len(req)) - qo_indptr[:-1][req]
    slots = kv_indices[kv_indptr[req] + pos // page].long() * page + pos % page
    arrays = {"slots": slots, "kv_indices": kv_indices}

    dec = torch.nonzero(q_lens == 1).flatten()
    shared_len = 0
    if window is None and len(dec) == b and b > 1 and int(kv_lens.min()) > cascade_min_len:
        shared = shared_prefix_pages(kv_indptr, kv_indices) * page
        shared_len = shared if shared >= cascade_min_len else 0
    dec_kv = kv_lens[dec]
    starts = torch.maximum(window_starts(dec_kv, window), torch.full_like(dec_kv, shared_len))
    chunk = kv_chunk_size or choose_kv_chunk(dec_kv - starts, num_kv_heads, num_sms, block_n)
    item_req, item_start, item_end, merge_indptr = split_kv(starts, dec_kv, chunk, block_n)
    split = len(item_req) > len(dec) or shared_len > 0
    arrays |= {"dec_row": qo_indptr[dec], "dec_page0": kv_indptr[dec], "item_req": item_req,
               "item_start": item_start, "item_end": item_end, "merge_indptr": merge_indptr}

    # prefill requests; a cascade's shared prefix rides along as one more, non-causal request
    # whose rows are all the decodes (rows 0..b-1 of an all-decode step)
    pre = torch.nonzero(q_lens > 1).flatten()
    pre_q0, pre_qlen, pre_kv, pre_page0 = qo_indptr[pre], q_lens[pre], kv_lens[pre], kv_indptr[pre]
    # a tile is block_m rows of (token, query head of one KV head) pairs
    tiles = cdiv(pre_qlen * group, block_m)
    tile_req = torch.repeat_interleave(torch.arange(len(pre)), tiles)
    first = torch.cumsum(tiles, 0) - tiles
    tile_m0 = (torch.arange(len(tile_req)) - first[tile_req]) * block_m
    # the tiles with the most KV to read go first, so the last wave is short ones
    work = torch.minimum(pre_kv[tile_req], (pre_kv - pre_qlen)[tile_req] + (tile_m0 + block_m) // group)
    order = torch.argsort(work, descending=True, stable=True)
    tile_req, tile_m0 = tile_req[order], tile_m0[order]
    num_cascade_tiles = 0
    if shared_len:
        num_cascade_tiles = cdiv(b * group, block_m)
        tile_req = torch.cat([tile_req, torch.full((num_cascade_tiles,), len(pre))])
        tile_m0 = torch.cat([tile_m0, torch.arange(num_cascade_tiles) * block_m])
        pre_q0 = torch.cat([pre_q0, torch.zeros(1, dtype=torch.long)])
        pre_qlen = torch.cat([pre_qlen, torch.tensor([b])])
        pre_kv = torch.cat([pre_kv, torch.tensor([shared_len])])
        pre_page0 = torch.cat([pre_page0, kv_indptr[:1]])
    arrays |= {"tile_req": tile_req, "tile_m0": tile_m0, "pre_q0": pre_q0, "pre_qlen": pre_qlen,
               "pre_kv": pre_kv, "pre_page0": pre_page0}
    max_parts = int((merge_indptr[1:] - merge_indptr[:-1]).max()) if len(dec) else 1
    return StepPlan(arrays, len(slots), len(dec), len(item_req), split, max_parts, shared_len,
                    len(tile_req) - num_cascade_tiles, num_cascade_tiles)
