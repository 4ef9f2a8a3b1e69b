"""Clusters held in fast memory under a byte budget, evicted by TeleRAG's hotness: every prefetch
halves all hotness (old popularity fades), every access adds 1024. The coldest cluster goes first.

Two ways in: a prefetch (the prediction is trusted: it evicts whatever is coldest) and admission
after a miss (the data was read anyway; it stays only if something colder can make room).
Thread-safe: searches, prefetches and admissions run on different threads."""
import threading
from concurrent.futures import Future

import numpy as np

HIT_HEAT = 1024.0


class ClusterCache:
    def __init__(self, budget_bytes: int, nlist: int):
        self.budget = int(budget_bytes)
        self.hotness = np.zeros(nlist, np.float64)
        self.entries: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.used = 0
        self.hits = self.misses = self.evictions = 0
        self.inflight: dict[int, Future] = {}  # clusters being read from disk right now
        self.lock = threading.Lock()

    @staticmethod
    def nbytes(entry) -> int:
        return entry[0].nbytes + entry[1].nbytes

    def lookup(self, clusters) -> tuple[dict[int, tuple[np.ndarray, np.ndarray]], list[int]]:
        """Cached entries of `clusters` (each one an access: +1024) and the ones missing."""
        found, missing = {}, []
        with self.lock:
            for c in clusters:
                entry = self.entries.get(int(c))
                if entry is None:
                    missing.append(int(c))
                else:
                    found[int(c)] = entry
                    self.hotness[c] += HIT_HEAT
            self.hits += len(found)
            self.misses += len(missing)
        return found, missing

    def begin_prefetch(self) -> None:
        with self.lock:
            self.hotness *= 0.5

    def insert(self, c: int, entry, accessed: bool = False, only_colder: bool = False,
               protect: set[int] = frozenset()) -> bool:
        """Adds cluster c, evicting the coldest unprotected clusters to stay within the budget.
        With only_colder, it evicts only clusters colder than c, else leaves the cache as it was."""
        size = self.nbytes(entry)
        with self.lock:
            if accessed:
                self.hotness[c] += HIT_HEAT
            if c in self.entries:
                return True
            if size > self.budget:
                return False
            victims, freed = [], 0
            if self.used + size > self.budget:
                candidates = sorted((self.hotness[k], k) for k in self.entries if k not in protect)
                for heat, k in candidates:
                    if self.used - freed + size <= self.budget:
                        break
                    if only_colder and heat >= self.hotness[c]:
                        return False
                    victims.append(k)
                    freed += self.nbytes(self.entries[k])
                if self.used - freed + size > self.budget:
                    return False
            for k in victims:
                del self.entries[k]
            self.evictions += len(victims)
            self.entries[c] = entry
            self.used += size - freed
            return True

    def __contains__(self, c: int) -> bool:
        return c in self.entries

    def stats(self) -> dict:
        with self.lock:
            total = self.hits + self.misses
            return {"budget_bytes": self.budget, "used_bytes": self.used, "clusters": len(self.entries),
                    "hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                    "hit_rate": self.hits / total if total else 0.0}
