"""KVCacheManager: which pages each sequence holds; allocation, prefix reuse, fork, free.

A sequence holds one page table per KV group (kv/groups.py), all of the same length: `seq.tables[g]`
(`seq.pages` is group 0's, the only one of a plain model). Pages a group's window has left are -1."""
from kvserve.kv.groups import KVGroups, behind_window
from kvserve.kv.offload_pools import OffloadPages, OffloadPools
from kvserve.kv.pool import PagePool
from kvserve.kv.page_keys import page_keys, root_key
from kvserve.kv.prefix import PrefixCache


class KVCacheManager:
    def __init__(self, pool: PagePool, enable_prefix_caching: bool = True, offload: OffloadPools | None = None,
                 groups: KVGroups | None = None):
        self.pool = pool
        self.page_size = pool.page_size
        self.groups = groups or KVGroups([None], [list(range(pool.k.shape[0]))], pool.k.shape[0])
        self.prefix = PrefixCache(pool) if enable_prefix_caching else None
        self.offload = offload  # MagicPIG with offload: a sequence's pages there grow with its main pages

    def offloaded(self, seq) -> bool:
        return self.offload is not None and seq.policy.offload

    @property
    def num_free_pages(self) -> int:
        """Pages a new allocation can get: free ones plus cached ones nobody uses."""
        return self.pool.num_free + (self.prefix.num_evictable() if self.prefix else 0)

    def _tables(self, seq) -> list[list[int]]:
        """seq's page tables, one per group (a new sequence starts with group 0's only)."""
        while len(seq.tables) < len(self.groups):
            seq.tables.append([])
            seq.released_until.append(0)
        return seq.tables

    def pages_for(self, num_tokens: int, chunk: int) -> int:
        """The most pages a sequence of num_tokens tokens holds at once, run in chunks of at most
        `chunk` tokens: every page for a global group; for a windowed one, the pages of its window
        and of one chunk (given back after each step)."""
        pages = -(-num_tokens // self.page_size)
        return sum(pages if w is None else min(pages, -(-(w + chunk) // self.page_size) + 1)
                   for w in self.groups.windows)

    def pages_held(self, seq) -> int:
        return sum(p >= 0 for table in seq.tables for p in table)

    @staticmethod
    def group_key(key: bytes, group: int) -> bytes:
        """The prefix cache key of a page of this group: group 0 keeps the plain key."""
        return key if group == 0 else key + bytes([group])

    def match_prefix(self, seq) -> int:
        """Gives a new sequence the cached pages of its longest cached prefix; returns the tokens
        they cover. At least one token is left to compute, since its logits are needed. A group
        with a window needs only the pages of the first uncomputed token's window."""
        if self.prefix is None or seq.pages:
            return 0
        hashes = self.keys(seq, (len(seq.token_ids) - 1) // self.page_size)
        n = len(hashes)
        for g, w in enumerate(self.groups.windows):
            if w is None:
                n = min(n, len(self.prefix.lookup([self.group_key(h, g) for h in hashes[:n]])))
        windowed = [(g, w) for g, w in enumerate(self.groups.windows) if w is not None]
        while n and not all(self.group_key(hashes[i], g) in self.prefix.pages for g, w in windowed
                            for i in range(self._first_read(n, w), n)):
            n -= 1
        self.prefix.record_query(len(seq.token_ids), n * self.page_size)
        tables = self._tables(seq)
        for g, w in enumerate(self.groups.windows):
            first = self._first_read(n, w)
            hits = self.prefix.lookup([self.group_key(h, g) for h in hashes[first:n]])
            self.pool.incref(hits)
            tables[g][:] = [-1] * first + hits
            seq.released_until[g] = first
        seq.page_hashes = hashes[:n]
        return n * self.page_size

    def _first_read(self, num_pages: int, window: int | None) -> int:
        """The first logical page read by the token after num_pages full pages."""
        return behind_window(num_pages * self.page_size + 1, window, self.page_size).stop

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
        tables = self._tables(seq)
        grow = max(0, -(-num_tokens // self.page_size) - len(tables[0]))  # per group
        need = grow * len(tables)
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
        for table in tables:
            table.extend(self.pool.allocate(grow))
        if offload_need:
            if seq.offload is None:
                seq.offload = OffloadPages()
            self.offload.grow(seq.offload, offload_need)
        return True

    def cache_computed_pages(self, seq, num_tokens: int | None = None) -> None:
        """Publishes seq's newly completed pages (in its first num_tokens, default all computed ones)
        to the prefix cache."""
        if self.prefix is None:
            return
        done = len(seq.page_hashes)  # pages before this are cached already
        full = (seq.num_computed_tokens if num_tokens is None else num_tokens) // self.page_size
        if full <= done:
            return
        seq.page_hashes = self.keys(seq, full)
        for g, table in enumerate(seq.tables):
            for i in range(done, full):
                if table[i] >= 0:
                    self.prefix.insert(self.group_key(seq.page_hashes[i], g), table[i])

    def fork(self, parent, child) -> bool:
        """Child shares parent's full pages; the partial last page is copied (copy-on-write). Pages
        the parent gave back (-1: behind a sliding window) stay given back in the child."""
        full = parent.num_computed_tokens // self.page_size
        partial = parent.num_computed_tokens % self.page_size
        copies = len(parent.tables) if partial else 0
        if copies > self.pool.num_free and self.prefix:
            self.prefix.evict(copies - self.pool.num_free)
        if copies > self.pool.num_free:
            return False
        tables = self._tables(child)
        for g, table in enumerate(parent.tables):
            shared = table[:full]
            self.pool.incref([p for p in shared if p >= 0])
            tables[g][:] = shared
            if partial:
                page = self.pool.allocate(1)[0]
                self.pool.copy_page(table[full], page)
                tables[g].append(page)
        child.page_hashes = list(parent.page_hashes[:full])
        child.page_keys = list(parent.page_keys[:full])
        child.num_computed_tokens = parent.num_computed_tokens
        return True

    def release_pages(self, seq, logical: range, group: int = 0) -> None:
        """Gives back the pages of a group's table at these logical indices, keeping the rest in
        place; a released page is marked -1 (streaming attention, or the group's sliding window,
        never reads it again). Ranges only grow at their end, so pages checked by an earlier call
        are skipped: a long sequence is not scanned from its start every step."""
        table = seq.tables[group]
        start = max(logical.start, seq.released_until[group])
        gone = [i for i in range(start, min(logical.stop, len(table))) if table[i] >= 0]
        self.pool.decref([table[i] for i in gone])
        for i in gone:
            table[i] = -1
        seq.released_until[group] = max(seq.released_until[group], min(logical.stop, len(table)))

    def release_windows(self, seq) -> None:
        """Gives back the pages each windowed group's layers will not read again, from the next
        token on (prompt chunks included: a chunk reads only its own window)."""
        for g, w in enumerate(self.groups.windows):
            if w is not None and g < len(seq.tables):
                self.release_pages(seq, behind_window(seq.num_computed_tokens + 1, w, self.page_size), g)

    def trim(self, seq, num_tokens: int) -> None:
        """Gives back the pages past the first num_tokens tokens (a rejected draft's K/V)."""
        keep = -(-num_tokens // self.page_size)
        for table in seq.tables:
            self.pool.decref([p for p in table[keep:] if p >= 0])
            del table[keep:]

    def free(self, seq) -> None:
        for table in seq.tables:
            self.pool.decref([p for p in table if p >= 0])
        seq.tables = [[]]
        seq.released_until = [0]
        seq.page_hashes = []
        if getattr(seq, "offload", None) is not None:
            self.offload.free(seq.offload)
            seq.offload = None

    def check_integrity(self, live_seqs) -> None:
        """Every page's ref count equals its holders: live sequences plus the prefix cache."""
        expected = [0] * self.pool.num_pages
        for seq in live_seqs:
            assert len({len(t) for t in seq.tables}) == 1, "a sequence's page tables differ in length"
            for table in seq.tables:
                for p in table:
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
