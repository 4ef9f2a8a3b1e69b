"""AsyncEngine: the engine on one background thread, fed by asyncio callers (the server).

The engine is single-threaded by design; callers talk to it only through a command queue and
get results back through per-request asyncio queues, so a slow client never stalls a step.
"""
import asyncio
import itertools
import logging
import queue
import threading
from collections import Counter
from collections.abc import AsyncIterator

import torch

from kvserve.engine.admission import AdmissionQueue, QueueLimits, QueueTimeout
from kvserve.engine.engine import Engine
from kvserve.engine.request import RequestOutput, SamplingParams, now

log = logging.getLogger("kvserve.engine")


class EngineUnavailable(RuntimeError):
    """The engine cannot serve any more (a tensor-parallel rank died or hung): HTTP 503."""


class AsyncEngine:
    def __init__(self, engine: Engine, limits: QueueLimits | None = None):
        self.engine = engine
        self.queue = AdmissionQueue(limits)
        self._queued: dict[str, int] = {}  # engine thread only: request id -> prompt tokens, never scheduled
        # engine thread only: the prompts of one API request (a batch) wait for their siblings, not
        # the queue, once one of them is scheduled: the queue timeout stops applying to them
        self._batch_of: dict[str, str] = {}  # queued request id -> its batch
        self._batch_queued: Counter = Counter()  # batch -> its requests still queued
        self._batch_started: set[str] = set()  # batches with a request scheduled
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._stopping = False
        self.failure: str | None = None  # set when the engine failed for good (Engine.failure)
        self._ids = itertools.count()
        self._threads = torch.get_num_threads()  # the caller's: it may give up its own afterwards
        self._thread = threading.Thread(target=self._run, name="kvserve-engine", daemon=True)
        self._thread.start()

    async def generate(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
                       priority: int = 0, batch: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yields cumulative outputs until finished. Bad input raises ValueError before the first
        yield, a full queue raises Overloaded, a wait past the queue timeout QueueTimeout (unless a
        request of the same `batch` is scheduled); leaving the loop early (client gone, task
        cancelled) aborts the request."""
        if self.failure:
            raise EngineUnavailable(self._failure_message())
        loop = asyncio.get_running_loop()
        request_id = request_id or f"areq-{next(self._ids)}"
        stream: asyncio.Queue = asyncio.Queue()
        accepted = loop.create_future()
        tokens = len(self.engine.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt)
        self.queue.reserve(tokens)  # released by the engine thread; nothing awaits in between
        self._commands.put(("add", (prompt, params, request_id, priority, tokens, batch), (loop, stream, accepted)))
        self._wake.set()
        await accepted
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)

    async def call(self, fn):
        """fn(engine) run on the engine thread, between steps: a consistent view of its state."""
        if not self.alive:
            raise RuntimeError("the engine thread has stopped")
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._commands.put(("call", fn, (loop, done)))
        self._wake.set()
        return await done

    def tokens_made(self, request_id: str) -> int | None:
        """The tokens a request held by the engine has made so far; None when it holds none of
        that id. Read from outside the engine thread, for logs and metrics only: a count one
        step stale is harmless."""
        state = self.engine.requests.get(request_id)
        return None if state is None else sum(len(s.output_token_ids) for s in list(state.seqs))

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id, None))
        self._wake.set()

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def _run(self) -> None:
        # OpenMP's thread count is per thread: without this, kvserve/native's kernels in this thread
        # would use every core whatever --threads says, until some torch op happened to set it. The
        # get first: a thread's first torch call copies the process-wide count into the thread, and
        # the server's HTTP thread sets that to 1 (release_openmp_workers) after this thread starts
        torch.get_num_threads()
        torch.set_num_threads(self._threads)
        while not self._stopping:
            if self._check_failure():
                return
            self._drain_commands()
            self._update_queue()
            if not self.engine.has_unfinished():
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # the engine isolates request failures; this is a bug in it
                log.exception("engine step failed")
                for rid in list(self._streams):
                    self.engine.abort(rid)
                    self._deliver(rid, RuntimeError(f"engine error: {e}"))
                continue
            for out in outputs:
                if out.error:
                    log.error("request %s failed in the engine: %s", out.request_id, out.error)
                self._deliver(out.request_id, RuntimeError(f"engine error: {out.error}") if out.error else out)
        for rid in list(self._streams):
            self.engine.abort(rid)
            self._deliver(rid, RuntimeError("server shutting down"))

    def _failure_message(self) -> str:
        return f"the engine has failed and cannot serve: {self.failure}"

    def _check_failure(self) -> bool:
        """On an engine failure (Engine.failure): every waiting caller gets EngineUnavailable, and
        the thread ends, so that `alive` turns False (the server's /health 503)."""
        failure = getattr(self.engine, "failure", None)
        if not failure:
            return False
        self.failure = failure
        log.error("%s", self._failure_message())
        while True:  # commands that raced the failure
            try:
                kind, arg, reply = self._commands.get_nowait()
            except queue.Empty:
                break
            if reply is not None:
                loop, future = reply[0], reply[-1]
                loop.call_soon_threadsafe(_settle, future, EngineUnavailable(self._failure_message()))
            if kind == "add":
                self.queue.release(arg[4])
        for rid in list(self._streams):
            self._deliver(rid, EngineUnavailable(self._failure_message()))
        return True

    def _drain_commands(self) -> None:
        while True:
            try:
                kind, arg, reply = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "abort":
                self.engine.abort(arg)
                self._streams.pop(arg, None)
                continue
            if kind == "call":
                loop, done = reply
                try:
                    result, error = arg(self.engine), None
                except Exception as e:  # noqa: BLE001 - the caller's to handle
                    result, error = None, e
                loop.call_soon_threadsafe(_settle, done, error, result)
                continue
            loop, stream, accepted = reply
            try:
                self.engine.add_request(arg[0], arg[1], request_id=arg[2], priority=arg[3])
            except Exception as e:
                self.queue.release(arg[4])
                loop.call_soon_threadsafe(_settle, accepted, e)
                continue
            self._queued[arg[2]] = arg[4]
            if arg[5] is not None:
                self._batch_of[arg[2]] = arg[5]
                self._batch_queued[arg[5]] += 1
            self._streams[arg[2]] = (loop, stream)
            loop.call_soon_threadsafe(_settle, accepted, None)

    def _update_queue(self) -> None:
        """Releases the queue slots of requests scheduled or gone; drops those past the timeout."""
        timeout = self.queue.limits.timeout
        for rid, tokens in list(self._queued.items()):
            state = self.engine.requests.get(rid)
            batch = self._batch_of.get(rid)
            if state is not None and all(s.first_scheduled is None for s in state.seqs):
                if timeout is None or now() - state.arrival <= timeout or batch in self._batch_started:
                    continue
                self.engine.abort(rid)
                self._deliver(rid, QueueTimeout(f"the request waited {timeout:g} s in the queue without "
                                                f"being scheduled; retry later"))
            elif batch is not None:  # scheduled (or gone)
                self._batch_started.add(batch)
            del self._queued[rid]
            self.queue.release(tokens)
            if batch is not None:
                del self._batch_of[rid]
                self._batch_queued[batch] -= 1
                if not self._batch_queued[batch]:
                    del self._batch_queued[batch]
                    self._batch_started.discard(batch)

    def _deliver(self, request_id: str, item) -> None:
        entry = self._streams.get(request_id)
        if entry is None:
            return
        if isinstance(item, BaseException) or item.finished:
            del self._streams[request_id]
        loop, stream = entry
        try:
            loop.call_soon_threadsafe(stream.put_nowait, item)
        except RuntimeError:  # the caller's event loop is closed: nobody is listening
            pass


def _settle(future: asyncio.Future, error: BaseException | None, result=None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)
