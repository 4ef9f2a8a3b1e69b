"""Portable paged attention in plain PyTorch; the reference every other backend is tested against.

`plan()` turns the step's page table into gather indices once; `run()` is called per layer.
Decodes (one query row) are batched into matmuls over their pages, gathered whole and padded
to the longest decode, with a prefix of pages common to all decodes attended once (cascade);
whole prompts of equal length run as one batched causal SDPA; other
prefill chunks run one SDPA each with a causal mask offset by their cached prefix, so a chunk is
never padded to another request's length.

Per-layer sliding windows (`windows[layer] = W`: a query at position p sees keys p-W+1..p, as
transformers masks them) and score softcapping (Gemma 2) change the masks and the score math;
windowed layers read only the pages their window covers, so pages before it may be freed.
Decodes of plain layers (no window, no softcap) take the C kernel or the cascade path; the
others one "banded" gather over each decode's window.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvserve.attention.merge import attention_with_lse, merge_state
from kvserve.attention.metadata import AttentionMetadata
from kvserve.kv.pool import PagePool
from kvserve.native import paged_attention


@dataclass
class _Chunk:
    q_start: int
    q_end: int
    kv: dict  # window -> (pool slots of the KV positions it reads, bool mask [q_len, len(slots)])


@dataclass
class _BandedDecodes:
    """Decodes over the pages of their window: page rows to gather and the mask as a bias."""
    rows_kv: torch.Tensor  # [Hkv * B * width] rows of the cache viewed as [Hkv * pages, page * D]
    width: int  # tokens gathered per decode
    bias: torch.Tensor  # [1, B, 1, width]: 0 where seen, -inf elsewhere


def band_mask(q_pos: torch.Tensor, kv_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """[len(q_pos), len(kv_pos)]: causal, and within the window if any (kv_pos > q_pos - window)."""
    mask = kv_pos[None, :] <= q_pos[:, None]
    if window is not None:
        mask &= kv_pos[None, :] > q_pos[:, None] - window
    return mask


def attend(q, k, v, scale: float, softcap: float | None, mask=None, causal: bool = False) -> torch.Tensor:
    """q [B, H, L, D], k/v [B, Hkv, S, D] -> [B, H, L, D]; mask a bool [L, S] (True: seen)."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                              scale=scale, enable_gqa=True)
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    scores = torch.tanh(scores / softcap) * softcap
    if mask is None and causal:
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(-1).to(q.dtype), v)


