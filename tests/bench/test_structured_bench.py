"""kvserve bench structured on the packaged SmolLM2, small: every constrained output validates, both
batches' rows and the ratios are printed; --peer vllm without its venv fails before any work."""
import argparse

import pytest

from kvserve.args import add_engine_args
from kvserve.bench import structured
from kvserve.bench.vllm_peer import SETUP


def _args(*extra):
    p = argparse.ArgumentParser()
    add_engine_args(p)
    structured.add_args(p)
    return p.parse_args(["--num-prompts", "3", "--rounds", "2", "--max-tokens", "64", *extra])


def test_bench_structured_runs_small(capsys):
    assert structured.main(_args("--json")) == 0
    out = capsys.readouterr().out
    rows = {line.split()[1] for line in out.splitlines() if line.startswith(("kvserve constrained", "kvserve unc"))}
    assert rows == {"constrained", "unconstrained"}
    assert "kvserve valid: 3/3 (3 finished" in out
    import json
    result = json.loads(out.splitlines()[-1])
    assert len(result["compile_ms"]) == len(result["first_request_added_ms"]) >= 30
    assert len(result["round_ratios"]) == 2 and result["step_ratio_median"] > 0
    constrained, plain = result["results"]
    assert constrained["output_tokens"] == plain["output_tokens"] > 0


def test_missing_vllm_venv_fails_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        structured.main(_args("--peer", "vllm", "--vllm-python", str(tmp_path / "nope")))
    assert SETUP in str(e.value) and "compile" not in capsys.readouterr().out
