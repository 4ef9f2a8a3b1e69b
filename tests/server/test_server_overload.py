"""Backpressure against a real server: past the queue limits 429 + Retry-After, past the queue
timeout 503, admitted requests untouched; cache_salt and per-key prefix-cache isolation."""
import asyncio
import contextlib
import threading
import time

import httpx
import openai
import pytest

from server_util import API_KEY, MODEL, metrics, start_uvicorn, wait_idle

PROMPT = [{"role": "user", "content": "Tell me a long story about a cat."}]


@contextlib.contextmanager
def serve(tiny_model, smollm2_tokenizer, limits=None, step_delay=0.0, api_key=API_KEY, **server):
    """A server over its own engine that runs one sequence at a time, each step >= step_delay s.
    Clearing engine.resume holds the steps, so that a running request cannot finish meanwhile."""
    from kvserve.config import CacheConfig, EngineConfig, SchedulerConfig
    from kvserve.engine.async_engine import AsyncEngine
    from kvserve.engine.engine import Engine
    from kvserve.server.app import build_app
    from kvserve.server.serving import ServerConfig
    engine = Engine(EngineConfig(cache=CacheConfig(16, 256, None, True), scheduler=SchedulerConfig(512, 1)),
                    model=tiny_model, tokenizer=smollm2_tokenizer)
    step = engine.step
    engine.resume = threading.Event()
    engine.resume.set()

    def slow_step():
        engine.resume.wait()
        time.sleep(step_delay)
        return step()
    engine.step = slow_step
    async_engine = AsyncEngine(engine, limits)
    app = build_app(async_engine, ServerConfig(model_name=MODEL, api_key=api_key, **server), shutdown_engine=False)
    srv, thread, url = start_uvicorn(app)
    try:
        yield url, engine
    finally:
        srv.should_exit = True
        thread.join(10)
        async_engine.shutdown()


def chat(client, tokens=40, **extra):
    return client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=tokens, temperature=0,
                                          extra_body={"ignore_eos": True, **extra})


