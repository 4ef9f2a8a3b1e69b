"""The vLLM peer without its venv: one line that says how to create it, before any work."""
from types import SimpleNamespace

import pytest

from kvserve.bench.vllm_peer import SETUP, run_vllm_throughput


def test_missing_vllm_venv_says_how_to_create_it(tmp_path):
    args = SimpleNamespace(vllm_python=str(tmp_path / "nope" / "bin" / "python"))
    with pytest.raises(SystemExit) as e:
        run_vllm_throughput(args, [[1, 2, 3]])
    assert "no vLLM venv python" in str(e.value) and SETUP in str(e.value)
