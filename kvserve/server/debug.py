"""GET /debug/kv: the KV page accounting, read on the engine thread between steps, so a soak test
can prove that no page leaked (every used page is held by a live sequence or the prefix cache)."""


def kv_report(engine) -> dict:
    pool, prefix = engine.pool, engine.kv.prefix
    live = [s for s in engine.scheduler.running + engine.scheduler.waiting]
    held = {p for s in live for p in s.pages if p >= 0} | set(prefix.pages.values() if prefix else ())
    used = pool.num_pages - pool.num_free
    try:
        engine.kv.check_integrity(live)
        consistent = True
    except AssertionError:
        consistent = False
    return {"pages_total": pool.num_pages, "pages_free": pool.num_free, "pages_cached": len(prefix) if prefix else 0,
            "pages_active": len({p for s in live for p in s.pages if p >= 0}), "pages_leaked": used - len(held),
            "ref_counts_consistent": consistent, "requests": len(engine.requests)}
