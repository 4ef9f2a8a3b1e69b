"""PagePool, PrefixCache and KVCacheManager with hand-made sequences."""
import pytest

from kvserve.engine.request import SamplingParams, Sequence
from kvserve.kv.manager import KVCacheManager
from kvserve.kv.pool import OutOfPagesError, PagePool


def seq(tokens, salt=None):
    return Sequence(0, "r", 0, list(tokens), SamplingParams(cache_salt=salt), 0.0)


def manager(num_pages=8, page_size=4, prefix=True):
    return KVCacheManager(PagePool(1, num_pages, page_size, 1, 2), prefix)


def test_pool_ref_counts_and_free_list():
    pool = PagePool(1, 4, 2, 1, 2)
    a = pool.allocate(3)
    pool.incref(a[:1])
    assert pool.decref(a) == a[1:]
    assert pool.num_free == 3
    with pytest.raises(OutOfPagesError):
        pool.allocate(4)


def test_prefix_hit_skips_computed_pages_and_leaves_one_token():
    kv = manager()
    a = seq(range(12))
    assert kv.match_prefix(a) == 0 and kv.allocate(a, 12)
    a.num_computed_tokens = 12
    kv.cache_computed_pages(a)
    b = seq(list(range(12)) + [99])
    assert kv.match_prefix(b) == 12 and b.pages == a.pages
    c = seq(range(12))  # the whole prompt is cached: the last page is recomputed for logits
    assert kv.match_prefix(c) == 8
    assert kv.prefix.hit_tokens == 20
    for s in (a, b, c):
        kv.free(s)
    kv.check_integrity([])
    assert kv.num_free_pages == 8


def test_eviction_is_lru_and_spares_pages_in_use():
    kv = manager(num_pages=4, page_size=2)
    old, new = seq([1, 2, 3, 4]), seq([5, 6, 7, 8])
    for s in (old, new):
        kv.allocate(s, 4)
        s.num_computed_tokens = 4
        kv.cache_computed_pages(s)
    kv.free(old)
    assert kv.pool.num_free == 0 and kv.num_free_pages == 2
    big = seq(range(20, 24))
    assert kv.allocate(big, 4)  # evicts old's two pages, not new's (in use)
    assert kv.prefix.lookup(new.page_hashes) == new.pages
    assert kv.prefix.lookup(old.page_hashes) == []
    assert not kv.allocate(big, 6)
    kv.check_integrity([new, big])


def test_fork_shares_full_pages_and_copies_the_partial_one():
    kv = manager(page_size=4)
    parent = seq(range(10))
    kv.allocate(parent, 10)
    parent.num_computed_tokens = 10
    kv.cache_computed_pages(parent)
    kv.pool.k[0, :, parent.pages[2] * 4:parent.pages[2] * 4 + 2] = 7.0
    child = seq(range(10))
    assert kv.fork(parent, child)
    assert child.pages[:2] == parent.pages[:2] and child.pages[2] != parent.pages[2]
    assert (kv.pool.k[0, :, child.pages[2] * 4:child.pages[2] * 4 + 2] == 7.0).all()
    kv.check_integrity([parent, child])
