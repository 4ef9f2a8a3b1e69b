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
