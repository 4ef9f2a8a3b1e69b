"""A short soak (KVSERVE_SOAK_SECONDS, default 15) at low concurrency against a tiny-model server
with queue limits: every request answered, only intended 4xx/429/503, zero leaked KV pages."""
import argparse
import asyncio
import os

from server_util import API_KEY, MODEL, start_uvicorn


def test_short_soak_against_a_tiny_server(tiny_model, smollm2_tokenizer):
    from kvserve.bench.soak import Soak, add_args, print_report
    from kvserve.config import CacheConfig, EngineConfig, SchedulerConfig
    from kvserve.engine.admission import QueueLimits
    from kvserve.engine.async_engine import AsyncEngine
    from kvserve.engine.engine import Engine
    from kvserve.server.app import build_app
    from kvserve.server.serving import ServerConfig
    engine = Engine(EngineConfig(cache=CacheConfig(16, 512, None, True), scheduler=SchedulerConfig(512, 8)),
                    model=tiny_model, tokenizer=smollm2_tokenizer)
    async_engine = AsyncEngine(engine, QueueLimits(max_requests=8, timeout=20.0))
    app = build_app(async_engine, ServerConfig(model_name=MODEL, api_key=API_KEY), shutdown_engine=False)
    server, thread, url = start_uvicorn(app)
    try:
        p = argparse.ArgumentParser()
        add_args(p)
        seconds = float(os.environ.get("KVSERVE_SOAK_SECONDS", 15))
        args = p.parse_args(["--minutes", str(seconds / 60), "--clients", "6", "--max-tokens", "24",
                             "--long-words", "600", "--burst-every", str(seconds / 3), "--burst-size", "24"])
        report = asyncio.run(Soak(url, {"Authorization": f"Bearer {API_KEY}"}, MODEL, args).run(os.getpid()))
    finally:
        server.should_exit = True
        thread.join(10)
        async_engine.shutdown()
    print_report(report)  # shown with -s
    checks, outcomes = report["checks"], report["outcomes"]
    assert checks["no_unexpected_errors_or_unanswered"], report["unexpected"]
    assert checks["zero_leaked_pages"], report["kv"]
    assert checks["idle_after_s"] is not None
    assert outcomes.get("ok", 0) > 20 and outcomes.get("malformed_4xx", 0) > 0
    assert outcomes.get("disconnected", 0) > 0 and outcomes.get("rejected_429", 0) > 0, outcomes
    assert report["health"]["load"] == {"queued_requests": 0, "queued_tokens": 0, "running": 0, "waiting": 0}
    assert all(w["requests"] for w in report["windows"])
