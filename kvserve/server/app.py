"""The FastAPI app: OpenAI's endpoints (and vLLM's tokenizer ones) over one AsyncEngine."""
import asyncio
from contextlib import asynccontextmanager
from importlib.metadata import version

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from kvserve.engine.async_engine import AsyncEngine
from kvserve.rag.embedder import MINILM
from kvserve.server.debug import kv_report
from kvserve.server.embeddings import EmbeddingServing
from kvserve.server.errors import OpenAIError, install_error_handlers
from kvserve.server.metrics import ServerMetrics
from kvserve.server.middleware import ServerMiddleware
from kvserve.server.protocol import (ChatCompletionResponse, CompletionRequest, CompletionResponse,
                                     DetokenizeRequest, DetokenizeResponse, EmbeddingRequest, EmbeddingResponse,
                                     ErrorResponse, ModelCard, ModelList, TokenizeRequest, TokenizeResponse)
from kvserve.server.rag_protocol import RagChatCompletionRequest
from kvserve.server.rag_routes import RagServing, install_rag_routes
from kvserve.server.serving import ServerConfig, Serving

_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 500)}


def build_app(engine: AsyncEngine, config: ServerConfig, shutdown_engine: bool = True) -> FastAPI:
    """With shutdown_engine, the app stops the engine's thread when it shuts down (the CLI);
    tests that share one engine between apps pass False."""
    metrics = ServerMetrics(engine.engine)
    metrics.watch_queue(engine.queue)
    serving = Serving(engine, config, metrics)
    rag = RagServing(serving, config.rag_registry(), config.rag_nprobe, config.rag_prefetch_nprobe)
    embeddings = EmbeddingServing(lambda: rag.registry.embedder(MINILM), metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        embeddings.close()
        if shutdown_engine:
            await asyncio.to_thread(engine.shutdown)

    app = FastAPI(title="kvserve", version=version("kvserve"), lifespan=lifespan,
                  description="OpenAI-compatible API of the kvserve engine")
    install_error_handlers(app)

    @app.get("/health")
    async def health() -> dict:
        if engine.failure:
            raise OpenAIError(f"the engine has failed: {engine.failure}", 503, code="engine_failed")
        if not engine.alive:
            raise OpenAIError("the engine thread has stopped", 503, code="engine_dead")
        return {"status": "ok", "load": metrics.load(engine.queue)}

    @app.get("/debug/kv")
    async def debug_kv() -> dict:
        return await engine.call(kv_report)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def card(name: str) -> ModelCard:
        return ModelCard(id=name, max_model_len=serving.max_model_len)

    @app.get("/v1/models", response_model=ModelList, responses=_ERRORS)
    async def list_models() -> ModelList:
        return ModelList(data=[card(name) for name in (config.model_name, *config.model_aliases)])

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=_ERRORS)
    async def get_model(model_id: str) -> ModelCard:
        serving.check_model(model_id)
        return card(model_id)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_ERRORS)
    async def chat_completions(body: RagChatCompletionRequest, request: Request):
        if body.rag is not None:
            return await rag.chat(body, request)
        return await serving.chat(body, request)

    @app.post("/v1/completions", response_model=CompletionResponse, responses=_ERRORS)
    async def completions(body: CompletionRequest, request: Request):
        return await serving.completions(body, request)

    @app.post("/v1/embeddings", response_model=EmbeddingResponse, responses=_ERRORS | {503: {"model": ErrorResponse}})
    async def create_embeddings(body: EmbeddingRequest):
        return Response((await embeddings.create(body)).model_dump_json(), media_type="application/json")

    @app.post("/tokenize", response_model=TokenizeResponse, responses=_ERRORS)
    async def tokenize(body: TokenizeRequest):
        return await asyncio.to_thread(serving.tokenize, body)

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=_ERRORS)
    async def detokenize(body: DetokenizeRequest):
        return await asyncio.to_thread(serving.detokenize, body)

    install_rag_routes(app, rag, _ERRORS)

    known = {route.path for route in app.routes} - {"/v1/models/{model_id:path}"}
    app.add_middleware(ServerMiddleware, metrics=metrics, known_paths=known, api_key=config.api_key,
                       max_body_bytes=config.max_body_bytes)
    return app


class ReadyServer(uvicorn.Server):
    """Prints where it listens once the socket is bound (with port 0, the port it got)."""

    def __init__(self, config: uvicorn.Config, model_name: str):
        super().__init__(config)
        self.model_name = model_name

    async def startup(self, sockets=None):
        await super().startup(sockets)
        if self.started and self.servers:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            print(f"kvserve: serving {self.model_name} at http://{host}:{port}/v1", flush=True)


def run(app: FastAPI, host: str, port: int, model_name: str, shutdown_timeout: float = 10.0,
        log_level: str = "info") -> None:
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=shutdown_timeout)
    ReadyServer(config, model_name).run()
