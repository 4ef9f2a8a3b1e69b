"""Decode attention over fixed buffers: what a CUDA graph can replay.

A captured graph reads the same tensors (addresses and shapes) at every replay, so the step's page
tables are copied into buffers sized once for the largest batch and the longest sequence, and a
batch is padded to a bucket size. Padding rows read and write a scratch page that no request owns.
A model with several KV groups (kvserve/kv/groups.py: Gemma 3's local and global layers) has one
block table and one slot buffer per group; layer l reads its group's and the pool's slot of l.
"""
import torch

from kvserve.kv.groups import KVGroups
from kvserve.native.lists import int_tensor


class StaticDecodeAttention:
    """One query token per sequence. `plan()` fills the buffers from host lists (one copy each);
    `run()` launches only fixed-shape work for the planned bucket. This one gathers every row's
    max_pages pages in PyTorch ops: the CPU's reference of the static path, and a GPU's without
    triton (see kvserve.attention.triton.static for the kernel that reads pages in place)."""

    index_dtype = torch.long  # of the page table, lengths and slots

    def __init__(self, pool, num_heads: int, head_dim: int, max_batch: int, max_pages: int, scratch_page: int,
                 scale: float | None = None, windows: list[int | None] | None = None, softcap: float | None = None,
                 groups: KVGroups | None = None):
        """windows: per model layer (None: full). groups: the pool's KV groups; None: one group whose
        slots are the model's layers (a pool of one page table)."""
        self.pool, self.num_heads = pool, num_heads
        self.scale = scale if scale is not None else head_dim ** -0.5
        self.groups = groups or KVGroups([None], [list(range(pool.k.shape[0]))], pool.k.shape[0])
        num_layers = sum(len(layers) for layers in self.groups.layers)
        self.windows = list(windows) if windows is not None else [None] * num_layers
        self.route = list(zip(self.groups.group_of, self.groups.slot_of))  # layer -> (group, pool slot)
        self.softcap = softcap
        self.max_pages, self.scratch_page = max_pages, scratch_page
        device, page, num_groups = pool.k.device, pool.page_size, len(self.groups)
        ints = dict(dtype=self.index_dtype, device=device)
        self.block_table = torch.full((num_groups, max_batch, max_pages), scratch_page, **ints)
        self.kv_lens = torch.ones(max_batch, **ints)
        self.slots = torch.full((num_groups, max_batch), scratch_page * page, **ints)
        # per sliding window, each row's first position to read (its kv_len - window, or 0)
        self.window_starts = {w: torch.zeros(max_batch, **ints) for w in dict.fromkeys(self.windows) if w is not None}
        # per group, what the host last wrote in each row of its block table (a copy of the page list, or _pad)
        self._pad = [scratch_page]
        self._held: list[list[list[int] | None]] = [[None] * max_batch for _ in range(num_groups)]
        self.token_offsets = torch.arange(page, device=device)
        self.key_positions = torch.arange(max_pages * page, device=device)

    def plan(self, tables: list[list[list[int]]], kv_lens: list[int], bucket: int) -> None:
        """Sequence i (of len(kv_lens) <= bucket) has kv_lens[i] tokens, its new one included, in
        its page table of each KV group, tables[i] (Sequence.tables); rows past them up to bucket
        are padding. Between decode steps a row's pages mostly stay as they were: the host keeps
        what each row holds and writes only the rows whose page list changed (a new page, a page
        given back, another sequence in that row). Pages given back before a window (-1) point at
        the scratch page."""
        page, n, scratch, extra = self.pool.page_size, len(kv_lens), self.scratch_page, bucket - len(kv_lens)
        slots = []
        for g, window in enumerate(self.groups.windows):
            held = self._held[g]
            changed = [i for i, t in enumerate(tables) if held[i] != t[g]]
            changed += [i for i in range(n, bucket) if held[i] is not self._pad]  # padding: the scratch page
            if changed:
                self._write_rows(g, window, changed, tables, kv_lens)
            slots += [t[g][(length - 1) // page] * page + (length - 1) % page for t, length in zip(tables, kv_lens)]
            slots += [scratch * page] * extra
        dtype = self.index_dtype
        self.kv_lens[:bucket].copy_(int_tensor(kv_lens + [1] * extra, dtype), non_blocking=True)
        self.slots[:, :bucket].copy_(int_tensor(slots, dtype).view(len(self.groups), bucket), non_blocking=True)
        for w, starts in self.window_starts.items():
            starts[:bucket].copy_(int_tensor([max(0, length - w) for length in kv_lens] + [0] * extra, dtype),
                                  non_blocking=True)

    def _write_rows(self, g: int, window: int | None, rows: list[int], tables, kv_lens: list[int]) -> None:
        """Group g's block-table rows <- their pages (-1: the scratch page), in one copy. Only the
        columns in use are written: those past a row's length, and a windowed group's before every
        written row's window, keep earlier (valid) page ids, which no kernel reads unmasked; so a
        long sequence costs a window's pages in a windowed group's table."""
        n, page, limit, held = len(kv_lens), self.pool.page_size, self.max_pages, self._held[g]
        values = [tables[i][g] if i < n else self._pad for i in rows]
        lo = 0 if window is None else min(max(0, kv_lens[i] - window) // page if i < n else 0 for i in rows)
        width = max(max(min(len(v), limit) for v in values), lo + 1)
        flat = []
        for i, pages in zip(rows, values):
            row = pages[lo:limit]
            flat += row
            flat += [self.scratch_page] * (width - lo - len(row))
            held[i] = pages if i >= n else list(pages)  # a copy: the sequence's own list grows in place
        if min(flat) < 0:
            flat = [p if p >= 0 else self.scratch_page for p in flat]
        block = int_tensor(flat, self.index_dtype).view(len(rows), width - lo)
        if len(rows) == rows[-1] - rows[0] + 1:  # consecutive rows (a whole batch): a slice
            self.block_table[g, rows[0]:rows[-1] + 1, lo:width].copy_(block, non_blocking=True)
        else:
            index = int_tensor(rows).to(self.block_table.device, non_blocking=True)
            self.block_table[g, :, lo:width].index_copy_(0, index, block.to(self.block_table.device, non_blocking=True))

    def prefers_eager(self, kv_lens: list[int]) -> bool:
        """Whether a dynamic backend would run this step better (e.g. by splitting long sequences)."""
        return False

    def run(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [B, H, D], k/v [B, Hkv, D] of the bucket's rows -> [B, H, D]."""
        batch, d = q.shape[0], q.shape[2]
        group, slot = self.route[layer]
        k_cache, v_cache = self.pool.k[slot], self.pool.v[slot]  # [Hkv, slots, D]
        slots = self.slots[group, :batch]
        k_cache.index_copy_(1, slots, k.transpose(0, 1).to(k_cache.dtype))
        v_cache.index_copy_(1, slots, v.transpose(0, 1).to(v_cache.dtype))
        hkv = k_cache.shape[0]
        rows = (self.block_table[group, :batch, :, None] * self.pool.page_size + self.token_offsets).flatten()
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
