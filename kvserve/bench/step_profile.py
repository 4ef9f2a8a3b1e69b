"""kvserve bench profile: where a decode step's time goes, from torch.profiler.

Per step: wall time, the time the GPU runs kernels (the union of their intervals, so that
overlapping kernels count once), that share of the wall time, kernel launches, and the costliest
kernels; on the CPU, the costliest ops of the host."""
import argparse
import time

import torch

from kvserve.args import at_least_one
from kvserve.bench.common import random_prompts
from kvserve.bench.floor import synchronize


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=at_least_one, default=256, help="decoding sequences")
    p.add_argument("--input-len", type=at_least_one, default=128)
    p.add_argument("--steps", type=at_least_one, default=8, help="decode steps profiled")
    p.add_argument("--top", type=at_least_one, default=10, help="kernels (ops on the CPU) listed")


def busy_time(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def main(args) -> int:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from kvserve.args import engine_config
    from kvserve.engine.engine import Engine
    from kvserve.engine.request import SamplingParams
    args.max_num_seqs = max(args.max_num_seqs, args.batch)
    args.max_num_batched_tokens = max(args.max_num_batched_tokens, args.batch * args.input_len)
    engine = Engine(engine_config(args))
    gpu = engine.device.startswith("cuda")
    params = SamplingParams(temperature=0, max_tokens=args.steps + 4, ignore_eos=True)
    for prompt in random_prompts(args.batch, args.input_len, engine.model.config.vocab_size):
        engine.add_request(prompt, params)
    for _ in range(3):  # the prompts, then decode steps that warm up (and capture nothing new)
        engine.step()
    synchronize(engine.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        synchronize(engine.device)
        wall = (time.perf_counter() - start) / args.steps
    print(f"{engine.model.config.num_layers}-layer model on {engine.device}, batch {args.batch}, "
          f"{args.steps} decode steps: {wall * 1e3:.2f} ms a step")
    events = prof.events()
    if gpu:
        kernels = [e for e in events if e.device_type == DeviceType.CUDA]
        busy = busy_time([(e.time_range.start, e.time_range.end) for e in kernels]) / 1e6 / args.steps
        print(f"GPU busy {busy * 1e3:.2f} ms a step = {busy / wall:.0%} of the wall time; "
              f"{len(kernels) / args.steps:.0f} kernel launches a step")
    table = prof.key_averages().table(sort_by="self_cuda_time_total" if gpu else "self_cpu_time_total",
                                      row_limit=args.top)
    print(table)
    return 0
