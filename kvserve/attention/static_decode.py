"""Decode attention over fixed buffers: what a CUDA graph can replay.

A captured graph reads the same tensors (addresses and shapes) at every replay, so the step's page
table is copied into buffers sized once for the largest batch and the longest sequence, and a
batch is padded to a bucket size. Padding rows read and write a scratch page that no request owns.
"""
import torch


class StaticDecodeAttention:
    """One query token per sequence. `plan()` fills the buffers from host lists (one copy each);
    `run()` launches only fixed-shape work for the planned bucket. This one gathers every row's
    max_pages pages in PyTorch ops: the CPU's reference of the static path, and a GPU's without
    triton (see kvserve.attention.triton.static for the kernel that reads pages in place)."""

    index_dtype = torch.long  # of the page table, lengths and slots

    def __init__(self, pool, num_heads: int, head_dim: int, max_batch: int, max_pages: int, scratch_page: int,
                 scale: float | None = None, *, windows: list[int | None] | None = None, softcap: float | None = None):
        if softcap is not None or any(w is not None for w in windows or ()):
            raise NotImplementedError("StaticDecodeAttention: sliding windows and softcapping are not implemented")
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
        page_tables[i]; rows past them up to bucket are padding. Only the columns in use are
        written: those past a row's length keep earlier (valid) page ids, which no kernel reads
        unmasked."""
        page, n, scratch = self.pool.page_size, len(kv_lens), self.scratch_page
        used = [-(-length // page) for length in kv_lens]
        width = max(used, default=1)
        pad = [scratch] * width
        table = [pages[:u] + pad[u:] for pages, u in zip(page_tables, used)] + [pad] * (bucket - n)
        slots = [pages[(length - 1) // page] * page + (length - 1) % page for pages, length in zip(page_tables, kv_lens)]
        self.block_table[:bucket, :width].copy_(torch.tensor(table, dtype=self.index_dtype), non_blocking=True)
        self.kv_lens[:bucket].copy_(torch.tensor(kv_lens + [1] * (bucket - n), dtype=self.index_dtype),
                                    non_blocking=True)
        self.slots[:bucket].copy_(torch.tensor(slots + [scratch * page] * (bucket - n), dtype=self.index_dtype),
                                  non_blocking=True)

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
