"""kvserve bench nanobatch at the tiny shape on the CPU: the step cut in halves gives the whole step's
hidden states (the bench checks it), and each variant is timed."""
import argparse

from kvserve.args import add_engine_args
from kvserve.bench import nanobatch


def test_bench_nanobatch_runs_small(capsys):
    p = argparse.ArgumentParser()
    add_engine_args(p)
    nanobatch.add_args(p)
    args = p.parse_args(["--random-weights", "tiny", "--device", "cpu", "--dtype", "float32", "--batch", "5",
                         "--input-len", "20", "--repeat", "2"])
    assert nanobatch.main(args) == 0
    out = capsys.readouterr().out
    assert "decode step of 5 sequences of 20 tokens" in out
    rows = [line for line in out.splitlines() if "ms a step" in line]
    assert len(rows) == 2 and all(float(r.split("vs whole ")[1].rstrip(")")) < 1e-4 for r in rows)
