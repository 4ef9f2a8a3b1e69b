"""kvserve bench structured: a batch of requests each constrained by a JSON schema of the corpus
(kvserve/bench/schemas.py) against the same batch unconstrained, generating as many tokens per
row (ignore_eos, max_tokens = the constrained row's length), so that the ratio is the cost of
the constraints alone. The two batches run on two engines of the same config, one step of each in
turn, so that a busy moment of a shared machine slows both alike: each side's time is the sum of
its steps, and since step k of both has the same rows, the per-step ratios pair exactly. Also: validity of the constrained outputs, what the first request for a
new schema pays for its compile, and with `--peer vllm` vLLM-CPU's structured outputs measured the
same way on the same prompts and schemas."""
import json
import statistics
import time

import torch

from kvserve.bench.common import ThroughputResult, print_table, to_json


def add_args(p) -> None:
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=256, help="per constrained request")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--rounds", type=int, default=6, help="runs of both batches, step-interleaved; the fastest counts")
    p.add_argument("--schema-in-prompt", action="store_true",
                   help="write each schema into its prompt (longer prompts: the prefill weighs more)")
    p.add_argument("--peer", choices=["none", "vllm"], default="none")
    p.add_argument("--vllm-python", default=".venv-vllm/bin/python", help="python of a venv with vllm-cpu")
    p.add_argument("--json", action="store_true", help="also print the results as one JSON line")


def _valid(text: str, schema: dict) -> bool:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return False
    try:
        import jsonschema
    except ImportError:  # the test extra: without it, parsing is the check
        return True
    return jsonschema.Draft202012Validator(schema).is_valid(value)


def compile_times(engine, schemas) -> tuple[float, list[float]]:
    """Seconds to build the tokenizer's compiler (once per tokenizer and process: the server does it
    at start) and to compile each schema on a cold cache."""
    from kvserve.engine.structured import GrammarCache, StructuredOutputs
    cache = GrammarCache(engine.tokenizer, engine.model.config.vocab_size, engine.eos_token_ids)
    start = time.perf_counter()
    cache.compiler()
    compiler = time.perf_counter() - start
    cache.compile(StructuredOutputs(json={"type": "object", "properties": {"warm": {"type": "integer"}}}))
    out = []
    for s in schemas:
        start = time.perf_counter()
        cache.compile(StructuredOutputs(json=s))
        out.append(time.perf_counter() - start)
    return compiler, out


def first_request_cost(engine, prompt: list[int], schemas) -> list[float]:
    """Per schema: Engine.add_request's time with the schema new to the engine, less its time once
    the schema is cached (each request aborted at once): what the first request for a schema pays
    for its compile. The server pays the same in its handler, off the engine's thread."""
    from kvserve.engine.request import SamplingParams
    out = []
    for s in schemas:
        params = SamplingParams(temperature=0, max_tokens=1, structured={"json": s})
        times = []
        for _ in range(2):
            start = time.perf_counter()
            rid = engine.add_request(prompt, params)
            times.append(time.perf_counter() - start)
            engine.abort(rid)
        out.append(times[0] - times[1])
    return out


def interleaved(sides: dict, prompts: list[list[int]]) -> dict[str, list[float]]:
    """Runs each side's batch (engine, params per prompt) one step of each engine in turn; the wall
    seconds of every step, per side."""
    from dataclasses import replace
    for engine, params in sides.values():
        if engine.kv.prefix:
            engine.kv.prefix.clear()
        for prompt, sp in zip(prompts, params):
            engine.add_request(prompt, replace(sp, output_kind="final_only"))
    times = {k: [] for k in sides}
    while any(engine.has_unfinished() for engine, _ in sides.values()):
        for k, (engine, _) in sides.items():
            if engine.has_unfinished():
                start = time.perf_counter()
                for out in engine.step():
                    if out.error:
                        raise RuntimeError(f"request {out.request_id} failed: {out.error}")
                times[k].append(time.perf_counter() - start)
    return times


def _ms(xs) -> str:
    return f"mean {1000 * statistics.mean(xs):.1f} ms, median {1000 * statistics.median(xs):.1f} ms, " \
           f"max {1000 * max(xs):.1f} ms"


