"""kvserve bench structured: a batch of requests each constrained by a JSON schema of the corpus
(kvserve/bench/schemas.py) against the same batch unconstrained, generating as many tokens per
row (ignore_eos, max_tokens = the constrained row's length), so that the ratio is the cost of
the constraints alone. Also: validity of the constrained outputs and each schema's compile time."""
import json
import time

import torch

from kvserve.bench.common import ThroughputResult, print_table, to_json


def add_args(p) -> None:
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=256, help="per constrained request")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--rounds", type=int, default=2, help="runs of each batch, alternating; the fastest counts")
    p.add_argument("--schema-in-prompt", action="store_true",
                   help="write each schema into its prompt (longer prompts: the prefill weighs more)")
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


def compile_times(engine, schemas) -> list[float]:
    """Seconds to compile each schema on a cold cache (the compiler itself warmed up first)."""
    from kvserve.engine.structured import GrammarCache, StructuredOutputs
    cache = GrammarCache(engine.tokenizer, engine.model.config.vocab_size, engine.eos_token_ids)
    cache.compile(StructuredOutputs(json={"type": "object", "properties": {"warm": {"type": "integer"}}}))
    out = []
    for s in schemas:
        start = time.perf_counter()
        cache.compile(StructuredOutputs(json=s))
        out.append(time.perf_counter() - start)
    return out


def main(args) -> int:
    from kvserve.bench.schemas import SCHEMAS
    from kvserve.args import engine_config
    from kvserve.engine.engine import Engine
    from kvserve.engine.request import SamplingParams
    from kvserve.llm import LLM
    if args.threads:
        torch.set_num_threads(args.threads)
    llm = LLM(engine=Engine(engine_config(args)))
    schemas = [SCHEMAS[i % len(SCHEMAS)] for i in range(args.num_prompts)]
    asks = [f"Reply with JSON matching this schema: {json.dumps(s)}" if args.schema_in_prompt else
            f"Reply with a JSON record, number {i}." for i, s in enumerate(schemas)]
    prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": a}], tokenize=True) for a in asks]
    times = compile_times(llm.engine, SCHEMAS)
    print(f"compile on a cold cache, {len(SCHEMAS)} schemas: mean {1000 * sum(times) / len(times):.1f} ms, "
          f"max {1000 * max(times):.1f} ms")
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)  # warm-up
    for s in schemas:  # compiled ahead, as the server does: the batch measures decoding only
        llm.engine.grammars.compile(SamplingParams(structured={"json": s}).structured)

    def run(label, params) -> tuple[ThroughputResult, list]:
        if llm.engine.kv.prefix:
            llm.engine.kv.prefix.clear()
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        return ThroughputResult(label, len(prompts), sum(map(len, prompts)),
                                sum(len(o.outputs[0].token_ids) for o in outs), seconds), outs

    constrained_params = [SamplingParams(temperature=args.temperature, seed=i, max_tokens=args.max_tokens,
                                         structured={"json": s}) for i, s in enumerate(schemas)]
    constrained, outs = run("kvserve constrained", constrained_params)
    lengths = [len(o.outputs[0].token_ids) for o in outs]
    plain_params = [SamplingParams(temperature=args.temperature, seed=i, max_tokens=n, ignore_eos=True)
                    for i, n in enumerate(lengths)]
    plain, _ = run("kvserve unconstrained", plain_params)
    for _ in range(args.rounds - 1):  # alternate, keep each one's fastest: a busy machine's noise is one-sided
        constrained = min(constrained, run(constrained.engine, constrained_params)[0], key=lambda r: r.seconds)
        plain = min(plain, run(plain.engine, plain_params)[0], key=lambda r: r.seconds)
    valid = sum(_valid(o.outputs[0].text, s) for o, s in zip(outs, schemas))
    finished = sum(o.outputs[0].finish_reason == "stop" for o in outs)
    print(f"workload: {len(prompts)} chat prompts, each constrained by a schema of the corpus; "
          f"{torch.get_num_threads()} threads")
    print()
    print_table([constrained, plain], baseline=plain.engine)
    ratio = constrained.output_tok_per_s / plain.output_tok_per_s
    print(f"valid: {valid}/{len(outs)} ({finished} finished before max_tokens, the rest cut: 'length'); "
          f"constrained/unconstrained throughput {ratio:.3f}x")
    if args.json:
        print(to_json([constrained, plain], valid=valid, finished=finished, ratio=ratio,
                      compile_ms_mean=1000 * sum(times) / len(times), compile_ms_max=1000 * max(times)))
    return 0
