"""Decode attention over fixed buffers: what a CUDA graph can replay.

A captured graph reads the same tensors (addresses and shapes) at every replay, so the step's page
table is copied into buffers sized once for the largest batch and the longest sequence, and a
batch is padded to a bucket size. Padding rows read and write a scratch page that no request owns.
"""
from itertools import chain

import torch


class StaticDecodeAttention:
    """One query token per sequence. `plan()` fills the buffers from host lists (one copy each);
    `run()` launches only fixed-shape work for the planned bucket. This one gathers every row's
    max_pages pages in PyTorch ops: the CPU's reference of the static path, and a GPU's without
    triton (see kvserve.attention.triton.static for the kernel that reads pages in place)."""

    index_dtype = torch.long  # of the page table, lengths and slots

    def __init__(self, pool, num_heads: int, head_dim: int, max_batch: int, max_pages: int, scratch_page: int,
                 scale: float | None = None):
        self.pool, self.num_heads = pool, num_heads
        self.scale = scale if scale is not None else head_dim ** -0.5
        self.max_pages, self.scratch_page = max_pages, scratch_page
        device, page = pool.k.device, pool.page_size
        ints = dict(dtype=self.index_dtype, device=device)
        self.block_table = torch.full((max_batch, max_pages), scratch_page, **ints)
        self.kv_lens = torch.ones(max_batch, **ints)
        self.slots = torch.full((max_batch,), scratch_page * page, **ints)
        self.token_offsets = torch.arange(page, device=device)
        self.key_positions = torch.arange(max_pages * page, device=device)

    def plan(self, page_tables: list[list[int]], kv_lens: list[int], bucket: int) -> None:
        """Sequence i (of len(kv_lens) <= bucket) has kv_lens[i] tokens, its new one included, in
        page_tables[i]; rows past them up to bucket are padding."""
        page, n = self.pool.page_size, len(kv_lens)
        used = torch.tensor([-(-length // page) for length in kv_lens], dtype=torch.long)
        table = torch.full((bucket, self.max_pages), self.scratch_page, dtype=torch.long)
        table[:n][torch.arange(self.max_pages) < used[:, None]] = torch.tensor(
            list(chain.from_iterable(pages[:u] for pages, u in zip(page_tables, used.tolist()))), dtype=torch.long)
        lens = torch.ones(bucket, dtype=torch.long)
        lens[:n] = torch.tensor(kv_lens, dtype=torch.long)
        last = lens - 1  # the new token's position; padding rows write the scratch page's first slot
        slots = table.gather(1, (last // page)[:, None]).squeeze(1) * page + last % page
        self.block_table[:bucket].copy_(table, non_blocking=True)
        self.kv_lens[:bucket].copy_(lens, non_blocking=True)
        self.slots[:bucket].copy_(slots, non_blocking=True)

    def prefers_eager(self, kv_lens: list[int]) -> bool:
        """Whether a dynamic backend would run this step better (e.g. by splitting long sequences)."""
        return False

    def run(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [B, H, D], k/v [B, Hkv, D] of the bucket's rows -> [B, H, D]."""
        batch, d = q.shape[0], q.shape[2]
        k_cache, v_cache = self.pool.k[layer], self.pool.v[layer]  # [Hkv, slots, D]
        slots = self.slots[:batch]
        k_cache.index_copy_(1, slots, k.transpose(0, 1).to(k_cache.dtype))
        v_cache.index_copy_(1, slots, v.transpose(0, 1).to(v_cache.dtype))
        hkv = k_cache.shape[0]
        rows = (self.block_table[:batch, :, None] * self.pool.page_size + self.token_offsets).flatten()
        kd = k_cache.index_select(1, rows).view(hkv, batch, -1, d).to(q.dtype)  # [Hkv, B, L, D]
        vd = v_cache.index_select(1, rows).view(hkv, batch, -1, d).to(q.dtype)
        qg = q.view(batch, hkv, -1, d).transpose(0, 1)  # [Hkv, B, group, D]
        scores = torch.matmul(qg, kd.transpose(2, 3)).float() * self.scale
        past = self.key_positions >= self.kv_lens[:batch, None]  # [B, L]
        probs = scores.masked_fill(past[None, :, None, :], float("-inf")).softmax(-1).to(q.dtype)
        return torch.matmul(probs, vd).transpose(0, 1).reshape(batch, -1, d)
