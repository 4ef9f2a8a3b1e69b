"""Every failure leaves the server as an OpenAI error object with a fitting status, so clients
(which branch on status and `error.code`) see one shape whatever went wrong and where."""
import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from kvserve.server.protocol import ErrorInfo, ErrorResponse

log = logging.getLogger("kvserve.server")


class OpenAIError(Exception):
    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
                 retry_after: int | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code
        self.retry_after = retry_after  # seconds, sent as Retry-After (429, 503)

    def info(self) -> ErrorInfo:
        kind = {429: "rate_limit_error"}.get(self.status, "server_error" if self.status >= 500
                                            else "invalid_request_error")
        return ErrorInfo(message=self.message, type=kind, param=self.param, code=self.code)

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else {}
        if self.retry_after is not None:
            headers["Retry-After"] = str(self.retry_after)
        return JSONResponse(ErrorResponse(error=self.info()).model_dump(), self.status, headers=headers or None)


def validation_error(errors: list[dict]) -> OpenAIError:
    """The first of pydantic's errors, worded for a person and naming the offending parameter."""
    if not errors:
        return OpenAIError("invalid request")
    err = errors[0]
    loc = [p for p in err.get("loc", ()) if p != "body"]
    kind = err.get("type")
    if kind == "json_invalid":
        return OpenAIError(f"the body is not valid JSON: {err.get('ctx', {}).get('error', 'decode error')}")
    if kind == "lone_surrogate":  # raised for the whole body (protocol._Request), naming where itself
        path = err["ctx"]["path"]
        return OpenAIError(f"Invalid value: {err['msg']}", param=re.split(r"[.\[]", path)[0], code="invalid_value")
    if not loc:
        return OpenAIError("the body must be a JSON object, sent with 'Content-Type: application/json'")
    tag = next((i for i, p in enumerate(loc) if _is_union_tag(p)), None)
    if tag is not None:  # a value that fits none of a union's types
        err, loc, expected = _union_error(errors, loc, tag)
        if expected:
            path = _path(loc)
            return OpenAIError(f"Invalid value for '{path}': expected {' or '.join(expected)}", param=str(loc[0]),
                               code="invalid_value")
    param = str(loc[0])
    path = _path(loc)
    kind = err.get("type")
    if kind == "extra_forbidden":
        return OpenAIError(f"Unrecognized request argument supplied: {path}", param=param,
                           code="unknown_parameter")
    if kind == "missing":
        return OpenAIError(f"Missing required parameter: '{path}'.", param=param, code="missing_required_parameter")
    return OpenAIError(f"Invalid value for '{path}': {err.get('msg', 'invalid')}", param=param,
                       code="invalid_value")


def _path(loc) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


def _is_union_tag(part) -> bool:
    """pydantic names the member of a union an error is for by its type ("str", "list[int]",
    "TextPart"), where field names (snake_case) and indices stand otherwise."""
    return isinstance(part, str) and re.fullmatch(r"(str|int|float|bool|[a-z]+\[.*\]|[A-Z]\w*)", part) is not None


def _union_error(errors: list[dict], loc: list, tag: int) -> tuple[dict, list, list[str]]:
    """For a union that failed at loc[:tag]: the error inside a member whose own type the value had
    (a list's bad item), with the member's tag taken out of its loc; else the types expected."""
    prefix = loc[:tag]
    members = [(e, [p for p in e["loc"] if p != "body"]) for e in errors]
    members = [(e, where) for e, where in members if where[:tag] == prefix and len(where) > tag]
    inside = [(e, where) for e, where in members if len(where) > tag + 1]
    if inside:  # the member that fits the value furthest: the list whose bad item comes last
        e, where = max(inside, key=lambda m: m[1][tag + 1] if isinstance(m[1][tag + 1], int) else 0)
        return e, prefix + where[tag + 1:], []
    return members[0][0], prefix, list(dict.fromkeys(where[tag] for _, where in members))


class InternalErrors:
    """ASGI middleware: an exception no handler caught becomes a 500 error object. Not an app-wide
    exception handler, which Starlette follows by re-raising, so that the server would then drop
    the kept-alive connection (and with it the client's next request)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        started = False

        async def send_and_watch(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        except Exception as e:
            if started or scope["type"] != "http":  # a broken stream: the server closes the connection
                raise
            log.exception("unhandled error in %s %s", scope["method"], scope["path"])
            await OpenAIError(f"internal server error: {type(e).__name__}", 500).response()(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    """OpenAI error objects for our errors, pydantic's and Starlette's, and (InternalErrors) any other."""
    app.add_middleware(InternalErrors)

    @app.exception_handler(OpenAIError)
    async def _openai(request: Request, exc: OpenAIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return validation_error(list(exc.errors())).response()

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return OpenAIError(str(exc.detail), exc.status_code, code=code).response()
