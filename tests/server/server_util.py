"""Helpers of the server tests: starting a server, reading the live server's state."""
import threading
import time

API_KEY = "test-key"
MODEL = "tiny"
ALIAS = "tiny-alias"  # a second --served-model-name
MAX_TOKENS_LIMIT = 256
MAX_N = 8
MAX_BODY_BYTES = 64 * 1024

def metrics(http_client) -> dict[str, float]:
    """Unlabelled samples of /metrics, by name."""
    from prometheus_client.parser import text_string_to_metric_families
    text = http_client.get("/metrics").text
    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples if not s.labels}


def wait_idle(engine, timeout: float = 5.0) -> float:
    """Seconds until the engine holds no request (asserts it gets there)."""
    start = time.monotonic()
    while engine.requests or engine.scheduler.running or engine.scheduler.waiting:
        assert time.monotonic() - start < timeout, f"engine still busy: {list(engine.requests)}"
        time.sleep(0.002)
    return time.monotonic() - start


def start_uvicorn(app) -> tuple[object, threading.Thread, str]:
    """uvicorn serving app on a free port of 127.0.0.1 in a daemon thread -> (server, thread, url)."""
    import uvicorn
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False,
                                           timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not (server.started and server.servers):
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    return server, thread, f"http://127.0.0.1:{port}"
