"""kvserve bench nanobatch: whether NanoFlow's nano-batching would pay, measured before it is built.

A decode step of B sequences as one CUDA graph replay, against the same step cut in two halves
replayed on two CUDA streams at once (so that one half's attention, bound by memory, can run beside
the other half's GEMMs, bound by compute), and the two halves one after the other on one stream (the
cost of the smaller GEMMs alone). The halves give the whole step's hidden states (checked). On the
CPU the halves run in turn and eagerly: a check of the logic, not a timing."""
import argparse
import time

import torch

from kvserve.args import at_least_one
from kvserve.bench.common import random_prompts
from kvserve.bench.floor import synchronize


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=at_least_one, default=256, help="decoding sequences, cut in two halves")
    p.add_argument("--input-len", type=at_least_one, default=512, help="each sequence's context")
    p.add_argument("--repeat", type=at_least_one, default=20, help="steps timed per variant")


def decoding_engine(args):
    """An engine whose args.batch sequences have their prompts in, and the scheduled decode step."""
    from kvserve.args import engine_config
    from kvserve.engine.engine import Engine
    from kvserve.engine.request import SamplingParams
    args.max_num_seqs = max(args.max_num_seqs, args.batch)
    args.overlap_schedule = False  # every token on the host: the step is rebuilt from the sequences
    engine = Engine(engine_config(args))
    params = SamplingParams(temperature=0, max_tokens=args.repeat + 16, ignore_eos=True)
    for prompt in random_prompts(args.batch, args.input_len, engine.model.config.vocab_size):
        engine.add_request(prompt, params)
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running + engine.scheduler.waiting):
        engine.step()
    engine.step()  # one decode: the graphs warm
    scheduled = engine.scheduler.schedule().scheduled  # allocates the next token's pages
    assert len(scheduled) == args.batch and all(n == 1 for _, n in scheduled), "not one decode step of the batch"
    return engine, scheduled


def main(args) -> int:
    from kvserve.attention.static_decode import StaticDecodeAttention
    from kvserve.engine.executors import attention_kwargs
    from kvserve.engine.runner import ModelRunner
    from kvserve.engine.static_executor import StaticDecodeExecutor
    engine, scheduled = decoding_engine(args)
    gpu = engine.device.startswith("cuda")
    if gpu:
        from kvserve.attention.triton.static import TritonStaticDecode as attention_cls
    else:
        attention_cls = StaticDecodeAttention
    eager = getattr(engine.runner.executor, "fallback", engine.runner.executor)

    def executor(n: int) -> StaticDecodeExecutor:  # its own static buffers and graph, for batch n only
        return StaticDecodeExecutor(engine.model, engine.pool, eager, n, engine.max_model_len, use_graphs=gpu,
                                    attention_cls=attention_cls, attention_kwargs=attention_kwargs(engine.model.config),
                                    groups=engine.kv_groups, buckets=[n])
    half = args.batch // 2
    whole, halves = executor(args.batch), [executor(half), executor(args.batch - half)]
    batch = ModelRunner.batch(scheduled)
    parts = [ModelRunner.batch(scheduled[:half]), ModelRunner.batch(scheduled[half:])]
    if not all(ex.takes(b) for ex, b in zip([whole, *halves], [batch, *parts])):
        print("a variant runs eagerly (long sequences are split): no graph to compare")
    streams = [torch.cuda.Stream() for _ in halves] if gpu else []

    @torch.inference_mode()
    def run_whole():
        return whole.execute(batch)

    @torch.inference_mode()
    def run_halves_in_turn():
        return torch.cat([ex.execute(b) for ex, b in zip(halves, parts)])

    @torch.inference_mode()
    def run_halves_on_two_streams():
        current, outs = torch.cuda.current_stream(), []
        for stream, ex, b in zip(streams, halves, parts):
            stream.wait_stream(current)
            with torch.cuda.stream(stream):
                outs.append(ex.execute(b))
        for stream in streams:
            current.wait_stream(stream)
        return torch.cat(outs)

    expected = run_whole().float()
    variants = [("whole batch, one graph", run_whole), ("two halves in turn, one stream", run_halves_in_turn)]
    if gpu:
        variants.append(("two halves on two streams", run_halves_on_two_streams))
    cfg = engine.model.config
    print(f"{cfg.num_layers}-layer model (hidden {cfg.hidden_size}) on {engine.device}, decode step of {args.batch} "
          f"sequences of {args.input_len} tokens, {args.repeat} steps a variant")
    times = {}
    for name, run in variants:
        got = run().float()
        err = (got - expected).abs().max().item()
        assert err <= 0.05 * expected.abs().max().item(), f"{name}: hidden states differ by {err}"
        synchronize(engine.device)
        start = time.perf_counter()
        for _ in range(args.repeat):
            run()
        synchronize(engine.device)
        times[name] = (time.perf_counter() - start) / args.repeat * 1e3
        print(f"  {name:32s} {times[name]:8.3f} ms a step (max |hidden diff| vs whole {err:.2e})")
    if gpu:
        whole_ms, two = times["whole batch, one graph"], times["two halves on two streams"]
        print(f"nano-batching gain (whole / two streams): {whole_ms / two:.2f}x "
              f"({'pays' if whole_ms > two * 1.02 else 'does not pay'} on this shape)")
    return 0
