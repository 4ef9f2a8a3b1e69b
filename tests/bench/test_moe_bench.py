"""kvserve bench moe on a tiny pair of models: both rows measured, the ratio printed."""
import argparse

from kvserve.bench import moe


def test_bench_moe_runs_small(capsys):
    p = argparse.ArgumentParser()
    moe.add_args(p)
    args = p.parse_args(["--hidden", "64", "--expert-intermediate", "32", "--layers", "1", "--vocab-size", "256",
                         "--experts", "4", "--batch-sizes", "1,3", "--steps", "2", "--rounds", "1",
                         "--prompt-len", "4", "--quantization", "none,int4", "--clock", "cpu"])
    assert moe.main(args) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith(("none", "int4"))]
    assert [(r[0], r[1]) for r in rows] == [("none", "1"), ("none", "3"), ("int4", "1"), ("int4", "3")]
    assert all(float(r[2]) > 0 and float(r[3]) > 0 and abs(float(r[4]) - float(r[2]) / float(r[3])) < 0.02
               for r in rows)
