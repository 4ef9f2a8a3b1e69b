import platform
import sys

import pytest

from kvserve.process import tune_malloc


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_glibc_takes_every_malloc_setting():
    assert tune_malloc() is True
