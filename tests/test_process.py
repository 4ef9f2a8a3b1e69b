import platform
import sys

import pytest

from kvserve.process import tune_malloc


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_glibc_takes_every_malloc_setting():
    assert tune_malloc() is True


def test_tune_gc_raises_only_the_young_threshold():
    import gc
    from kvserve.process import GC_YOUNG_THRESHOLD, tune_gc
    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 11, 12)
        tune_gc()
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, 11, 12)
    finally:
        gc.set_threshold(*before)


def test_release_openmp_workers_leaves_the_caller_one_thread():
    """Run in a thread of its own (it changes the calling thread's OpenMP settings): after a
    parallel op, the release leaves that thread one OpenMP thread, still computing, and it finds
    the runtime torch loaded."""
    import sys
    import threading

    import torch

    from kvserve import process
    seen = {}

    def caller():
        torch.set_num_threads(2)
        torch.ones(512, 512) @ torch.ones(512, 512)  # a team of workers for this thread
        seen["runtimes"] = process._openmp_runtimes()
        process.release_openmp_workers()
        seen["threads"] = torch.get_num_threads()
        seen["after"] = float((torch.ones(64, 64) @ torch.ones(64, 64))[0, 0])  # still computes
    thread = threading.Thread(target=caller)
    thread.start()
    thread.join()
    assert seen["threads"] == 1 and seen["after"] == 64.0
    if sys.platform.startswith("linux"):
        assert any("omp" in path.rsplit("/", 1)[-1] for path in seen["runtimes"])
