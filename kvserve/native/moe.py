"""moe.c from PyTorch: every chosen expert of a step on float32 stacked weights in one call.
Twin: SparseMoE._grouped, which callers use when `available` is False."""
import ctypes
from functools import cache

import torch

from kvserve import native

_ptr, _i64 = ctypes.c_void_p, ctypes.c_int64


@cache
def _kernel():
    has_avx2 = native.function("moe", "moe_available", _i64, [])
    if has_avx2 is None or not has_avx2():
        return None
    return native.function("moe", "moe_pairs", _i64, [_ptr, _i64, _i64, _ptr, _i64, _ptr, _ptr, _i64, _i64, _ptr])


def available(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> bool:
    """Whether moe.c runs these: float32 CPU tensors, the stacks laid out as SparseMoE keeps them."""
    return (x.device.type == "cpu" and x.dtype == gate_up.dtype == down.dtype == torch.float32
            and gate_up.is_contiguous() and down.is_contiguous() and _kernel() is not None)


def pair_outputs(x: torch.Tensor, experts: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """x [T, H], experts [T, k] -> [T * k, H]: each (token, expert) pair's expert output, row-major.
    gate_up [E, 2I, H] (gate rows, then up), down [E, H, I]."""
    (t, h), k = x.shape, experts.shape[1]
    e, i = down.shape[0], down.shape[2]
    x, experts = x.contiguous(), experts.to(torch.int64).contiguous()
    out = torch.empty(t * k, h)
    if out.numel() and _kernel()(x.data_ptr(), t, h, experts.data_ptr(), k, gate_up.data_ptr(), down.data_ptr(), e, i,
                 out.data_ptr()):
        raise MemoryError("moe_pairs could not allocate its buffers")
    return out
