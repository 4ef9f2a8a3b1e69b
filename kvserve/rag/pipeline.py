"""One RAG request: embed the question, start the lookahead prefetch, write the pre-retrieval
text (HyDE), retrieve with the transformed query, and put the chunks into the chat prompt.

The LLM is reached through `generate(messages, max_tokens) -> text` (async), so the server,
`kvserve rag ask` and the benchmark share this code over the same AsyncEngine."""
import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

from kvserve.rag.collections import Collection

Generate = Callable[[list[dict], int], Awaitable[str]]

HYDE_PROMPT = "Write a short passage that answers this question.\nQuestion: {question}\nPassage:"
CONTEXT_PROMPT = ("Answer using the context below. If the context does not contain the answer, say so.\n\n"
                  "Context:\n{context}")


@dataclass
class RagOptions:
    top_k: int = 3
    pipeline: str = "plain"  # plain | hyde
    lookahead: bool = True
    nprobe: int = 8
    prefetch_nprobe: int = 16  # wider than nprobe: the transformed query drifts from the question
    hyde_max_tokens: int = 64


@dataclass
class Retrieved:
    chunks: list[dict]  # id, source, text, score
    hyde: str | None = None
    timings: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict)
    query: np.ndarray | None = None  # the vector searched with (benchmarks check recall with it)

    def summary(self) -> dict:
        """What a response tells the client: which chunks, from where (not their text again)."""
        return {"chunks": [{k: c[k] for k in ("id", "source", "score")} for c in self.chunks],
                "hyde": self.hyde, "timings": self.timings, "cache": self.cache}


async def retrieve(coll: Collection, question: str, opts: RagOptions, generate: Generate | None = None) -> Retrieved:
    t0 = time.perf_counter()
    q = (await asyncio.to_thread(coll.embedder.encode, [question]))[0]
    timings = {"embed_s": time.perf_counter() - t0}
    # only a pre-retrieval step leaves time to prefetch in; without one the search itself reads
    prefetch = coll.prefetcher.start(q, opts.prefetch_nprobe) if opts.lookahead and opts.pipeline == "hyde" else None
    hyde = None
    if opts.pipeline == "hyde":
        if generate is None:
            raise ValueError("the hyde pipeline needs a model")
        t = time.perf_counter()
        hyde = await generate([{"role": "user", "content": HYDE_PROMPT.format(question=question)}],
                              opts.hyde_max_tokens)
        p = (await asyncio.to_thread(coll.embedder.encode, [hyde]))[0]
        q = (q + p) / max(float(np.linalg.norm(q + p)), 1e-12)  # HyDE: the question and its passage together
        timings["hyde_s"] = time.perf_counter() - t
    result = await asyncio.to_thread(coll.searcher.search, q, opts.top_k, opts.nprobe)
    timings["search_s"] = result.seconds
    chunks = []
    for cid, score in zip(result.ids, result.scores):
        c = coll.store.chunks.get(cid)
        chunks.append({"id": cid, "source": c["source"], "text": c["text"], "score": score})
    cache = {"hits": result.hits, "misses": result.misses}
    if prefetch is not None:
        if prefetch.done() and prefetch.exception() is None:
            cache["prefetched"] = prefetch.result().clusters
        else:
            cache["prefetched"] = None  # still running: it ends on its own
    timings["total_s"] = time.perf_counter() - t0
    return Retrieved(chunks, hyde, timings, cache, q)


def with_context(messages: list[dict], chunks: list[dict]) -> list[dict]:
    """The chat with the retrieved chunks in its system message (merged into one the chat has)."""
    context = "\n\n".join(f"[{i + 1}] ({c['source']}) {c['text']}" for i, c in enumerate(chunks))
    text = CONTEXT_PROMPT.format(context=context)
    if messages and messages[0]["role"] in ("system", "developer"):
        first = dict(messages[0], content=f"{_text(messages[0]['content'])}\n\n{text}")
        return [first] + list(messages[1:])
    return [{"role": "system", "content": text}] + list(messages)


def last_user_text(messages: list[dict]) -> str:
    for m in reversed(messages):
        if m["role"] == "user":
            return _text(m["content"])
    return ""


def _text(content) -> str:
    return content if isinstance(content, str) else "".join(p["text"] for p in content)


def engine_generate(async_engine, tokenizer) -> Generate:
    """`generate` over an AsyncEngine: greedy, so a question always gets the same HyDE passage."""
    from kvserve.engine.request import SamplingParams

    async def generate(messages: list[dict], max_tokens: int) -> str:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        text = ""
        async for out in async_engine.generate(ids, SamplingParams(temperature=0, max_tokens=max_tokens)):
            text = out.outputs[0].text
        return text
    return generate
