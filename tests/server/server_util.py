"""Helpers of the server tests that read the live server's state."""
import time

API_KEY = "test-key"
MODEL = "tiny"
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
