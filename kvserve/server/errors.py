"""Every failure leaves the server as an OpenAI error object with a fitting status, so clients
(which branch on status and `error.code`) see one shape whatever went wrong and where."""
import logging

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
    if not loc:
        return OpenAIError("the body must be a JSON object, sent with 'Content-Type: application/json'")
    param = str(loc[0])
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    if kind == "extra_forbidden":
        return OpenAIError(f"Unrecognized request argument supplied: {path}", param=param,
                           code="unknown_parameter")
    if kind == "missing":
        return OpenAIError(f"Missing required parameter: '{path}'.", param=param, code="missing_required_parameter")
    return OpenAIError(f"Invalid value for '{path}': {err.get('msg', 'invalid')}", param=param,
                       code="invalid_value")


def install_error_handlers(app: FastAPI) -> None:
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

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return OpenAIError(f"internal server error: {type(exc).__name__}", 500).response()
