"""Decode attention over fixed buffers: what a CUDA graph can replay.

A captured graph reads the same tensors (addresses and shapes) at every replay, so the step's page
table is copied into buffers sized once for the largest batch and the longest sequence, and a
batch is padded to a bucket size. Padding rows read and write a scratch page that no request owns.
"""
import torch

from kvserve.native.lists import int_tensor


class StaticDecodeAttention:
    """One query token per sequence. `plan()` fills the buffers from host lists (one copy each);
    `run()` launches only fixed-shape work for the planned bucket. This one gathers every row's
    max_pages pages in PyTorch ops: the CPU's reference of the static path, and a GPU's without
    triton (see kvserve.attention.triton.static for the kernel that reads pages in place)."""

    index_dtype = torch.long  # of the page table, lengths and slots

    def __init__(self, pool, num_heads: int, head_dim: int, max_batch: int, max_pages: int, scratch_page: int,
                 scale: float | None = None, windows: list[int | None] | None = None, softcap: float | None = None):
        self.pool, self.num_heads = pool, num_heads
        self.scale = scale if scale is not None else head_dim ** -0.5
        self.windows = list(windows) if windows is not None else [None] * pool.k.shape[0]
        self.softcap = softcap
        self.max_pages, self.scratch_page = max_pages, scratch_page
        device, page = pool.k.device, pool.page_size
        ints = dict(dtype=self.index_dtype, device=device)
        self.block_table = torch.full((max_batch, max_pages), scratch_page, **ints)
        self.kv_lens = torch.ones(max_batch, **ints)
        self.slots = torch.full((max_batch,), scratch_page * page, **ints)
        # per sliding window, each row's first position to read (its kv_len - window, or 0)
        self.window_starts = {w: torch.zeros(max_batch, **ints) for w in dict.fromkeys(self.windows) if w is not None}
        # what the host last wrote in each row of block_table (a copy of its page list, or _pad)
        self._pad = [scratch_page]
        self._held: list[list[int] | None] = [None] * max_batch
        self.token_offsets = torch.arange(page, device=device)
        self.key_positions = torch.arange(max_pages * page, device=device)

    def plan(self, page_tables: list[list[int]], kv_lens: list[int], bucket: int) -> None:
        """Sequence i (of len(kv_lens) <= bucket) has kv_lens[i] tokens, its new one included, in
        page_tables[i]; rows past them up to bucket are padding. Only the columns in use are
        written: those past a row's length keep earlier (valid) page ids, which no kernel reads
        unmasked. Pages given back before a sliding window (-1) point at the scratch page.
        Between decode steps a row's pages mostly stay as they were: the host keeps what each row
        of block_table holds and writes only the rows whose page list changed (a new page, a
        different sequence in that row), in one indexed copy."""
        page, n, scratch = self.pool.page_size, len(kv_lens), self.scratch_page
        held, changed = self._held, []
        for i, pages in enumerate(page_tables):
            if held[i] != pages:
                changed.append(i)
        pad = self._pad
        for i in range(n, bucket):  # padding rows read one token of the scratch page
            if held[i] is not pad:
                changed.append(i)
        if changed:
            self._write_rows(changed, page_tables, n)
        slots = [pages[(length - 1) // page] * page + (length - 1) % page for pages, length in zip(page_tables, kv_lens)]
        dtype, extra = self.index_dtype, bucket - n
        self.kv_lens[:bucket].copy_(int_tensor(kv_lens + [1] * extra, dtype), non_blocking=True)
        self.slots[:bucket].copy_(int_tensor(slots + [scratch * page] * extra, dtype), non_blocking=True)
        for w, starts in self.window_starts.items():
            starts[:bucket].copy_(int_tensor([max(0, length - w) for length in kv_lens] + [0] * extra, dtype),
                                  non_blocking=True)

    def _write_rows(self, rows: list[int], page_tables: list[list[int]], n: int) -> None:
        """block_table rows <- their pages (-1: the scratch page), up to max_pages columns, in one copy."""
        scratch, held, limit = self.scratch_page, self._held, self.max_pages
        values = [page_tables[i] if i < n else self._pad for i in rows]
        width = max(min(len(v), limit) for v in values) or 1
        flat = []
        for i, pages in zip(rows, values):
            row = pages[:limit]
            flat += row
            if len(row) < width:
                flat += [scratch] * (width - len(row))
            held[i] = pages if i >= n else list(pages)  # a copy: the sequence's own list grows in place
        if min(flat) < 0:
            flat = [p if p >= 0 else scratch for p in flat]
        table = int_tensor(flat, self.index_dtype).view(len(rows), width)
        if len(rows) == rows[-1] - rows[0] + 1:  # consecutive rows (a whole batch): a slice
            self.block_table[rows[0]:rows[-1] + 1, :width].copy_(table, non_blocking=True)
        else:
            index = int_tensor(rows).to(self.block_table.device, non_blocking=True)
            self.block_table[:, :width].index_copy_(0, index, table.to(self.block_table.device, non_blocking=True))

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
        if self.softcap:
            scores = self.softcap * torch.tanh(scores / self.softcap)
        hidden = self.key_positions >= self.kv_lens[:batch, None]  # [B, L]
        window = self.windows[layer]
        if window is not None:
            hidden |= self.key_positions < self.window_starts[window][:batch, None]
        probs = scores.masked_fill(hidden[None, :, None, :], float("-inf")).softmax(-1).to(q.dtype)
        return torch.matmul(probs, vd).transpose(0, 1).reshape(batch, -1, d)
