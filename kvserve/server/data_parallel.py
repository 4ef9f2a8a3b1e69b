"""`kvserve serve --data-parallel-size N`: N engine replicas behind one OpenAI server.

Each replica is a `kvserve serve` process of its own (so it may itself be tensor-parallel), on a
free local port, started with this command's own flags and an equal share of the threads (and of
the GPUs: replica i sees GPUs i*tp .. i*tp+tp-1). The front process routes each completion or
chat request to one replica (`PrefixRouter`: longest prefix it was sent, then least loaded) and
relays the response, streamed or whole. `/metrics` is the router's counters followed by every
replica's metrics, each sample labelled replica="i"; `/health` is 200 only while every replica is.
A replica that exits makes every answer a 503 naming it; after a short grace the front stops
its other replicas and exits 1. On SIGTERM it stops them and exits 0.
"""
import asyncio
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from kvserve.server.errors import OpenAIError, install_error_handlers
from kvserve.server.prefix_router import PrefixRouter

log = logging.getLogger("kvserve.server")
ROUTED = {"/v1/completions", "/v1/chat/completions"}


class Replicas:
    """The replica processes: started together, watched, stopped together."""

    def __init__(self, argv: list[str], n: int, tp: int, threads: int | None):
        self.procs: list[subprocess.Popen] = []
        self.urls: list[str] = []
        self.failure: str | None = None
        self._stopping = False
        per = max(1, (threads or os.cpu_count() or 1) // n)
        gpus = _visible_gpus()
        for i in range(n):
            env = dict(os.environ, KVSERVE_PARENT_PID=str(os.getpid()))
            if len(gpus) >= n * tp:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[i * tp:(i + 1) * tp])
            cmd = [sys.executable, "-m", "kvserve", *argv, "--host", "127.0.0.1", "--port", "0", "--threads", str(per)]
            self.procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env))
        try:
            self.urls = [self._ready_url(i, p) for i, p in enumerate(self.procs)]
        except BaseException:
            self.stop()
            raise
        threading.Thread(target=self._watch, name="kvserve-replica-watch", daemon=True).start()

    @staticmethod
    def _ready_url(i: int, proc: subprocess.Popen, timeout: float = 600) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if " at http" in line:
                # the replica prints nothing more on stdout; drain it anyway so it can never block
                threading.Thread(target=proc.stdout.read, daemon=True).start()
                return line.split(" at ")[-1].strip().removesuffix("/v1")
            if not line and proc.poll() is not None:
                raise RuntimeError(f"data-parallel replica {i} exited with code {proc.returncode} while starting")
        raise RuntimeError(f"data-parallel replica {i} did not start within {timeout:g} s")

    def _watch(self) -> None:
        while not self._stopping:
            for i, p in enumerate(self.procs):
                if p.poll() is not None and not self._stopping:
                    self.failure = f"data-parallel replica {i} (pid {p.pid}) exited with code {p.returncode}"
                    log.error("%s", self.failure)
                    return
            time.sleep(0.2)

    def stop(self, timeout: float = 15.0) -> None:
        self._stopping = True
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _visible_gpus() -> list[str]:
    try:
        import torch
        n = torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no CUDA: no GPUs to share out
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible.split(",")[:n] if visible else [str(i) for i in range(n)]


def build_router_app(replicas: Replicas, tokenizer, page_size: int) -> FastAPI:
    router = PrefixRouter(len(replicas.urls), page_size)
    client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10))
    counts = {"requests": [0] * len(replicas.urls)}
    app = FastAPI(title="kvserve data-parallel router")
    install_error_handlers(app)

    def check_alive() -> None:
        if replicas.failure:
            raise OpenAIError(f"the server cannot serve: {replicas.failure}", 503, code="replica_failed")

    @app.get("/health")
    async def health():
        check_alive()
        replies = await asyncio.gather(*(client.get(f"{u}/health") for u in replicas.urls), return_exceptions=True)
        bad = [i for i, r in enumerate(replies) if isinstance(r, Exception) or r.status_code != 200]
        if bad:
            raise OpenAIError(f"data-parallel replica {', '.join(map(str, bad))} not healthy", 503,
                              code="replica_unhealthy")
        return {"status": "ok", "replicas": [r.json() for r in replies]}

    @app.get("/metrics")
    async def metrics():
        lines = ["# HELP kvserve_router_requests_total Requests the router sent to each replica",
                 "# TYPE kvserve_router_requests_total counter"]
        lines += [f'kvserve_router_requests_total{{replica="{i}"}} {n}' for i, n in enumerate(counts["requests"])]
        lines += ["# HELP kvserve_router_prefix_hit_tokens_total Prompt tokens routed to a replica that was "
                  "sent them before", "# TYPE kvserve_router_prefix_hit_tokens_total counter"]
        lines += [f'kvserve_router_prefix_hit_tokens_total{{replica="{i}"}} {r.prefix_hit_tokens}'
                  for i, r in enumerate(router.replicas)]
        texts = []
        for i, u in enumerate(replicas.urls):
            try:
                texts.append((i, (await client.get(f"{u}/metrics")).text))
            except httpx.HTTPError:
                continue
        lines += merged_families(texts)
        return Response("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    @app.api_route("/{path:path}", methods=["GET", "POST"])
    async def relay(path: str, request: Request):
        check_alive()
        path = "/" + path
        body = await request.body()
        replica, load = 0, None
        if path in ROUTED and request.method == "POST":
            ids, max_new = _prompt_ids(body, path, tokenizer)
            if ids is not None:
                replica, hit = router.choose(ids)
                load = router.start(replica, ids, max_new, hit)
        counts["requests"][replica] += 1
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "content-type")}
        upstream = client.build_request(request.method, f"{replicas.urls[replica]}{path}", content=body,
                                        headers=headers, params=request.query_params)
        try:
            reply = await client.send(upstream, stream=True)
        except httpx.HTTPError as e:
            if load is not None:
                router.finish(replica, load)
            raise OpenAIError(f"data-parallel replica {replica} did not answer: {e}", 503,
                              code="replica_failed") from None

        async def relay_body():
            try:
                async for chunk in reply.aiter_raw():
                    yield chunk
            except httpx.HTTPError as e:  # the replica went away mid-response: say so in the stream
                err = {"error": {"message": f"data-parallel replica {replica} failed: {e}", "type": "server_error",
                                 "code": "replica_failed"}}
                yield f"data: {json.dumps(err)}\n\n".encode()
            finally:
                await reply.aclose()
                if load is not None:
                    router.finish(replica, load)

        keep = {k: v for k, v in reply.headers.items() if k.lower() in ("content-type", "retry-after")}
        return StreamingResponse(relay_body(), status_code=reply.status_code, headers=keep)

    app.state.router = router
    return app


