"""kvserve eval longctx: how much each decode attention policy changes a real model's answers.

- passkey retrieval: a 5-digit number hidden at a chosen depth of filler text, asked for at the end;
  exact-match rate per context length (prefill is full under every policy, so the prompt is
  computed once and the policies decode from the same cached pages);
- a common-word list (aggregation, `eval/common_word.py`): exact-match rate, and how often each
  policy gives the same answer as full;
- a long text continued token by token (teacher forcing) under each policy: top-1 agreement
  with full attention and perplexity of the true continuation;
- on the same steps, each layer's attention output against full attention over the same K/V.
topk without its own `k` gets MagicPIG's average number of sampled keys per head (the same key
budget), so magicpig runs first.
"""
import argparse
import random
import re
import sys
import time
from collections import defaultdict

import torch

from kvserve.args import at_least_one, token_lengths
from kvserve.attention.policy import parse_attention
from kvserve.attention.sparse.backend import SlotSet
from kvserve.engine.offload import sync_offloaded
from kvserve.engine.request import SamplingParams, Sequence, now
from kvserve.eval.common_word import answered_word, common_word_prompt

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")
INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.\n")
POLICIES = ["full", "magicpig", "topk", "streaming"]


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lengths", type=token_lengths, default="1024,2048,4096,8192",
                   help="passkey prompt lengths in tokens")
    p.add_argument("--trials", type=int, default=4, help="passkey prompts per length (depths spread evenly)")
    p.add_argument("--agg-lengths", type=token_lengths, default="1024,2048",
                   help="common-word (aggregation) prompt lengths in tokens ('' for none)")
    p.add_argument("--agg-trials", type=at_least_one, default=12, help="common-word prompts per length")
    p.add_argument("--agg-share", type=_share, default=0.33, help="the common word's share of the list's items")
    p.add_argument("--policies", nargs="+", default=POLICIES, help="as for --attention; full is always run")
    p.add_argument("--ppl-context", type=int, default=4096, help="tokens of text before the scored ones (0: skip)")
    p.add_argument("--ppl-tokens", type=int, default=64, help="tokens scored one decode step at a time")


def _share(text: str) -> float:
    x = float(text)
    if not 0 < x <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {x}")
    return x


def passkey_prompt(tokenizer, length: int, depth: float, key: int) -> list[int]:
    """INTRO + filler with the key sentence at `depth` (0 = start, 1 = end) + the question, a little
    under `length` tokens (room for the answer)."""
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    question = "What is the pass key? The pass key is"
    unit = len(tokenizer.encode(FILLER))
    room = length - len(tokenizer.encode(INTRO + needle + question)) - 16
    n = max(1, room // unit)
    before = round(n * depth)
    return tokenizer.encode(INTRO + FILLER * before + needle + FILLER * (n - before) + question)


def _generate(engine, prompt: list[int], policy, max_tokens: int) -> str:
    rid = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=max_tokens, attention=policy))
    text = ""
    while rid in engine.requests:
        for out in engine.step():
            if out.error:
                raise RuntimeError(out.error)
            if out.request_id == rid:
                text = out.outputs[0].text
    return text


def _matched_topk(engine, policies):
    """topk policies without a k take magicpig's latest average sampled keys per head."""
    pa = engine.runner.policy_attention
    k = max(1, round(pa.sampled_pairs / pa.sampled_heads)) if pa.sampled_heads else None
    out = []
    for p in policies:
        if p.policy == "topk" and p.k is None and k is not None:
            p = parse_attention({"policy": "topk", "k": k, "sink": p.sink, "window": p.window,
                                 "dense_layers": list(p.dense_layers)})
        out.append(p)
    return out


def _answers(engine, prompt: list[int], policies, max_tokens: int) -> tuple[dict, int | None]:
    """Each policy's greedy answer to one prompt, and the k topk ran with."""
    pa = engine.runner.policy_attention
    pa.sampled_pairs = pa.sampled_heads = 0
    answers, k = {}, None
    for policy in policies:
        run = _matched_topk(engine, [policy])[0]
        if run.policy == "topk":
            k = run.k
        answers[policy] = _generate(engine, prompt, run, max_tokens)
    return answers, k


