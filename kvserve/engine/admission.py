"""Backpressure: a bounded waiting queue. Saying "busy" early (429) beats accepting a burst that
then times out for everyone; a request that waits too long anyway is dropped (503).

"Queued" means submitted and never scheduled: a preempted request was admitted already and is
never dropped. Counts are reserved on the caller's thread at submission, so a burst that arrives
while the engine thread is mid-step is still counted, and released by the engine thread.
"""
import threading
from dataclasses import dataclass


@dataclass
class QueueLimits:
    max_requests: int | None = None  # engine requests (one per prompt); None: unlimited
    max_tokens: int | None = None  # their prompt tokens; a request is admitted into an empty queue
    timeout: float | None = None  # seconds a request may wait before it is dropped


class Overloaded(Exception):
    def __init__(self, reason: str, message: str, retry_after: int = 1):
        super().__init__(message)
        self.reason, self.retry_after = reason, retry_after


class QueueTimeout(Exception):
    reason = "queue_timeout"
    retry_after = 1


class AdmissionQueue:
    def __init__(self, limits: QueueLimits | None = None):
        self.limits = limits or QueueLimits()
        self._lock = threading.Lock()
        self.requests = 0
        self.tokens = 0

    def reserve(self, tokens: int) -> None:
        """Counts one more queued request, or raises Overloaded and counts nothing."""
        with self._lock:
            self._check(1, tokens)
            self.requests += 1
            self.tokens += tokens

    def check_room(self, requests: int, tokens: int) -> None:
        """Whether `requests` engine requests (the prompts of one API request) with `tokens`
        prompt tokens fit now, before any is reserved, so that a batch is not half queued:
        ValueError if they never can, Overloaded if not now."""
        lim = self.limits
        if lim.max_requests is not None and requests > lim.max_requests:
            raise ValueError(f"{requests} prompts in one request are more than the server queues at once "
                             f"(--max-queued-requests {lim.max_requests}); send them in smaller batches")
        with self._lock:
            self._check(requests, tokens)

    def _check(self, requests: int, tokens: int) -> None:
        lim = self.limits
        if lim.max_requests is not None and self.requests + requests > lim.max_requests:
            raise Overloaded("queued_requests", f"the server is busy: {self.requests} requests are "
                             f"queued (limit {lim.max_requests}); retry later")
        if lim.max_tokens is not None and self.requests and self.tokens + tokens > lim.max_tokens:
            raise Overloaded("queued_tokens", f"the server is busy: {self.tokens} prompt tokens are "
                             f"queued (limit {lim.max_tokens}); retry later")

    def release(self, tokens: int) -> None:
        with self._lock:
            self.requests -= 1
            self.tokens -= tokens