def merged_families(texts: list[tuple[int, str]]) -> list[str]:
    """Replicas' Prometheus texts as one: each family's HELP and TYPE once, then every replica's
    samples of it, labelled replica="i" (the text format wants a family's samples together)."""
    families: dict[str, tuple[list[str], list[str]]] = {}
    for i, text in texts:
        current = None
        for line in text.splitlines():
            if line.startswith(("# HELP ", "# TYPE ")):
                current = line.split()[2]
                meta, _ = families.setdefault(current, ([], []))
                if line not in meta:
                    meta.append(line)
            elif line and not line.startswith("#") and current is not None:
                families[current][1].append(_with_label(line, f'replica="{i}"'))
    return [line for meta, samples in families.values() for line in meta + samples]


def _with_label(sample: str, label: str) -> str:
    m = re.match(r"([^{\s]+)(\{[^}]*\})?(\s.*)", sample)
    if not m:
        return sample
    name, labels, rest = m.groups()
    inner = labels[1:-1] if labels else ""
    return f"{name}{{{label}{',' + inner if inner else ''}}}{rest}"


def _prompt_ids(body: bytes, path: str, tokenizer) -> tuple[list[int] | None, int]:
    """The prompt's tokens as the replica will see them, near enough to route on; None if unreadable
    (the replica then answers the error itself)."""
    try:
        req = json.loads(body)
        max_new = int(req.get("max_tokens") or req.get("max_completion_tokens") or 16)
        if path == "/v1/chat/completions":
            return tokenizer.apply_chat_template(req["messages"], add_generation_prompt=True, tokenize=True), max_new
        prompt = req["prompt"]
        if isinstance(prompt, list):
            prompt = prompt[0] if prompt and not isinstance(prompt[0], int) else prompt
        return (list(prompt) if isinstance(prompt, list) else tokenizer.encode(prompt)), max_new
    except Exception:  # noqa: BLE001 - routing is best effort; the replica validates
        return None, 16


def replica_argv(argv: list[str]) -> list[str]:
    """This command's flags without those the front keeps for itself."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in ("--data-parallel-size", "-dp", "--port", "--host", "--threads"):
            skip = "=" not in a
            continue
        out.append(a)
    return out


def main(args, argv: list[str]) -> int:
    from kvserve.model.random_weights import shape_config, token_tokenizer
    from kvserve.server.app import run
    from kvserve.server.launch import _signals_end_cleanly
    if args.random_weights:
        tokenizer = token_tokenizer(shape_config(args.random_weights).vocab_size)
    else:
        from kvserve.engine.engine import load_tokenizer
        tokenizer = load_tokenizer(args.model)
    replicas = Replicas(replica_argv(argv), args.data_parallel_size, args.tensor_parallel_size or 1, args.threads)
    try:
        app = build_router_app(replicas, tokenizer, args.page_size)

        def watch():
            while replicas.failure is None:
                time.sleep(0.2)
            time.sleep(2.0)  # 503s name the failed replica meanwhile
            os.kill(os.getpid(), signal.SIGTERM)
        threading.Thread(target=watch, name="kvserve-failure-watch", daemon=True).start()
        with _signals_end_cleanly():
            run(app, args.host, args.port, f"{args.data_parallel_size} replicas", args.shutdown_timeout,
                args.log_level)
    finally:
        replicas.stop()
    if replicas.failure:
        print(f"kvserve: exiting: {replicas.failure}", file=sys.stderr, flush=True)
        return 1
    return 0
