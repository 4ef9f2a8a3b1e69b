"""`kvserve serve -dp 2`: two engine replicas behind one server. Concurrent streams all finish;
a repeated prompt goes back to the replica that cached it; a replica that dies turns /health 503
and the server exits non-zero, leaving no process behind."""
import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from kvserve.server.data_parallel import _with_label, replica_argv
from kvserve.server.prefix_router import PrefixRouter
from test_tp_server import children, gone


def test_router_prefers_the_longest_cached_prefix_then_the_least_loaded():
    router = PrefixRouter(3, block=4)
    a, b = list(range(12)), list(range(100, 112))
    first = router.choose(a)[0]
    load = router.start(first, a, 10, 0)
    assert router.choose(b)[0] != first  # nothing cached anywhere: the idle replicas
    other = router.choose(b)[0]
    router.start(other, b, 10, 0)
    assert router.choose(a[:8] + [999] * 4) == (first, 8)  # two of three blocks cached there
    router.finish(first, load)
    assert router.choose([7] * 12)[0] not in (first, other)


def test_replica_flags_and_metric_labels():
    assert replica_argv(["serve", "m.gguf", "-dp", "2", "--port=9", "--threads", "4", "-tp", "2"]) == \
        ["serve", "m.gguf", "-tp", "2"]
    assert _with_label('kvserve_x{a="b"} 1.0', 'replica="1"') == 'kvserve_x{replica="1",a="b"} 1.0'
    assert _with_label("kvserve_y 2", 'replica="0"') == 'kvserve_y{replica="0"} 2'


def prompt(i: int) -> str:
    return " ".join(f"<{(i * 37 + j) % 500}>" for j in range(48))


def labelled(text: str, name: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            out[line.split('replica="')[1].split('"')[0]] = float(line.rsplit(" ", 1)[1])
    return out


def test_streams_finish_and_repeats_go_where_they_were_cached():
    proc = subprocess.Popen([sys.executable, "-m", "kvserve", "serve", "--port", "0", "--random-weights", "tiny",
                             "--dtype", "float32", "-dp", "2", "--num-pages", "128", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "serving" in line, proc.stderr.read()
        url = line.split(" at ")[-1].strip().removesuffix("/v1")
        kids = children(proc.pid)
        assert len(kids) == 2

        async def traffic():
            async with httpx.AsyncClient(timeout=120) as c:
                async def stream(i):
                    body = {"prompt": prompt(i), "max_tokens": 12, "stream": True, "ignore_eos": True}
                    n = 0
                    async with c.stream("POST", f"{url}/v1/completions", json=body) as r:
                        async for ln in r.aiter_lines():
                            if ln.startswith("data: {"):
                                n += len(json.loads(ln[6:])["choices"])
                            if ln == "data: [DONE]":
                                return n
                return await asyncio.gather(*(stream(i) for i in range(16)))
        assert asyncio.run(traffic()) == [12] * 16

        before = labelled(httpx.get(f"{url}/metrics").text, "kvserve_router_requests_total")
        for i in (100, 101, 100, 101, 100, 101):  # two new prompts, each sent back three times
            r = httpx.post(f"{url}/v1/completions", timeout=60, json={"prompt": prompt(i), "max_tokens": 2})
            assert r.status_code == 200
        text = httpx.get(f"{url}/metrics").text
        after = labelled(text, "kvserve_router_requests_total")
        assert {k: after[k] - before[k] for k in after} == {"0": 3, "1": 3}  # each prompt stayed on its replica
        assert all(v >= 2 * 48 - 16 for v in labelled(text, "kvserve_router_prefix_hit_tokens_total").values())
        assert all(v > 0 for v in labelled(text, "kvserve_prefix_cache_hit_rate").values())
        assert httpx.get(f"{url}/health").status_code == 200

        os.kill(kids[1], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while httpx.get(f"{url}/health").status_code != 503:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert "replica 1" in httpx.get(f"{url}/health").json()["error"]["message"]
        assert proc.wait(30) == 1
        assert gone(kids)
    finally:
        proc.kill()
        proc.wait()


def test_metrics_of_replicas_merge_into_valid_families():
    """Each family's samples of every replica follow its one HELP/TYPE, as the text format wants
    (appended replica by replica, a parser saw each family once per replica)."""
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from kvserve.server.data_parallel import merged_families
    texts = []
    for i in range(2):
        registry = CollectorRegistry()
        Counter("kvserve_tokens", "Tokens", registry=registry).inc(3 + i)
        Histogram("kvserve_ttft_seconds", "TTFT", ["model"], registry=registry).labels("m").observe(0.1)
        texts.append((i, generate_latest(registry).decode()))
    families = list(text_string_to_metric_families("\n".join(merged_families(texts)) + "\n"))
    names = [f.name for f in families]
    assert len(names) == len(set(names)) and {"kvserve_tokens", "kvserve_ttft_seconds"} <= set(names)
    tokens = next(f for f in families if f.name == "kvserve_tokens")
    assert {s.labels["replica"]: s.value for s in tokens.samples if s.name == "kvserve_tokens_total"} == \
        {"0": 3.0, "1": 4.0}
