"""`kvserve serve` as users run it (the packaged SmolLM2, a real process): it prints its URL when
ready, answers, and on SIGTERM/SIGINT stops accepting, finishes or aborts what runs, exits 0."""
import json
import selectors
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest


def start_server(*args) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "kvserve.cli", "serve", "--port", "0", "--threads", "1", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if sel.select(timeout=1):
            line = proc.stdout.readline()
            if "serving" in line:
                return proc, line.split(" at ")[-1].strip()
            if not line and proc.poll() is not None:
                break
    proc.kill()
    pytest.fail(f"kvserve serve did not start: {proc.stderr.read()}")


def stream_in_background(url: str, max_tokens: int) -> tuple[threading.Event, dict]:
    started, result = threading.Event(), {"tokens": 0, "done": False, "error": None}

    def run():
        body = {"prompt": "Once upon a time", "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
                "stream_options": {"include_usage": True}}
        try:
            with httpx.stream("POST", f"{url}/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        result["done"] = True
                    elif line.startswith("data: "):
                        event = json.loads(line[6:])
                        result["usage"] = event.get("usage") or result.get("usage")
                        result["tokens"] += len(event["choices"])
                        started.set()
        except httpx.HTTPError as e:
            result["error"] = e
        started.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    result["thread"] = thread
    return started, result


def test_sigterm_finishes_running_requests_and_exits_0(smollm2_path):
    proc, url = start_server()
    try:
        r = httpx.post(f"{url}/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 16,
            "temperature": 0})
        assert r.status_code == 200 and "Paris" in r.json()["choices"][0]["message"]["content"]
        started, result = stream_in_background(url, 24)
        assert started.wait(60)
        proc.send_signal(signal.SIGTERM)
        result["thread"].join(60)
        assert result["done"] and result["usage"]["completion_tokens"] == 24, result
        assert proc.wait(30) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/models")
        assert "Shutting down" in proc.stderr.read()
    finally:
        proc.kill()


def test_sigint_aborts_after_the_shutdown_timeout(smollm2_path):
    proc, url = start_server("--shutdown-timeout", "0.5")
    try:
        started, result = stream_in_background(url, 4000)
        assert started.wait(60)
        whole = {}
        waiting = threading.Thread(target=lambda: whole.update(r=httpx.post(
            f"{url}/completions", json={"prompt": "Hi", "max_tokens": 4000, "ignore_eos": True}, timeout=60)))
        waiting.start()
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        result["thread"].join(30)
        waiting.join(30)
        assert not result["done"] and result["tokens"] < 4000
        # cut at shutdown as expected, not a crash: no traceback, and the answer not begun is a 503
        assert "Traceback" not in proc.stderr.read()
        assert whole["r"].status_code == 503 and "shutting down" in whole["r"].json()["error"]["message"]
    finally:
        proc.kill()
