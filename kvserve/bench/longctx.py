"""kvserve bench longctx: decode cost of each attention policy at long contexts.

2k-8k on the default model (its context limit), 16k/32k on a random-weight Llama with SmolLM2's
attention shape and a longer rope range. Each context is prefilled once with full attention; every
policy then decodes from it (a prefix-cache hit), so all policies see the same K/V. Reported per
decode step (median over the steps): latency, attention time (all layers, and per sampled layer,
i.e. a layer a policy does not keep dense), share of (query head, key) pairs read, and the KV
memory the request holds on the device (pages, plus MagicPIG's hash tables). With --random-weights
(e.g. llama-8b on --device cuda) --lengths run on that shape, its context stretched to fit them.
A policy with offload (magicpig:offload=true) also gets where its steps go: the CPU's sampled
attention, the copies (query out, partial outputs back, K/V rows landing on the host) and the rest
(the device, and host work around it).
"""
import argparse
import sys
import time
from collections import defaultdict
from statistics import median

import torch

from kvserve.args import at_least_one, token_lengths
from kvserve.engine.request import SamplingParams

POLICIES = ["full", "streaming", "magicpig", "topk"]


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lengths", type=token_lengths, default="2048,4096,8192",
                   help="contexts on the default model ('' for none)")
    p.add_argument("--long-lengths", type=token_lengths, default="16384,32768",
                   help="contexts on the random long-rope Llama")
    p.add_argument("--long-layers", type=int, default=2, help="layers of the random Llama (layer 0 stays dense)")
    p.add_argument("--policies", nargs="+", default=POLICIES,
                   help="policies to compare, each as for --attention (e.g. magicpig:K=10,L=150)")
    p.add_argument("--steps", type=int, default=8, help="decode steps timed per policy and context")
    p.add_argument("--rounds", type=at_least_one, default=1,
                   help="times every policy decodes, the policies taking turns, so that a drift of the machine's "
                        "speed favours none; the table shows medians over the rounds")


class _Timed:
    """Wraps a backend's run() (or another per-layer method: PolicyAttention.run_rows, which the C
    step calls back) to add up the seconds each layer spends in attention. Attention inside
    decode.c (full rows, windowed layers) is not seen: there only the step time compares."""

    def __init__(self, backend, method: str = "run"):
        self.by_layer: dict[int, float] = defaultdict(float)
        inner = getattr(backend, method)

        def run(layer, *args):
            start = time.perf_counter()
            out = inner(layer, *args)
            if out is not None and out.is_cuda:  # what the layer's attention took, not its launch
                torch.cuda.synchronize()
            self.by_layer[layer] += time.perf_counter() - start
            return out
        setattr(backend, method, run)


def random_long_llama(layers: int, max_positions: int, dtype=torch.float32, seed: int = 0,
                      quantization: str = "none"):
    """SmolLM2-135M's shapes (576 wide, 9 query heads and 3 KV heads of 64), a small vocabulary;
    quantization int4 / int8: its linears quantized as a float checkpoint's are (int4: decode.c runs it)."""
    from kvserve.config import ModelConfig
    from kvserve.model.families import model_class
    from kvserve.model.loader import _quant_kind
    from kvserve.model.quant import quantize
    cfg = ModelConfig("llama", vocab_size=2048, hidden_size=576, intermediate_size=1536, num_layers=layers,
                      num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=1_000_000.0,
                      max_position_embeddings=max_positions, eos_token_ids=[0])
    g = torch.Generator().manual_seed(seed)
    hidden, inter, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (cfg.vocab_size, hidden)}
    for i in range(layers):
        pre = f"model.layers.{i}."
        shapes |= {pre + "input_layernorm.weight": (hidden,), pre + "post_attention_layernorm.weight": (hidden,),
                   pre + "self_attn.q_proj.weight": (cfg.num_heads * hd, hidden),
                   pre + "self_attn.k_proj.weight": (cfg.num_kv_heads * hd, hidden),
                   pre + "self_attn.v_proj.weight": (cfg.num_kv_heads * hd, hidden),
                   pre + "self_attn.o_proj.weight": (hidden, cfg.num_heads * hd),
                   pre + "mlp.gate_proj.weight": (inter, hidden), pre + "mlp.up_proj.weight": (inter, hidden),
                   pre + "mlp.down_proj.weight": (hidden, inter)}
    weights = {name: (1 + 0.1 * torch.randn(shape, generator=g)) if "norm" in name
               else 0.05 * torch.randn(shape, generator=g) for name, shape in shapes.items()}
    if quantization not in ("none", "auto"):
        for name, w in weights.items():
            kind, group = _quant_kind(name, w.shape, quantization)
            if kind:
                weights[name] = quantize(w, kind, group)
    return model_class(cfg).from_weights(cfg, weights, dtype)


