"""Decode attention over fixed buffers: what a CUDA graph can replay.

A captured graph reads the same tensors (addresses and shapes) at every replay, so the step's page
tables are copied into buffers sized once for the largest batch and the longest sequence, and a
batch is padded to a bucket size. Padding rows read and write a scratch page that no request owns.
A model with several KV groups (kvserve/kv/groups.py: Gemma 3's local and global layers) has one
block table and one slot buffer per group; layer l reads its group's and the pool's slot of l.
"""
import torch

from kvserve.kv.groups import KVGroups


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
        self.token_offsets = torch.arange(page, device=device)
        self.key_positions = torch.arange(max_pages * page, device=device)

    def plan(self, tables: list[list[list[int]]], kv_lens: list[int], bucket: int) -> None:
        """Sequence i (of len(kv_lens) <= bucket) has kv_lens[i] tokens, its new one included, in
        its page table of each KV group, tables[i] (Sequence.tables); rows past them up to bucket
        are padding. Only the columns in use are written: those past a row's length, and a windowed
        group's before the window of every row, keep earlier (valid) page ids, which no kernel reads
        unmasked; so a long sequence costs a window's pages in a windowed group's table. Pages given
        back before a window (-1) point at the scratch page."""
        page, n, scratch = self.pool.page_size, len(kv_lens), self.scratch_page
        used = [-(-length // page) for length in kv_lens]
        width = max(used, default=1)
        flat, blocks, slots = [], [], []  # every group's block in one host list: one tensor made
        for g, window in enumerate(self.groups.windows):
            firsts = [0 if window is None else max(0, length - window) // page for length in kv_lens]
            lo = min(firsts, default=0)
            pad = [scratch] * (width - lo)
            for t, f, u in zip(tables, firsts, used):
                flat += pad[:f - lo]
                flat += [p if p >= 0 else scratch for p in t[g][f:u]]
                flat += pad[u - lo:]
            flat += pad * (bucket - n)
            blocks.append((lo, bucket * (width - lo)))
            slots += [t[g][(length - 1) // page] * page + (length - 1) % page for t, length in zip(tables, kv_lens)]
            slots += [scratch * page] * (bucket - n)
        host, at = torch.tensor(flat, dtype=self.index_dtype), 0
        for g, (lo, size) in enumerate(blocks):
            self.block_table[g, :bucket, lo:width].copy_(host[at:at + size].view(bucket, width - lo), non_blocking=True)
            at += size
        self.kv_lens[:bucket].copy_(torch.tensor(kv_lens + [1] * (bucket - n), dtype=self.index_dtype),
                                    non_blocking=True)
        self.slots[:, :bucket].copy_(torch.tensor(slots, dtype=self.index_dtype).view(len(self.groups), bucket),
                                     non_blocking=True)
        for w, starts in self.window_starts.items():
            starts[:bucket].copy_(torch.tensor([max(0, length - w) for length in kv_lens] + [0] * (bucket - n),
                                               dtype=self.index_dtype), non_blocking=True)

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
