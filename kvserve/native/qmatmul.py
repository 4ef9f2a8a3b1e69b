"""qmatmul.c (a few rows: int8 dot products) and gemm.c (many rows: float products on weights
unpacked a panel at a time) from PyTorch: y = x W^T on quantized weights held by kvserve's modules,
int4 in QuantizedLinear's buffers (`_convert_weight_to_int4pack_for_cpu` layout, bf16 (scale, zero)
pairs), int8 in QuantizedEmbedding's groups (the vocabulary table, for the logits)."""
import ctypes
from functools import cache

import torch

from kvserve import native

MAX_ROWS = 1  # from 2 rows on, gemm.c's int4 kernel, which unpacks each weight once for all rows, is as fast
INT8_GEMM_MIN_ROWS = 8  # below, unpacking the vocabulary table costs more than the int8 products
_ptr, _i64 = ctypes.c_void_p, ctypes.c_int64


@cache
def _kernels() -> dict | None:
    has_avx2 = native.function("qmatmul", "qmatmul_available", _i64, [])
    if has_avx2 is None or not has_avx2():
        return None
    return {"int4": native.function("qmatmul", "int4_matmul", None, [_ptr, _i64, _ptr, _ptr, _i64, _i64, _i64, _i64, _ptr, _ptr]),
            "dequantize_t": native.function("qmatmul", "int4_dequantize_t", None, [_ptr, _ptr, _i64, _i64, _i64, _i64, _ptr]),
            "int8": native.function("qmatmul", "int8_matmul", None, [_ptr, _i64, _ptr, _ptr, _i64, _i64, _i64, _ptr, _ptr])}


@cache
def _gemm_kernels() -> dict | None:
    has_avx2 = native.function("gemm", "gemm_available", _i64, [])
    if has_avx2 is None or not has_avx2():
        return None
    return {"int4": native.function("gemm", "int4_gemm", _i64, [_ptr, _i64, _ptr, _ptr, _i64, _i64, _i64, _i64, _ptr]),
            "int8": native.function("gemm", "int8_gemm", _i64, [_ptr, _i64, _ptr, _ptr, _i64, _i64, _i64, _ptr])}


def int4_available(out_features: int, in_features: int, group: int, block: int | None) -> bool:
    return (_kernels() is not None and block is not None and group % 16 == 0 and in_features % group == 0
            and out_features % block == 0 and block % 32 == 0)


def int8_available(in_features: int, group: int) -> bool:
    return _kernels() is not None and group % 32 == 0 and in_features % group == 0


def gemm_available(out_features: int, in_features: int, group: int, block: int | None = 32) -> bool:
    """int4 (with `block`) or int8 (block None) weights of this shape through gemm.c"""
    return (_gemm_kernels() is not None and out_features % 16 == 0 and in_features % group == 0
            and (block is None and group % 16 == 0 and group <= 512  # int8: int32 sums of a group
                 or block is not None and group % 8 == 0 and block % 32 == 0 and out_features % block == 0))


def _run(kind: str, x: torch.Tensor, n: int, group: int, weight: torch.Tensor, scales: torch.Tensor,
         *extra) -> torch.Tensor:
    m, k = x.shape
    x = x.float().contiguous()
    y = torch.empty(m, n)
    scratch = torch.empty(2 * m * k + 8 * m * (k // group), dtype=torch.uint8)
    _kernels()[kind](x.data_ptr(), m, weight.data_ptr(), scales.data_ptr(), n, k, group, *extra, y.data_ptr(),
                     scratch.data_ptr())
    return y


def int4_matmul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, group: int, block: int) -> torch.Tensor:
    """x [M, K] (any float dtype) -> [M, N] float32."""
    return _run("int4", x, scales.shape[1], group, weight, scales, block)


def int8_matmul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] (any float dtype), weight int8 [N, K], scales float32 [N, K / G] -> [M, N] float32."""
    assert weight.is_contiguous() and scales.dtype == torch.float32 and scales.is_contiguous()
    return _run("int8", x, weight.shape[0], weight.shape[1] // scales.shape[1], weight, scales)


def _run_gemm(kind: str, x: torch.Tensor, n: int, group: int, weight: torch.Tensor, scales: torch.Tensor,
              *extra) -> torch.Tensor:
    m, k = x.shape
    x, y = x.float().contiguous(), torch.empty(m, n)
    if _gemm_kernels()[kind](x.data_ptr(), m, weight.data_ptr(), scales.data_ptr(), n, k, group, *extra, y.data_ptr()):
        raise MemoryError(f"{kind}_gemm could not allocate its panels")
    return y


def int4_gemm(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, group: int, block: int) -> torch.Tensor:
    """int4_matmul's product for many rows: x [M, K] (any float dtype) -> [M, N] float32."""
    return _run_gemm("int4", x, scales.shape[1], group, weight, scales, block)


def int8_gemm(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """int8_matmul's product for many rows."""
    return _run_gemm("int8", x, weight.shape[0], weight.shape[1] // scales.shape[1], weight, scales)


def int4_dequantize(weight: torch.Tensor, scales: torch.Tensor, n: int, k: int, group: int, block: int) -> torch.Tensor:
    """The float32 [N, K] weight of int4_matmul's buffers: a transposed view of a [K, N] tensor, which
    matmuls take as it is."""
    out = torch.empty(k, n)
    _kernels()["dequantize_t"](weight.data_ptr(), scales.data_ptr(), n, k, group, block, out.data_ptr())
    return out.t()
