"""kvserve bench latency --random-weights SHAPE: one stream's time to first token and time per
output token, kvserve and transformers on the same random weights in this process, against the
bandwidth floor (every weight read once per token). For GPU hosts, which have no model file."""
import time

import torch

from kvserve.bench.common import random_prompts
from kvserve.bench.floor import measure_peaks, synchronize, token_floor
from kvserve.bench.throughput import release_device_memory
from kvserve.model.random_weights import shape_config


def kvserve_latency(args, prompt: list[int]) -> tuple[float, float]:
    from kvserve.args import engine_config
    from kvserve.engine.engine import Engine
    from kvserve.engine.request import SamplingParams
    engine = Engine(engine_config(args))
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    timings = []
    for _ in range(2):  # the first run warms up kernels and allocators
        engine.add_request(prompt, params)
        start, first = time.perf_counter(), None
        while engine.has_unfinished():
            outs = engine.step()
            if first is None and outs and outs[0].outputs[0].token_ids:
                first = time.perf_counter()
        timings.append((first - start, (time.perf_counter() - first) / (args.output_len - 1)))
        if engine.kv.prefix:
            engine.kv.prefix.clear()  # the second run computes its prompt again
    return timings[-1]


def transformers_latency(args, prompt: list[int], dtype, device) -> tuple[float, float]:
    from kvserve.bench.transformers_peer import load_transformers_model
    model = load_transformers_model(None, dtype, device, args.random_weights)
    ids = torch.tensor([prompt], device=device)

    def generate(n: int) -> float:
        synchronize(device)
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)
        synchronize(device)
        return time.perf_counter() - start
    generate(2)  # warm-up
    ttft, total = generate(1), generate(args.output_len)
    return ttft, (total - ttft) / (args.output_len - 1)


def main(args) -> int:
    from kvserve.engine.engine import resolve_device, resolve_dtype
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    shape = shape_config(args.random_weights)
    prompt = random_prompts(1, args.prompt_len, shape.vocab_size, seed=1)[0]
    print(f"one stream, {args.random_weights} random weights on {device} ({dtype}): {args.prompt_len}-token "
          f"prompt -> {args.output_len} tokens")
    rows = [("kvserve", *kvserve_latency(args, prompt))]
    release_device_memory()
    if args.peer != "none":
        rows.append(("transformers generate", *transformers_latency(args, prompt, dtype, device)))
    floor = token_floor(shape, dtype, measure_peaks(device, dtype))
    print(f"\n{'engine':<24}{'TTFT ms':>10}{'ms/token':>10}{'x floor':>9}")
    for name, ttft, tpot in rows:
        print(f"{name:<24}{ttft * 1e3:>10.2f}{tpot * 1e3:>10.3f}{tpot / floor:>9.2f}")
    print(f"bandwidth floor {floor * 1e3:.3f} ms/token (the weights read once per token at the copy bandwidth "
          f"measured here)")
    if len(rows) > 1:
        print(f"kvserve / transformers: time per token {rows[1][2] / rows[0][2]:.2f}x faster, "
              f"TTFT {rows[1][1] / rows[0][1]:.2f}x faster")
    return 0
