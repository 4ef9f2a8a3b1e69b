"""IVF search over a ClusterCache in front of an IndexStore: rank centroids, score the cached
clusters with one matmul, read the missed ones from disk on a thread pool (scoring each as it
arrives), merge into the top k. Where a cluster came from never changes the result."""
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from kvserve.rag.cluster_cache import ClusterCache
from kvserve.rag.index_store import IndexStore


@dataclass
class SearchResult:
    ids: list[int]
    scores: list[float]
    hits: int = 0
    misses: int = 0
    seconds: float = 0.0
    probed: list[int] = field(default_factory=list)


class IVFSearcher:
    def __init__(self, store: IndexStore, cache: ClusterCache, io_threads: int = 8):
        self.store, self.cache = store, cache
        self.pool = ThreadPoolExecutor(io_threads, thread_name_prefix="kvserve-ivf-io")

    def rank(self, q: np.ndarray, n: int) -> np.ndarray:
        """The n clusters whose centroids are nearest q, nearest first."""
        scores = self.store.centroids @ np.asarray(q, np.float32).reshape(-1)
        n = max(1, min(n, len(scores)))
        top = np.argpartition(-scores, n - 1)[:n] if n < len(scores) else np.arange(len(scores))
        return top[np.lexsort((top, -scores[top]))]

    def load(self, c: int, admit: bool = True, protect: set[int] = frozenset()):
        """Cluster c from disk, read once however many threads want it at the same moment.
        admit: keep it cached if something colder can make room (a search miss); else the
        caller inserts it itself (a prefetch)."""
        cache = self.cache
        with cache.lock:
            entry = cache.entries.get(c)
            if entry is not None:
                return entry
            future = cache.inflight.get(c)
            owner = future is None
            if owner:
                future = cache.inflight[c] = Future()
        if not owner:
            return future.result()
        try:
            entry = self.store.read_cluster(c)
            if admit:
                cache.insert(c, entry, accessed=True, only_colder=True)
            else:
                cache.insert(c, entry, protect=protect)
            future.set_result(entry)
            return entry
        except BaseException as e:
            future.set_exception(e)
            raise
        finally:
            with cache.lock:
                cache.inflight.pop(c, None)

    def search(self, q: np.ndarray, top_k: int, nprobe: int) -> SearchResult:
        start = time.perf_counter()
        q = np.asarray(q, np.float32).reshape(-1)
        probe = self.rank(q, nprobe)
        found, missing = self.cache.lookup(probe)
        futures = [self.pool.submit(self._score_missed, c, q) for c in missing]
        parts = []
        if found:
            vecs = np.concatenate([found[c][0] for c in probe if c in found])
            ids = np.concatenate([found[c][1] for c in probe if c in found])
            parts.append((vecs @ q, ids))
        parts += [f.result() for f in futures]
        ids, scores = _top_k(parts, top_k)
        return SearchResult(ids, scores, len(found), len(missing), time.perf_counter() - start,
                            [int(c) for c in probe])

    def _score_missed(self, c: int, q: np.ndarray):
        vecs, ids = self.load(c)
        return vecs @ q, ids

    def close(self) -> None:
        self.pool.shutdown(wait=False)


def _top_k(parts, k: int) -> tuple[list[int], list[float]]:
    if not parts:
        return [], []
    scores = np.concatenate([p[0] for p in parts])
    ids = np.concatenate([p[1] for p in parts])
    if len(scores) > k:
        keep = np.argpartition(-scores, k - 1)[:k]
        scores, ids = scores[keep], ids[keep]
    order = np.lexsort((ids, -scores))  # ties by chunk id: the same answer whatever the order of reads
    return ids[order].tolist(), scores[order].astype(float).tolist()


def exact_search(vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Brute-force top-k chunk ids (faiss IndexFlatIP), the reference for recall."""
    import faiss
    index = faiss.IndexFlatIP(vectors.shape[1])
    block = 262144
    for s in range(0, len(vectors), block):
        index.add(np.ascontiguousarray(vectors[s:s + block], np.float32))
    _, rows = index.search(np.ascontiguousarray(queries, np.float32), k)
    return np.asarray(ids)[rows]
