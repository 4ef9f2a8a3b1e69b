"""GET /debug/kv: the KV page accounting, read on the engine thread between steps, so a soak test
can prove that no page leaked (every used page is held by a live sequence or the prefix cache)."""


def kv_report(engine) -> dict:
    pool, prefix = engine.pool, engine.kv.prefix
    live = engine.scheduler.running + engine.scheduler.waiting
    active = {p for s in live for table in s.tables for p in table if p >= 0}
    cached = set(prefix.pages.values()) if prefix else set()
    try:
        engine.kv.check_integrity(live)  # every page's ref count equals its holders
        consistent = True
    except AssertionError:
        consistent = False
    return {"pages_total": pool.num_pages, "pages_free": pool.num_free, "pages_cached": len(cached),
            "pages_active": len(active), "pages_reserved": len(pool.reserved),
            "pages_leaked": pool.num_pages - pool.num_free - len(active | cached | set(pool.reserved)),
            "ref_counts_consistent": consistent, "requests": len(engine.requests),
            # KV memory is allocated untouched and first written when a page is first handed out, so
            # RSS grows with these until every page has been used once: growth, not a leak
            "pages_touched": sum(pool.zeroed),
            "page_bytes": (pool.k.numel() + pool.v.numel()) * pool.k.element_size() // pool.num_pages,
            # KV groups (kvserve/kv/groups.py): a page holds one group's layers; windowed groups give pages back
            "kv_group_windows": engine.kv_groups.windows, "layers_per_page": engine.kv_groups.slots}