def measure(engine, prompt: list[int], policy, steps: int, timers: list[_Timed]) -> dict:
    """One request decoding `steps` tokens from a cached prompt under policy; its first two steps
    (the prompt's uncached tail, then the first decode, where MagicPIG builds its tables) are
    reported apart."""
    pa = engine.runner.policy_attention
    rid = engine.add_request(prompt, SamplingParams(temperature=0, ignore_eos=True, max_tokens=steps + 2,
                                                    attention=policy))
    seq = engine.requests[rid].seqs[0]
    step_s, attn_s, layer_s, first_s, held, extra, warm = [], [], [], 0.0, 0, 0, 0
    split = defaultdict(list)  # offload: seconds per step by part
    sampled_layers = range(1, engine.model.config.num_layers)  # layer 0 is dense under every policy
    while rid in engine.requests:
        for t in timers:
            t.by_layer.clear()
        before = dict(pa.offloaded.seconds)
        start = time.perf_counter()
        outs = engine.step()
        elapsed = time.perf_counter() - start
        if any(o.error for o in outs):
            raise RuntimeError(outs[0].error)
        by_layer = defaultdict(float)
        for t in timers:
            for layer, sec in t.by_layer.items():
                by_layer[layer] += sec
        warm += 1
        if warm <= 2:
            first_s += elapsed
            pa.keys_read = pa.keys_total = 0
        else:
            step_s.append(elapsed)
            spent = {k: v - before.get(k, 0.0) for k, v in pa.offloaded.seconds.items()}
            split["cpu_ms"].append(1e3 * spent.get("cpu_sampled", 0.0))
            split["copy_ms"].append(1e3 * sum(v for k, v in spent.items() if k.startswith("copy")))
            attn_s.append(sum(by_layer.values()))
            layer_s.append(sum(by_layer[i] for i in sampled_layers) / max(1, len(sampled_layers)))
        if not seq.finished:
            held = max(held, engine.kv.pages_held(seq))
            if seq.attn_state is not None and not policy.offload:  # offloaded tables are in CPU memory
                extra = seq.attn_state.nbytes()
    mc = engine.model.config
    page_bytes = engine.pool.bytes_per_page(engine.kv_groups.slots, engine.pool.page_size, mc.num_kv_heads, mc.head_dim,
                                            engine.pool.k.dtype)
    # medians: on a shared 2-core machine a step now and then is several times slower
    return {"policy": policy.policy, "step_ms": 1e3 * median(step_s), "attn_ms": 1e3 * median(attn_s),
            "layer_attn_ms": 1e3 * median(layer_s), "first_step_ms": 1e3 * first_s,
            "keys_read": pa.keys_read / pa.keys_total if pa.keys_total else 1.0,
            "kv_mib": (held * page_bytes + extra) / 2**20} | {k: median(v) for k, v in split.items()}


def run_contexts(engine, prompts: dict[int, list[int]], policies, steps: int, model_name: str,
                 rounds: int = 1) -> list[dict]:
    timers = [_Timed(engine.runner.attention), _Timed(engine.runner.policy_attention)]
    if hasattr(engine.runner.policy_attention, "run_rows"):  # the policy decodes of the C step
        timers.append(_Timed(engine.runner.policy_attention, "run_rows"))
    rows = []
    for length, prompt in prompts.items():
        print(f"{model_name}: prefilling {length} tokens ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        rid = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=1, attention="full"))
        while rid in engine.requests:
            engine.step()
        print(f"  prefill {time.perf_counter() - start:.1f}s", file=sys.stderr, flush=True)
        runs = [[] for _ in policies]
        for r in range(rounds):
            for policy, results in zip(policies, runs):
                print(f"  {length} tokens, {policy.policy}: {steps} decode steps (round {r + 1}/{rounds})",
                      file=sys.stderr, flush=True)
                results.append(measure(engine, prompt, policy, steps, timers))
        for policy, results in zip(policies, runs):
            name = policy.label
            rows.append({"model": model_name, "context": length, "policy": name, "rounds": results}
                        | {key: median(x[key] for x in results) for key in results[0] if key != "policy"})
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'model':<14}{'context':>8} {'policy':<17}{'step ms':>9}{'attn ms':>9}{'attn ms/layer':>14}"
          f"{'keys read':>10}{'KV MiB':>9}{'first 2 ms':>12}")
    for r in rows:
        print(f"{r['model']:<14}{r['context']:>8} {r['policy']:<17}{r['step_ms']:>9.2f}{r['attn_ms']:>9.2f}"
              f"{r['layer_attn_ms']:>14.3f}{100 * r['keys_read']:>9.1f}%{r['kv_mib']:>9.1f}{r['first_step_ms']:>12.0f}")
    for r in rows:
        if r["policy"].endswith("+offload"):
            rest = r["step_ms"] - r["cpu_ms"] - r["copy_ms"]
            print(f"  {r['model']} {r['context']} offload, per step: CPU sampled attention (candidates + softmax, "
                  f"one C call) {r['cpu_ms']:.2f} ms, copies {r['copy_ms']:.2f} ms, the rest (device, host "
                  f"around it) {rest:.2f} ms")
    print("end to end decode tok/s (1000 / step ms), and vs full's:")
    for (model, length), group in _by_context(rows).items():
        full = group.get("full")
        print(f"  {model} {length}: " + ", ".join(
            f"{name} {1e3 / r['step_ms']:.1f}" + (f" ({full['step_ms'] / r['step_ms']:.2f}x)" if full else "")
            for name, r in group.items()))
    print("magicpig vs full decode attention speed (full time / magicpig time), all layers | per sampled layer:")
    for (model, length), group in _by_context(rows).items():
        if "full" in group and "magicpig" in group:
            if not group["full"]["attn_ms"] or not group["magicpig"]["attn_ms"]:
                print(f"  {model} {length}: - (full's attention runs inside decode.c: compare the step times)")
                continue
            f, m = group["full"], group["magicpig"]
            by_round = ""
            if len(f["rounds"]) > 1:
                by_round = "; by round: " + ", ".join(f"{a['attn_ms'] / b['attn_ms']:.2f}x | "
                                                     f"{a['layer_attn_ms'] / b['layer_attn_ms']:.2f}x"
                                                     for a, b in zip(f["rounds"], m["rounds"]))
            print(f"  {model} {length}: {f['attn_ms'] / m['attn_ms']:.2f}x | "
                  f"{f['layer_attn_ms'] / m['layer_attn_ms']:.2f}x{by_round}")


