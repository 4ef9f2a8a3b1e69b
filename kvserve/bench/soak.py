"""kvserve bench soak: long mixed traffic with faults against a running server, and whether it
stays healthy: every request answered, no 5xx but the queue's own 503s, no leaked KV page, flat
RSS and a steady time per token.

Each client loops: 5% malformed requests (expect 4xx), 10% streams dropped after a few chunks,
5% long-context prompts, the rest chat requests over a few shared system prompts (prefix-cache
hits), half streamed. Every --burst-every seconds a burst of short requests goes past the queue
limit (expect 429s). Structured output is not sent: kvserve does not support it yet.
"""
import argparse
import asyncio
import json
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
import numpy as np

from kvserve.args import at_least_one, non_negative, positive

SYSTEMS = ["You are a terse assistant. Answer in one sentence.",
           "You are a helpful assistant who explains things to children, with small examples.",
           "You are a pirate. Answer every question as a pirate would, with nautical words."]
TOPICS = ["the moon", "bread", "rivers", "prime numbers", "owls", "trains", "volcanoes", "chess", "tea", "rain"]
MALFORMED = [  # (body, content type): each must get a 4xx with an OpenAI error
    ("{not json", "application/json"),
    (json.dumps({"messages": []}), "application/json"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}), "application/json"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}), "application/json"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "bogus_field": 1}), "application/json"),
    (json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}), "application/json"),
    (json.dumps({"messages": "hello"}), "text/plain"),
    (json.dumps({"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}), "application/json"),
]


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server (with or without /v1)")
    p.add_argument("--api-key", default=os.environ.get("KVSERVE_API_KEY") or os.environ.get("OPENAI_API_KEY"))
    p.add_argument("--minutes", type=positive, default=1.0)
    p.add_argument("--clients", type=at_least_one, default=32)
    p.add_argument("--max-tokens", type=at_least_one, default=48, help="largest max_tokens of a request")
    p.add_argument("--long-words", type=at_least_one, default=1200, help="words of a long-context prompt")
    p.add_argument("--burst-every", type=non_negative, default=30.0, help="seconds between bursts (0: none)")
    p.add_argument("--burst-size", type=at_least_one, default=64)
    p.add_argument("--window", type=positive, default=None, help="seconds per report row (default: a tenth of the run)")
    p.add_argument("--server-pid", type=int, default=None, help="for RSS (default: whoever listens on the port)")
    p.add_argument("--timeout", type=positive, default=300.0, help="seconds a request may take before it counts "
                                                                 "as unanswered")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the report here")


@dataclass
class Record:
    start: float
    kind: str  # chat | stream | long | malformed | disconnect | burst
    outcome: str  # ok | rejected_429 | timeout_503 | malformed_4xx | disconnected | error_<status> | no_answer
    ttft: float | None = None
    tpot: float | None = None


@dataclass
class Soak:
    base: str
    headers: dict
    model: str
    args: argparse.Namespace
    records: list[Record] = field(default_factory=list)
    rss: list[tuple[float, float, float]] = field(default_factory=list)  # (s since start, MiB, MiB less KV)
    t0: float = field(default_factory=time.monotonic)

    def body(self, rng: random.Random, long: bool = False) -> dict:
        topic = rng.choice(TOPICS)
        text = f"Tell me about {topic}." if not long else \
            " ".join(rng.choice(TOPICS).split()[-1] for _ in range(self.args.long_words)) + f" Now: {topic}?"
        return {"model": self.model, "max_tokens": rng.randint(4, self.args.max_tokens),
                "temperature": rng.choice((0.0, 0.8)), "seed": rng.randrange(1000),
                "messages": [{"role": "system", "content": rng.choice(SYSTEMS)}, {"role": "user", "content": text}]}

    async def one(self, http: httpx.AsyncClient, rng: random.Random, kind: str) -> Record:
        rec = Record(time.monotonic() - self.t0, kind, "ok")
        try:
            if kind == "malformed":
                content, ctype = rng.choice(MALFORMED)
                r = await http.post("/v1/chat/completions", content=content, headers={"Content-Type": ctype})
                rec.outcome = "malformed_4xx" if 400 <= r.status_code < 500 and "error" in r.json() else \
                    f"error_{r.status_code}"
                return rec
            body = self.body(rng, long=kind == "long")
            if kind in ("chat", "burst") or (kind == "long" and rng.random() < 0.5):
                r = await http.post("/v1/chat/completions", json=body)
                rec.outcome = _outcome(r.status_code)
                return rec
            body |= {"stream": True, "stream_options": {"include_usage": True}}
            start = time.monotonic()
            first = last = None
            tokens, chunks = 0, 0
            async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    await r.aread()
                    rec.outcome = _outcome(r.status_code)
                    return rec
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        rec.outcome = "error_in_stream"
                        return rec
                    if any(c.get("delta", {}).get("content") for c in event.get("choices", [])):
                        last = time.monotonic()
                        first = first or last
                        chunks += 1
                    tokens = (event.get("usage") or {}).get("completion_tokens", tokens)
                    if kind == "disconnect" and chunks >= 2:
                        rec.outcome = "disconnected"  # leaving the block closes the connection
                        return rec
            if first is not None:
                rec.ttft = first - start
                n = tokens or chunks
                rec.tpot = (last - first) / (n - 1) if n > 1 else None
            return rec
        except httpx.TimeoutException:
            rec.outcome = "no_answer"
        except httpx.HTTPError as e:
            rec.outcome = f"error_{type(e).__name__}"
        except ValueError:  # a body or event that is not the JSON it should be
            rec.outcome = "error_bad_json"
        return rec

    async def client(self, i: int, deadline: float) -> None:
        rng = random.Random(self.args.seed * 1000 + i)
        async with self._http() as http:
            while time.monotonic() < deadline:
                x = rng.random()
                kind = "malformed" if x < 0.05 else "disconnect" if x < 0.15 else "long" if x < 0.20 else \
                    rng.choice(("chat", "stream"))
                rec = await self.one(http, rng, kind)
                self.records.append(rec)
                if rec.outcome in ("rejected_429", "timeout_503"):
                    await asyncio.sleep(rng.uniform(0.5, 1.5))  # as Retry-After asks

    async def bursts(self, deadline: float) -> None:
        every = self.args.burst_every
        if not every:
            return
        rng = random.Random(self.args.seed - 1)
        async with self._http(limits=httpx.Limits(max_connections=self.args.burst_size)) as http:
            while time.monotonic() + every < deadline:
                await asyncio.sleep(every)
                recs = await asyncio.gather(*(self.one(http, rng, "burst") for _ in range(self.args.burst_size)))
                self.records.extend(recs)

    async def sample_rss(self, deadline: float, pid: int | None) -> None:
        """RSS, and RSS less the KV pages touched so far (the pool is first written page by page,
        so raw RSS climbs until every page has been used once: growth, not a leak)."""
        async with self._http() as http:
            while time.monotonic() < deadline and pid:
                try:
                    with open(f"/proc/{pid}/status") as f:
                        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
                    kv = (await http.get("/debug/kv")).json()
                except (OSError, StopIteration, httpx.HTTPError, ValueError):
                    return
                mib = kb / 1024
                kv_mib = kv.get("pages_touched", 0) * kv.get("page_bytes", 0) / 2**20
                self.rss.append((time.monotonic() - self.t0, mib, mib - kv_mib))
                await asyncio.sleep(5.0)

    def _http(self, **kw) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.base, headers=self.headers, timeout=self.args.timeout, **kw)

    async def run(self, pid: int | None) -> dict:
        seconds = self.args.minutes * 60
        deadline = self.t0 + seconds
        await asyncio.gather(*(self.client(i, deadline) for i in range(self.args.clients)),
                             self.bursts(deadline), self.sample_rss(deadline + 5, pid))
        async with self._http() as http:
            idle_after = await _wait_idle(http)
            kv = (await http.get("/debug/kv")).json()
            health = (await http.get("/health")).json()
        return self.report(seconds, idle_after, kv, health)

    def report(self, seconds: float, idle_after: float | None, kv: dict, health: dict) -> dict:
        window = self.args.window or max(seconds / 10, 5.0)
        rows = []
        for w in range(int(np.ceil(seconds / window))):
            lo, hi = w * window, (w + 1) * window
            recs = [r for r in self.records if lo <= r.start < hi]
            ttft = [r.ttft for r in recs if r.ttft is not None]
            tpot = [r.tpot for r in recs if r.tpot is not None]
            rss = [(m, n) for t, m, n in self.rss if lo <= t < hi]
            rows.append({"from_s": round(lo), "requests": len(recs),
                         "ttft_p50_ms": _pct(ttft, 50), "ttft_p99_ms": _pct(ttft, 99),
                         "tpot_p50_ms": _pct(tpot, 50), "tpot_p99_ms": _pct(tpot, 99),
                         "rss_mib": round(max(m for m, _ in rss), 1) if rss else None,
                         "rss_less_kv_mib": round(max(n for _, n in rss), 1) if rss else None})
        outcomes = Counter(r.outcome for r in self.records)
        by_kind = {k: dict(Counter(r.outcome for r in self.records if r.kind == k)) for k in
                   sorted({r.kind for r in self.records})}
        unexpected = {k: v for k, v in outcomes.items() if k.startswith("error") or k == "no_answer"}
        span = min(300.0, seconds / 3)  # the goal's first and last 5 minutes, in shorter runs a third
        warm = [(m, n) for t, m, n in self.rss if t >= span]  # after warm-up: the first span

        def growth(i):
            return round((warm[-1][i] - warm[0][i]) / warm[0][i], 4) if len(warm) > 1 else None
        first = [r.tpot for r in self.records if r.tpot is not None and r.start < span]
        last = [r.tpot for r in self.records if r.tpot is not None and r.start >= seconds - span]
        checks = {
            "no_unexpected_errors_or_unanswered": not unexpected,
            "idle_after_s": idle_after,
            "zero_leaked_pages": kv.get("pages_leaked") == 0 and kv.get("ref_counts_consistent") is True
            and kv.get("pages_free") == kv.get("pages_total", 0) - kv.get("pages_cached", 0),
            "rss_growth_after_warmup": growth(0),
            "rss_less_kv_growth_after_warmup": growth(1),
            "tpot_p99_last_over_first": round(_pct(last, 99) / _pct(first, 99), 3) if first and last else None,
        }
        return {"seconds": seconds, "clients": self.args.clients, "requests": len(self.records),
                "outcomes": dict(outcomes), "by_kind": by_kind, "unexpected": unexpected, "windows": rows,
                "kv": kv, "health": health, "checks": checks,
                "rss_samples": [[round(t, 1), round(m, 1), round(n, 1)] for t, m, n in self.rss]}


def _outcome(status: int) -> str:
    return {200: "ok", 429: "rejected_429", 503: "timeout_503"}.get(status, f"error_{status}")


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1000, 1) if values else None


