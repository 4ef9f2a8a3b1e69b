"""POST /v1/embeddings: OpenAI's embeddings endpoint over the packaged all-MiniLM-L6-v2 embedder
(kvserve.rag.embedder, the one RAG collections use; one copy serves both).

Choices where OpenAI's API is wider than this embedder:
- `input`: a string or a list of strings. Token ids are refused (400): they would have to be
  MiniLM's WordPiece ids, which no OpenAI client produces.
- `dimensions`: only the native 384. MiniLM was not trained to be truncated (as OpenAI's
  text-embedding-3 models were), so a cut vector would be a worse one, silently.
- A text longer than the embedder's 256 tokens is a 400, as OpenAI's over-long inputs are, not
  truncated behind the caller's back.
- `model`: omitted, or the embedder's name (`all-MiniLM-L6-v2`); the response names the embedder.

Embedding runs on its own single worker thread, so the event loop and the engine's thread keep
serving generation meanwhile, and one request's batch at a time competes with them for the CPU.
"""
import asyncio
import base64
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from kvserve.rag.embedder import MINILM
from kvserve.server.errors import OpenAIError
from kvserve.server.metrics import ServerMetrics
from kvserve.server.protocol import Embedding, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage

log = logging.getLogger("kvserve.server")

_BATCH = 32  # texts per forward, sorted by length so that a batch pads little


class EmbeddingServing:
    def __init__(self, load_embedder, metrics: ServerMetrics, max_inputs: int = 256):
        """`load_embedder()` returns the embedder (called on the worker thread, the first time)."""
        self.load_embedder, self.metrics, self.max_inputs = load_embedder, metrics, max_inputs
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="kvserve-embed")
        self._embedder = None

    async def create(self, req: EmbeddingRequest) -> EmbeddingResponse:
        if req.model is not None and req.model != MINILM:
            raise OpenAIError(f"The model `{req.model}` does not exist; embeddings are served by {MINILM}.", 404,
                              param="model", code="model_not_found")
        texts = self._texts(req.input)
        start = time.perf_counter()
        embedder = await self._run(self._load)
        if req.dimensions is not None and req.dimensions != embedder.dim:
            raise OpenAIError(f"dimensions must be {embedder.dim} (the embedder's own) or omitted; {MINILM} "
                              "vectors cannot be shortened", param="dimensions", code="invalid_value")
        vectors, tokens = await self._run(self._embed, embedder, texts)
        seconds = time.perf_counter() - start
        self.metrics.observe_embedding(len(texts), tokens, seconds)
        log.info("embedded %d inputs (%d tokens) in %.3fs", len(texts), tokens, seconds)
        data = [Embedding(index=i, embedding=_encode(v, req.encoding_format)) for i, v in enumerate(vectors)]
        return EmbeddingResponse(data=data, model=embedder.name,
                                 usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens))

    def _texts(self, given) -> list[str]:
        texts = [given] if isinstance(given, str) else given
        if not texts:
            raise OpenAIError("input must not be empty", param="input", code="invalid_value")
        if not all(isinstance(t, str) for t in texts):
            raise OpenAIError("input must be a string or a list of strings: token ids are not supported by "
                              f"{MINILM}", param="input", code="invalid_value")
        if len(texts) > self.max_inputs:
            raise OpenAIError(f"at most {self.max_inputs} inputs per request", param="input", code="invalid_value")
        if any(not t.strip() for t in texts):
            raise OpenAIError("input must not hold empty strings", param="input", code="invalid_value")
        return texts

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    def _load(self):
        if self._embedder is None:
            try:
                self._embedder = self.load_embedder()
            except RuntimeError as e:  # the rag extra (the weights) is not installed
                raise OpenAIError(f"embeddings are unavailable: {e}", 503, code="embeddings_unavailable") from None
        return self._embedder

    @staticmethod
    def _embed(embedder, texts: list[str]) -> tuple[np.ndarray, int]:
        encodings = embedder.tokenize(texts)
        too_long = [i for i, e in enumerate(encodings) if e.overflowing]
        if too_long:
            raise OpenAIError(f"input[{too_long[0]}] is longer than {MINILM}'s {embedder.max_length} tokens",
                              param="input", code="context_length_exceeded")
        lengths = [sum(e.attention_mask) for e in encodings]
        order = sorted(range(len(texts)), key=lengths.__getitem__)
        out = np.zeros((len(texts), embedder.dim), np.float32)
        for s in range(0, len(order), _BATCH):
            idx = order[s:s + _BATCH]
            out[idx] = embedder.embed([encodings[i] for i in idx])
        return out, sum(lengths)

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)


def _encode(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode()
    return vector.tolist()
