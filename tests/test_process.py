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


def test_engine_thread_keeps_its_threads_when_the_server_releases_its_own(tiny_model, smollm2_tokenizer):
    """`serve` starts the AsyncEngine, then frees the HTTP thread's OpenMP workers, which also sets
    torch's process-wide count to 1: the engine thread must keep the count it was given (it once
    took 1 on its first torch call, and a decode step through the server took 1.7x as long)."""
    import asyncio
    import threading

    import torch

    from kvserve import process
    from kvserve.config import CacheConfig, EngineConfig
    from kvserve.engine.async_engine import AsyncEngine
    from kvserve.engine.engine import Engine
    seen = {}

    def http_thread():
        torch.set_num_threads(2)
        engine = Engine(EngineConfig(cache=CacheConfig(16, 64)), model=tiny_model, tokenizer=smollm2_tokenizer)
        async_engine = AsyncEngine(engine)

        async def serve():
            await async_engine.call(lambda e: None)  # the engine thread is up and idle
            process.release_openmp_workers()
            seen["engine"] = await async_engine.call(lambda e: torch.get_num_threads())
        try:
            asyncio.run(serve())
        finally:
            async_engine.shutdown()
    thread = threading.Thread(target=http_thread)
    thread.start()
    thread.join()
    assert seen["engine"] == 2