def main(args) -> int:
    from kvserve.bench.schemas import SCHEMAS
    from kvserve.args import engine_config
    from kvserve.engine.engine import Engine
    from kvserve.engine.request import SamplingParams
    from kvserve.llm import LLM
    if args.peer == "vllm":
        from kvserve.bench.vllm_peer import require_vllm
        require_vllm(args)  # before any work
    if args.threads:
        torch.set_num_threads(args.threads)
    llm = LLM(engine=Engine(engine_config(args)))
    schemas = [SCHEMAS[i % len(SCHEMAS)] for i in range(args.num_prompts)]
    asks = [f"Reply with JSON matching this schema: {json.dumps(s)}" if args.schema_in_prompt else
            f"Reply with a JSON record, number {i}." for i, s in enumerate(schemas)]
    prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": a}], tokenize=True) for a in asks]
    compiler, times = compile_times(llm.engine, SCHEMAS)
    print(f"the tokenizer's grammar compiler, built once: {1000 * compiler:.0f} ms")
    print(f"compile on a cold cache, {len(SCHEMAS)} schemas: {_ms(times)}")
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)  # warm-up
    llm.engine.grammars.json_safe()  # once per engine, as the server's warm-up does at start
    added = first_request_cost(llm.engine, prompts[0], SCHEMAS)
    print(f"first request for a new schema, added over a cached one: {_ms(added)}")

    # every schema is compiled by now (first_request_cost): the batch measures decoding only
    constrained_params = [SamplingParams(temperature=args.temperature, seed=i, max_tokens=args.max_tokens,
                                         structured={"json": s}) for i, s in enumerate(schemas)]
    outs = llm.generate(prompts, constrained_params, use_tqdm=False)
    lengths = [len(o.outputs[0].token_ids) for o in outs]
    plain_params = [SamplingParams(temperature=args.temperature, seed=i, max_tokens=n, ignore_eos=True)
                    for i, n in enumerate(lengths)]
    twin = Engine(engine_config(args))  # runs the unconstrained batch
    twin.add_request(prompts[0], SamplingParams(temperature=0, max_tokens=4))
    while twin.has_unfinished():
        twin.step()
    sides = {"kvserve constrained": (llm.engine, constrained_params),
             "kvserve unconstrained": (twin, plain_params)}
    totals, step_ratios = {k: [] for k in sides}, []
    for r in range(args.rounds):
        order = list(sides) if r % 2 == 0 else list(sides)[::-1]
        steps = interleaved({k: sides[k] for k in order}, prompts)
        for k in sides:
            totals[k].append(sum(steps[k]))
        step_ratios += [p / c for c, p in zip(*(steps[k] for k in sides))]
    constrained, plain = (ThroughputResult(k, len(prompts), sum(map(len, prompts)), sum(lengths), min(totals[k]))
                          for k in sides)
    valid = sum(_valid(o.outputs[0].text, s) for o, s in zip(outs, schemas))
    finished = sum(o.outputs[0].finish_reason == "stop" for o in outs)
    results = [constrained, plain]
    peer = {}
    if args.peer == "vllm":
        from kvserve.bench.vllm_structured import run_vllm_structured
        vc, vp, texts, reasons = run_vllm_structured(args, prompts, schemas)
        results += [min(vc, key=lambda r: r.seconds), min(vp, key=lambda r: r.seconds)]
        peer = {"vllm_valid": sum(_valid(t, s) for t, s in zip(texts, schemas)),
                "vllm_finished": sum(r == "stop" for r in reasons)}
    print(f"workload: {len(prompts)} chat prompts, each constrained by a schema of the corpus; "
          f"{torch.get_num_threads()} threads; {args.rounds} rounds, the two batches' steps "
          f"interleaved")
    print()
    print_table(results, baseline=plain.engine)
    ratio = constrained.output_tok_per_s / plain.output_tok_per_s
    pairs = [p / c for c, p in zip(*totals.values())]
    print(f"kvserve valid: {valid}/{len(outs)} ({finished} finished, the rest cut by max_tokens: 'length')")
    print(f"constrained/unconstrained throughput: {ratio:.3f}x (each side's fastest round); per round "
          f"{', '.join(f'{x:.3f}' for x in pairs)}; median of the {len(step_ratios)} paired steps' ratios "
          f"{statistics.median(step_ratios):.3f}x")
    if peer:
        print(f"vLLM-CPU valid: {peer['vllm_valid']}/{len(schemas)} ({peer['vllm_finished']} finished); "
              f"kvserve constrained / vLLM-CPU constrained: "
              f"{constrained.output_tok_per_s / results[2].output_tok_per_s:.2f}x")
    if args.json:
        print(to_json(results, valid=valid, finished=finished, ratio=ratio, round_ratios=pairs,
                      step_ratio_median=statistics.median(step_ratios),
                      compiler_ms=1000 * compiler, compile_ms=[1000 * t for t in times],
                      first_request_added_ms=[1000 * t for t in added], **peer))
    return 0
