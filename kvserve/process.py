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


def release_openmp_workers() -> None:
    """The calling thread runs OpenMP work on itself alone from now on, and its idle workers exit,
    for a process whose compute runs in another thread (the server's engine thread). libgomp
    counts every thread's team: past the core count, idle workers stop spinning between parallel
    regions and each region of the engine's waits for a futex wake-up: a SmolLM2 decode step took
    2x as long in the server's engine thread as in a lone thread, on 2 cores."""
    import torch
    torch.set_num_threads(1)
    for path in _openmp_runtimes():
        try:
            pause = ctypes.CDLL(path).omp_pause_resource_all
        except (OSError, AttributeError):
            continue
        pause(OMP_PAUSE_HARD)  # frees this thread's pool of workers (OpenMP 5.0)


OMP_PAUSE_HARD = 2


def _openmp_runtimes() -> list[str]:
    """The OpenMP runtimes loaded in this process (torch's; a wheel may bundle its own)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/lib" in line}
    except OSError:
        return []
    return sorted(p for p in paths if p.rsplit("/", 1)[-1].startswith(("libgomp", "libomp", "libiomp")))
