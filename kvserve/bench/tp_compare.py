"""`bench throughput -tp N --peer tp1`: tensor parallelism against one process on the same cores.

Both engines live in this process (rank 0 of the -tp N engine here, its other ranks spawned), and
their rounds alternate, so that a machine whose load changes (other jobs) weighs on both alike:
-tp 1 with all --threads, -tp N with --threads / N per rank. Reports each round's seconds and
ratio, the median ratio, the steps' time in collectives on rank 0 (waits for a slower rank
included) and how many collectives a step makes."""
import dataclasses
import statistics
import time

import torch

from kvserve.bench.common import ThroughputResult, print_table


def _engine(args, tp: int):
    from kvserve.args import engine_config
    from kvserve.engine.engine import Engine
    return Engine(dataclasses.replace(engine_config(args), tensor_parallel_size=tp))


def _round(engine, prompts, params, threads: int) -> tuple[float, dict]:
    torch.set_num_threads(threads)  # one process: the engines share torch's thread count
    from kvserve.llm import LLM
    group = engine.tp
    if group is not None:
        group.collective_seconds, group.collectives, group.steps = 0.0, 0, 0
    start = time.perf_counter()
    LLM(engine=engine).generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    if engine.kv.prefix:
        engine.kv.prefix.clear()  # each round computes its prompts
    if group is None:
        return seconds, {}
    steps = max(1, group.steps)
    return seconds, dict(steps=group.steps, collective_ms=1e3 * group.collective_seconds / steps,
                         collectives=group.collectives / steps, step_ms=1e3 * seconds / steps)


def compare(args, prompts: list[list[int]], rounds: int) -> list[ThroughputResult]:
    from kvserve.engine.request import SamplingParams
    tp, threads = args.tensor_parallel_size, args.threads or torch.get_num_threads()
    per_rank = max(1, threads // tp)
    many = _engine(args, tp)
    one = _engine(args, 1)
    print(f"-tp 1: {type(one.runner.executor).__name__}, {threads} threads; -tp {tp}: "
          f"{type(many.runner.executor.inner).__name__} on each rank, {per_rank} thread(s) per rank")
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    warm = SamplingParams(temperature=0, max_tokens=4)
    _round(one, prompts[:2], warm, threads)
    _round(many, prompts[:2], warm, per_rank)
    ones, manys, ratios = [], [], []
    try:
        for r in range(rounds):
            t1, _ = _round(one, prompts, params, threads)
            tn, stats = _round(many, prompts, params, per_rank)
            ones.append(t1)
            manys.append(tn)
            ratios.append(t1 / tn)
            print(f"round {r + 1}: -tp 1 {t1:.2f} s, -tp {tp} {tn:.2f} s, ratio {t1 / tn:.2f}x; -tp {tp}: "
                  f"{stats['steps']} steps of {stats['step_ms']:.1f} ms, {stats['collective_ms']:.1f} ms of "
                  f"them in {stats['collectives']:.0f} collectives on rank 0 "
                  f"({stats['collective_ms'] / stats['step_ms']:.0%})", flush=True)
    finally:
        many.close()
    print(f"median ratio -tp 1 / -tp {tp} (time): {statistics.median(ratios):.2f}x over {rounds} round(s)")
    n_in, n_out = sum(map(len, prompts)), len(prompts) * args.output_len
    return [ThroughputResult(f"kvserve -tp {tp}", len(prompts), n_in, n_out, statistics.median(manys)),
            ThroughputResult("kvserve -tp 1", len(prompts), n_in, n_out, statistics.median(ones))]
