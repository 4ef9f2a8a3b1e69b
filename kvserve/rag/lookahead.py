"""TeleRAG's lookahead: while the LLM writes the pre-retrieval text (a HyDE passage), the
clusters nearest the *original* question are read into the cache on a background thread. The
transformed query usually lands in the same neighbourhood, so its search then hits memory.
A prefetch only moves data; the search result is the same with or without it."""
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from kvserve.rag.search import IVFSearcher


@dataclass
class PrefetchReport:
    clusters: int = 0  # read from disk by this prefetch
    already_cached: int = 0
    bytes: int = 0


class Prefetcher:
    def __init__(self, searcher: IVFSearcher, budget_bytes: int):
        self.searcher = searcher
        self.budget = int(budget_bytes)  # per prefetch; at most the cache's budget
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="kvserve-prefetch")

    def start(self, q: np.ndarray, prefetch_nprobe: int) -> Future:
        return self.pool.submit(self.prefetch, q, prefetch_nprobe)

    def prefetch(self, q: np.ndarray, prefetch_nprobe: int) -> PrefetchReport:
        searcher, cache = self.searcher, self.searcher.cache
        budget = min(self.budget, cache.budget)
        cache.begin_prefetch()
        report, protect = PrefetchReport(), set()
        for c in searcher.rank(q, prefetch_nprobe):
            c = int(c)
            protect.add(c)
            if c in cache:
                report.already_cached += 1
                continue
            size = searcher.store.cluster_bytes(c)
            if report.bytes + size > budget:
                break  # ranked nearest first: what is left is less likely to be needed
            searcher.load(c, admit=False, protect=protect)
            report.clusters += 1
            report.bytes += size
        return report

    def close(self) -> None:
        self.pool.shutdown(wait=False)
