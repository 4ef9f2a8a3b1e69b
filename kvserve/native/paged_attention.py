"""paged_attention.c from PyTorch: decode attention that reads each sequence's K/V from its pages in
place, for TorchRefAttention's decodes on the CPU."""
import ctypes
from functools import cache

import torch

from kvserve import native

_ptr, _i64 = ctypes.c_void_p, ctypes.c_int64


@cache
def _kernel():
    return native.function("paged_attention", "paged_decode_attention", _i64,
                           [_ptr, _ptr, _ptr, _i64, _i64, _i64, _i64, _i64, _i64, ctypes.c_float, ctypes.c_float,
                            _i64, _ptr, _ptr, _ptr, _i64, _ptr, _i64])


@cache
def _topk_kernel():
    return native.function("paged_attention", "topk_decode_attention", _i64,
                           [_ptr, _ptr, _ptr, _i64, _i64, _i64, _i64, _i64, ctypes.c_float, ctypes.c_float, _ptr,
                            _i64, _i64, _i64, _i64, _i64, _ptr])


def available(cache_tensor: torch.Tensor) -> bool:
    return (cache_tensor.device.type == "cpu" and cache_tensor.dtype in (torch.float32, torch.bfloat16)
            and _kernel() is not None)


def decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
           page_starts: torch.Tensor, kv_lens: torch.Tensor, page_size: int, scale: float,
           window: int | None = None, softcap: float | None = None, sink: int = 0) -> torch.Tensor:
    """q [B, H, D] -> [B, H, D] in q's dtype. Caches [Hkv, S, D] (one layer's); sequence b attends its
    first kv_lens[b] positions, in pages page_table[page_starts[b]:] (int32, int64, int64).
    window: only the last `window` of them (a sliding window; pages before it are never read, so
    they may be -1). softcap: scores = softcap * tanh(scores / softcap) after the scale. sink: with a
    window, the first `sink` positions too (StreamingLLM; the pages between may be -1 as well)."""
    b, h, d = q.shape
    hkv, slots = k_cache.shape[0], k_cache.shape[1]
    qf = q.float().contiguous()
    out = torch.empty_like(qf)
    if _kernel()(qf.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), int(k_cache.dtype == torch.bfloat16), slots,
                 b, h, hkv, d, scale, softcap or 0.0, window or 0, page_table.data_ptr(), page_starts.data_ptr(),
                 kv_lens.data_ptr(), page_size, out.data_ptr(), sink):
        raise MemoryError("paged_decode_attention could not allocate its scores")
    return out.to(q.dtype)


def topk_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pages: torch.Tensor, kv_len: int,
                start: int, end: int, k: int, page_size: int, scale: float, softcap: float | None = None) -> torch.Tensor:
    """The topk policy's decode of one sequence: q [H, D] -> [H, D] float32. Each head attends
    positions [0, start) and [end, kv_len), and its k highest-scoring positions of [start, end), in
    one softmax; K/V read in place from pages (int32, covering kv_len) of the caches [Hkv, S, D]."""
    h, d = q.shape
    qf = q.float().contiguous()
    out = torch.empty_like(qf)
    if _topk_kernel()(qf.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), int(k_cache.dtype == torch.bfloat16),
                      k_cache.shape[1], h, k_cache.shape[0], d, scale, softcap or 0.0, pages.data_ptr(), page_size,
                      kv_len, start, end, k, out.data_ptr()):
        raise MemoryError("topk_decode_attention could not allocate its scores")
    return out
