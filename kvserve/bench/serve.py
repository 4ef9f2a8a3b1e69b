"""kvserve bench serve: streaming load on any OpenAI-compatible server (kvserve, llama-cpp-python,
vLLM), at a fixed concurrency or with Poisson arrivals, and the latencies users feel.

TTFT is the time to the first streamed text, ITL the gaps between streamed chunks, TPOT a
request's decode time over its output tokens after the first. Output tokens are the server's own
count (stream_options.include_usage) where it gives one, else the number of text chunks.
"""
import argparse
import asyncio
import json
import os
import random
import time
from dataclasses import dataclass, field

import httpx
import numpy as np
from tqdm import tqdm

from kvserve.args import at_least_one, positive


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", required=True, help="the server's OpenAI base, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--model", default=None, help="model id to send (default: the server's first model)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=at_least_one, default=None, help="clients sending back to back (default 8)")
    load.add_argument("--request-rate", type=positive, default=None, help="Poisson arrivals per second")
    p.add_argument("--num-prompts", type=at_least_one, default=64)
    p.add_argument("--input-len", type=at_least_one, default=128, help="prompt tokens (by --tokenizer's count)")
    p.add_argument("--output-len", type=at_least_one, default=128)
    p.add_argument("--tokenizer", default=None, help="model file whose tokenizer writes the prompts "
                   "(default: the packaged SmolLM2)")
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="ask for exactly --output-len tokens (vLLM's extension; off for servers that reject it)")
    p.add_argument("--ban-eos", action="store_true",
                   help="send logit_bias -100 on the EOS ids: exact lengths where ignore_eos is unknown")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=positive, default=600.0, help="seconds per request")
    p.add_argument("--json", action="store_true", help="also print the results as one JSON line")


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)


def make_prompts(num: int, input_len: int, tokenizer_path: str | None, seed: int) -> tuple[list[str], list[int]]:
    """Random-token texts that re-tokenize to about input_len tokens (the same workload for every
    server, whatever it tokenizes with), and the tokenizer's EOS ids."""
    from kvserve.engine.engine import load_tokenizer
    tok = load_tokenizer(tokenizer_path)
    rng = random.Random(seed)
    prompts = []
    for _ in range(num):
        text = tok.decode([rng.randrange(100, tok.vocab_size - 100) for _ in range(input_len)])
        prompts.append(tok.decode(tok.encode(text, add_special_tokens=False)[:input_len]))
    return prompts, tok.eos_token_ids


def request_body(args, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}
    if args.ignore_eos:
        body["ignore_eos"] = True
    if args.ban_eos:  # exact output lengths on servers without ignore_eos (llama-cpp-python)
        body["logit_bias"] = {str(i): -100 for i in args.eos_ids}
    if args.endpoint == "chat":
        return body | {"messages": [{"role": "user", "content": prompt}]}
    return body | {"prompt": prompt}


async def send(client: httpx.AsyncClient, url: str, body: dict) -> RequestResult:
    result, chunks, usage_tokens = RequestResult(), [], None
    start = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                result.error = f"HTTP {r.status_code}: {(await r.aread())[:200].decode(errors='replace')}"
                return result
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    result.error = str(event["error"])
                    return result
                if event.get("usage"):
                    usage_tokens = event["usage"].get("completion_tokens")
                for choice in event.get("choices") or []:
                    text = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
                    if text:
                        chunks.append(time.perf_counter())
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        result.error = f"{type(e).__name__}: {e}"
        return result
    result.latency = time.perf_counter() - start
    if not chunks:
        result.error = "no text streamed"
        return result
    result.ok = True
    result.ttft = chunks[0] - start
    result.itl = [b - a for a, b in zip(chunks, chunks[1:])]
    result.output_tokens = usage_tokens if usage_tokens is not None else len(chunks)
    return result


