"""The cluster cache: within budget whatever happens, coldest evicted first, hotness halves on
each prefetch and grows by 1024 on each hit."""
import numpy as np
import pytest

from kvserve.rag.cluster_cache import HIT_HEAT, ClusterCache


def entry(rows: int, dim: int = 4):
    return np.zeros((rows, dim), np.float32), np.arange(rows, dtype=np.int64)


ONE = ClusterCache.nbytes(entry(10))


def test_eviction_follows_hotness():
    cache = ClusterCache(3 * ONE, nlist=8)
    for c in range(3):
        assert cache.insert(c, entry(10))
    for c, hits in ((0, 2), (1, 1), (2, 3)):
        for _ in range(hits):
            cache.lookup([c])
    assert cache.hotness[:3].tolist() == [2 * HIT_HEAT, HIT_HEAT, 3 * HIT_HEAT]
    assert cache.insert(3, entry(10))
    assert sorted(cache.entries) == [0, 2, 3]  # 1 was the coldest
    assert cache.insert(4, entry(10))
    assert sorted(cache.entries) == [0, 2, 4]  # 3, never hit, was colder than 0
    cache.begin_prefetch()
    assert cache.hotness[:3].tolist() == [HIT_HEAT, HIT_HEAT / 2, 1.5 * HIT_HEAT]
    assert cache.evictions == 2


def test_admission_after_miss_only_evicts_colder():
    cache = ClusterCache(2 * ONE, nlist=8)
    cache.insert(0, entry(10))
    cache.insert(1, entry(10))
    for _ in range(2):
        cache.lookup([0, 1])
    assert not cache.insert(2, entry(10), accessed=True, only_colder=True)  # 1024 < 2048: stays out
    assert sorted(cache.entries) == [0, 1]
    cache.begin_prefetch()
    cache.begin_prefetch()  # both at 512 now, the newcomer at 256 + 1024
    assert cache.insert(2, entry(10), accessed=True, only_colder=True)
    assert len(cache.entries) == 2 and 2 in cache.entries


def test_protected_clusters_are_not_evicted():
    cache = ClusterCache(2 * ONE, nlist=8)
    cache.insert(0, entry(10))
    cache.insert(1, entry(10))
    cache.lookup([1])
    assert not cache.insert(2, entry(10), protect={0, 1})
    assert cache.insert(2, entry(10), protect={0})
    assert sorted(cache.entries) == [0, 2]


def test_never_exceeds_budget_random_workload():
    rng = np.random.default_rng(0)
    budget = 5 * ONE + 17
    cache = ClusterCache(budget, nlist=32)
    sizes = rng.integers(1, 30, 32)
    for step in range(2000):
        c = int(rng.integers(0, 32))
        op = rng.random()
        if op < 0.4:
            cache.lookup(rng.integers(0, 32, 4))
        elif op < 0.5:
            cache.begin_prefetch()
        else:
            cache.insert(c, entry(int(sizes[c])), accessed=op < 0.7, only_colder=op < 0.7)
        assert cache.used <= budget
        assert cache.used == sum(ClusterCache.nbytes(e) for e in cache.entries.values())
    assert cache.evictions > 0


def test_cluster_larger_than_budget_is_refused():
    cache = ClusterCache(ONE, nlist=2)
    assert not cache.insert(0, entry(11))
    assert cache.used == 0


@pytest.mark.parametrize("budget", [0, ONE // 2])
def test_tiny_budget(budget):
    cache = ClusterCache(budget, nlist=2)
    assert not cache.insert(0, entry(10))
    assert cache.stats()["used_bytes"] == 0
