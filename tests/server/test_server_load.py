"""Many clients at once, clients that leave, and an engine that fails: the server keeps its
accounting straight and the KV pool returns to idle."""
import asyncio
import json
import threading
import time

import httpx
import openai
import pytest

from server_util import API_KEY, MODEL, metrics, wait_idle

MESSAGES = [{"role": "user", "content": "Count to ten."}]


def test_32_concurrent_streams_then_idle(live_server, aclient, http):
    prompts = [f"Client {i} says hello and counts." for i in range(32)]

    async def one(i):
        stream = await aclient.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompts[i]}], max_tokens=8 + i % 5, stream=True,
            logprobs=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        tokens, usage = 0, None
        async for chunk in stream:
            usage = chunk.usage or usage
            for c in chunk.choices:
                tokens += len(c.logprobs.content) if c.logprobs and c.logprobs.content else 0
        return tokens, usage

    async def all_clients():
        return await asyncio.gather(*(one(i) for i in range(32)))

    before = metrics(http)["kvserve_generation_tokens_total"]
    results = asyncio.run(all_clients())
    for i, (tokens, usage) in enumerate(results):
        assert usage.completion_tokens == tokens == 8 + i % 5
        count = http.post("/tokenize", json={"messages": [{"role": "user", "content": prompts[i]}]}).json()["count"]
        assert usage.prompt_tokens == count
    wait_idle(live_server.engine)
    m = metrics(http)
    assert m["kvserve_generation_tokens_total"] - before == sum(8 + i % 5 for i in range(32))
    assert m["kvserve_requests_running"] == m["kvserve_requests_waiting"] == 0
    assert m["kvserve_kv_pages_active"] == 0
    assert m["kvserve_kv_pages_used"] == m["kvserve_kv_pages_cached"]  # only the prefix cache holds pages
    live_server.engine.kv.check_integrity([])


@pytest.fixture
def slow_engine(live_server, monkeypatch):
    """Engine steps take at least 20 ms, so a long request is surely still running when its client
    leaves; counts steps and records aborts."""
    engine = live_server.engine
    step, abort = engine.step, engine.abort
    seen = {"steps": 0, "aborted": []}

    def slow_step():
        time.sleep(0.02)
        seen["steps"] += 1
        return step()

    def spy_abort(request_id):
        seen["aborted"].append((request_id, seen["steps"]))
        abort(request_id)

    monkeypatch.setattr(engine, "step", slow_step)
    monkeypatch.setattr(engine, "abort", spy_abort)
    yield seen
    wait_idle(engine)


def left(http) -> float:
    """Chat requests whose client left before the end (status 499 in /metrics and the log line)."""
    from prometheus_client.parser import text_string_to_metric_families
    return sum(s.value for fam in text_string_to_metric_families(http.get("/metrics").text) for s in fam.samples
               if s.name == "kvserve_http_requests_total" and s.labels["status"] == "499"
               and s.labels["endpoint"] == "/v1/chat/completions")


def test_stream_disconnect_aborts_within_a_step(live_server, slow_engine, http):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 200, "stream": True, "ignore_eos": True}
    left_before = left(http)
    with httpx.Client(base_url=live_server.url, headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            chunks = 0
            for line in r.iter_lines():
                if line.startswith("data: "):
                    request_id = json.loads(line[6:])["id"] + "-0"
                    chunks += 1
                if chunks == 4:
                    break
            assert request_id in live_server.engine.requests
            steps_at_close = slow_engine["steps"]
    waited = wait_idle(live_server.engine)
    aborted = dict(slow_engine["aborted"])
    assert request_id in aborted
    assert aborted[request_id] - steps_at_close <= 2, (aborted, steps_at_close)
    assert waited < 1.0
    assert live_server.engine.pool.num_free + live_server.engine.kv.prefix.num_evictable() == \
        live_server.engine.pool.num_pages
    deadline = time.monotonic() + 5  # counted once the response's task has ended
    while left(http) == left_before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert left(http) == left_before + 1  # its 200 already sent, counted as the client's leaving


def test_non_streaming_disconnect_aborts(live_server, slow_engine, http, caplog):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 200, "ignore_eos": True}
    before = metrics(http)["kvserve_generation_tokens_total"]
    with caplog.at_level("INFO", logger="kvserve.server"), \
            httpx.Client(base_url=live_server.url, headers={"Authorization": f"Bearer {API_KEY}"},
                         timeout=httpx.Timeout(10, read=0.5)) as c:
        with pytest.raises(httpx.ReadTimeout):
            c.post("/v1/chat/completions", json=body)
        assert wait_idle(live_server.engine) < 1.0
        deadline = time.monotonic() + 5  # logged once the response's task has ended
        while not (lines := [r.getMessage() for r in caplog.records if " 499 " in r.getMessage()]) \
                and time.monotonic() < deadline:
            time.sleep(0.01)
    assert slow_engine["aborted"] and slow_engine["steps"] < 100  # long before its 200 tokens
    # the tokens it made before its client left are logged and counted, though none were sent
    made = int(lines[0].split("completion_tokens=")[1].split()[0])
    assert 0 < made < 200
    assert metrics(http)["kvserve_generation_tokens_total"] - before == made


