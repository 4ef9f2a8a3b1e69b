"""kvserve.native: C kernels built at first use, and the fallback when they can't be."""
import logging
import shutil

import pytest

from kvserve import native


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_builds_once_into_the_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    lib = native.load.__wrapped__("magicpig")
    assert lib is not None and hasattr(lib, "magicpig_decode")
    built = list((tmp_path / "kvserve" / "native").iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"
    mtime = built[0].stat().st_mtime_ns
    assert native.load.__wrapped__("magicpig") is not None
    assert built[0].stat().st_mtime_ns == mtime  # the second load reuses the build


def test_falls_back_when_disabled_or_the_build_fails(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("KVSERVE_NATIVE", "0")
    assert native.load.__wrapped__("magicpig") is None
    monkeypatch.delenv("KVSERVE_NATIVE")
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    with caplog.at_level(logging.WARNING):
        assert native.load.__wrapped__("magicpig") is None
    assert "falling back to PyTorch" in caplog.text
    assert not list((tmp_path / "kvserve" / "native").iterdir())  # no half-written library left
