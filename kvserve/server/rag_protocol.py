"""The RAG extensions of the API: POST /v1/retrieve, and a `rag` field on chat completions
(sent with the openai client's `extra_body`)."""
from typing import Literal

from pydantic import BaseModel, Field

from kvserve.server.protocol import ChatCompletionRequest, _Request

MAX_TOP_K = 50
MAX_NPROBE = 4096


class RagRequestOptions(_Request):
    collection: str = Field(min_length=1)
    top_k: int = Field(3, ge=1, le=MAX_TOP_K)
    pipeline: Literal["plain", "hyde"] = "plain"
    lookahead: bool = True
    nprobe: int | None = Field(None, ge=1, le=MAX_NPROBE)
    prefetch_nprobe: int | None = Field(None, ge=1, le=MAX_NPROBE)
    hyde_max_tokens: int = Field(64, ge=1, le=512)


class RagChatCompletionRequest(ChatCompletionRequest):
    rag: RagRequestOptions | None = None


class RetrieveRequest(_Request):
    collection: str = Field(min_length=1)
    query: str = Field(min_length=1)
    top_k: int = Field(5, ge=1, le=MAX_TOP_K)
    nprobe: int | None = Field(None, ge=1, le=MAX_NPROBE)


class RetrievedChunk(BaseModel):
    object: Literal["chunk"] = "chunk"
    id: int
    source: str
    text: str
    score: float


class RetrieveResponse(BaseModel):
    object: Literal["list"] = "list"
    collection: str
    data: list[RetrievedChunk]
    cache: dict[str, int | None]
