"""Process-wide settings for the `kvserve` command (a library user's process is left alone)."""
import ctypes
import ctypes.util
import sys

# glibc mallopt parameters
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3


def tune_malloc() -> bool:
    """Keep freed memory in the heap instead of returning it to the OS. glibc serves big blocks
    (the K/V a long-context decode gathers, prefill activations) by fresh mmaps and unmaps them on
    free, so every step page-faults its temporaries in again: at 16k-32k tokens that is a third to
    two thirds of a decode's attention time. Costs ~30 MiB of RSS. False where glibc is absent."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(param, value) == 1 for param, value in (
        (M_MMAP_THRESHOLD, 32 * 2**20),  # glibc's maximum: blocks below 32 MiB come from the heap
        (M_TRIM_THRESHOLD, 2**31 - 1), (M_TOP_PAD, 256 * 2**20)))
