"""`kvserve ...` in a subprocess, as a user runs it, or in this process for refusals (usage errors,
bad files): a subprocess spends 2-3 s importing before it can refuse anything."""
import contextlib
import io
import subprocess
import sys
from dataclasses import dataclass
from unittest import mock

import torch


def kvserve(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvserve.cli", *args], capture_output=True, text=True, timeout=300)


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def kvserve_here(*args) -> Result:
    """cli.main in this process, its process-wide tuning left out; an exception it lets through
    fails the test, as a traceback would."""
    from kvserve import cli
    out, err, threads = io.StringIO(), io.StringIO(), torch.get_num_threads()
    with mock.patch.object(cli, "tune_malloc"), mock.patch.object(cli, "tune_gc"), \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(list(args))
        except SystemExit as e:  # sys.exit("message") prints it and exits 1, as Python does
            code = e.code if isinstance(e.code, int) else (print(e.code, file=sys.stderr) or 1)
        finally:
            torch.set_num_threads(threads)
    return Result(code, out.getvalue(), err.getvalue())
