"""The checks every request passes before a handler runs, and the one log line it leaves after.

A plain ASGI middleware rather than FastAPI dependencies: the API key is checked before the body
is even read (a bad key with a bad body is a 401, not a 400), the size limit holds for chunked
bodies too, and the log line and request counter see streamed responses to their end.
"""
import asyncio
import hmac
import logging
import time

from kvserve.server.errors import OpenAIError
from kvserve.server.metrics import ServerMetrics

log = logging.getLogger("kvserve.server")

PROTECTED = ("/v1/", "/tokenize", "/detokenize", "/debug/")  # /health and /metrics stay open for probes


class ServerMiddleware:
    def __init__(self, app, metrics: ServerMetrics, known_paths: set[str], api_key: str | None,
                 max_body_bytes: int):
        self.app, self.metrics, self.known_paths = app, metrics, known_paths
        self.max_body_bytes = max_body_bytes
        # several keys, comma-separated: one per tenant (see --prefix-cache-isolation per-key)
        self.api_keys = None if api_key is None else \
            [k.strip().encode() for k in api_key.split(",") if k.strip()] or [api_key.encode()]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status, started = 500, False
        state = scope.setdefault("state", {})

        async def send_and_watch(message):
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
            await send(message)

        try:
            error = self._auth_error(scope)
            if error is None:
                body, error = await self._read_body(scope, receive)
                if body is None and error is None:  # the client left while sending
                    status = 499
                    return
            if error is not None:
                await error.response()(scope, receive, send_and_watch)
                return
            await self.app(scope, _replay(body, receive), send_and_watch)
        except asyncio.CancelledError:
            # uvicorn cancels the requests still running when --shutdown-timeout ends, and logs
            # what the task raises as a crash: this one ends as planned, a stream cut, else a 503
            log.info("%s %s cancelled at shutdown", scope["method"], scope["path"])
            if not started:
                await OpenAIError("the server is shutting down", 503).response()(scope, receive, send_and_watch)
        finally:
            if state.get("client_left"):
                status = 499  # as nginx logs a client that left before the response ended
            self._record(scope, state, status, time.perf_counter() - start)

    def _auth_error(self, scope) -> OpenAIError | None:
        if self.api_keys is None or not scope["path"].startswith(PROTECTED):
            return None
        given = ""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                given = value.decode("latin-1")
        scheme, _, token = given.partition(" ")
        token = token.strip().encode()
        # every key compared, so the time taken does not tell which one nearly matched
        if scheme.lower() == "bearer" and sum(hmac.compare_digest(token, k) for k in self.api_keys):
            return None
        what = "No API key provided" if not given else "Incorrect API key provided"
        return OpenAIError(f"{what}; send it as 'Authorization: Bearer <key>'.", 401, code="invalid_api_key")

    async def _read_body(self, scope, receive) -> tuple[bytes | None, OpenAIError | None]:
        too_large = OpenAIError(f"the request body is larger than the limit of {self.max_body_bytes} bytes",
                                413, code="request_too_large")
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_body_bytes:
                return b"", too_large
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None, None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return b"", too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None

    def _record(self, scope, state: dict, status: int, seconds: float) -> None:
        path = scope["path"]
        endpoint = path if path in self.known_paths else "other"
        self.metrics.requests.labels(scope["method"], endpoint, str(status)).inc()
        client = scope.get("client") or ("-", 0)
        log.info("%s %s %s %d prompt_tokens=%s completion_tokens=%s %.3fs", client[0], scope["method"], path,
                 status, state.get("prompt_tokens", 0), state.get("completion_tokens", 0), seconds)


def _replay(body: bytes, receive):
    """The body already read, then whatever the client sends next (a disconnect)."""
    delivered = False

    async def replay():
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return replay
