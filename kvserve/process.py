"""Process-wide settings for the `kvserve` command (a library user's process is left alone)."""
import ctypes
import ctypes.util
import gc
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


# collections of the youngest generation once this many more objects are alive than at the last one
GC_YOUNG_THRESHOLD = 50_000


def tune_gc() -> None:
    """Collect the youngest generation less often. A decode step at batch 256 makes ~1,600
    short-lived containers (schedule tuples, outputs) that live until the caller drops the outputs;
    Python's default threshold (700) collects twice a step, each time tracing the step's live
    outputs: 0.2-0.4 ms a step at batch 256 on a 2-core EPYC. At 50,000 a step's objects are gone
    before a collection comes; cycles, which the engine does not make per step, wait longer."""
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
