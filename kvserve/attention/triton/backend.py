"""TritonAttention: a drop-in for TorchRefAttention on GPUs (and on the CPU under TRITON_INTERPRET=1).

plan(meta) once per step works out the work lists on the host and uploads them in one copy;
run(layer, q, k, v) per layer only launches kernels: the K/V write, decode (split-KV where the
batch is too small to fill the GPU, then an LSE merge), prefill/append tiles and, where every
decode shares leading pages, the cascade pass over them."""
import math

import torch
import triton

from kvserve.attention.metadata import AttentionMetadata
from kvserve.attention.triton.cache_write import rope_write_kv, write_kv
from kvserve.attention.triton.config import Tiles
from kvserve.attention.triton.decode import decode_kernel, merge_kernel
from kvserve.attention.triton.plan import StepPlan, plan_step
from kvserve.attention.triton.prefill import prefill_kernel
from kvserve.kv.pool import PagePool

DEFAULT_NUM_SMS = 132  # an H100/H200; the real count is read where a GPU is present
ALIGN = 32  # int32 elements: 128 bytes


class TritonAttention:
    def __init__(self, pool: PagePool, num_heads: int, head_dim: int, scale: float | None = None, *,
                 num_sms: int | None = None, kv_chunk_size: int | None = None, cascade_min_len: int = 256,
                 tiles: Tiles | None = None, windows: list[int | None] | None = None, softcap: float | None = None):
        if softcap is not None or any(w is not None for w in windows or ()):
            raise NotImplementedError("TritonAttention: sliding windows and softcapping are not implemented")
        self.pool = pool
        self.num_heads = num_heads
        self.num_kv_heads = pool.k.shape[1]
        self.head_dim = head_dim
        assert num_heads % self.num_kv_heads == 0, "query heads must be a multiple of KV heads"
        self.group = num_heads // self.num_kv_heads
        self.scale = scale if scale is not None else head_dim ** -0.5
        device = pool.k.device
        self.num_sms = num_sms or device_sm_count(device)
        self.kv_chunk_size = kv_chunk_size
        self.cascade_min_len = cascade_min_len
        self.tiles = tiles or Tiles.default(pool.k.dtype, head_dim)
        self.block_d = triton.next_power_of_2(head_dim)
        self._part_out = self._part_lse = self._ints = None
        self.plan_info: StepPlan | None = None

    def plan(self, meta: AttentionMetadata) -> None:
        assert meta.page_size == self.pool.page_size
        p = plan_step(meta, self.num_kv_heads, self.group, self.num_sms, block_m=self.tiles.prefill_block_m,
                      block_n=self.tiles.decode_block_n,
                      kv_chunk_size=self.kv_chunk_size, cascade_min_len=self.cascade_min_len)
        self.plan_info = p
        device = self.pool.k.device
        # one host buffer, one upload into a device buffer kept across steps: every int array of
        # the step a view of it, each starting on a 128-byte boundary (triton specializes kernels
        # on pointer alignment; unaligned views would compile new variants mid-serving)
        names = list(p.arrays)
        starts, total = [], 0
        for n in names:
            starts.append(total)
            total += -(-len(p.arrays[n]) // ALIGN) * ALIGN
        host = torch.zeros(total, dtype=torch.int32, pin_memory=device.type == "cuda")
        for n, start in zip(names, starts):
            host[start:start + len(p.arrays[n])] = p.arrays[n]
        self._ints = _grow(self._ints, (total,), torch.int32, device)
        self._ints[:total].copy_(host, non_blocking=True)
        self._host_ints = host  # alive until the next plan: the copy may still be reading it
        self.buf = {n: self._ints[start:start + len(p.arrays[n])] for n, start in zip(names, starts)}
        if p.split:  # partial states: the decode items, then one per decode for a shared prefix
            rows = p.num_items + (p.num_decodes if p.shared_len else 0)
            self._part_out = _grow(self._part_out, (rows, self.num_heads, self.head_dim), torch.float32, device)
            self._part_lse = _grow(self._part_lse, (rows, self.num_heads), torch.float32, device)

    def run(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, H, D], k/v [T, Hkv, D] of this step's tokens -> attention output [T, H, D]."""
        self.write_kv(layer, k, v)
        return self.attend(layer, q)

    def run_with_rope(self, layer: int, qk: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                      signed_sin: torch.Tensor) -> torch.Tensor:
        """run() with the rotary embedding fused into the K/V write: qk [T, H + Hkv, D] are the q
        then k heads before RoPE, cos/signed_sin what RotaryEmbedding.table gives."""
        q = rope_write_kv(_rows(qk), _rows(v), cos, signed_sin, self.pool.k[layer], self.pool.v[layer],
                          self.buf["slots"], self.num_heads)
        return self.attend(layer, q)

    def write_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        write_kv(_rows(k), _rows(v), self.pool.k[layer], self.pool.v[layer], self.buf["slots"])

    def attend(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """Attention of q over the pages (the step's K/V already written)."""
        p, b = self.plan_info, self.buf
        q = _rows(q)
        k_cache, v_cache = self.pool.k[layer], self.pool.v[layer]
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        prec = "ieee" if q.dtype == torch.float32 else "tf32"  # tf32 only ever applies to fp32 dots
        scale_log2 = self.scale * math.log2(math.e)
        d, bd, t = self.head_dim, self.block_d, self.tiles
        cache_strides = (k_cache.stride(0), k_cache.stride(1))
        if p.num_prefill_tiles:
            prefill_kernel[(p.num_prefill_tiles, self.num_kv_heads)](
                q, k_cache, v_cache, out, out, b["tile_req"], b["tile_m0"], b["pre_q0"], b["pre_qlen"],
                b["pre_kv"], b["pre_page0"], b["kv_indices"], q.stride(0), q.stride(1), *cache_strides,
                out.stride(0), out.stride(1), 0, scale_log2, GROUP=self.group, D=d, BLOCK_D=bd,
                BLOCK_M=t.prefill_block_m, BLOCK_N=t.prefill_block_n, PAGE_SIZE=self.pool.page_size,
                CAUSAL=True, WRITE_LSE=False, DOT_PREC=prec, num_warps=t.prefill_warps,
                num_stages=t.prefill_stages)
        if not p.num_decodes:
            return out
        block_g = max(16, triton.next_power_of_2(self.group))
        if p.split:
            part_out, part_lse = self._part_out, self._part_lse
            dst, dst_strides = part_out, (part_out.stride(0), part_out.stride(1), part_lse.stride(0))
        else:
            dst, part_lse, dst_strides = out, out, (out.stride(0), out.stride(1), 0)
        decode_kernel[(p.num_items, self.num_kv_heads)](
            q, k_cache, v_cache, dst, part_lse, b["item_req"], b["item_start"], b["item_end"],
            b["dec_row"], b["dec_page0"], b["kv_indices"], q.stride(0), q.stride(1), *cache_strides,
            *dst_strides, scale_log2, GROUP=self.group, BLOCK_G=block_g, D=d, BLOCK_D=bd,
            BLOCK_N=t.decode_block_n, PAGE_SIZE=self.pool.page_size, SPLIT=p.split, DOT_PREC=prec,
            num_warps=t.decode_warps, num_stages=t.decode_stages)
        if not p.split:
            return out
        if p.shared_len:  # the shared prefix, once for all decodes, into partial rows num_items + i
            shared_out, shared_lse = part_out[p.num_items:], part_lse[p.num_items:]
            t0 = p.num_prefill_tiles
            prefill_kernel[(p.num_cascade_tiles, self.num_kv_heads)](
                q, k_cache, v_cache, shared_out, shared_lse, b["tile_req"][t0:], b["tile_m0"][t0:],
                b["pre_q0"], b["pre_qlen"], b["pre_kv"], b["pre_page0"], b["kv_indices"],
                q.stride(0), q.stride(1), *cache_strides, shared_out.stride(0), shared_out.stride(1),
                shared_lse.stride(0), scale_log2, GROUP=self.group, D=d, BLOCK_D=bd,
                BLOCK_M=t.prefill_block_m, BLOCK_N=t.prefill_block_n, PAGE_SIZE=self.pool.page_size,
                CAUSAL=False, WRITE_LSE=True, DOT_PREC=prec, num_warps=t.prefill_warps,
                num_stages=t.prefill_stages)
        merge_kernel[(p.num_decodes, self.num_heads)](
            part_out, part_lse, out, b["dec_row"], b["merge_indptr"], part_out.stride(0),
            part_out.stride(1), part_lse.stride(0), out.stride(0), out.stride(1), p.num_items,
            D=d, BLOCK_D=bd, MAX_PARTS=triton.next_power_of_2(p.max_parts), HAS_SHARED=p.shared_len > 0,
            num_warps=1)
        return out


def device_sm_count(device: torch.device) -> int:
    """Streaming multiprocessors the kernels' work is spread over (a default without a GPU)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" \
        else DEFAULT_NUM_SMS


def _rows(x: torch.Tensor) -> torch.Tensor:
    """Kernels take any row and head strides but a contiguous head dim."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _grow(buf, shape, dtype, device):
    """A scratch buffer kept across steps (stable addresses, no allocation per step), grown on demand."""
    rows = shape[0]
    if buf is None or buf.shape[0] < rows:
        buf = torch.empty((max(rows, 2 * (0 if buf is None else buf.shape[0])),) + shape[1:],
                          dtype=dtype, device=device)
    return buf
