"""kvserve bench moe: what routing costs. A mixture-of-experts model and a dense one with the same
active parameters per token (E experts of width I, top-k, against one MLP of width k * I; all else
equal), both on random weights built in this process, decode steps timed through the engine,
interleaved round by round so that load on the machine falls on both alike. Each runs on the
executor the engine picks for it (decode.c for int4 weights on the CPU, both dense and MoE)."""
import argparse
import dataclasses
import statistics
import time

import torch

from kvserve.args import at_least_one, token_lengths
from kvserve.bench.common import random_prompts
from kvserve.bench.floor import synchronize
from kvserve.config import ModelConfig


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experts", type=at_least_one, default=8)
    p.add_argument("--top-k", type=at_least_one, default=2)
    p.add_argument("--expert-intermediate", type=at_least_one, default=512, help="each expert's MLP width I")
    p.add_argument("--hidden", type=at_least_one, default=512)
    p.add_argument("--layers", type=at_least_one, default=4)
    p.add_argument("--vocab-size", type=at_least_one, default=4096)
    p.add_argument("--batch-sizes", type=token_lengths, default=[1, 8], help="comma-separated decode batch sizes")
    p.add_argument("--quantization", default="none,int4", help="comma-separated: none (fp32 weights), int8, int4")
    p.add_argument("--prompt-len", type=at_least_one, default=32)
    p.add_argument("--steps", type=at_least_one, default=32, help="decode steps timed per round")
    p.add_argument("--rounds", type=at_least_one, default=3, help="interleaved rounds; the fastest is shown")
    p.add_argument("--threads", type=at_least_one, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: the process's CPU time (CPU only), steadier than wall time on a busy machine")


def configs(args) -> tuple[ModelConfig, ModelConfig]:
    heads = max(1, args.hidden // 64)
    dense = ModelConfig("llama", args.vocab_size, args.hidden, args.top_k * args.expert_intermediate, args.layers,
                        heads, max(1, heads // 2), args.hidden // heads, max_position_embeddings=1024)
    moe = dataclasses.replace(dense, architecture="mixtral", intermediate_size=args.expert_intermediate,
                              num_experts=args.experts, num_experts_per_tok=args.top_k,
                              moe_intermediate_size=args.expert_intermediate)
    return moe, dense


def build_engine(cfg: ModelConfig, quantization: str, device: str):
    """An engine over random weights quantized as asked."""
    from kvserve.config import CacheConfig, EngineConfig
    from kvserve.engine.engine import Engine
    from kvserve.model.llama import LlamaForCausalLM
    from kvserve.model.loader import _quant_kind
    from kvserve.model.quant import quantize
    from kvserve.model.random_weights import RandomWeights, token_tokenizer
    weights = dict(RandomWeights(cfg, torch.float32, device))
    for name, w in weights.items():
        kind, group = _quant_kind(name, w.shape, quantization)
        if kind:
            weights[name] = quantize(w, kind, group)
    model = LlamaForCausalLM.from_weights(cfg, weights, torch.float32, device)
    return Engine(EngineConfig(device=device, cache=CacheConfig(num_pages=512)), model=model,
                  tokenizer=token_tokenizer(cfg.vocab_size))


def decode_step_seconds(engine, batch: int, args, seed: int) -> float:
    """Median time of a decode step of `batch` streams (after their prompts ran)."""
    from kvserve.engine.request import SamplingParams
    params = SamplingParams(temperature=0, max_tokens=args.steps + 1, ignore_eos=True)
    for prompt in random_prompts(batch, args.prompt_len, engine.model.config.vocab_size, seed=seed):
        engine.add_request(prompt, params)
    engine.step()  # the prompts, and each stream's first token
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times = []
    while engine.has_unfinished():
        synchronize(engine.device)
        start = clock()
        engine.step()
        synchronize(engine.device)
        times.append(clock() - start)
    return statistics.median(times)


def main(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    moe_cfg, dense_cfg = configs(args)
    print(f"{args.experts} experts of width {args.expert_intermediate}, top-{args.top_k}, vs a dense MLP of width "
          f"{dense_cfg.intermediate_size}; hidden {args.hidden}, {args.layers} layers, {args.device}, "
          f"{torch.get_num_threads()} threads; median decode step ({args.clock} time) over {args.steps} steps, "
          f"best of {args.rounds} rounds")
    print(f"{'weights':<8}{'batch':>6}{'MoE ms':>9}{'dense ms':>10}{'MoE/dense':>11}  executors (MoE, dense)")
    for quantization in args.quantization.split(","):
        engines = {"moe": build_engine(moe_cfg, quantization, args.device),
                   "dense": build_engine(dense_cfg, quantization, args.device)}
        executors = ", ".join(type(e.runner.executor).__name__ for e in engines.values())
        for batch in args.batch_sizes:
            best = {name: float("inf") for name in engines}
            for r in range(args.rounds + 1):  # round 0 warms up
                for name, engine in engines.items():
                    t = decode_step_seconds(engine, batch, args, seed=r)
                    best[name] = min(best[name], t) if r else best[name]
            moe, dense = best["moe"] * 1e3, best["dense"] * 1e3
            print(f"{quantization:<8}{batch:>6}{moe:>9.3f}{dense:>10.3f}{moe / dense:>11.2f}  {executors}", flush=True)
    return 0
