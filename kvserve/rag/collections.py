"""Every collection under an index folder, opened on first use with its own cluster cache,
searcher and prefetcher; reopened when a build has swapped in a new version."""
import os
import threading
from dataclasses import dataclass

from kvserve.rag.cluster_cache import ClusterCache
from kvserve.rag.embedder import make_embedder
from kvserve.rag.index_store import NAME_RE, IndexStore, index_dir, list_collections
from kvserve.rag.lookahead import Prefetcher
from kvserve.rag.search import IVFSearcher


class CollectionNotFound(KeyError):
    pass


@dataclass
class Collection:
    name: str
    version: str  # the folder the link pointed to when opened
    store: IndexStore
    cache: ClusterCache
    searcher: IVFSearcher
    prefetcher: Prefetcher
    embedder: object

    def close(self) -> None:
        self.prefetcher.close()
        self.searcher.close()
        self.store.close()


class CollectionRegistry:
    def __init__(self, root=None, cache_bytes: int = 256 * 2**20, prefetch_bytes: int | None = None,
                 embedder_factory=make_embedder):
        self.root = index_dir(root)
        self.cache_bytes = cache_bytes
        self.prefetch_bytes = prefetch_bytes or cache_bytes
        self.embedder_factory = embedder_factory
        self._open: dict[str, Collection] = {}
        self._embedders: dict[str, object] = {}
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        return list_collections(self.root)

    def get(self, name: str) -> Collection:
        """Raises CollectionNotFound for a name that is not a collection here (or not a valid
        name at all: names never reach the file system unchecked)."""
        if not isinstance(name, str) or not NAME_RE.fullmatch(name) or not (self.root / name / "meta.json").is_file():
            raise CollectionNotFound(name)
        version = os.path.realpath(self.root / name)
        with self._lock:
            current = self._open.get(name)
            if current is not None and current.version == version:
                return current
            store = IndexStore(version)
            embedder = self._embedder(store.meta["embedder"])
            cache = ClusterCache(self.cache_bytes, store.nlist)
            searcher = IVFSearcher(store, cache)
            coll = Collection(name, version, store, cache, searcher, Prefetcher(searcher, self.prefetch_bytes),
                              embedder)
            self._open[name] = coll  # the old version is left to searches still running on it
        return coll

    def embedder(self, name: str):
        """The embedder of that name, shared with the collections that use it (loaded once)."""
        with self._lock:
            return self._embedder(name)

    def _embedder(self, name: str):
        if name not in self._embedders:
            self._embedders[name] = self.embedder_factory(name)
        return self._embedders[name]

    def close(self) -> None:
        with self._lock:
            for coll in self._open.values():
                coll.close()
            self._open.clear()
