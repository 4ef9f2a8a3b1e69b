"""Small C kernels for loops PyTorch has no single op for, built at first use with the system's C
compiler and loaded with ctypes (no torch headers, so a build takes well under a second).

Each kernel has a PyTorch twin (ops that compute the same, or PyTorch's own kernel) that callers
use when `load` returns None: no compiler, a failed build, or KVSERVE_NATIVE=0.
"""
import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path

log = logging.getLogger(__name__)
SOURCES = Path(__file__).parent
# -fno-trapping-math: lets GCC vectorize loops with float selects (the softmax, SiLU); results are unchanged
FLAGS = ["-O3", "-march=native", "-fno-trapping-math", "-shared", "-fPIC", "-std=c11", "-fopenmp"]


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kvserve" / "native"


@cache
def load(name: str) -> ctypes.CDLL | None:
    """The compiled library of kvserve/native/<name>.c, or None where it can't be had."""
    if os.environ.get("KVSERVE_NATIVE", "1") == "0" or not sys.platform.startswith("linux"):
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        log.warning("no C compiler found: %s kernels fall back to PyTorch ops", name)
        return None
    # every source, as one kernel file may #include another
    source = b"".join(p.read_bytes() for p in sorted(SOURCES.glob("*.[ch]")))
    # -march=native: the key covers the machine too, as a shared home may serve several CPUs
    key = hashlib.sha256(source + " ".join(FLAGS + [compiler, os.uname().machine]).encode()
                         + _cpu_flags()).hexdigest()[:16]
    target = cache_dir() / f"{name}-{key}.so"
    if not target.exists():
        try:
            _build(compiler, SOURCES / f"{name}.c", target)
        except subprocess.CalledProcessError as e:
            log.warning("building %s kernels failed: falling back to PyTorch ops\n%s", name, e.stderr.decode())
            return None
        except OSError as e:
            log.warning("building %s kernels failed (%s): falling back to PyTorch ops", name, e)
            return None
    return ctypes.CDLL(str(target))


def function(name: str, symbol: str, restype, argtypes: list):
    """`symbol` of kvserve/native/<name>.c with its ctypes signature, or None as for `load`."""
    lib = load(name)
    if lib is None:
        return None
    f = getattr(lib, symbol)
    f.restype, f.argtypes = restype, argtypes
    return f


def _build(compiler: str, source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, str(source), "-o", tmp, "-lm"], check=True, capture_output=True)
        os.replace(tmp, target)  # atomic: processes building at once each install a whole file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _cpu_flags() -> bytes:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.encode()
    except OSError:
        pass
    return b""
