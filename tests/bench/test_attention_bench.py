"""`kvserve bench attention` on the CPU: tiny sizes under triton's interpreter, so CI runs the
command end to end (its figures mean nothing here), and it imports no serving stack."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def test_bench_attention_runs_on_the_cpu(capsys):
    from kvserve.cli import main
    assert main(["bench", "attention", "--device", "cpu", "--batches", "1,2", "--kv-lens", "20",
                 "--prefill-lens", "17", "--max-kv-tokens", "30"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines()]
    decode = [r for r in rows if r[:2] == ["1", "20"]]
    assert len(decode) == 1 and decode[0][-2].endswith("x") and float(decode[0][-1]) < 1e-2
    assert any(r[:2] == ["2", "20"] and "skipped" in r for r in rows)
    prefill = [r for r in rows if r[:1] == ["17"]]
    assert len(prefill) == 1 and float(prefill[0][-1]) < 1e-2


def test_bench_attention_imports_only_torch_and_triton():
    code = ("import sys, kvserve.bench.attention, kvserve.attention.triton.backend; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'gguf', 'fastapi', 'uvicorn', 'transformers'}))")
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]"


def test_bench_attention_rejects_unknown_tiles(capsys):
    from kvserve.cli import main
    assert main(["bench", "attention", "--device", "cpu", "--tiles", "block_q=64"]) == 2
    assert "tiles: expected name=int" in capsys.readouterr().err
