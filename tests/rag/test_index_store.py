"""Building collections from documents: chunking, adding documents, atomic versions."""
import json
import os

import numpy as np
import pytest

from rag_util import DOCS, write_docs

pytest.importorskip("faiss")


def test_split_words_overlaps():
    from kvserve.rag.chunking import split_words
    words = " ".join(f"w{i}" for i in range(25))
    chunks = split_words(words, chunk_words=10, overlap=3)
    assert chunks[0].split()[-3:] == chunks[1].split()[:3]
    assert chunks[-1].split()[-1] == "w24"
    assert split_words("", 10, 3) == [] and split_words("one two", 10, 3) == ["one two"]
    with pytest.raises(ValueError):
        split_words(words, 5, 5)


def test_read_documents_formats_and_errors(tmp_path):
    from kvserve.rag.chunking import read_documents
    docs = read_documents([write_docs(tmp_path / "docs")])
    sources = [s for s, _ in docs]
    assert "pasta-notes" in sources and any(s.endswith("cooking.jsonl:1") for s in sources)
    assert len(docs) == len(DOCS) + 1
    (tmp_path / "bad.jsonl").write_text('{"title": "no text"}\n')
    (tmp_path / "x.pdf").write_text("")
    for bad in ("bad.jsonl", "x.pdf", "missing.txt"):
        with pytest.raises((ValueError, FileNotFoundError)):
            read_documents([tmp_path / bad])


def test_build_add_and_search(tmp_path):
    from kvserve.rag.builder import build_collection
    from kvserve.rag.collections import CollectionRegistry
    from kvserve.rag.embedder import HashEmbedder
    from kvserve.rag.index_store import IndexStore, list_collections
    docs = write_docs(tmp_path / "docs")
    root, emb = tmp_path / "index", HashEmbedder(64)
    meta = build_collection([docs / "fruit.txt", docs / "space.md"], "kb", root, emb, chunk_words=12, overlap=4,
                            progress=False)
    first = IndexStore(root / "kb")
    assert list_collections(root) == ["kb"] and meta["num_chunks"] == first.num_chunks
    meta2 = build_collection([docs / "cooking.jsonl", docs / "music.txt"], "kb", root, emb, chunk_words=12,
                             overlap=4, progress=False)
    second = IndexStore(root / "kb")
    assert second.num_chunks == first.num_chunks + meta2["added"]
    again = build_collection([docs / "music.txt", docs / "space.md"], "kb", root, emb, chunk_words=12, overlap=4,
                             progress=False)  # documents already in it: nothing added, no new version
    assert again["added"] == 0 and again["skipped"] > 0 and again["num_chunks"] == second.num_chunks
    assert IndexStore(root / "kb").num_chunks == second.num_chunks
    assert np.array_equal(second.centroids, first.centroids)  # added to the existing clusters
    assert second.chunks.get(0) == first.chunks.get(0)
    assert first.read_cluster(0)[0].shape[1] == 64  # the old version stays readable while open
    assert len([p for p in root.iterdir() if p.name.startswith(".kb.")]) == 1  # the old version is gone
    coll = CollectionRegistry(root).get("kb")
    q = emb.encode(["Which planet has the great red spot storm?"])[0]
    top = coll.searcher.search(q, 1, nprobe=coll.store.nlist)
    assert "red spot" in coll.store.chunks.get(top.ids[0])["text"]


def test_a_replaced_version_lets_go_of_its_files(tmp_path):
    import gc
    import os

    from kvserve.rag.builder import build_collection
    from kvserve.rag.collections import CollectionRegistry
    from kvserve.rag.embedder import HashEmbedder
    docs, root, emb = write_docs(tmp_path / "docs"), tmp_path / "index", HashEmbedder(64)
    registry = CollectionRegistry(root)

    def build_and_search():
        build_collection([docs / "fruit.txt"], "kb", root, emb, chunk_words=12, overlap=4, progress=False,
                         rebuild=True)  # a new version each time, with the same chunks
        coll = registry.get("kb")
        coll.searcher.search(emb.encode(["apples"])[0], 1, nprobe=coll.store.nlist)
        return coll.version

    def open_files():
        gc.collect()
        return len(os.listdir("/proc/self/fd"))

    versions = [build_and_search()]
    before = open_files()
    for _ in range(3):
        versions.append(build_and_search())
    assert len(set(versions)) == 4  # each build swapped in a new version
    assert open_files() == before
    registry.close()


def test_crash_mid_build_keeps_previous_version(tmp_path):
    from kvserve.rag.builder import build_collection
    from kvserve.rag.embedder import HashEmbedder
    from kvserve.rag.index_store import IndexStore, write_collection
    root = tmp_path / "index"
    build_collection([write_docs(tmp_path / "docs")], "kb", root, HashEmbedder(16), progress=False)
    before = IndexStore(root / "kb")
    vectors = np.eye(16, dtype=np.float32)

    def chunks():
        yield ("a", "first")
        raise KeyboardInterrupt  # the process dies while writing the chunk store

    with pytest.raises(KeyboardInterrupt):
        write_collection(root, "kb", vectors, np.zeros(16, np.int64), vectors[:1], chunks(), {"embedder": "hash-16"},
                         progress=False)
    after = IndexStore(root / "kb")
    assert after.path == before.path and after.num_chunks == before.num_chunks
    assert sorted(p.name for p in root.iterdir()) == [before.path.name, "kb"]
    assert json.loads((root / "kb" / "meta.json").read_text())["embedder"] == "hash-16"
    dead = root / ".kb.999999999-0123456789ab"  # a build killed outright (no cleanup ran) ...
    dead.mkdir()
    live = root / f".kb.{os.getpid()}-ba9876543210"  # ... and one still running
    live.mkdir()
    build_collection([tmp_path / "docs"], "kb", root, HashEmbedder(16), progress=False, rebuild=True)
    assert not dead.exists() and live.exists() and IndexStore(root / "kb").num_chunks == before.num_chunks


def test_bad_collection_names(tmp_path):
    from kvserve.rag.collections import CollectionNotFound, CollectionRegistry
    from kvserve.rag.index_store import check_name
    for bad in ("../etc", ".hidden", "a/b", "", "x" * 200):
        with pytest.raises(ValueError):
            check_name(bad)
        with pytest.raises(CollectionNotFound):
            CollectionRegistry(tmp_path).get(bad)
