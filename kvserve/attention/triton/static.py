"""The static decode buffers read in place by the Triton decode kernel: one program per (row, KV
head) over a fixed grid, so a CUDA graph of a bucket replays for any lengths and pages.

No split-KV here (a graph's grid cannot change with the lengths): the executor leaves steps that
would want splits, a few long sequences, to the eager TritonAttention."""
import math

import torch
import triton

from kvserve.attention.static_decode import StaticDecodeAttention
from kvserve.attention.triton.backend import _rows, device_sm_count
from kvserve.attention.triton.cache_write import write_kv
from kvserve.attention.triton.config import Tiles
from kvserve.attention.triton.decode import decode_kernel
from kvserve.attention.triton.plan import choose_kv_chunk


class TritonStaticDecode(StaticDecodeAttention):
    index_dtype = torch.int32

    def __init__(self, pool, num_heads: int, head_dim: int, max_batch: int, max_pages: int, scratch_page: int,
                 scale: float | None = None, windows: list[int | None] | None = None, softcap: float | None = None,
                 groups=None):
        super().__init__(pool, num_heads, head_dim, max_batch, max_pages, scratch_page, scale, windows, softcap,
                         groups)
        device = pool.k.device
        self.rows = torch.arange(max_batch, dtype=torch.int32, device=device)  # item = request = output row
        self.starts = torch.zeros(max_batch, dtype=torch.int32, device=device)
        self.page_starts = self.rows * max_pages  # row i's pages in its group's flattened block table
        self.num_kv_heads = pool.k.shape[1]
        self.group = num_heads // self.num_kv_heads
        self.tiles = Tiles.default(pool.k.dtype, head_dim)
        self.num_sms = device_sm_count(device)

    def prefers_eager(self, kv_lens: list[int]) -> bool:
        """Where TritonAttention would split the sequences (few and long), its eager step beats a
        graph of one program per (row, KV head)."""
        return choose_kv_chunk(torch.tensor(kv_lens), self.num_kv_heads, self.num_sms, self.tiles.decode_block_n) \
            is not None

    def run(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        batch = q.shape[0]
        group, slot = self.route[layer]
        k_cache, v_cache = self.pool.k[slot], self.pool.v[slot]
        write_kv(_rows(k), _rows(v), k_cache, v_cache, self.slots[group, :batch])
        q = _rows(q)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        d, t = q.shape[2], self.tiles
        window = self.windows[layer]  # a windowed layer's rows start at its window (filled by plan)
        starts = self.starts if window is None else self.window_starts[window]
        decode_kernel[(batch, self.num_kv_heads)](
            q, k_cache, v_cache, out, out, self.rows, starts, self.kv_lens, self.rows, self.page_starts,
            self.block_table[group], q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
            out.stride(0), out.stride(1), 0, self.scale * math.log2(math.e),
            GROUP=self.group, BLOCK_G=max(16, triton.next_power_of_2(self.group)), D=d,
            BLOCK_D=triton.next_power_of_2(d), BLOCK_N=t.decode_block_n, PAGE_SIZE=self.pool.page_size,
            SPLIT=False, DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32", SOFTCAP=float(self.softcap or 0.0),
            num_warps=t.decode_warps, num_stages=t.decode_stages)
        return out
