"""int4.c from PyTorch: y = x W^T for a few rows, on the weight buffers of QuantizedLinear's int4
kernel (`_convert_weight_to_int4pack_for_cpu` layout, bf16 (scale, zero) pairs)."""
import ctypes
from functools import cache

import torch

from kvserve import native

MAX_ROWS = 1  # for 2 rows and more PyTorch's kernel, which unpacks each weight once for all rows, is as fast


@cache
def _kernel():
    has_avx2 = native.function("int4", "int4_available", ctypes.c_int64, [])
    if has_avx2 is None or not has_avx2():
        return None
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    return native.function("int4", "int4_matmul", None, [ptr, i64, ptr, ptr, i64, i64, i64, i64, ptr, ptr])


def available(out_features: int, in_features: int, group: int, block: int | None) -> bool:
    return (_kernel() is not None and block is not None and group % 16 == 0 and in_features % group == 0
            and out_features % block == 0 and block % 32 == 0)


def matmul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, group: int, block: int) -> torch.Tensor:
    """x [M, K] (any float dtype) -> [M, N] float32."""
    m, k = x.shape
    n = scales.shape[1]
    x = x.float().contiguous()
    y = torch.empty(m, n)
    scratch = torch.empty(2 * m * k + 8 * m * (k // group), dtype=torch.uint8)
    _kernel()(x.data_ptr(), m, weight.data_ptr(), scales.data_ptr(), n, k, group, block, y.data_ptr(),
              scratch.data_ptr())
    return y
