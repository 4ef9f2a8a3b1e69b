"""token_bitmask.c from PyTorch: a grammar's bitmask applied to float32 logits on the CPU, in place."""
import ctypes
from functools import cache

import torch

from kvserve import native

_ptr, _i64 = ctypes.c_void_p, ctypes.c_int64


@cache
def _kernel():
    return native.function("token_bitmask", "apply_token_bitmask", None, [_ptr, _i64, _ptr, _i64, _ptr, _i64, _i64])


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int], vocab: int) -> bool:
    """logits[r, t] = -inf for each r in rows and t < vocab whose bit in bitmask[r] is 0; False (and
    nothing done) where the kernel cannot run: no compiler, or tensors it does not take."""
    if (_kernel() is None or logits.device.type != "cpu" or logits.dtype != torch.float32
            or logits.stride(1) != 1 or bitmask.dtype != torch.int32 or not bitmask.is_contiguous()
            or bitmask.shape[1] * 32 < vocab or vocab > logits.shape[1]
            or (rows and (min(rows) < 0 or max(rows) >= min(logits.shape[0], bitmask.shape[0])))):
        return False
    index = torch.tensor(rows, dtype=torch.int64)
    _kernel()(logits.data_ptr(), logits.stride(0), bitmask.data_ptr(), bitmask.shape[1], index.data_ptr(),
              len(rows), vocab)
    return True
