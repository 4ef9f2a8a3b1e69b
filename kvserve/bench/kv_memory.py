"""kvserve bench kv-memory: the KV memory a long chat holds on a model with sliding-window layers.

One greedy request (a prompt of real text, then decode steps) runs twice on the same engine: as
served, where each windowed KV group gives back the pages behind its window (kvserve/kv/groups.py),
and with that release switched off, where every layer keeps every page (what the model held before
KV groups, and what a full-attention model of its size holds). Pages are counted from the pool
after every step (prefix caching off: every page in use is the request's); the peak of each run
and its bytes are printed, and the two runs' tokens are checked equal."""
import argparse
import json

from kvserve.args import at_least_one, engine_config


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt-tokens", type=at_least_one, default=4096)
    p.add_argument("--output-tokens", type=at_least_one, default=64)


def run(engine, prompt: list[int], max_tokens: int) -> tuple[int, list[int]]:
    """(peak pages in use, output tokens) of one greedy request."""
    from kvserve.engine.request import SamplingParams
    pool = engine.pool
    rid = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    peak, tokens = 0, None
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id == rid and out.finished:
                tokens = out.outputs[0].token_ids
        peak = max(peak, pool.num_pages - pool.num_free - len(pool.reserved))
    return peak, tokens


def main(args) -> int:
    from kvserve.engine.engine import Engine
    from kvserve.eval.texts import long_text
    args.no_prefix_caching = True
    engine = Engine(engine_config(args))
    prompt = engine.tokenizer.encode(long_text(8 * args.prompt_tokens))[:args.prompt_tokens]
    pool, groups, mc = engine.pool, engine.kv_groups, engine.model.config
    page_bytes = pool.bytes_per_page(groups.slots, pool.page_size, mc.num_kv_heads, mc.head_dim, pool.k.dtype)
    held, tokens = run(engine, prompt, args.output_tokens)
    release = engine.kv.release_windows
    engine.kv.release_windows = lambda seq: None  # every layer keeps every page
    kept, kept_tokens = run(engine, prompt, args.output_tokens)
    engine.kv.release_windows = release
    engine.kv.check_integrity([])
    mib = 2 ** 20
    print(json.dumps({
        "model": mc.architecture, "layers": mc.num_layers, "windows": groups.windows, "layers_per_page": groups.slots,
        "page_size": pool.page_size, "tokens": len(prompt) + args.output_tokens,
        "pages_held": held, "kv_mib_held": round(held * page_bytes / mib, 2),
        "pages_held_without_release": kept, "kv_mib_without_release": round(kept * page_bytes / mib, 2),
        "saving": round(kept / held, 2), "same_tokens": tokens == kept_tokens}))
    return 0 if tokens == kept_tokens else 1
