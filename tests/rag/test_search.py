"""IVF search: recall against exact search, and the same answer whether clusters come from the
cache, from disk, or from a lookahead prefetch."""
import numpy as np
import pytest

from rag_util import clustered, write_synthetic

pytest.importorskip("faiss")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    vectors, queries = clustered(6000, 32, centers=48)
    path = write_synthetic(tmp_path_factory.mktemp("index"), "synthetic", vectors, nlist=48)
    return path, vectors, queries


def searcher(path, budget):
    from kvserve.rag.cluster_cache import ClusterCache
    from kvserve.rag.index_store import IndexStore
    from kvserve.rag.search import IVFSearcher
    store = IndexStore(path)
    return IVFSearcher(store, ClusterCache(budget, store.nlist))


def test_recall_at_10_against_exact(synthetic):
    from kvserve.rag.index_store import IndexStore
    from kvserve.rag.search import exact_search
    path, vectors, queries = synthetic
    s = searcher(path, 2**20)
    store = IndexStore(path)
    rows, ids = store.all_vectors()
    exact = exact_search(rows, ids, queries, 10)
    got = [s.search(q, 10, nprobe=6).ids for q in queries]
    recall = np.mean([len(set(g) & set(e.tolist())) / 10 for g, e in zip(got, exact)])
    assert recall >= 0.9, recall
    full = [s.search(q, 10, nprobe=store.nlist).ids for q in queries[:5]]  # every cluster probed: exact
    assert [sorted(f) for f in full] == [sorted(e.tolist()) for e in exact[:5]]


def test_results_independent_of_cache_and_prefetch(synthetic):
    from kvserve.rag.lookahead import Prefetcher
    path, _, queries = synthetic
    cold = searcher(path, 0)  # every cluster read from disk
    warm = searcher(path, 2**30)
    prefetched = searcher(path, warm.store.total_bytes // 4)
    prefetcher = Prefetcher(prefetched, prefetched.cache.budget)
    for q in queries[:20]:
        base = cold.search(q, 10, nprobe=8)
        assert base.hits == 0 and base.misses == 8
        again = [warm.search(q, 10, nprobe=8) for _ in range(2)]
        assert again[1].hits == 8
        report = prefetcher.start(q + 0.05, 12).result()
        assert report.bytes <= prefetched.cache.budget
        p = prefetched.search(q, 10, nprobe=8)
        for r in (*again, p):
            assert r.ids == base.ids and np.allclose(r.scores, base.scores, atol=1e-6)
    assert prefetched.cache.stats()["hit_rate"] > 0.5
    assert prefetched.cache.used <= prefetched.cache.budget


def test_concurrent_searches_read_each_cluster_once(synthetic):
    from concurrent.futures import ThreadPoolExecutor
    path, _, queries = synthetic
    s = searcher(path, 2**30)
    reads = []
    original = s.store.read_cluster
    s.store.read_cluster = lambda c: reads.append(c) or original(c)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: s.search(queries[0], 10, 8).ids, range(16)))
    assert all(r == results[0] for r in results)
    assert sorted(reads) == sorted(set(reads)) and len(reads) == 8
