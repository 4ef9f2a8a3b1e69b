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
    for r in rows:
        moe_ms, dense_ms, ratio = map(float, r[2:5])
        # printed to 0.001 ms and 0.01: at these sizes (~0.05 ms) the rounding alone moves moe/dense by ~0.04
        slack = 0.005 + 0.0005 * (1 + moe_ms / dense_ms) / dense_ms + 1e-9
        assert moe_ms > 0 and dense_ms > 0 and abs(ratio - moe_ms / dense_ms) <= slack, r
