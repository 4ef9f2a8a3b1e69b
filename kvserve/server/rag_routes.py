"""RAG over HTTP: POST /v1/retrieve and chat completions with a `rag` field. A RAG chat runs the
pipeline (lookahead prefetch, HyDE, retrieval), then the ordinary chat path on the augmented
messages; the response gains a `rag` object (in the first chunk when streamed) naming the
chunks used and their sources."""
import asyncio
import json

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from kvserve.engine.admission import Overloaded, QueueTimeout
from kvserve.rag.collections import Collection, CollectionNotFound, CollectionRegistry
from kvserve.rag.pipeline import RagOptions, engine_generate, last_user_text, retrieve, with_context
from kvserve.server.errors import OpenAIError
from kvserve.server.protocol import ErrorResponse
from kvserve.server.rag_protocol import (RagChatCompletionRequest, RetrievedChunk, RetrieveRequest,
                                         RetrieveResponse)
from kvserve.server.serving import Serving, load_error


class RagServing:
    def __init__(self, serving: Serving, registry: CollectionRegistry, nprobe: int = 8, prefetch_nprobe: int = 16):
        self.serving, self.registry = serving, registry
        self.nprobe, self.prefetch_nprobe = nprobe, prefetch_nprobe
        self.generate = engine_generate(serving.engine, serving.tokenizer)

    async def collection(self, name: str) -> Collection:
        try:
            return await asyncio.to_thread(self.registry.get, name)
        except CollectionNotFound:
            raise OpenAIError(f"The collection `{name}` does not exist.", 404, param="collection",
                              code="collection_not_found") from None
        except RuntimeError as e:  # the embedder of this collection cannot be loaded here
            raise OpenAIError(f"retrieval is unavailable: {e}", 503, code="rag_unavailable") from None

    async def retrieve(self, body: RetrieveRequest) -> RetrieveResponse:
        if not body.query.strip():
            raise OpenAIError("query must not be empty", param="query", code="invalid_value")
        coll = await self.collection(body.collection)
        opts = RagOptions(top_k=body.top_k, pipeline="plain", lookahead=False, nprobe=body.nprobe or self.nprobe)
        got = await retrieve(coll, body.query, opts)
        self.serving.metrics.observe_retrieval(got.timings, got.cache)
        return RetrieveResponse(collection=body.collection, data=[RetrievedChunk(**c) for c in got.chunks],
                                cache={k: v for k, v in got.cache.items() if k in ("hits", "misses")})

    async def chat(self, body: RagChatCompletionRequest, request: Request) -> Response:
        self.serving.check_model(body.model)
        o = body.rag
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        question = last_user_text(messages)
        if not question.strip():
            raise OpenAIError("a RAG chat needs a non-empty user message to retrieve for", param="messages",
                              code="invalid_value")
        coll = await self.collection(o.collection)
        opts = RagOptions(top_k=o.top_k, pipeline=o.pipeline, lookahead=o.lookahead, nprobe=o.nprobe or self.nprobe,
                          prefetch_nprobe=o.prefetch_nprobe or self.prefetch_nprobe, hyde_max_tokens=o.hyde_max_tokens)
        try:
            got = await retrieve(coll, question, opts, self.generate)
        except ValueError as e:  # the engine refused the HyDE prompt (too long, ...)
            raise OpenAIError(str(e), param="messages") from None
        except (Overloaded, QueueTimeout) as e:  # the HyDE passage found the queue full
            raise load_error(e, self.serving.metrics) from None
        self.serving.metrics.observe_retrieval(got.timings, got.cache)
        augmented = body.model_copy(update={"rag": None, "messages": [
            type(body.messages[0]).model_validate(m) for m in with_context(messages, got.chunks)]})
        info = {"collection": o.collection, "pipeline": o.pipeline, "lookahead": o.lookahead} | got.summary()
        response = await self.serving.chat(augmented, request)
        return _with_rag(response, info)


def _with_rag(response: Response, info: dict) -> Response:
    if isinstance(response, StreamingResponse):
        response.body_iterator = _inject_first(response.body_iterator, info)
        return response
    if response.status_code != 200:
        return response
    body = json.loads(response.body)
    body["rag"] = info
    return Response(json.dumps(body), media_type="application/json")


async def _inject_first(events, info: dict):
    pending = True
    async for event in events:
        if pending and event.startswith("data: {"):
            payload = json.loads(event[len("data: "):])
            if "choices" in payload:
                event, pending = f"data: {json.dumps(payload | {'rag': info})}\n\n", False
        yield event


def install_rag_routes(app: FastAPI, rag: RagServing, responses: dict) -> None:
    @app.post("/v1/retrieve", response_model=RetrieveResponse, responses=responses | {503: {"model": ErrorResponse}})
    async def retrieve_chunks(body: RetrieveRequest) -> RetrieveResponse:
        return await rag.retrieve(body)