async def until(http, predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate((await http.get("/health")).json()["load"]):
        assert time.monotonic() < deadline, "the server never reached the expected load"
        await asyncio.sleep(0.01)


def rejected(url) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families
    text = httpx.get(f"{url}/metrics").text
    return {s.labels["reason"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == "kvserve_requests_rejected_total"}


def test_past_the_queue_limit_429_with_retry_after_and_admitted_requests_finish(tiny_model, smollm2_tokenizer):
    from kvserve.engine.admission import QueueLimits
    with serve(tiny_model, smollm2_tokenizer, QueueLimits(max_requests=2), step_delay=0.01) as (url, engine):
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
        alone = chat(openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0), 40)
        expected = alone.choices[0].message.content

        async def scenario():
            async with httpx.AsyncClient(base_url=url) as http:
                running = asyncio.create_task(chat(client))
                await until(http, lambda load: load["running"] == 1 and load["queued_requests"] == 0)
                engine.resume.clear()
                queued = [asyncio.create_task(chat(client)) for _ in range(2)]
                await until(http, lambda load: load["queued_requests"] == 2)
                with pytest.raises(openai.RateLimitError) as busy:
                    await chat(client)
                load = (await http.get("/health")).json()["load"]
                engine.resume.set()
                return await asyncio.gather(running, *queued), busy.value, load

        admitted, busy, load = asyncio.run(scenario())
        assert busy.status_code == 429 and busy.response.headers["retry-after"] == "1"
        assert busy.body["code"] == "server_busy" and busy.body["type"] == "rate_limit_error"
        assert load["queued_requests"] == 2 and load["queued_tokens"] > 0
        assert [r.choices[0].message.content for r in admitted] == [expected] * 3
        assert rejected(url) == {"queued_requests": 1.0}
        assert metrics(httpx.Client(base_url=url))["kvserve_queued_requests"] <= 2
        wait_idle(engine)
        assert httpx.get(f"{url}/health").json()["load"] == {"queued_requests": 0, "queued_tokens": 0,
                                                             "running": 0, "waiting": 0}


def test_a_batch_is_queued_whole_or_not_at_all(tiny_model, smollm2_tokenizer):
    """The prompts of one completions request are engine requests: all of them fit, or the request
    is a 429 with none queued; a batch larger than the queue itself is a 400, as retrying never helps."""
    from kvserve.engine.admission import QueueLimits

    def complete(http, prompts):
        return http.post("/v1/completions", json={"model": MODEL, "prompt": prompts, "max_tokens": 3})

    with serve(tiny_model, smollm2_tokenizer, QueueLimits(max_requests=3), api_key=None) as (url, engine):
        with httpx.Client(base_url=url, timeout=60) as http:
            assert len(complete(http, ["a", "b", "c"]).json()["choices"]) == 3  # the queue's size, from idle
            too_many = complete(http, ["a", "b", "c", "d"])
            assert too_many.status_code == 400 and "--max-queued-requests 3" in too_many.json()["error"]["message"]

            async def scenario():
                async with httpx.AsyncClient(base_url=url, timeout=60) as ahttp:
                    engine.resume.clear()
                    first = asyncio.create_task(ahttp.post("/v1/completions", json={
                        "model": MODEL, "prompt": ["x", "y"], "max_tokens": 3}))
                    await until(ahttp, lambda load: load["queued_requests"] == 2)
                    busy = await ahttp.post("/v1/completions", json={"model": MODEL, "prompt": ["a", "b"],
                                                                      "max_tokens": 3})
                    load = (await ahttp.get("/health")).json()["load"]
                    engine.resume.set()
                    return busy, load, await first

            busy, load, first = asyncio.run(scenario())
            assert busy.status_code == 429 and load["queued_requests"] == 2  # none of its two was queued
            assert first.status_code == 200
        wait_idle(engine)
        assert httpx.get(f"{url}/health").json()["load"]["queued_requests"] == 0


def test_a_batch_s_prompts_waiting_for_their_siblings_do_not_time_out(tiny_model, smollm2_tokenizer):
    """One sequence at a time, 1 s queue timeout: the third prompt of a batch waits ~1.5 s behind its
    own siblings, not behind other requests, and the batch completes (it was a 503)."""
    from kvserve.engine.admission import QueueLimits
    with serve(tiny_model, smollm2_tokenizer, QueueLimits(timeout=1.0), step_delay=0.02, api_key=None) as (url, engine):
        r = httpx.post(f"{url}/v1/completions", timeout=60, json={
            "model": MODEL, "prompt": ["a", "b", "c"], "max_tokens": 40, "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert [c["finish_reason"] for c in r.json()["choices"]] == ["length"] * 3
        wait_idle(engine)
        assert httpx.get(f"{url}/health").json()["load"]["queued_requests"] == 0


def test_queued_tokens_limit_admits_into_an_empty_queue(tiny_model, smollm2_tokenizer):
    from kvserve.engine.admission import QueueLimits
    with serve(tiny_model, smollm2_tokenizer, QueueLimits(max_tokens=5), step_delay=0.01) as (url, engine):
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=60)

        async def scenario():
            async with httpx.AsyncClient(base_url=url) as http:
                running = asyncio.create_task(chat(client))
                await until(http, lambda load: load["running"] == 1 and load["queued_requests"] == 0)
                engine.resume.clear()
                queued = asyncio.create_task(chat(client))  # longer than the limit, but the queue is empty
                await until(http, lambda load: load["queued_requests"] == 1)
                with pytest.raises(openai.RateLimitError):
                    await chat(client)
                engine.resume.set()
                return await asyncio.gather(running, queued)

        assert all(r.choices[0].finish_reason == "length" for r in asyncio.run(scenario()))
        assert rejected(url) == {"queued_tokens": 1.0}


def test_queue_timeout_503_removes_the_request(tiny_model, smollm2_tokenizer):
    from kvserve.engine.admission import QueueLimits
    with serve(tiny_model, smollm2_tokenizer, QueueLimits(timeout=0.2), step_delay=0.02) as (url, engine):
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=60)

        async def scenario():
            async with httpx.AsyncClient(base_url=url) as http:
                running = asyncio.create_task(chat(client, 60))
                await until(http, lambda load: load["running"] == 1)
                start = time.monotonic()
                with pytest.raises(openai.InternalServerError) as late:
                    await chat(client, 60, stream=False)
                waited = time.monotonic() - start
                return await running, late.value, waited

        done, late, waited = asyncio.run(scenario())
        assert late.status_code == 503 and late.response.headers["retry-after"] == "1"
        assert late.body["code"] == "queue_timeout" and 0.2 <= waited < 1.0
        assert done.usage.completion_tokens == 60
        assert rejected(url) == {"queue_timeout": 1.0}
        wait_idle(engine)
        engine.kv.check_integrity([])


def test_cache_salt_and_per_key_isolation(tiny_model, smollm2_tokenizer):
    with serve(tiny_model, smollm2_tokenizer, api_key=f"{API_KEY},tenant-2",
               prefix_cache_isolation="per-key") as (url, engine):
        long = [{"role": "user", "content": "A fairly long shared system prompt. " * 12}]

        def cached(salt=None, key=API_KEY):
            body = {"model": MODEL, "messages": long, "max_tokens": 2}
            if salt is not None:
                body["cache_salt"] = salt
            r = httpx.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200, r.text
            return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

        assert cached("a") == 0
        assert cached("a") > 0  # equal salts share
        assert cached("b") == 0  # different salts never do
        assert cached() == 0  # no salt is a salt of its own
        assert cached(key="tenant-2") == 0  # another API key: its own cache, even without salts
        assert cached(key="tenant-2") > 0
        r = httpx.post(f"{url}/v1/chat/completions", json={"model": MODEL, "messages": long, "cache_salt": ""},
                       headers={"Authorization": f"Bearer {API_KEY}"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "cache_salt"
        wait_idle(engine)
        report = httpx.get(f"{url}/debug/kv", headers={"Authorization": f"Bearer {API_KEY}"}).json()
        assert report["pages_leaked"] == 0 and report["ref_counts_consistent"]
        assert report["pages_free"] == report["pages_total"] - report["pages_cached"]


def test_per_key_isolation_separates_tenants(tiny_model, smollm2_tokenizer):
    from kvserve.server.serving import ServerConfig, Serving, tenant_digest
    from types import SimpleNamespace
    serving = SimpleNamespace(config=ServerConfig(model_name=MODEL, prefix_cache_isolation="per-key"))
    salt = lambda key, s: Serving._cache_salt(serving, SimpleNamespace(cache_salt=s),  # noqa: E731
                                              SimpleNamespace(headers={"authorization": f"Bearer {key}"}))
    assert salt("k1", None) != salt("k2", None)
    assert salt("k1", "x") == salt("k1", "x") != salt("k2", "x")
    assert "k1" not in salt("k1", None) and tenant_digest("Bearer k1") in salt("k1", None)


def test_flags_parse_and_refuse_nonsense():
    from kvserve.cli import build_parser
    from kvserve.engine.admission import QueueLimits
    from kvserve.server.isolation_args import queue_limits
    args = build_parser().parse_args(["serve", "--prefix-cache-isolation", "per-key", "--max-queued-requests", "8",
                                      "--max-queued-tokens", "4096", "--queue-timeout", "2.5"])
    assert args.prefix_cache_isolation == "per-key"
    assert queue_limits(args) == QueueLimits(8, 4096, 2.5)
    assert queue_limits(build_parser().parse_args(["serve"])).max_requests is None
    for bad in (["--max-queued-requests", "0"], ["--queue-timeout", "-1"], ["--max-queued-tokens", "x"],
                ["--prefix-cache-isolation", "per-user"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", *bad])