class TorchRefAttention:
    def __init__(self, pool: PagePool, num_heads: int, head_dim: int, scale: float | None = None, *,
                 windows: list[int | None] | None = None, softcap: float | None = None):
        """windows: per layer, a sliding window or None (full attention); softcap: scores become
        softcap * tanh(scores * scale / softcap) before the softmax."""
        self.pool = pool
        self.num_heads = num_heads
        self.scale = scale if scale is not None else head_dim ** -0.5
        self.windows = list(windows) if windows is not None else [None] * pool.k.shape[0]
        self.softcap = softcap
        # layers that need neither a window nor softcapping take the fast decode paths
        self.plain = [w is None and softcap is None for w in self.windows]
        self.mask_windows = set(self.windows)  # the masks a prefill needs, one per distinct window
        self.banded_windows = {w for w, plain in zip(self.windows, self.plain) if not plain}

    def plan(self, meta: AttentionMetadata) -> None:
        device, page = self.pool.k.device, meta.page_size
        q_lens, kv_lens = meta.q_lens(), meta.kv_lens()
        kv_indptr, kv_indices = meta.kv_indptr.long(), meta.kv_indices.long()
        decodes = torch.nonzero(q_lens == 1).flatten()
        self.all_decodes = len(decodes) == meta.batch_size
        # pool slot of every new token: its request's page at its position
        if self.all_decodes:  # one row per request, at its last position (most steps: fewer ops)
            pos = kv_lens - 1
            self.slot_mapping = (kv_indices[kv_indptr[:-1] + pos // page] * page + pos % page).to(device)
            self.decode_rows = decodes.to(device)
        else:
            req = torch.repeat_interleave(torch.arange(meta.batch_size), q_lens)
            pos = kv_lens[req] - q_lens[req] + torch.arange(len(req)) - meta.qo_indptr[:-1].long()[req]
            self.slot_mapping = (kv_indices[kv_indptr[req] + pos // page] * page + pos % page).to(device)
            self.decode_rows = meta.qo_indptr[:-1].long()[decodes].to(device)
        if len(decodes):
            decode_lens = kv_lens if self.all_decodes else kv_lens[decodes]
            if any(self.plain):
                self._plan_decodes(decodes, kv_indptr, kv_indices, decode_lens, page, device)
            self.banded = {w: self._plan_banded(decodes, kv_indptr, kv_indices, decode_lens, page, device, w)
                           for w in self.banded_windows}

        self.chunks, whole = [], {}
        if self.all_decodes:
            self.prompts = []
            return
        qo = meta.qo_indptr.tolist()
        for i in torch.nonzero(q_lens > 1).flatten().tolist():
            q_len, kv_len = int(q_lens[i]), int(kv_lens[i])
            if q_len == kv_len:  # whole prompts of one length run as one batched SDPA call
                whole.setdefault(q_len, []).append(i)
                continue
            q_pos = torch.arange(kv_len - q_len, kv_len)
            kv = {}
            for w in self.mask_windows:  # a window reads from the first position its first query sees
                start = 0 if w is None else max(0, kv_len - q_len - w + 1)
                kv[w] = (meta.token_slots(i, start, kv_len).to(device),
                         band_mask(q_pos, torch.arange(start, kv_len), w).to(device))
            self.chunks.append(_Chunk(qo[i], qo[i + 1], kv))
        self.prompts = [(torch.cat([torch.arange(qo[i], qo[i + 1]) for i in reqs]).to(device),
                         torch.cat([meta.token_slots(i, 0, length) for i in reqs]).to(device), len(reqs), length,
                         {w: band_mask(torch.arange(length), torch.arange(length), w).to(device)
                          for w in self.mask_windows if w is not None and w < length})
                        for length, reqs in whole.items()]

    def _plan_banded(self, decodes, kv_indptr, kv_indices, kv_lens, page, device, window) -> _BandedDecodes:
        """Each decode's pages from the one holding its window's first position (all for None)."""
        num_pages = kv_indptr[decodes + 1] - kv_indptr[decodes]
        first = (kv_lens - window).clamp(min=0) // page if window is not None else torch.zeros_like(kv_lens)
        count = num_pages - first
        width = int(count.max())
        col = torch.arange(width)
        idx = (kv_indptr[decodes][:, None] + first[:, None] + col).clamp(max=len(kv_indices) - 1)
        pages = torch.where(col < count[:, None], kv_indices[idx], 0)  # padding reads page 0, masked
        heads = torch.arange(self.pool.k.shape[1])[:, None] * self.pool.num_pages
        pos = first[:, None] * page + torch.arange(width * page)
        seen = (pos < kv_lens[:, None]) & ((pos > (kv_lens - 1 - window)[:, None]) if window is not None else True)
        bias = torch.zeros(seen.shape).masked_fill_(~seen, float("-inf"))
        return _BandedDecodes((heads + pages.flatten()[None, :]).flatten().to(device), width * page,
                              bias[None, :, None, :].to(device))

    def _plan_decodes(self, decodes, kv_indptr, kv_indices, kv_lens, page, device) -> None:
        """Page rows to gather per decode; pages that every decode shares from the start (a common
        system prompt) are split off and attended once for all of them (cascade attention)."""
        # reading pages in place (a C kernel) beats gathering them, where it can be built; it needs
        # none of the gather plan below
        self.native_decode = (kv_indices.int().contiguous(), kv_indptr[decodes].contiguous(),
                              kv_lens.contiguous()) if paged_attention.available(self.pool.k) else None
        if self.native_decode is not None:
            return
        num_pages = kv_indptr[decodes + 1] - kv_indptr[decodes]
        width = int(num_pages.max())
        col = torch.arange(width)
        idx = (kv_indptr[decodes][:, None] + col).clamp(max=len(kv_indices) - 1)
        pages = torch.where(col < num_pages[:, None], kv_indices[idx], -1)
        shared = 0
        if len(decodes) > 1:  # each keeps at least its own last page
            same = (pages == pages[:1]).all(0)[:int(num_pages.min()) - 1]
            shared = int(same.long().cumprod(0).sum())
        # rows of the cache viewed as [Hkv * num_pages, page * D], head-major
        heads = torch.arange(self.pool.k.shape[1])[:, None] * self.pool.num_pages
        self.shared_rows_kv = (heads + pages[0, :shared]).flatten().to(device) if shared else None
        self.shared_len = shared * page
        own = pages[:, shared:].clamp(min=0)
        self.decode_rows_kv = (heads + own.flatten()[None, :]).flatten().to(device)
        self.decode_shape = (len(decodes), (width - shared) * page)
        self.single_decode_len = int(kv_lens[0]) if len(decodes) == 1 else None
        # one stream whose pages are consecutive (a fresh pool hands them out in order): its K/V
        # are a plain slice of the cache, so nothing needs gathering
        run = pages[0, :int(num_pages[0])]
        consecutive = len(decodes) == 1 and bool((run[1:] - run[:-1] == 1).all())
        self.single_decode_start = int(run[0]) * page if consecutive else None
        valid = torch.arange((width - shared) * page) < (kv_lens - shared * page)[:, None]
        bias = torch.zeros(valid.shape).masked_fill_(~valid, float("-inf"))
        self.decode_bias = bias[None, :, None, :].to(device)  # [1, B, 1, W]

    def run(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, H, D], k/v [T, Hkv, D] of this step's tokens -> attention output [T, H, D]."""
        k_cache, v_cache = self.pool.k[layer], self.pool.v[layer]  # [Hkv, slots, D]
        k_cache.index_copy_(1, self.slot_mapping, k.transpose(0, 1).to(k_cache.dtype))
        v_cache.index_copy_(1, self.slot_mapping, v.transpose(0, 1).to(v_cache.dtype))
        decode = self._decode if self.plain[layer] else self._decode_banded
        if self.all_decodes:
            return decode(q, k_cache, v_cache, layer)
        out = torch.empty_like(q)
        if len(self.decode_rows):
            out[self.decode_rows] = decode(q[self.decode_rows], k_cache, v_cache, layer)
        hkv, d = k_cache.shape[0], k_cache.shape[2]
        window = self.windows[layer]
        for rows, slots, n, length, masks in self.prompts:
            qp = q[rows].view(n, length, -1, d).transpose(1, 2)  # [n, H, L, D]
            kp = k_cache.index_select(1, slots).view(hkv, n, length, d).transpose(0, 1).to(q.dtype)
            vp = v_cache.index_select(1, slots).view(hkv, n, length, d).transpose(0, 1).to(q.dtype)
            op = attend(qp, kp, vp, self.scale, self.softcap, masks.get(window), causal=True)
            out[rows] = op.transpose(1, 2).reshape(n * length, -1, d)
        for c in self.chunks:
            # 4-D inputs: CPU SDPA takes its fast flash path only with a batch dimension
            slots, mask = c.kv[window]
            qc = q[c.q_start:c.q_end].transpose(0, 1)[None]  # [1, H, L, D]
            kc = k_cache.index_select(1, slots).to(q.dtype)[None]
            vc = v_cache.index_select(1, slots).to(q.dtype)[None]
            oc = attend(qc, kc, vc, self.scale, self.softcap, mask)
            out[c.q_start:c.q_end] = oc[0].transpose(0, 1)
        return out

    def _decode_banded(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, layer: int
                       ) -> torch.Tensor:
        """Decodes of a layer with a window or softcapping: each over its window's pages."""
        plan = self.banded[self.windows[layer]]
        hkv, page, d = k_cache.shape[0], self.pool.page_size, k_cache.shape[2]
        batch = q.shape[0]
        kd = k_cache.view(-1, page * d).index_select(0, plan.rows_kv).view(hkv, batch, plan.width, d)
        vd = v_cache.view(-1, page * d).index_select(0, plan.rows_kv).view(hkv, batch, plan.width, d)
        qg = q.view(batch, hkv, -1, d).transpose(0, 1)  # [Hkv, B, group, D]
        scores = torch.matmul(qg, kd.transpose(2, 3).to(q.dtype)).float() * self.scale
        if self.softcap is not None:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        probs = (scores + plan.bias).softmax(-1).to(q.dtype)
        return torch.matmul(probs, vd.to(q.dtype)).transpose(0, 1).reshape(batch, -1, d)

    def _decode_one(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One query token [1, H, D] over its K/V [Hkv, n, D]."""
        hkv, d = k.shape[0], k.shape[2]
        scores = torch.bmm(q.view(hkv, -1, d), k.transpose(1, 2).to(q.dtype))
        probs = (scores.float() * self.scale).softmax(-1).to(q.dtype)
        return torch.bmm(probs, v.to(q.dtype)).view(1, -1, d)

    def _decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, layer: int = 0) -> torch.Tensor:
        """Whole pages are gathered (page_size times fewer indices than tokens). Plain matmuls with
        the query heads of one KV head stacked as rows: CPU SDPA is several times slower in bf16
        for a single query row, and this needs no K/V repeat for GQA."""
        hkv, page, d = k_cache.shape[0], self.pool.page_size, k_cache.shape[2]
        if self.native_decode is not None:
            return paged_attention.decode(q, k_cache, v_cache, *self.native_decode, page, self.scale)
        batch, width = self.decode_shape
        if self.single_decode_start is not None:
            start, n = self.single_decode_start, self.single_decode_len
            return self._decode_one(q, k_cache[:, start:start + n], v_cache[:, start:start + n])
        kd = k_cache.view(-1, page * d).index_select(0, self.decode_rows_kv).view(hkv, batch, width, d)
        vd = v_cache.view(-1, page * d).index_select(0, self.decode_rows_kv).view(hkv, batch, width, d)
        if self.single_decode_len is not None:  # one stream: slice off the padding instead of masking it
            n = self.single_decode_len
            return self._decode_one(q, kd[:, 0, :n], vd[:, 0, :n])
        qg = q.view(batch, hkv, -1, d).transpose(0, 1)  # [Hkv, B, group, D]
        if self.shared_rows_kv is None:
            scores = torch.matmul(qg, kd.transpose(2, 3).to(q.dtype)).float() * self.scale
            probs = (scores + self.decode_bias).softmax(-1).to(q.dtype)
            return torch.matmul(probs, vd.to(q.dtype)).transpose(0, 1).reshape(batch, -1, d)
        out, lse = attention_with_lse(qg, kd.to(q.dtype), vd.to(q.dtype), self.scale, self.decode_bias)
        ks = k_cache.view(-1, page * d).index_select(0, self.shared_rows_kv).view(hkv, self.shared_len, d)
        vs = v_cache.view(-1, page * d).index_select(0, self.shared_rows_kv).view(hkv, self.shared_len, d)
        out_s, lse_s = attention_with_lse(qg.reshape(hkv, -1, d), ks.to(q.dtype), vs.to(q.dtype), self.scale)
        out, _ = merge_state(out, lse, out_s.view(out.shape), lse_s.view(lse.shape))
        return out.transpose(0, 1).reshape(batch, -1, d)