def passkey(engine, lengths, trials, policies) -> dict:
    rng = random.Random(0)
    hits = defaultdict(int)
    budgets = defaultdict(list)
    for length in lengths:
        for t in range(trials):
            key = rng.randrange(10000, 100000)
            prompt = passkey_prompt(engine.tokenizer, length, (t + 0.5) / trials, key)
            start = time.perf_counter()
            answers, k = _answers(engine, prompt, policies, 10)
            if k is not None:
                budgets[length].append(k)
            for policy, a in answers.items():
                hits[length, policy] += re.sub(r"\D", "", a).startswith(str(key))
            print(f"passkey {length} tokens (built {len(prompt)}), depth {(t + 0.5) / trials:.2f}, key {key}: "
                  + ", ".join(f"{p.label}={a.strip()[:12]!r}" for p, a in answers.items())
                  + f" ({time.perf_counter() - start:.0f}s)", file=sys.stderr, flush=True)
    return {"hits": hits, "budgets": budgets}


def common_word(engine, lengths, trials, share, policies) -> dict:
    """Exact-match rate of the common-word task, and how often each policy gives full's answer."""
    rng = random.Random(1)
    hits, same = defaultdict(int), defaultdict(int)
    budgets = defaultdict(list)
    for length in lengths:
        for _ in range(trials):
            prompt, word = common_word_prompt(engine.tokenizer, length, share, rng)
            start = time.perf_counter()
            answers, k = _answers(engine, prompt, policies, 16)
            if k is not None:
                budgets[length].append(k)
            named = {p: answered_word(a) for p, a in answers.items()}
            full = next(named[p] for p in policies if p.is_full)
            for p, w in named.items():
                hits[length, p] += w == word
                same[length, p] += w == full
            print(f"common word {length} tokens (built {len(prompt)}), word {word!r}: "
                  + ", ".join(f"{p.label}={w!r}" for p, w in named.items())
                  + f" ({time.perf_counter() - start:.0f}s)", file=sys.stderr, flush=True)
    return {"hits": hits, "same": same, "budgets": budgets}


def forced_logits(engine, ids: list[int], context: int, policy) -> torch.Tensor:
    """Logits predicting ids[context:] when ids[:context] is the prompt and every later token is
    fed one decode step at a time under policy (teacher forcing)."""
    seq = Sequence(-1, "eval-forced", 0, ids[:context], SamplingParams(attention=policy), now())
    seq.num_computed_tokens = engine.kv.match_prefix(seq)
    rows = []
    try:
        for nxt in range(context, len(ids)):
            n = len(seq.token_ids) - seq.num_computed_tokens
            if not engine.kv.allocate(seq, len(seq.token_ids)):
                raise RuntimeError("the KV cache is too small for the text")
            logits, _ = engine.runner.execute([(seq, n)])
            seq.num_computed_tokens += n
            engine.kv.cache_computed_pages(seq)
            rows.append(logits[0].float())
            seq.token_ids.append(ids[nxt])
            sync_offloaded(engine.kv, [(seq, n)])  # as Engine.step: offload's rows to its pools
    finally:
        engine.kv.free(seq)
    return torch.stack(rows)


