"""kvserve bench latency: single-stream decode, prompt processing, time to first token and peak
RSS, with llama.cpp on the same GGUF and thread count in the same run."""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from kvserve.args import at_least_one
from kvserve.bench import spec_latency
from kvserve.bench.common import random_prompts

WORKERS = Path(__file__).with_name("latency_workers.py")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt-len", type=int, default=16, help="the short prompt before decoding")
    p.add_argument("--long-prompt-len", type=int, default=512, help="the prompt-processing prompt")
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--peer", choices=["llama.cpp", "none"], default="llama.cpp",
                   help="with --random-weights the peer is transformers in the same process")
    p.add_argument("--llamacpp-python", default=".venv-llamacpp/bin/python",
                   help="python of a venv with llama-cpp-python (pip install llama-cpp-python)")
    p.add_argument("--rounds", type=at_least_one, default=3,
                   help="runs of each engine, alternating (a shared machine's load drifts); medians are printed")
    p.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    spec_latency.add_args(p)


def run_worker(python: str, engine: str, args, model: str, prompts) -> dict:
    cmd = [python, str(WORKERS), engine, "--model", model, "--threads", str(args.threads),
           "--output-len", str(args.output_len), "--prompt", json.dumps(prompts),
           "--dtype", args.dtype, "--quantization", args.quantization] + (["--compile"] if args.compile else [])
    print(f"running {engine} ...", file=sys.stderr, flush=True)
    # the workers' own progress and logs go straight to our stderr
    # kvserve's worker imports this checkout's kvserve (not whichever one the venv installed)
    path = str(Path(__file__).parents[2]) if engine == "kvserve" else ""
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=os.environ | {"PYTHONPATH": path})
    if done.returncode:
        raise SystemExit(f"{engine} worker failed with exit code {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(args) -> int:
    if args.speculative:  # speculative decoding off vs on, in one process
        return spec_latency.main(args)
    if args.random_weights:  # no GGUF, so no llama.cpp: in-process, against transformers
        from kvserve.bench import random_latency
        return random_latency.main(args)
    import torch

    from kvserve.engine.engine import load_tokenizer
    from kvserve.model.loader import resolve_model_path
    model = str(resolve_model_path(args.model))
    args.threads = args.threads or os.cpu_count()
    vocab = load_tokenizer(args.model).vocab_size
    short, long = (random_prompts(1, n, vocab, seed=i)[0] for i, n in ((1, args.prompt_len), (2, args.long_prompt_len)))
    print(f"single stream: {args.prompt_len}-token prompt -> {args.output_len} tokens; prompt processing: "
          f"{args.long_prompt_len} tokens; {args.threads} threads ({torch.backends.cpu.get_cpu_capability()}); "
          f"{Path(model).name} "
          f"({Path(model).stat().st_size / 2**20:.0f} MiB)")
    python = args.llamacpp_python
    if args.peer == "llama.cpp" and not Path(python).exists():
        raise SystemExit(f"no {python}: python -m venv .venv-llamacpp && "
                         ".venv-llamacpp/bin/pip install llama-cpp-python (builds in ~5 min)")
    engines = {"kvserve": sys.executable} | ({"llama.cpp": python} if args.peer == "llama.cpp" else {})
    rounds = []
    for i in range(args.rounds):
        print(f"round {i + 1}/{args.rounds}", file=sys.stderr, flush=True)
        # who goes first alternates, so a drift of the machine's speed favours neither engine
        order = list(engines) if i % 2 == 0 else list(engines)[::-1]
        done = {engine: run_worker(engines[engine], engine, args, model, [short, long]) for engine in order}
        runs = [done[engine] for engine in engines]
        for r in runs:
            r["decode_tok_s"] = (args.output_len - 1) / r["decode_s"]
            r["prefill_tok_s"] = args.long_prompt_len / r["prefill_s"]
        rounds.append(runs)
    results = [median_run([runs[i] for runs in rounds]) for i in range(len(rounds[0]))]
    print(f"\nmedians of {args.rounds} round(s), each engine in a fresh process")
    if len(results) > 1:
        for key, name in (("decode_tok_s", "decode"), ("prefill_tok_s", "prompt processing")):
            print(f"{name} ratio by round: " + ", ".join(f"{a[key] / b[key]:.2f}x" for a, b in rounds))
    print_table(results, Path(model).stat().st_size / 2**20)
    if args.json:
        print(json.dumps({"results": results}))
    return 0


def median_run(runs: list[dict]) -> dict:
    """Each timing's median over the rounds, the highest peak RSS."""
    out = dict(runs[0])
    for key, value in out.items():
        if isinstance(value, float):
            values = sorted(r[key] for r in runs)
            out[key] = max(values) if "rss" in key else values[len(values) // 2]
    return out


def print_table(results: list[dict], gguf_mb: float) -> None:
    base = results[-1]
    print(f"\n{'engine':<30}{'decode tok/s':>13}{'prompt tok/s':>13}{'TTFT ms':>9}{'peak RSS MiB':>13}"
          f"{'runtime MiB':>12}")
    for r in results:
        print(f"{r['engine']:<30}{r['decode_tok_s']:>13.1f}{r['prefill_tok_s']:>13.1f}{r['ttft_s'] * 1e3:>9.1f}"
              f"{r['peak_rss_mb']:>13.0f}{r['runtime_rss_mb']:>12.0f}")
    if len(results) > 1:
        ours = results[0]
        print(f"\nkvserve / {base['engine']}: decode {ours['decode_tok_s'] / base['decode_tok_s']:.2f}x, "
              f"prompt processing {ours['prefill_tok_s'] / base['prefill_tok_s']:.2f}x, "
              f"TTFT {base['ttft_s'] / ours['ttft_s']:.2f}x faster")
    ours = results[0]
    print(f"kvserve peak RSS {ours['peak_rss_mb']:.0f} MiB = runtime (Python + torch, before loading) "
          f"{ours['runtime_rss_mb']:.0f} + model and buffers {ours['peak_rss_mb'] - ours['runtime_rss_mb']:.0f}; "
          f"budget 2 x GGUF + KV cache = {2 * gguf_mb + ours['kv_cache_mb']:.0f} MiB "
          f"(KV cache {ours['kv_cache_mb']:.0f} MiB)")
