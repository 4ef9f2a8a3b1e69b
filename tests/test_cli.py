"""The command line: bad input is one line naming the problem and exit code 2, no traceback."""
import json

import numpy as np
import pytest

from cli_util import kvserve, kvserve_here


def write_gguf(path, arch="llama", qtype=None):
    import gguf
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    if qtype:
        qt = gguf.GGMLQuantizationType[qtype]
        block, size = gguf.GGML_QUANT_SIZES[qt]
        w.add_tensor("token_embd.weight", np.zeros((4, 256 // block * size), np.uint8), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def bad_inputs(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    hf = tmp_path / "gpt2"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    (hf / "model.safetensors").write_bytes(b"")
    truncated = tmp_path / "truncated.gguf"  # a valid start, cut inside its metadata
    truncated.write_bytes(write_gguf(tmp_path / "whole.gguf").read_bytes()[:40])
    return {
        "missing": (tmp_path / "nope.gguf", "not found"),
        "not a model": (tmp_path / "notes.txt", "not a GGUF file"),
        "architecture": (hf, "unsupported architecture"),
        "gguf architecture": (write_gguf(tmp_path / "gpt2.gguf", "gpt2"), "unsupported GGUF architecture"),
        "tensor type": (write_gguf(tmp_path / "q2k.gguf", qtype="Q2_K"), "unsupported GGUF tensor type Q2_K"),
        "truncated": (truncated, "cannot read GGUF"),
    }


@pytest.mark.parametrize("case", ["missing", "not a model", "architecture", "gguf architecture", "tensor type",
                                  "truncated"])
def test_bad_model_is_one_line_and_exit_2(tmp_path, case):
    path, message = bad_inputs(tmp_path)[case]
    r = kvserve_here("generate", "hi", "--model", str(path))
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_generate_answers(smollm2_path):
    r = kvserve("generate", "What is the capital of France?", "--max-tokens", "24")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout and "layers" not in r.stdout  # the model's load line goes to stderr


def test_bad_attention_is_a_usage_error():
    r = kvserve_here("generate", "hi", "--attention", "magicpig:K=99")
    assert r.returncode == 2 and "--attention" in r.stderr and "K must be" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("bench", [["latency", "--peer", "none"], ["longctx"]])
def test_bench_rounds_must_be_positive(bench):
    r = kvserve_here("bench", *bench, "--rounds", "0")
    assert r.returncode == 2 and "--rounds" in r.stderr and "must be >= 1" in r.stderr
    assert "Traceback" not in r.stderr


def test_bench_longctx_runs_small():
    r = kvserve("bench", "longctx", "--lengths", "", "--long-lengths", "320", "--steps", "3", "--rounds", "2")
    assert r.returncode == 0, r.stderr
    rows = {line.split()[2]: line.split() for line in r.stdout.splitlines() if line.startswith("random-2L")}
    assert set(rows) == {"full", "streaming", "magicpig", "topk"}
    assert rows["full"][6] == "100.0%" and float(rows["magicpig"][6].rstrip("%")) < 100
    assert "(round 2/2)" in r.stderr and r.stdout.count("x | ") == 3  # the medians' ratios, then each round's


def test_bench_longctx_int4_runs_policies_on_the_c_step():
    """--quantization int4: the random Llama's linears int4, so decode.c runs full steps and policy decodes."""
    r = kvserve("bench", "longctx", "--lengths", "", "--long-lengths", "320", "--steps", "3", "--quantization", "int4")
    assert r.returncode == 0, r.stderr
    rows = {line.split()[2]: line.split() for line in r.stdout.splitlines() if line.startswith("random-2L")}
    assert set(rows) == {"full", "streaming", "magicpig", "topk"}
    assert float(rows["full"][4]) == 0 and float(rows["magicpig"][4]) > 0  # full's attention is inside decode.c
    assert "full's attention runs inside decode.c" in r.stdout and "magicpig" in r.stdout.split("tok/s")[-1]


def test_eval_longctx_runs_small(smollm2_path):
    r = kvserve("eval", "longctx", "--lengths", "512", "--trials", "1", "--agg-lengths", "256", "--agg-trials", "1",
                "--ppl-context", "256", "--ppl-tokens", "4", "--policies", "streaming")
    assert r.returncode == 0, r.stderr
    assert "passkey retrieval" in r.stdout and "common word" in r.stdout and "top-1 agree" in r.stdout


@pytest.mark.parametrize("args, error", [
    (["eval", "longctx", "--agg-share", "1.5"], "must be in (0, 1]"),
    (["eval", "longctx", "--agg-trials", "0"], "must be >= 1"),
    (["eval", "longctx", "--agg-lengths", "1024,abc"], "comma-separated counts >= 1"),
    (["eval", "longctx", "--lengths", "512,0"], "comma-separated counts >= 1"),
    (["bench", "longctx", "--long-lengths", "32k"], "comma-separated counts >= 1"),
    (["generate", "hi", "--max-tokens", "-5"], "must be >= 1"),
    (["generate", "hi", "--temperature", "-1"], "must be >= 0"),
    (["generate", "hi", "--top-p", "5"], "must be in (0, 1]"),
    (["generate", "hi", "--page-size", "0"], "must be >= 1"),
    (["generate", "hi", "--device", "tpu"], "expected auto, cpu, cuda or cuda:N"),
    (["serve", "--port", "99999"], "must be in 0-65535"),
    (["serve", "a.gguf", "--model", "b.gguf"], "give the model once"),
    (["serve", "--max-model-len", "0"], "must be >= 1"),
    (["bench", "serve", "--num-prompts", "0", "--base-url", "http://x/v1"], "must be >= 1"),
    (["bench", "serve", "--request-rate", "0", "--base-url", "http://x/v1"], "must be > 0"),
    (["bench", "soak", "--clients", "-1"], "must be >= 1")])
def test_bad_options_are_usage_errors(args, error):
    r = kvserve_here(*args)
    assert r.returncode == 2 and args[2] in r.stderr and error in r.stderr
    assert "Traceback" not in r.stderr


def test_a_request_the_engine_refuses_is_one_line(smollm2_path):
    r = kvserve("generate", "hi", "--max-tokens", "100000")
    assert r.returncode == 2 and "exceeds the context length" in r.stderr and "Traceback" not in r.stderr


def test_serve_takes_the_model_as_argument_or_option():
    from kvserve.cli import build_parser
    for argv in (["serve", "m.gguf"], ["serve", "--model", "m.gguf", "--port", "0"], ["chat", "--model", "m.gguf"]):
        assert build_parser().parse_args(argv).model == "m.gguf"
    assert build_parser().parse_args(["serve"]).model is None


@pytest.mark.parametrize("mode", [[], ["--static", "--overlap-schedule"]])
def test_bench_overhead_runs_small(mode):
    r = kvserve("bench", "overhead", "--batch-sizes", "1,4", "--steps", "3", "--rounds", "1", "--input-len", "8", *mode)
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines() if line.split()[:1] in (["1"], ["4"])]
    assert [row[0] for row in rows] == ["1", "4"] and all(float(x) >= 0 for row in rows for x in row[1:5])


def test_bench_overhead_bad_batch_sizes():
    r = kvserve_here("bench", "overhead", "--batch-sizes", "1,x")
    assert r.returncode != 0 and "--batch-sizes" in r.stderr and "Traceback" not in r.stderr


def test_random_weight_benchmarks_run_small():
    """What a GPU host runs (--device cuda --random-weights llama-8b), at the tiny shape on the CPU."""
    r = kvserve("bench", "throughput", "--random-weights", "tiny", "--num-prompts", "4", "--input-len", "8",
                "--output-len", "4", "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    assert "transformers generate" in r.stdout and "of the floor" in r.stdout
    r = kvserve("bench", "latency", "--random-weights", "tiny", "--prompt-len", "8", "--output-len", "4",
                "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    assert "bandwidth floor" in r.stdout and "kvserve / transformers" in r.stdout
    r = kvserve("bench", "profile", "--random-weights", "tiny", "--batch", "2", "--input-len", "4", "--steps", "2")
    assert r.returncode == 0, r.stderr
    assert "2 decode steps" in r.stdout and "aten::" in r.stdout


def test_bench_longctx_offload_on_random_weights():
    r = kvserve("bench", "longctx", "--random-weights", "tiny", "--device", "cpu", "--lengths", "300", "--steps", "3",
                "--policies", "magicpig:window=16", "magicpig:window=16,offload=true")
    assert r.returncode == 0, r.stderr
    rows = {line.split()[2]: line.split() for line in r.stdout.splitlines() if line.startswith("tiny")}
    assert set(rows) == {"magicpig", "magicpig+offload"} and rows["magicpig"][6] == rows["magicpig+offload"][6]
    assert "offload, per step: CPU sampled attention" in r.stdout
