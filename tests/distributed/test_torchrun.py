"""Two torchrun "nodes" on localhost (node ranks 0 and 1, one process each) serve as one
tensor-parallel engine (-tp taken from WORLD_SIZE): rank 0 serves HTTP, rank 1 runs its steps. Also: a rendezvous whose
peer never comes fails within its timeout, naming the address."""
import os
import selectors
import signal
import subprocess
import sys
import time

import httpx
import pytest

from test_tp_server import ARGS


def torchrun(node_rank: int, port: int, timeout: str = "60") -> subprocess.Popen:
    env = dict(os.environ, KVSERVE_DIST_TIMEOUT=timeout)
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                             "--node-rank", str(node_rank), "--master-addr", "127.0.0.1", "--master-port", str(port),
                             "-m", "kvserve", "serve", "--port", "0", *[a for a in ARGS if a not in ("-tp", "2")]],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_serve_a_request():
    port = free_port()
    nodes = [torchrun(0, port), torchrun(1, port)]
    try:
        sel = selectors.DefaultSelector()
        sel.register(nodes[0].stdout, selectors.EVENT_READ)
        url, deadline = None, time.monotonic() + 150
        while url is None and time.monotonic() < deadline:
            if sel.select(timeout=1):
                line = nodes[0].stdout.readline()
                if "serving" in line:
                    url = line.split(" at ")[-1].strip()
                elif not line:
                    break
        assert url, nodes[0].stderr.read() if nodes[0].poll() is not None else "no URL"
        r = httpx.post(f"{url}/completions", timeout=60,
                       json={"prompt": "<1> <2>", "max_tokens": 5, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
        nodes[0].send_signal(signal.SIGTERM)  # torchrun passes it on; rank 0 stops rank 1
        assert nodes[1].wait(60) == 0
        nodes[0].wait(60)
    finally:
        for p in nodes:  # each torchrun and its workers are one process group
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_rendezvous_without_peers_fails_in_time_naming_the_address(tmp_path):
    port = free_port()
    env = dict(os.environ, RANK="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               KVSERVE_DIST_START_TIMEOUT="3")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "kvserve", "serve", *ARGS], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0 and time.monotonic() - start < 40
    assert f"127.0.0.1:{port}" in proc.stderr, proc.stderr[-2000:]
