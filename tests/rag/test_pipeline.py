"""The RAG pipeline over a text collection: HyDE with a stand-in LLM, lookahead on and off give
the same chunks, and the chunks end up in the prompt."""
import asyncio

import pytest

from rag_util import write_docs

pytest.importorskip("faiss")

QUESTION = "What does the orchard keeper pick in autumn?"


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    from kvserve.rag.builder import build_collection
    from kvserve.rag.collections import CollectionRegistry
    from kvserve.rag.embedder import HashEmbedder
    tmp = tmp_path_factory.mktemp("rag")
    build_collection([write_docs(tmp / "docs")], "kb", tmp / "index", HashEmbedder(64), chunk_words=10, overlap=3,
                     nlist=4, progress=False)
    return lambda budget: CollectionRegistry(tmp / "index", budget).get("kb")


async def fake_llm(messages, max_tokens):
    return "Ripe apples are picked from the orchard trees in autumn."


@pytest.mark.parametrize("pipeline", ["plain", "hyde"])
def test_lookahead_returns_the_same_chunks(collection, pipeline):
    from kvserve.rag.pipeline import RagOptions, retrieve
    results = {}
    for lookahead in (False, True):
        coll = collection(coll_budget := 4096)
        assert coll.cache.budget == coll_budget
        opts = RagOptions(top_k=3, pipeline=pipeline, lookahead=lookahead, nprobe=2, prefetch_nprobe=3)
        got = asyncio.run(retrieve(coll, QUESTION, opts, fake_llm))
        results[lookahead] = [(c["id"], round(c["score"], 6)) for c in got.chunks]
        assert (got.hyde is not None) == (pipeline == "hyde")
        assert ("prefetched" in got.cache) == (lookahead and pipeline == "hyde")
    assert results[True] == results[False] and len(results[True]) == 3


def test_context_in_prompt_and_sources(collection):
    from kvserve.rag.pipeline import RagOptions, last_user_text, retrieve, with_context
    coll = collection(2**20)
    got = asyncio.run(retrieve(coll, QUESTION, RagOptions(top_k=2, nprobe=4), fake_llm))
    assert "apples" in got.chunks[0]["text"] and got.chunks[0]["source"].endswith("fruit.txt")
    msgs = with_context([{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}],
                        got.chunks)
    assert len(msgs) == 2 and msgs[0]["content"].startswith("Be brief.") and got.chunks[0]["text"] in msgs[0]["content"]
    assert with_context([{"role": "user", "content": "q"}], got.chunks)[0]["role"] == "system"
    assert last_user_text(msgs) == QUESTION
    summary = got.summary()
    assert [c["id"] for c in summary["chunks"]] == [c["id"] for c in got.chunks]
    assert "text" not in summary["chunks"][0]
