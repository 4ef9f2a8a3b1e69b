"""One live server for the whole server suite: the tiny random Llama (SmolLM2's tokenizer) behind
uvicorn on 127.0.0.1, in a background thread, with small limits the tests run into on purpose."""
from dataclasses import dataclass

import httpx
import pytest

from server_util import ALIAS, API_KEY, MAX_BODY_BYTES, MAX_N, MAX_TOKENS_LIMIT, MODEL, start_uvicorn


@dataclass
class LiveServer:
    url: str  # http://127.0.0.1:PORT
    engine: object  # the Engine, to read its state
    async_engine: object
    app: object

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="session")
def server_engine(tiny_model, smollm2_tokenizer):
    from kvserve.config import CacheConfig, EngineConfig, SchedulerConfig
    from kvserve.engine.async_engine import AsyncEngine
    from kvserve.engine.engine import Engine
    engine = Engine(EngineConfig(cache=CacheConfig(16, 512, None, True), scheduler=SchedulerConfig(512, 64)),
                    model=tiny_model, tokenizer=smollm2_tokenizer)
    async_engine = AsyncEngine(engine)
    yield engine, async_engine
    async_engine.shutdown()


@pytest.fixture(scope="session")
def live_server(server_engine):
    from kvserve.server.app import build_app
    from kvserve.server.serving import ServerConfig
    engine, async_engine = server_engine
    config = ServerConfig(model_name=MODEL, model_aliases=(ALIAS,), api_key=API_KEY, max_tokens_limit=MAX_TOKENS_LIMIT,
                          max_n=MAX_N, max_body_bytes=MAX_BODY_BYTES)
    app = build_app(async_engine, config, shutdown_engine=False)
    server, thread, url = start_uvicorn(app)
    yield LiveServer(url, engine, async_engine, app)
    server.should_exit = True
    thread.join(10)


@pytest.fixture
def http(live_server):
    with httpx.Client(base_url=live_server.url, headers=live_server.headers(), timeout=60) as client:
        yield client


@pytest.fixture
def client(live_server):
    import openai
    return openai.OpenAI(base_url=live_server.base_url, api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture
def aclient(live_server):
    import openai
    return openai.AsyncOpenAI(base_url=live_server.base_url, api_key=API_KEY, max_retries=0, timeout=60)
