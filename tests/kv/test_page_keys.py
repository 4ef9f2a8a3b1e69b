"""Prefix-cache keys: SHA-256 chains, not hash(); salts isolate, equal salts share."""
import subprocess
import sys

import kvserve.kv.page_keys as page_keys_module
from kvserve.kv.manager import KVCacheManager
from kvserve.kv.page_keys import page_keys, root_key
from kvserve.kv.pool import PagePool
from test_kv import seq


def manager(page_size=4):
    return KVCacheManager(PagePool(1, 32, page_size, 1, 2), True)


def cache(kv, s):
    """Prefills s fully and publishes its pages; returns its prefix hit in tokens."""
    hit = kv.match_prefix(s)
    assert kv.allocate(s, len(s.token_ids))
    s.num_computed_tokens = len(s.token_ids)
    kv.cache_computed_pages(s)
    return hit


def test_colliding_python_hashes_never_share_pages(monkeypatch):
    # the old keys were hash((parent, tokens)): with a hash() under which every page collides,
    # the second prompt would have been served the first one's pages
    monkeypatch.setattr("builtins.hash", lambda _: 42)
    monkeypatch.setattr(page_keys_module, "hash", lambda _: 42, raising=False)
    kv = manager()
    a, b = seq(range(13)), seq(range(100, 113))
    assert cache(kv, a) == 0
    assert cache(kv, b) == 0
    assert not set(a.pages) & set(b.pages)
    assert len(kv.prefix) == 6
    kv.check_integrity([a, b])


def test_keys_are_sha256_chains_stable_across_processes():
    keys = page_keys(list(range(8)), 4, root_key("s"))
    assert all(isinstance(k, bytes) and len(k) == 32 for k in keys)
    code = ("from kvserve.kv.page_keys import page_keys, root_key;"
            "print(page_keys(list(range(8)), 4, root_key('s'))[1].hex())")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "123", "PYTHONPATH": ":".join(sys.path)})
    assert other.stdout.strip() == keys[1].hex()
    # a key covers its whole prefix, not only its own page
    assert page_keys([9, 9, 9, 9] + list(range(4)), 4, root_key("s"))[1] != keys[1]


def test_different_salts_never_share_and_equal_salts_do():
    kv = manager()
    tokens = list(range(13))
    first = seq(tokens, salt="tenant-a")
    assert cache(kv, first) == 0
    assert cache(kv, seq(tokens, salt="tenant-b")) == 0
    assert cache(kv, seq(tokens)) == 0  # no salt is a salt of its own
    assert cache(kv, seq(tokens, salt="")) == 0  # "" is not None
    assert cache(kv, seq(tokens, salt="tenant-a")) == 12


def test_memoized_keys_extend_with_the_sequence():
    kv = manager()
    s = seq(range(9))
    assert kv.keys(s, 2) == page_keys(list(range(8)), 4, root_key(None))
    s.token_ids += [9, 10, 11, 12]
    assert kv.keys(s, 3) == page_keys(list(range(12)), 4, root_key(None))
