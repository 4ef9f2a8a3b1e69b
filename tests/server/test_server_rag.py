"""RAG over the API: /v1/retrieve and chat completions with a `rag` field (through the official
openai client's extra_body), on a tiny collection indexed with the hashing embedder."""
import sys
from pathlib import Path

import httpx
import pytest

from server_util import API_KEY, MODEL, metrics, start_uvicorn, wait_idle

sys.path.insert(0, str(Path(__file__).parents[1] / "rag"))
from rag_util import write_docs  # noqa: E402

pytest.importorskip("faiss")

QUESTION = "Which planet has two small moons?"


@pytest.fixture(scope="module")
def rag_server(server_engine, tmp_path_factory):
    from kvserve.rag.builder import build_collection
    from kvserve.rag.embedder import HashEmbedder
    from kvserve.server.app import build_app
    from kvserve.server.serving import ServerConfig
    tmp = tmp_path_factory.mktemp("rag-server")
    build_collection([write_docs(tmp / "docs")], "kb", tmp / "index", HashEmbedder(64), chunk_words=12, overlap=4,
                     nlist=3, progress=False)
    engine, async_engine = server_engine
    config = ServerConfig(model_name=MODEL, api_key=API_KEY, index_dir=str(tmp / "index"), rag_cache_mb=0.002,
                          rag_nprobe=2, rag_prefetch_nprobe=3)
    server, thread, url = start_uvicorn(build_app(async_engine, config, shutdown_engine=False))
    yield url, engine
    server.should_exit = True
    thread.join(10)


@pytest.fixture
def rag_http(rag_server):
    with httpx.Client(base_url=rag_server[0], headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
        yield c


def test_retrieve(rag_http):
    r = rag_http.post("/v1/retrieve", json={"collection": "kb", "query": QUESTION, "top_k": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["collection"] == "kb" and len(body["data"]) == 2
    top = body["data"][0]
    assert top["source"].endswith("space.md") and "Phobos" in top["text"]
    assert top["score"] >= body["data"][1]["score"]
    assert body["cache"]["hits"] + body["cache"]["misses"] == 2


def test_retrievals_show_in_metrics(rag_http):
    before = metrics(rag_http)
    for _ in range(2):
        assert rag_http.post("/v1/retrieve", json={"collection": "kb", "query": QUESTION, "top_k": 2}).status_code == 200
    after = metrics(rag_http)
    assert after["kvserve_rag_retrievals_total"] - before.get("kvserve_rag_retrievals_total", 0) == 2
    assert after["kvserve_rag_search_seconds_count"] - before.get("kvserve_rag_search_seconds_count", 0) == 2
    read = lambda m: m.get("kvserve_rag_cluster_hits_total", 0) + m.get("kvserve_rag_cluster_misses_total", 0)
    assert read(after) - read(before) == 4  # nprobe 2 clusters a search


USER = [{"role": "user", "content": QUESTION}]
BAD = {
    "unknown collection": ("/v1/retrieve", {"collection": "nope", "query": "x"}, 404, "collection"),
    "path in collection": ("/v1/retrieve", {"collection": "../kb", "query": "x"}, 404, "collection"),
    "empty query": ("/v1/retrieve", {"collection": "kb", "query": ""}, 400, "query"),
    "blank query": ("/v1/retrieve", {"collection": "kb", "query": "   "}, 400, "query"),
    "top_k zero": ("/v1/retrieve", {"collection": "kb", "query": "x", "top_k": 0}, 400, "top_k"),
    "top_k too large": ("/v1/retrieve", {"collection": "kb", "query": "x", "top_k": 10_000}, 400, "top_k"),
    "top_k not int": ("/v1/retrieve", {"collection": "kb", "query": "x", "top_k": "three"}, 400, "top_k"),
    "missing collection": ("/v1/retrieve", {"query": "x"}, 400, "collection"),
    "unknown field": ("/v1/retrieve", {"collection": "kb", "query": "x", "k": 3}, 400, "k"),
    "chat unknown collection": ("/v1/chat/completions", {"messages": USER, "rag": {"collection": "nope"}}, 404,
                                "collection"),
    "chat top_k out of range": ("/v1/chat/completions", {"messages": USER, "rag": {"collection": "kb", "top_k": 0}},
                                400, "rag"),
    "chat bad pipeline": ("/v1/chat/completions", {"messages": USER, "rag": {"collection": "kb", "pipeline": "x"}},
                          400, "rag"),
    "chat empty question": ("/v1/chat/completions", {"messages": [{"role": "user", "content": " "}],
                                                     "rag": {"collection": "kb"}}, 400, "messages"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_input(rag_http, case):
    path, body, status, param = BAD[case]
    r = rag_http.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]
    if status == 404:
        assert err["code"] == "collection_not_found"


def test_hyde_chat_through_openai_client(rag_server):
    import openai
    client = openai.OpenAI(base_url=f"{rag_server[0]}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    plain = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=4, temperature=0)
    r = client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=6, temperature=0,
        extra_body={"ignore_eos": True, "rag": {"collection": "kb", "top_k": 2, "pipeline": "hyde", "lookahead": True,
                                                "hyde_max_tokens": 8}})
    assert r.usage.completion_tokens == 6
    rag = r.model_dump()["rag"]
    assert rag["collection"] == "kb" and rag["pipeline"] == "hyde" and rag["lookahead"] is True
    assert len(rag["chunks"]) == 2 and all(isinstance(c["id"], int) and c["source"] for c in rag["chunks"])
    assert isinstance(rag["hyde"], str) and rag["cache"]["hits"] + rag["cache"]["misses"] == 2
    assert r.usage.prompt_tokens > plain.usage.prompt_tokens + 20  # the chunks are in the prompt
    no_lookahead = client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=6, temperature=0,
        extra_body={"ignore_eos": True, "rag": {"collection": "kb", "top_k": 2, "pipeline": "hyde",
                                                "lookahead": False, "hyde_max_tokens": 8}})
    assert [c["id"] for c in no_lookahead.model_dump()["rag"]["chunks"]] == [c["id"] for c in rag["chunks"]]
    assert no_lookahead.choices[0].message.content == r.choices[0].message.content
    stream = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=4, temperature=0, stream=True,
                                            extra_body={"rag": {"collection": "kb", "top_k": 1}})
    chunks = list(stream)
    assert len(chunks[0].model_dump()["rag"]["chunks"]) == 1
    assert all("rag" not in c.model_dump() for c in chunks[1:])
    wait_idle(rag_server[1])
