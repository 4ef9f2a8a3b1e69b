"""Paged attention in Triton kernels (issue 23). triton is imported only when the backend is:
importing this package costs nothing where triton is absent.

    from kvserve.attention.triton import TritonAttention  # instead of TorchRefAttention
"""
import importlib.util


def available() -> bool:
    return importlib.util.find_spec("triton") is not None


def __getattr__(name):
    if name == "TritonAttention":
        from kvserve.attention.triton.backend import TritonAttention
        return TritonAttention
    raise AttributeError(name)
