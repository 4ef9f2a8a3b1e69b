"""token_bitmask.c from PyTorch: a grammar's bitmask applied to float32 logits on the CPU, in place."""
import ctypes
from functools import cache

import torch

from kvserve import native

_ptr, _i64 = ctypes.c_void_p, ctypes.c_int64


@cache
def _kernel():
    return native.function("token_bitmask", "apply_token_bitmask", None,
                           [_ptr, _i64, _ptr, _i64, _ptr, _ptr, _ptr, _ptr, _i64, _i64])


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int], vocab: int,
                        mask_rows: list[int] | None = None, and_mask: torch.Tensor | None = None,
                        also: list[bool] | None = None) -> bool:
    """logits[rows[i], t] = -inf for each i and t < vocab whose bit in bitmask[mask_rows[i]] (default
    rows[i]) is 0, or, where also[i], whose bit in the single row and_mask is 0. False (and nothing
    done) where the kernel cannot run: no compiler, or tensors it does not take."""
    mask_rows = rows if mask_rows is None else mask_rows
    if (_kernel() is None or logits.device.type != "cpu" or logits.dtype != torch.float32
            or logits.stride(1) != 1 or bitmask.dtype != torch.int32 or not bitmask.is_contiguous()
            or bitmask.shape[1] * 32 < vocab or vocab > logits.shape[1] or len(mask_rows) != len(rows)
            or (rows and (min(rows) < 0 or max(rows) >= logits.shape[0]))
            or (rows and (min(mask_rows) < 0 or max(mask_rows) >= bitmask.shape[0]))
            or (and_mask is not None and (and_mask.dtype != torch.int32 or not and_mask.is_contiguous()
                                          or and_mask.numel() < bitmask.shape[1] or also is None
                                          or len(also) != len(rows)))):
        return False
    index = torch.tensor([*rows, *mask_rows], dtype=torch.int64)
    flags = torch.tensor(also, dtype=torch.uint8) if and_mask is not None else None
    _kernel()(logits.data_ptr(), logits.stride(0), bitmask.data_ptr(), bitmask.shape[1], index.data_ptr(),
              index.data_ptr() + 8 * len(rows), None if and_mask is None else and_mask.data_ptr(),
              None if flags is None else flags.data_ptr(), len(rows), vocab)
    return True