class ErrorProbe:
    """Wraps PolicyAttention._decode, which every sparse decode whose K/V the pool holds goes through
    (offloaded ones do not): its output against full attention over the same K/V, relative L2 error
    per layer."""

    def __init__(self, pa):
        self.errors: dict[int, list[float]] = defaultdict(list)
        inner = pa._decode

        def decode(layer, d, q, k_cache, v_cache):
            out = inner(layer, d, q, k_cache, v_cache)
            pages = torch.tensor(d.seq.tables[pa.route[layer][0]], dtype=torch.long)  # its KV group's
            pos = torch.arange(d.kv_len)
            slots = pages[pos // pa.pool.page_size] * pa.pool.page_size + pos % pa.pool.page_size
            ref, _ = pa._dense(q, *pa._gather_slots(k_cache, v_cache, SlotSet.of(slots, k_cache.device)))
            self.errors[layer].append(((out.float() - ref.float()).norm() / ref.float().norm()).item())
            return out
        pa._decode = decode  # shadows the method for this instance, until restore
        self.restore = lambda: delattr(pa, "_decode")


def continuation(engine, context: int, tokens: int, policies) -> list[dict]:
    from kvserve.eval.texts import long_text
    ids = engine.tokenizer.encode(long_text(8 * (context + tokens)))[:context + tokens]
    if len(ids) < context + tokens:
        raise SystemExit(f"only {len(ids)} tokens of text")
    target = torch.tensor(ids[context:])
    full = forced_logits(engine, ids, context, parse_attention("full"))
    pa = engine.runner.policy_attention
    results = []
    for policy in policies:
        pa.keys_read = pa.keys_total = 0
        if policy.policy != "full":
            pa.sampled_pairs = pa.sampled_heads = 0
        run = _matched_topk(engine, [policy])[0]
        probe = ErrorProbe(pa) if not policy.is_full else None
        start = time.perf_counter()
        logits = full if policy.is_full else forced_logits(engine, ids, context, run)
        if probe:
            probe.restore()
        # the first row comes from the prompt's prefill, full under every policy: scored rows are decodes
        lp = torch.log_softmax(logits[1:], -1)
        nll = -lp[torch.arange(len(target) - 1), target[1:]]
        results.append({"policy": run.label if run.policy != "topk" else f"topk(k={run.k})",
                        "agree": (logits[1:].argmax(-1) == full[1:].argmax(-1)).float().mean().item(),
                        "ppl": torch.exp(nll.mean()).item(),
                        "keys_read": pa.keys_read / pa.keys_total if pa.keys_total else 1.0,
                        "errors": {layer: sum(e) / len(e) for layer, e in sorted(probe.errors.items())} if probe else {}})
        print(f"continuation under {results[-1]['policy']}: {time.perf_counter() - start:.0f}s",
              file=sys.stderr, flush=True)
    return results


def _print_rates(res, lengths, trials, policies) -> None:
    print(f"{'length':>8}" + "".join(f"{p.label:>16}" for p in policies) + "   topk k")
    for n in lengths:
        budget = res["budgets"].get(n)
        rates = [f"{100 * res['hits'][n, p] / trials:.0f}%" for p in policies]
        if "same" in res:
            rates = [r + ("" if p.is_full else f" ({100 * res['same'][n, p] / trials:.0f}%)")
                     for r, p in zip(rates, policies)]
        print(f"{n:>8}" + "".join(f"{r:>16}" for r in rates)
              + (f"   {sum(budget) / len(budget):.0f}" if budget else ""))


def main(args) -> int:
    from kvserve.args import engine_config
    from kvserve.engine.engine import Engine
    lengths, agg_lengths = args.lengths, args.agg_lengths
    policies = [parse_attention(p) for p in args.policies]
    if not any(p.is_full for p in policies):
        policies.insert(0, parse_attention("full"))
    # magicpig before topk, whose default budget copies magicpig's
    policies.sort(key=lambda p: {"full": 0, "magicpig": 1}.get(p.policy, 2))
    longest = max(lengths + agg_lengths + [args.ppl_context + args.ppl_tokens])
    args.num_pages = args.num_pages or 2 * longest // args.page_size + 256
    args.max_num_batched_tokens = max(args.max_num_batched_tokens, longest)
    engine = Engine(engine_config(args))
    if engine.max_model_len < longest:
        print(f"note: the model's context is {engine.max_model_len} tokens", file=sys.stderr)
    if lengths and args.trials:
        res = passkey(engine, lengths, args.trials, policies)
        print(f"passkey retrieval, exact match over {args.trials} depths per length:")
        _print_rates(res, lengths, args.trials, policies)
    if agg_lengths:
        res = common_word(engine, agg_lengths, args.agg_trials, args.agg_share, policies)
        print(f"common word ({100 * args.agg_share:.0f}% of a word list), exact match over {args.agg_trials} "
              "lists per length (in brackets: the same answer as full):")
        _print_rates(res, agg_lengths, args.agg_trials, policies)
    if args.ppl_context:
        rows = continuation(engine, args.ppl_context, args.ppl_tokens, policies)
        print(f"continuation of {args.ppl_tokens} tokens after {args.ppl_context} tokens of text (teacher forced):")
        print(f"{'policy':<16}{'top-1 agree':>12}{'perplexity':>12}{'keys read':>11}{'attn rel err (mean, max layer)':>32}")
        for r in rows:
            err = r["errors"]
            e = (f"{sum(err.values()) / len(err):.4f}, {max(err.values()):.4f} (layer {max(err, key=err.get)})"
                 if err else "-")
            print(f"{r['policy']:<16}{100 * r['agree']:>11.1f}%{r['ppl']:>12.3f}{100 * r['keys_read']:>10.1f}%{e:>32}")
        for r in rows:
            if r["errors"]:
                print(f"per-layer attention output relative error, {r['policy']}: "
                      + " ".join(f"{e:.3f}" for e in r["errors"].values()))
    return 0
