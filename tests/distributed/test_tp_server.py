"""`kvserve serve -tp 2` as a real process on the CPU: it answers; SIGTERM stops it and its rank
with code 0; a rank killed mid-stream gives the client an error, /health 503, then a non-zero
exit, and no child process stays behind."""
import json
import os
import selectors
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

ARGS = ["--random-weights", "tiny", "--dtype", "float32", "-tp", "2", "--num-pages", "64", "--log-level", "warning"]


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def start_server(*extra, timeout: str = "30") -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, KVSERVE_DIST_TIMEOUT=timeout)
    proc = subprocess.Popen([sys.executable, "-m", "kvserve", "serve", "--port", "0", *ARGS, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if sel.select(timeout=1):
            line = proc.stdout.readline()
            if "serving" in line:
                return proc, line.split(" at ")[-1].strip().removesuffix("/v1")
            if not line and proc.poll() is not None:
                break
    proc.kill()
    pytest.fail(f"kvserve serve -tp 2 did not start: {proc.stderr.read()}")


def gone(pids: list[int]) -> bool:
    """None of these processes exists, not even as a zombie."""
    deadline = time.monotonic() + 10
    while any(os.path.exists(f"/proc/{p}") for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def rank_pids(proc) -> list[int]:
    """The spawned rank processes (not multiprocessing's resource tracker)."""
    pids = []
    for pid in children(proc.pid):
        with open(f"/proc/{pid}/cmdline") as f:
            if "spawn_main" in f.read():
                pids.append(pid)
    return pids


def test_serves_and_sigterm_stops_every_rank():
    proc, url = start_server()
    try:
        ranks, kids = rank_pids(proc), children(proc.pid)
        assert len(ranks) == 1
        r = httpx.post(f"{url}/v1/completions", timeout=60,
                       json={"prompt": "<1> <2> <3>", "max_tokens": 6, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 6
        assert httpx.get(f"{url}/health").status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert gone(kids)
    finally:
        proc.kill()


@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_failed_rank_fails_the_stream_then_503_then_nonzero_exit(fault):
    """killed: SIGKILL, noticed at once; hung: SIGSTOP, noticed at KVSERVE_DIST_TIMEOUT (5 s here)."""
    proc, url = start_server(timeout="5" if fault == "hung" else "30")
    try:
        result = {"tokens": 0}

        def stream():
            body = {"prompt": "<1> <2>", "max_tokens": 450, "stream": True, "ignore_eos": True}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        event = json.loads(line[6:])
                        if "error" in event:
                            result["error"] = event["error"]
                        else:
                            result["tokens"] += 1

        thread = threading.Thread(target=stream, daemon=True)
        thread.start()
        deadline = time.monotonic() + 60
        while result["tokens"] < 3:
            assert time.monotonic() < deadline and thread.is_alive(), result
            time.sleep(0.01)
        kids = children(proc.pid)
        os.kill(rank_pids(proc)[0], signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
        thread.join(30)
        why = "rank 1" if fault == "killed" else "KVSERVE_DIST_TIMEOUT"
        assert why in result["error"]["message"] and result["tokens"] < 450
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and why in health.json()["error"]["message"]
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "<1>", "max_tokens": 2}, timeout=10)
        assert r.status_code == 503
        assert proc.wait(30) != 0
        assert gone(kids)
    finally:
        proc.kill()
