"""kvserve serve: flags -> engine -> app -> uvicorn, with a clean exit on SIGINT/SIGTERM.

On a signal uvicorn stops accepting connections, lets running requests finish for up to
--shutdown-timeout seconds, then cancels them (which aborts them in the engine) and stops the
engine. It then re-raises the signal to itself; the no-op handlers installed here turn that into
exit code 0, which is what service managers expect of a requested stop.
"""
import argparse
import logging
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager

from kvserve.args import at_least_one
from kvserve.server import isolation_args


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: local only)")
    p.add_argument("--port", type=_port, default=8000, help="0 picks a free port")
    p.add_argument("--api-key", default=os.environ.get("KVSERVE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1; several keys comma-separated "
                        "(default: $KVSERVE_API_KEY)")
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="model ids clients may send; responses carry the first (default: the file name)")
    p.add_argument("--max-model-len", type=at_least_one, default=None, help="context limit below the model's own")
    p.add_argument("--max-tokens-limit", type=int, default=None, help="largest max_tokens a request may ask for")
    p.add_argument("--max-n", type=int, default=16, help="largest n (choices per request)")
    p.add_argument("--max-request-bytes", type=int, default=8 * 2**20, help="larger bodies get 413")
    p.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="seconds running requests may finish after SIGINT/SIGTERM before they are aborted")
    p.add_argument("--index-dir", default=None, help="RAG collections served (default: ~/.kvserve/index)")
    p.add_argument("--rag-cache-mb", type=float, default=256.0, help="cluster cache of each RAG collection")
    p.add_argument("--rag-nprobe", type=int, default=8, help="IVF clusters searched per retrieval")
    p.add_argument("--rag-prefetch-nprobe", type=int, default=16, help="clusters the lookahead prefetches")
    p.add_argument("--data-parallel-size", "-dp", type=int, default=1,
                   help="engine replicas (processes, each with -tp ranks) behind this server; requests go to "
                        "the replica holding the longest cached prefix, then the least loaded")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    isolation_args.add_args(p)


def _port(value: str) -> int:
    port = int(value)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be in 0-65535, got {port}")
    return port


def main(args) -> int:
    from kvserve.args import engine_config
    from kvserve.engine.engine import Engine

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if os.environ.get("KVSERVE_PARENT_PID"):  # a data-parallel replica ends with its front server
        from kvserve.distributed.worker import exit_with_parent
        exit_with_parent(int(os.environ["KVSERVE_PARENT_PID"]))
    if args.data_parallel_size > 1:
        from kvserve.server.data_parallel import main as data_parallel_main
        return data_parallel_main(args, sys.argv[1:])
    if int(os.environ.get("RANK", "0")) > 0:  # torchrun: rank 0 serves, the others run its steps
        from kvserve.distributed.worker import run_worker
        return run_worker(engine_config(args))
    engine = Engine(engine_config(args))
    try:
        return _serve(args, engine)
    finally:
        engine.close()


def _serve(args, engine) -> int:
    from kvserve import process
    from kvserve.engine.async_engine import AsyncEngine
    from kvserve.model.loader import resolve_model_path
    from kvserve.server.app import build_app, run
    from kvserve.server.serving import ServerConfig

    path = resolve_model_path(args.model)
    name, *aliases = args.served_model_name or [path.name if path.is_dir() else path.stem]
    config = ServerConfig(model_name=name, model_aliases=tuple(aliases), api_key=args.api_key,
                          max_model_len=args.max_model_len, max_tokens_limit=args.max_tokens_limit, max_n=args.max_n,
                          max_body_bytes=args.max_request_bytes, index_dir=args.index_dir,
                          rag_cache_mb=args.rag_cache_mb, rag_nprobe=args.rag_nprobe,
                          rag_prefetch_nprobe=args.rag_prefetch_nprobe,
                          prefix_cache_isolation=args.prefix_cache_isolation)
    async_engine = AsyncEngine(engine, isolation_args.queue_limits(args))
    process.release_openmp_workers()  # the engine thread computes; this one serves HTTP
    app = build_app(async_engine, config)
    with _signals_end_cleanly():
        _stop_on_failure(async_engine)
        run(app, args.host, args.port, name, args.shutdown_timeout, args.log_level)
    if async_engine.failure:
        print(f"kvserve: exiting: {async_engine.failure}", file=sys.stderr, flush=True)
        return 1
    return 0


def _stop_on_failure(async_engine, grace: float = 2.0) -> None:
    """When the engine fails for good (a tensor-parallel rank died or hung), the server answers
    503 for `grace` seconds, then stops as on SIGTERM; main then exits non-zero."""
    def watch():
        while async_engine.failure is None:
            time.sleep(0.2)
        time.sleep(grace)
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=watch, name="kvserve-failure-watch", daemon=True).start()


@contextmanager
def _signals_end_cleanly():
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        sys.stdout.flush()
