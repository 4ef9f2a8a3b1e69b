"""A server with --speculative ngram: the same greedy text streamed or not, with speculation on or
turned off per request (extra_body), and the kvserve_spec_* gauges on /metrics."""
import httpx
import openai
import pytest

from server_util import API_KEY, MODEL, metrics, start_uvicorn


@pytest.fixture(scope="module")
def spec_server(tiny_model, smollm2_tokenizer):
    from kvserve.config import CacheConfig, EngineConfig
    from kvserve.engine.async_engine import AsyncEngine
    from kvserve.engine.engine import Engine
    from kvserve.server.app import build_app
    from kvserve.server.serving import ServerConfig
    engine = Engine(EngineConfig(speculative="ngram", cache=CacheConfig(16, 256, None, True)),
                    model=tiny_model, tokenizer=smollm2_tokenizer)
    async_engine = AsyncEngine(engine)
    app = build_app(async_engine, ServerConfig(model_name=MODEL, api_key=API_KEY), shutdown_engine=False)
    server, thread, url = start_uvicorn(app)
    yield url
    server.should_exit = True
    thread.join(10)
    async_engine.shutdown()


def test_speculative_server_streams_the_same_text(spec_server):
    client = openai.OpenAI(base_url=f"{spec_server}/v1", api_key=API_KEY)
    prompt = "one two three four five six " * 12
    kwargs = dict(model=MODEL, prompt=prompt, max_tokens=40, temperature=0)
    extra = {"ignore_eos": True}
    plain = client.completions.create(**kwargs, extra_body=extra | {"speculative": False}).choices[0].text
    with httpx.Client(base_url=spec_server, headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        before = metrics(http)["kvserve_spec_proposed_tokens"]
        assert before == 0  # the request that turned it off proposed nothing
        spec = client.completions.create(**kwargs, extra_body=extra).choices[0].text
        streamed = "".join(c.choices[0].text for c in client.completions.create(**kwargs, extra_body=extra,
                                                                                 stream=True))
        after = metrics(http)
    assert spec == streamed == plain
    assert after["kvserve_spec_proposed_tokens"] > 0
    assert after["kvserve_spec_mean_accepted_length"] >= 1