async def run_load(args, url: str, bodies: list[dict], client: httpx.AsyncClient) -> tuple[list[RequestResult], float]:
    results: list[RequestResult] = []
    bar = tqdm(total=len(bodies), desc="requests", unit="req")

    async def one(body):
        res = await send(client, url, body)
        results.append(res)
        bar.update(1)

    start = time.perf_counter()
    if args.request_rate is not None:
        rng = random.Random(args.seed)
        tasks = []
        for body in bodies:
            tasks.append(asyncio.create_task(one(body)))
            await asyncio.sleep(rng.expovariate(args.request_rate))
        await asyncio.gather(*tasks)
    else:
        queue = list(reversed(bodies))

        async def client_loop():
            while queue:
                await one(queue.pop())
        await asyncio.gather(*(client_loop() for _ in range(args.concurrency or 8)))
    duration = time.perf_counter() - start
    bar.close()
    return results, duration


def _stats(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "p50": None, "p99": None}
    a = np.asarray(values) * 1000
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99))}


def summarize(results: list[RequestResult], duration: float, args) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    errors = sorted({r.error for r in results if not r.ok})
    return {
        "base_url": args.base_url, "endpoint": args.endpoint,
        "concurrency": None if args.request_rate is not None else (args.concurrency or 8),
        "request_rate": args.request_rate, "input_len": args.input_len, "output_len": args.output_len,
        "completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
        "request_throughput": len(ok) / duration, "output_throughput": out_tokens / duration,
        "total_output_tokens": out_tokens,
        "ttft_ms": _stats([r.ttft for r in ok]), "tpot_ms": _stats(tpot),
        "itl_ms": _stats([x for r in ok for x in r.itl]), "errors": errors[:5],
    }


def print_table(s: dict) -> None:
    load = f"concurrency {s['concurrency']}" if s["concurrency"] else f"{s['request_rate']} req/s Poisson"
    print(f"serving benchmark: {s['base_url']} ({s['endpoint']}), {load}, "
          f"{s['input_len']} in / {s['output_len']} out tokens")
    print(f"{'requests completed / failed':<32}{s['completed']} / {s['failed']}")
    print(f"{'duration (s)':<32}{s['duration_s']:.2f}")
    print(f"{'request throughput (req/s)':<32}{s['request_throughput']:.2f}")
    print(f"{'output throughput (tok/s)':<32}{s['output_throughput']:.1f}")
    print(f"{'':<12}{'mean':>10}{'p50':>10}{'p99':>10}")
    for name, key in (("TTFT (ms)", "ttft_ms"), ("TPOT (ms)", "tpot_ms"), ("ITL (ms)", "itl_ms")):
        row = s[key]
        cells = "".join(f"{row[k]:>10.1f}" if row[k] is not None else f"{'-':>10}" for k in ("mean", "p50", "p99"))
        print(f"{name:<12}{cells}")
    for e in s["errors"]:
        print(f"error: {e}")


async def bench(args) -> int:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    base = args.base_url.rstrip("/")
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(headers=headers, timeout=args.timeout, limits=limits) as client:
        model = args.model
        try:
            if model is None:
                r = await client.get(f"{base}/models")
                r.raise_for_status()
                model = r.json()["data"][0]["id"]
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
            print(f"kvserve bench serve: cannot list the models of {base}: {type(e).__name__}: {e}")
            return 1
        url = f"{base}/{'chat/completions' if args.endpoint == 'chat' else 'completions'}"
        prompts, args.eos_ids = make_prompts(args.num_prompts, args.input_len, args.tokenizer, args.seed)
        warm = await send(client, url, request_body(args, model, prompts[0], 4))
        if not warm.ok:
            print(f"kvserve bench serve: the warm-up request failed: {warm.error}")
            return 1
        bodies = [request_body(args, model, p, args.output_len) for p in prompts]
        results, duration = await run_load(args, url, bodies, client)
    summary = summarize(results, duration, args)
    print_table(summary)
    if args.json:
        print(json.dumps(summary))
    return 0 if summary["failed"] == 0 else 1


def main(args) -> int:
    return asyncio.run(bench(args))