def _by_context(rows):
    out = {}
    for r in rows:
        out.setdefault((r["model"], r["context"]), {})[r["policy"]] = r
    return out


def main(args) -> int:
    from kvserve.args import engine_config
    from kvserve.attention.policy import parse_attention
    from kvserve.config import CacheConfig, EngineConfig, SchedulerConfig
    from kvserve.engine.engine import Engine, load_tokenizer, resolve_dtype
    from kvserve.eval.texts import long_text
    policies = [parse_attention(p) for p in args.policies]
    lengths, long_lengths = args.lengths, args.long_lengths
    page, slack = args.page_size, 4 * args.steps + 64
    offloaded = [p for p in policies if p.offload]
    if offloaded:  # the engine's default: it builds the offload pools (every request names its policy)
        args.attention = offloaded[0]
    rows = []
    if lengths:
        # at least what one group of layers holds; --num-pages raises it (a model with KV groups
        # holds a table per group: Gemma 3 270M, 6 groups, needs about 6x in its prompt's step)
        args.num_pages = max(args.num_pages or 0, sum(lengths) // page + len(lengths) * (len(policies) + 2) + slack)
        args.max_num_batched_tokens = max(lengths)  # a whole prompt in one step: one causal SDPA
        config = engine_config(args)
        if offloaded and args.offload_kv_gb is None:
            config.cache.offload_pages = sum(lengths) // page + len(lengths) * 4 + slack
        if args.random_weights:
            engine = _random_weights_engine(config, max(lengths) + slack)
            g = torch.Generator().manual_seed(0)
            vocab = engine.model.config.vocab_size
            prompts = {n: torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths}
            long_lengths = []  # this shape is the long-context model
        else:
            engine = Engine(config)
            text = engine.tokenizer.encode(long_text(6 * max(lengths)))
            if len(text) < max(lengths):
                raise SystemExit(f"only {len(text)} tokens of text for a {max(lengths)}-token context")
            # a distinct first token per context, so no context is a cache hit of another; room left
            # for the decode steps within the model's context
            prompts = {n: [1000 + i] + text[:min(n, engine.max_model_len - args.steps - 2) - 1]
                       for i, n in enumerate(lengths)}
        rows += run_contexts(engine, prompts, policies, args.steps, args.random_weights or "default", args.rounds)
        del engine
    if long_lengths:
        model = random_long_llama(args.long_layers, max(long_lengths) + slack, resolve_dtype(args.dtype, "cpu"),
                                  quantization=args.quantization)
        cache = CacheConfig(page, sum(long_lengths) // page + slack * len(long_lengths))
        if offloaded:
            cache.offload_pages = cache.num_pages
        cfg = EngineConfig(dtype=args.dtype, threads=args.threads, cache=cache, attention=args.attention,
                           scheduler=SchedulerConfig(max(long_lengths), 4))
        engine = Engine(cfg, model=model, tokenizer=load_tokenizer(None))
        g = torch.Generator().manual_seed(0)
        prompts = {n: torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist() for n in long_lengths}
        rows += run_contexts(engine, prompts, policies, args.steps, f"random-{args.long_layers}L", args.rounds)
    print_table(rows)
    return 0


def _random_weights_engine(config, max_positions: int):
    """An engine on config.random_weights' shape with its context stretched to max_positions (random
    weights have no trained context length; rope extends)."""
    import dataclasses

    from kvserve.engine.engine import Engine, resolve_device, resolve_dtype
    from kvserve.model.llama import LlamaForCausalLM
    from kvserve.model.random_weights import RandomWeights, shape_config, token_tokenizer
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    cfg = shape_config(config.random_weights)
    cfg = dataclasses.replace(cfg, max_position_embeddings=max(max_positions, cfg.max_position_embeddings))
    model = LlamaForCausalLM.from_weights(cfg, RandomWeights(cfg, dtype, device, config.seed), dtype, device)
    return Engine(config, model=model, tokenizer=token_tokenizer(cfg.vocab_size))
