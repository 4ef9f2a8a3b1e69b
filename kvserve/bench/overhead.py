"""kvserve bench overhead: the host's own time per engine step, over a model that costs nothing.

On a GPU the host schedules, plans and books each step while the device waits (unless the two
overlap), so this time bounds a GPU step from below. It needs no GPU: the model is NullModel.
"""
import argparse
import sys
import time
from collections import defaultdict
from contextlib import contextmanager

import torch

from kvserve.args import at_least_one
from kvserve.bench.common import random_prompts

STAGES = ("schedule", "inputs", "model", "sample", "append", "outputs")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-sizes", default="1,64,256", help="comma-separated decode batch sizes")
    p.add_argument("--input-len", type=at_least_one, default=128)
    p.add_argument("--steps", type=at_least_one, default=50, help="decode steps timed per batch size")
    p.add_argument("--vocab-size", type=at_least_one, default=512,
                   help="logits per row; ids below it are real tokens of the tokenizer")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--rounds", type=at_least_one, default=3,
                   help="runs per batch size; the fastest is shown (other load on the machine only adds time)")
    p.add_argument("--threads", type=at_least_one, default=1, help="torch threads (the host's work is serial)")
    p.add_argument("--final-only", action="store_true",
                   help="requests read only when finished (as LLM.generate and non-streaming API calls do): "
                        "no per-step outputs")
    p.add_argument("--static", action="store_true",
                   help="decode steps through the static-buffer executor (what a GPU replays as CUDA graphs)")
    p.add_argument("--overlap-schedule", action="store_true",
                   help="overlapped steps (the GPU's default): each step launches the next before landing its own")
    p.add_argument("--tokenizer", default=None, help="model whose tokenizer detokenizes (default: the packaged one)")


class StageTimer:
    """Wraps bound methods of the engine so each call's time adds to its stage."""

    def __init__(self):
        self.seconds = defaultdict(float)

    def wrap(self, obj, name: str, stage: str) -> None:
        inner = getattr(obj, name)

        def timed(*a, **kw):
            start = time.perf_counter()
            try:
                return inner(*a, **kw)
            finally:
                self.seconds[stage] += time.perf_counter() - start
        setattr(obj, name, timed)

    @contextmanager
    def nested(self, outer: str, inner: str):
        """Time counted in inner is taken out of outer."""
        before = self.seconds[inner]
        yield
        self.seconds[outer] -= self.seconds[inner] - before


def build_engine(batch: int, args, tokenizer):
    from kvserve.config import CacheConfig, EngineConfig, SchedulerConfig
    from kvserve.engine.engine import Engine
    from kvserve.engine.null_model import NullModel
    steps = args.steps + 4
    pages = batch * (-(-(args.input_len + steps + 1) // 16)) + 16
    config = EngineConfig(cache=CacheConfig(num_pages=pages),
                          scheduler=SchedulerConfig(max_num_batched_tokens=max(2048, batch * args.input_len),
                                                    max_num_seqs=batch),
                          overlap_schedule=args.overlap_schedule)
    # sampled tokens are whole characters, as most of a real text's are (a byte token alone is not)
    text_like = [i for i in range(args.vocab_size) if tokenizer.piece(i) is not None] or None
    model = NullModel(args.vocab_size, max_len=args.input_len + steps + 8, allowed=text_like)
    engine = Engine(config, model=model, tokenizer=tokenizer)
    if args.static:
        from kvserve.engine.static_executor import StaticDecodeExecutor
        engine.runner.executor = StaticDecodeExecutor(model, engine.pool, engine.runner.executor, batch,
                                                      model.config.max_position_embeddings)
    return engine


def measure(batch: int, args, tokenizer) -> dict[str, float]:
    """Milliseconds per decode step, by stage, at this batch size."""
    from kvserve.engine.request import SamplingParams
    engine = build_engine(batch, args, tokenizer)
    params = SamplingParams(temperature=args.temperature, max_tokens=args.steps + 4, ignore_eos=True,
                            output_kind="final_only" if args.final_only else "cumulative")
    for p in random_prompts(batch, args.input_len, args.vocab_size, seed=batch):
        engine.add_request(p, params)
    for _ in range(3):  # the prompts, then two decode steps of warm-up
        engine.step()
    timer = StageTimer()
    timer.wrap(engine.scheduler, "schedule", "schedule")
    timer.wrap(engine.runner, "execute", "inputs")
    timer.wrap(engine.model, "forward", "model")
    timer.wrap(engine.model, "compute_logits", "model")
    timer.wrap(engine.overlap if engine.overlap is not None else engine, "_sample", "sample")
    timer.wrap(engine, "_append_all", "append")
    timer.wrap(engine, "_outputs", "outputs")
    total = 0.0
    for _ in range(args.steps):
        with timer.nested("inputs", "model"):
            start = time.perf_counter()
            outs = engine.step()
            total += time.perf_counter() - start
        assert len(outs) == (0 if args.final_only else batch), f"a decode step returned {len(outs)} outputs"
    ms = {s: 1000 * timer.seconds[s] / args.steps for s in STAGES}
    ms["other"] = 1000 * total / args.steps - sum(ms.values())
    ms["total"] = 1000 * total / args.steps
    return ms


def main(args) -> int:
    from kvserve.engine.engine import load_tokenizer
    from kvserve.model.loader import ModelLoadError
    from kvserve.model.random_weights import token_tokenizer
    try:
        batches = [at_least_one(b) for b in args.batch_sizes.split(",") if b]
    except (ValueError, argparse.ArgumentTypeError):
        raise SystemExit(f"kvserve bench overhead: error: --batch-sizes must be counts >= 1, got {args.batch_sizes!r}")
    try:
        tokenizer = load_tokenizer(args.tokenizer)
    except (ModelLoadError, ImportError) as e:  # e.g. a GPU host without the packaged model
        print(f"no tokenizer ({e}); tokens are spelled <id>", file=sys.stderr)
        tokenizer = token_tokenizer(args.vocab_size)
    print(f"host time per decode step (ms), null model, vocab {args.vocab_size}, prompts of {args.input_len} "
          f"tokens, temperature {args.temperature}, {args.steps} steps, fastest of {args.rounds} rounds"
          + (", static-buffer executor" if args.static else "")
          + (", overlapped steps" if args.overlap_schedule else "") + (", final outputs only" if args.final_only else ""))
    cols = (*STAGES, "other", "total")
    print(f"{'batch':>6}" + "".join(f"{c:>10}" for c in cols) + f"{'us/seq':>10}")
    torch.set_num_threads(args.threads)
    for batch in batches:
        ms = min((measure(batch, args, tokenizer) for _ in range(args.rounds)), key=lambda m: m["total"])
        print(f"{batch:>6}" + "".join(f"{ms[c]:>10.3f}" for c in cols) + f"{1000 * ms['total'] / batch:>10.1f}",
              flush=True)
    return 0