async def _wait_idle(http: httpx.AsyncClient, timeout: float = 120.0) -> float | None:
    """Seconds until the server reports nothing queued or running; None if it never does."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        load = (await http.get("/health")).json().get("load", {})
        if not any(load.get(k) for k in ("queued_requests", "running", "waiting")):
            return round(time.monotonic() - start, 2)
        await asyncio.sleep(0.1)
    return None


def _pid_listening(base: str) -> int | None:
    """The process listening on base's port on this machine, for its RSS."""
    try:
        import psutil
        port = httpx.URL(base).port or 80
        for c in psutil.net_connections("tcp"):
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.pid:
                return c.pid
    except Exception:  # noqa: BLE001 - RSS is optional (no permission, not local)
        pass
    return None


async def soak(args) -> dict:
    base = args.base_url.rstrip("/").removesuffix("/v1")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=args.timeout) as http:
        try:
            model = (await http.get("/v1/models")).json()["data"][0]["id"]
        except (httpx.HTTPError, ValueError, KeyError, IndexError) as e:
            raise ValueError(f"cannot list the models of {base}/v1: {type(e).__name__}: {e}") from None
        # most of the traffic is chat: a server that cannot chat (a base model) would fail all of it
        warm = await http.post("/v1/chat/completions", json={
            "model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
        if warm.status_code != 200:
            raise ValueError(f"the warm-up chat request failed ({warm.status_code}: {warm.text[:300]}); "
                             "the soak needs a server that answers chat requests")
    pid = args.server_pid or _pid_listening(base)
    return await Soak(base, headers, model, args).run(pid)


def print_report(report: dict) -> None:
    print(f"soak: {report['requests']} requests in {report['seconds']:.0f} s at {report['clients']} clients")
    print("outcomes:", json.dumps(report["outcomes"]))
    for kind, outcomes in report["by_kind"].items():
        print(f"  {kind:10s} {json.dumps(outcomes)}")
    print(f"{'from_s':>7} {'reqs':>5} {'ttft p50':>9} {'ttft p99':>9} {'tpot p50':>9} {'tpot p99':>9} {'rss MiB':>8} "
          f"{'less KV':>8}   (ms)")
    for r in report["windows"]:
        print(f"{r['from_s']:>7} {r['requests']:>5} {_ms(r['ttft_p50_ms'])} {_ms(r['ttft_p99_ms'])} "
              f"{_ms(r['tpot_p50_ms'])} {_ms(r['tpot_p99_ms'])} {r['rss_mib'] or '-':>8} "
              f"{r['rss_less_kv_mib'] or '-':>8}")
    print("kv:", json.dumps(report["kv"]))
    print("checks:", json.dumps(report["checks"]))


def _ms(v) -> str:
    return f"{v:>9.1f}" if v is not None else f"{'-':>9}"


def main(args) -> int:
    report = asyncio.run(soak(args))
    print_report(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    c = report["checks"]
    return 0 if c["no_unexpected_errors_or_unanswered"] and c["zero_leaked_pages"] else 1