def test_engine_failure_fails_that_request(live_server, client, monkeypatch):
    """A request that makes the engine raise fails alone with a 500 error object, while a request
    running beside it in the same steps finishes; the server and engine go on serving."""
    engine = live_server.engine
    sampler = engine.sampler

    def failing(logits, rows):
        if any(r.params.seed == 424242 for r in rows):
            raise RuntimeError("boom")
        return sampler(logits, rows)

    monkeypatch.setattr(engine, "sampler", failing)
    neighbour = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=256, seed=2, stream=True,
                                               extra_body={"ignore_eos": True})
    next(iter(neighbour))  # running before the failing request arrives
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, seed=424242)
    assert e.value.status_code == 500 and e.value.body["code"] == "engine_error"
    text = "".join(c.choices[0].delta.content or "" for c in neighbour if c.choices)
    assert text  # the neighbour went on generating after the failure
    with pytest.raises(openai.APIError, match="engine"):
        list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, seed=424242,
                                            stream=True))
    wait_idle(engine)
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, seed=1,
                                       extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 4
    engine.kv.check_integrity([])


def test_every_request_is_logged_and_counted(live_server, http, caplog):
    caplog.set_level("INFO", logger="kvserve.server")
    before = metrics(http)
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 3, "ignore_eos": True})
    assert r.status_code == 200
    http.post("/v1/completions", json={"model": "nope", "prompt": "Hi"})
    deadline = time.monotonic() + 2  # the line is written just after the response is sent
    while time.monotonic() < deadline:
        lines = [rec.getMessage() for rec in caplog.records if "/v1/completions" in rec.getMessage()]
        if len(lines) == 2:
            break
        time.sleep(0.01)
    assert any(" 200 " in line and "completion_tokens=3" in line for line in lines), lines
    assert any(" 404 " in line for line in lines), lines
    text = http.get("/metrics").text
    assert 'kvserve_http_requests_total{endpoint="/v1/completions",method="POST",status="404"}' in text
    assert metrics(http)["kvserve_generation_tokens_total"] - before["kvserve_generation_tokens_total"] >= 3


def test_bench_serve_against_live_server(live_server, capsys):
    from kvserve.cli import main
    args = ["bench", "serve", "--base-url", live_server.base_url, "--api-key", API_KEY, "--num-prompts", "6",
            "--input-len", "16", "--output-len", "8", "--json"]
    assert main(args + ["--concurrency", "3"]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["completed"] == 6 and summary["failed"] == 0 and summary["total_output_tokens"] == 48
    assert summary["ttft_ms"]["p99"] >= summary["ttft_ms"]["p50"] > 0 and summary["output_throughput"] > 0
    assert "TTFT (ms)" in out and "output throughput" in out
    assert main(args + ["--request-rate", "50", "--endpoint", "chat"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["completed"] == 6 and summary["request_rate"] == 50


def test_concurrent_threads_with_sync_client(client):
    """The sync client from several threads at once (what a thread-pool app does)."""
    results = [None] * 4

    def run(i):
        results[i] = client.completions.create(model=MODEL, prompt=f"thread {i}", max_tokens=5, temperature=0,
                                               extra_body={"ignore_eos": True}).usage.completion_tokens
    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [5] * 4


def test_health_reports_a_stopped_engine(tiny_model, smollm2_tokenizer):
    from kvserve.config import CacheConfig, EngineConfig
    from kvserve.engine.async_engine import AsyncEngine
    from kvserve.engine.engine import Engine
    from kvserve.server.app import build_app
    from kvserve.server.serving import ServerConfig
    engine = AsyncEngine(Engine(EngineConfig(cache=CacheConfig(16, 64)), model=tiny_model, tokenizer=smollm2_tokenizer))
    app = build_app(engine, ServerConfig(model_name="m"), shutdown_engine=False)

    async def get_health():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return await c.get("/health")

    assert asyncio.run(get_health()).status_code == 200
    engine.shutdown()
    r = asyncio.run(get_health())
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
