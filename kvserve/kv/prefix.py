"""PrefixCache: full KV pages keyed by a SHA-256 chain of their token ids (kv/page_keys.py),
evicted LRU when unused."""
from collections import OrderedDict

from kvserve.kv.pool import PagePool


class PrefixCache:
    """Holds one pool reference per cached page. A cached page nobody else references is
    "evictable": still a hit for the next request, but given back to the pool when pages run out."""

    def __init__(self, pool: PagePool):
        self.pool = pool
        self.pages: OrderedDict[bytes, int] = OrderedDict()  # key -> page, least recently used first
        self.queried_tokens = 0
        self.hit_tokens = 0

    def __len__(self) -> int:
        return len(self.pages)

    def lookup(self, hashes: list[bytes]) -> list[int]:
        """The longest run of cached pages from the start; marks them recently used."""
        hits = []
        for h in hashes:
            page = self.pages.get(h)
            if page is None:
                break
            self.pages.move_to_end(h)
            hits.append(page)
        return hits

    def record_query(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.queried_tokens += num_tokens
        self.hit_tokens += num_hit_tokens

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0

    def insert(self, page_hash: bytes, page: int) -> None:
        if page_hash in self.pages:  # another request computed the same prefix first; keep that one
            return
        self.pool.incref([page])
        self.pages[page_hash] = page

    def num_evictable(self) -> int:
        return sum(1 for p in self.pages.values() if self.pool.ref_counts[p] == 1)

    def evict(self, n: int) -> int:
        """Frees up to n unreferenced cached pages, oldest first; returns how many were freed."""
        victims = []
        for h, p in self.pages.items():
            if len(victims) == n:
                break
            if self.pool.ref_counts[p] == 1:
                victims.append(h)
        for h in victims:
            self.pool.decref([self.pages.pop(h)])
        return len(victims)

    def clear(self) -> None:
        self.evict(len(self.pages))
