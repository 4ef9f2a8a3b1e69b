"""sampling.c from PyTorch: one token per row of float32 CPU logits, drawn by inverse CDF from given
uniforms after temperature, top-k, top-p and min-p (ties at a cut kept)."""
import ctypes
import threading
from functools import cache

import torch

from kvserve import native

_ptr, _i64 = ctypes.c_void_p, ctypes.c_int64
_BLOCK = 64  # sampling.c's BLOCK


@cache
def _kernel():
    return native.function("sampling", "sample_rows", None,
                           [_ptr, _i64, _ptr, _i64, _i64, _ptr, _ptr, _ptr, _i64, _ptr])


@cache
def _threads() -> int:
    return native.function("sampling", "sampling_threads", _i64, [])()


_local = threading.local()  # .work: this thread's scratch of its last call, reused while large enough


def sample_rows(logits: torch.Tensor, params: torch.Tensor, uniforms: torch.Tensor,
                index: torch.Tensor | None = None) -> torch.Tensor | None:
    """Token ids [R] (int64) for logits rows index (all rows when None). params: [R, 4] float64 of
    temperature (> 0), top_k (<= 0 or >= vocab: off), top_p (1: off), min_p; uniforms: [R] float32
    in [0, 1). None (and nothing done) where the kernel cannot run: no compiler, other tensors."""
    rows = logits.shape[0] if index is None else index.shape[0]
    if (_kernel() is None or logits.device.type != "cpu" or logits.dtype != torch.float32 or logits.dim() != 2
            or logits.stride(1) != 1 or params.dtype != torch.float64 or params.shape != (rows, 4)
            or not params.is_contiguous() or uniforms.dtype != torch.float32 or uniforms.shape != (rows,)
            or not uniforms.is_contiguous()
            or (index is not None and (index.dtype != torch.int64 or not index.is_contiguous()))):
        return None
    vocab = logits.shape[1]
    stride = 3 * vocab + (vocab + _BLOCK - 1) // _BLOCK + 16
    threads = _threads()
    work = getattr(_local, "work", None)
    if work is None or work.numel() < threads * stride:
        work = _local.work = torch.empty(threads * stride, dtype=torch.float32)
    out = torch.empty(rows, dtype=torch.int64)
    if rows:
        _kernel()(logits.data_ptr(), logits.stride(0), None if index is None else index.data_ptr(), rows, vocab,
                  params.data_ptr(), uniforms.data_ptr(), work.data_ptr(), stride, out.data_ptr())
    return out
