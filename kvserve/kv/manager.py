"""KVCacheManager: which pages each sequence holds; allocation, prefix reuse, fork, free."""
from kvserve.kv.offload_pools import OffloadPages, OffloadPools
from kvserve.kv.pool import PagePool
from kvserve.kv.page_keys import page_keys, root_key
from kvserve.kv.prefix import PrefixCache


class KVCacheManager:
    def __init__(self, pool: PagePool, enable_prefix_caching: bool = True, offload: OffloadPools | None = None):
        self.pool = pool
        self.page_size = pool.page_size
        self.prefix = PrefixCache(pool) if enable_prefix_caching else None
        self.offload = offload  # MagicPIG with offload: a sequence's pages there grow with its main pages

    def offloaded(self, seq) -> bool:
        return self.offload is not None and seq.policy.offload

    @property
    def num_free_pages(self) -> int:
        """Pages a new allocation can get: free ones plus cached ones nobody uses."""
        return self.pool.num_free + (self.prefix.num_evictable() if self.prefix else 0)

    def pages_needed(self, seq, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.page_size) - len(seq.pages))

    def match_prefix(self, seq) -> int:
        """Gives a new sequence the cached pages of its longest cached prefix; returns the tokens
        they cover. At least one token is left to compute, since its logits are needed."""
        if self.prefix is None or seq.pages:
            return 0
        hashes = self.keys(seq, (len(seq.token_ids) - 1) // self.page_size)
        hits = self.prefix.lookup(hashes)
        self.prefix.record_query(len(seq.token_ids), len(hits) * self.page_size)
        self.pool.incref(hits)
        seq.pages = hits
        seq.page_hashes = hashes[:len(hits)]
        return len(hits) * self.page_size

    def keys(self, seq, num_pages: int) -> list[bytes]:
        """Keys of seq's first num_pages full pages. Memoized in seq.page_keys (token ids only
        grow), so a waiting prompt retried every step is hashed once, not once per retry."""
        memo = seq.page_keys
        if len(memo) < num_pages:
            parent = memo[-1] if memo else root_key(seq.cache_salt)
            memo += page_keys(seq.token_ids[:num_pages * self.page_size], self.page_size, parent,
                              start_page=len(memo))
        return memo[:num_pages]

    def allocate(self, seq, num_tokens: int) -> bool:
        """Grows seq's pages to hold num_tokens tokens; False (and nothing changed) if the pool
        cannot, even after evicting unused cached pages."""
        need = self.pages_needed(seq, num_tokens)
        offload_need = 0
        if self.offloaded(seq):
            held = len(seq.offload.host) if seq.offload is not None else 0
            offload_need = max(0, -(-num_tokens // self.page_size) - held)
            if offload_need > self.offload.num_free:
                return False
        if need == 0 and offload_need == 0:  # most decode steps
            return True
        if need > self.pool.num_free and self.prefix is not None:
            self.prefix.evict(need - self.pool.num_free)
        if need > self.pool.num_free:
            return False
        seq.pages.extend(self.pool.allocate(need))
        if offload_need:
            if seq.offload is None:
                seq.offload = OffloadPages()
            self.offload.grow(seq.offload, offload_need)
        return True

    def cache_computed_pages(self, seq) -> None:
        """Publishes seq's newly completed pages to the prefix cache."""
        if self.prefix is None:
            return
        done = len(seq.page_hashes)  # pages before this are cached already
        full = seq.num_computed_tokens // self.page_size
        if full <= done:
            return
        seq.page_hashes = self.keys(seq, full)
        for i in range(done, full):
            if seq.pages[i] >= 0:
                self.prefix.insert(seq.page_hashes[i], seq.pages[i])

    def fork(self, parent, child) -> bool:
        """Child shares parent's full pages; the partial last page is copied (copy-on-write). Pages
        the parent gave back (-1: behind a sliding window) stay given back in the child."""
        full = parent.num_computed_tokens // self.page_size
        shared = parent.pages[:full]
        partial = parent.num_computed_tokens % self.page_size
        if partial and self.pool.num_free == 0 and not (self.prefix and self.prefix.evict(1)):
            return False
        self.pool.incref([p for p in shared if p >= 0])
        child.pages = list(shared)
        if partial:
            page = self.pool.allocate(1)[0]
            self.pool.copy_page(parent.pages[full], page)
            child.pages.append(page)
        child.page_hashes = list(parent.page_hashes[:full])
        child.page_keys = list(parent.page_keys[:full])
        child.num_computed_tokens = parent.num_computed_tokens
        return True

    def release_pages(self, seq, logical: range) -> None:
        """Gives back the pages at these logical indices, keeping the rest in place; a released
        page is marked -1 in seq.pages (streaming attention, or a model's sliding windows, never
        read it again). Ranges only grow at their end, so pages checked by an earlier call are
        skipped: a long sequence is not scanned from its start every step."""
        start = max(logical.start, seq.released_until)
        gone = [i for i in range(start, min(logical.stop, len(seq.pages))) if seq.pages[i] >= 0]
        self.pool.decref([seq.pages[i] for i in gone])
        for i in gone:
            seq.pages[i] = -1
        seq.released_until = max(seq.released_until, min(logical.stop, len(seq.pages)))

    def trim(self, seq, num_tokens: int) -> None:
        """Gives back the pages past the first num_tokens tokens (a rejected draft's K/V)."""
        keep = -(-num_tokens // self.page_size)
        self.pool.decref([p for p in seq.pages[keep:] if p >= 0])
        del seq.pages[keep:]

    def free(self, seq) -> None:
        self.pool.decref([p for p in seq.pages if p >= 0])
        seq.pages = []
        seq.released_until = 0
        seq.page_hashes = []
        if getattr(seq, "offload", None) is not None:
            self.offload.free(seq.offload)
            seq.offload = None

    def check_integrity(self, live_seqs) -> None:
        """Every page's ref count equals its holders: live sequences plus the prefix cache."""
        expected = [0] * self.pool.num_pages
        for seq in live_seqs:
            for p in seq.pages:
                if p >= 0:
                    expected[p] += 1
        if self.prefix:
            for p in self.prefix.pages.values():
                expected[p] += 1
        for p in self.pool.reserved:
            expected[p] += 1
        assert expected == self.pool.ref_counts, "page ref counts do not match their holders"
        assert sorted(self.pool.free_pages) == [p for p, c in enumerate(expected) if c == 0]
        if self.offload is not None:
            for pool, name in ((self.offload.host, "host"), (self.offload.dense, "dense")):
                held = [0] * pool.num_pages
                for seq in live_seqs:
                    for p in getattr(seq.offload, name, None) or []:
                        held[p] += 1
                assert held == pool.ref_counts, f"offload {name} page ref counts do not match their holders"
                assert sorted(pool.free_pages) == [p for p, c in enumerate(held) if c == 0]
