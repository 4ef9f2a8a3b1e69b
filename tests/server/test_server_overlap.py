"""The server over an engine with overlapped steps (the default on a GPU, whose hosts lack the
server stack, so it is checked here): concurrent streams give the engine's own greedy tokens, a
client that leaves mid-stream is aborted, and the pool goes back to idle."""
import asyncio

import httpx
import openai
import pytest

from server_util import API_KEY, MODEL, metrics, start_uvicorn, wait_idle


@pytest.fixture(scope="module")
def overlapped(tiny_model, smollm2_tokenizer):
    from kvserve.config import CacheConfig, EngineConfig, SchedulerConfig
    from kvserve.engine.async_engine import AsyncEngine
    from kvserve.engine.engine import Engine
    from kvserve.server.app import build_app
    from kvserve.server.serving import ServerConfig
    engine = Engine(EngineConfig(cache=CacheConfig(16, 512, None, True), scheduler=SchedulerConfig(512, 64),
                                 overlap_schedule=True), model=tiny_model, tokenizer=smollm2_tokenizer)
    assert engine.overlap is not None
    async_engine = AsyncEngine(engine)
    server, thread, url = start_uvicorn(build_app(async_engine, ServerConfig(model_name=MODEL, api_key=API_KEY),
                                                  shutdown_engine=False))
    yield engine, url
    server.should_exit = True
    thread.join(10)
    async_engine.shutdown()


def test_concurrent_streams_get_the_engine_s_tokens(overlapped, make_engine):
    engine, url = overlapped
    prompts = [f"Client {i} says hello and counts." for i in range(16)]
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=60)

    async def one(i):
        stream = await client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=6 + i % 7, stream=True,
                                                 temperature=0, stream_options={"include_usage": True})
        text, usage = "", None
        async for chunk in stream:
            usage = chunk.usage or usage
            text += "".join(c.text for c in chunk.choices)
        return text, usage.completion_tokens

    async def all_clients():
        return await asyncio.gather(*(one(i) for i in range(16)))
    got = asyncio.run(all_clients())
    from kvserve.engine.request import SamplingParams
    sync = make_engine()
    ids = [sync.add_request(p, SamplingParams(temperature=0, max_tokens=6 + i % 7)) for i, p in enumerate(prompts)]
    done = {}
    while sync.has_unfinished():
        done |= {o.request_id: o.outputs[0] for o in sync.step() if o.finished}
    assert got == [(done[i].text, len(done[i].token_ids)) for i in ids]
    wait_idle(engine)
    engine.kv.check_integrity([])


def test_a_client_leaving_mid_stream_is_aborted(overlapped):
    engine, url = overlapped
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": MODEL, "prompt": "Tell a long story.", "max_tokens": 400, "stream": True, "ignore_eos": True}
    with httpx.Client(base_url=url, headers=headers, timeout=60) as http:
        before = metrics(http)["kvserve_generation_tokens_total"]
        with http.stream("POST", "/v1/completions", json=body) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i == 4:
                    break
        wait_idle(engine)
        assert 0 < metrics(http)["kvserve_generation_tokens_total"] - before < 200  # long before its 400 tokens
    engine.kv.check_integrity([])
