"""kvserve bench latency --speculative ngram|self|draft: the same greedy requests with
speculative decoding off and on, in one process over one loaded model, alternating rounds.

Workloads: `grounded` (rewrite a ~1k-token text: the output copies its input), `chat` (free
writing), `long` (continue a text of --spec-context tokens: self speculation's case; past the
model's context length the rope is extended and the engine's length limit raised, which is
a speed measurement, not a quality one; --spec-rope-scale F interpolates positions instead, RoPE's
linear scaling by F, untuned), and --spec-batch B streams of `grounded` over 300-token texts at once.
Prints decode tok/s of each, their ratio, whether the outputs are identical, the acceptance rate
and the mean accepted length (tokens per verification step)."""
import dataclasses
import statistics
import time

from kvserve.args import engine_config

GROUNDED = "Rewrite the following text in your own words, keeping every detail:\n\n{text}"
CHAT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
LONG = "{text}\n\nContinue the text above."


def add_args(p) -> None:
    p.add_argument("--spec-workloads", default="grounded,chat",
                   help="comma list of grounded, chat, long, batch (with --speculative)")
    p.add_argument("--spec-context", type=int, default=16384, help="prompt tokens of the long workload")
    p.add_argument("--spec-batch", type=int, default=64, help="streams of the batch workload")
    p.add_argument("--spec-rope-scale", type=float, default=None,
                   help="long: linear RoPE scaling by this factor (position interpolation, no tuning), so the "
                        "model reads past its context length; off: positions past it are extrapolated")
    p.add_argument("--spec-clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: this process's CPU time, steadier than wall time on a shared machine "
                        "(with --threads 1; more threads also count their spinning)")


def main(args) -> int:
    import torch

    from kvserve.engine.engine import Engine
    from kvserve.engine.request import SamplingParams
    from kvserve.eval.texts import long_text
    cfg = engine_config(args)
    workloads = args.spec_workloads.split(",")
    need = max(args.spec_context if "long" in workloads else 0, 4096) + args.output_len + 64
    plain_cfg = dataclasses.replace(cfg, speculative=None,
                                    cache=dataclasses.replace(cfg.cache, num_pages=cfg.cache.num_pages or max(
                                        512, (need + 1200 * args.spec_batch * ("batch" in workloads)) // cfg.cache.page_size)))
    plain = Engine(plain_cfg)
    spec = Engine(dataclasses.replace(plain_cfg, speculative=cfg.speculative), model=plain.model,
                  tokenizer=plain.tokenizer)
    if args.spec_rope_scale:
        from kvserve.model.llama import make_rope
        mc = plain.model.config
        mc.rope_scaling = {"rope_type": "linear", "factor": args.spec_rope_scale}
        plain.model.rope = make_rope(mc, mc.rope_theta, mc.rope_scaling, None, plain.device)
    tok = plain.tokenizer
    text = long_text(200_000)
    ids = tok.encode(text)

    def chat(content: str) -> list[int]:
        return tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True)

    prompts = {
        "grounded": [chat(GROUNDED.format(text=tok.decode(ids[:1000])))],
        "chat": [chat(CHAT)],
        "long": [chat(LONG.format(text=tok.decode(ids[:args.spec_context])))],
        "batch": [chat(GROUNDED.format(text=tok.decode(ids[i * 300:i * 300 + 300]))) for i in range(args.spec_batch)],
    }
    print(f"speculative {cfg.speculative}, k={cfg.num_speculative_tokens}; {args.output_len} output tokens, greedy; "
          f"RoPE {plain.model.config.rope_scaling or 'as trained'}; "
          f"{torch.get_num_threads()} threads; {args.rounds} rounds, medians; {args.spec_clock} clock")
    for e in (plain, spec):
        e.max_model_len = max(e.max_model_len, need + 16)  # long: past the context length, see above
        if e.speculator is not None:
            e.speculator.max_model_len = e.max_model_len
    params = SamplingParams(temperature=0, max_tokens=args.output_len)
    clock = time.process_time if args.spec_clock == "cpu" else time.perf_counter
    rows = []
    for name in workloads:
        ps = prompts[name]
        results = {"off": [], "on": []}
        for _ in range(args.rounds):
            for label, engine in (("off", plain), ("on", spec)):
                results[label].append(_timed(engine, ps, params, clock))
        off = statistics.median(r[0] for r in results["off"])
        on = statistics.median(r[0] for r in results["on"])
        same = results["off"][-1][1] == results["on"][-1][1]
        stats = spec.speculator.stats
        rows.append((name, len(ps[0]), off, on, same, stats.acceptance_rate, stats.mean_accepted_length))
        spec.speculator.stats = type(stats)()
    print(f"\n{'workload':<10}{'prompt':>8}{'off tok/s':>11}{'on tok/s':>10}{'ratio':>7}{'same':>6}"
          f"{'accept':>8}{'tok/step':>9}")
    for name, n, off, on, same, rate, mean in rows:
        print(f"{name:<10}{n:>8}{off:>11.1f}{on:>10.1f}{on / off:>6.2f}x{'yes' if same else 'NO':>6}"
              f"{rate:>8.2f}{mean:>9.2f}")
    return 0


def _timed(engine, prompts: list[list[int]], params, clock) -> tuple[float, list]:
    """Decode tokens per second after each request's first token (prompt processing excluded),
    and the outputs. Prefix caching is cleared so both settings prefill the same way."""
    if engine.kv.prefix:
        engine.kv.prefix.clear()
    ids = [engine.add_request(p, params) for p in prompts]
    first, outs = {}, {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.outputs and out.outputs[0].token_ids and out.request_id not in first:
                first[out.request_id] = clock()
            if out.finished:
                outs[out.request_id] = out.outputs[0].token_ids
    end = clock()
    generated = sum(len(outs[i]) - 1 for i in ids)
    return generated / (end - min(first.values())), [outs[i] for i in ids]
