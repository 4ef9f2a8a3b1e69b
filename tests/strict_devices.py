"""Catching device mistakes without a GPU.

On CUDA, a tensor made without `device=` lands on the CPU while the KV pool is on the GPU, and the
first op mixing them fails. `strict_devices()` recreates that on a CPU-only machine: tensors made
without a device land on "meta" (the stand-in for "not the pool's device"), and any torch op whose
tensor arguments sit on two devices raises, as CUDA would (0-dim tensors excepted, as on CUDA;
explicit moves excepted). Meta tensors also refuse .item()/.tolist(), so host logic that forgot
`device="cpu"` fails too."""
import contextlib

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

_MOVES = {"to", "copy_", "cpu", "cuda", "pin_memory", "device", "is_pinned", "__get__", "__set__", "data_ptr"}


class DeviceMixError(AssertionError):
    pass


class _StrictDevices(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name not in _MOVES:
            devices = {t.device for t in tree_flatten((args, kwargs))[0]
                       if isinstance(t, torch.Tensor) and t.dim() > 0}
            if len(devices) > 1:
                raise DeviceMixError(f"{name} mixes tensors on {sorted(map(str, devices))}")
        return func(*args, **kwargs)


@contextlib.contextmanager
def strict_devices():
    with torch.device("meta"), _StrictDevices():
        yield
