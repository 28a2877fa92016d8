"""Every 4xx/5xx answer as an `ErrorBody` JSON, and the request-size guard that runs before parsing.

    400 invalid_json       the body is not JSON (nothing else is ever decoded: no pickle, no torch.load)
    401 unauthorized       missing or wrong API key (the detail never repeats what was sent)
    404 model_not_found    unknown model; not_found for an unknown path
    405 method_not_allowed
    413 request_too_large  body over --max-body-mb, checked on Content-Length and on the bytes read
    422 invalid_request    schema errors, wrong shapes, NaN/inf, requests over a limit, a bad Idempotency-Key
    422 idempotency_key_reused  an Idempotency-Key sent before with another body
    429 quota_exhausted    the key's query quota is spent; Retry-After: seconds to the reset
    429 rate_limited       over the key's request rate; Retry-After: seconds to the next free token
    429/5xx                test fault switch (servers/faults.py)
    500 internal_error     an unexpected failure; the server logs it and stays up
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bbt.errors import BackendError, ConfigError, ModelNotFound, ServerUnavailable
from bbt.protocol import ErrorBody
from servers.auth import Unauthorized
from servers.idempotency import KeyReused
from servers.quotas import QuotaExhausted, RateLimited

log = logging.getLogger("bbt.server")

MAX_ERRORS_SHOWN = 5  # validation errors listed in one detail
_STATUS_KINDS = {400: "invalid_json", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


def error_response(status: int, error: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(ErrorBody(error=error, detail=detail).model_dump(), status_code=status, headers=headers)


def describe_validation(errors: list[dict]) -> str:
    """pydantic errors as one readable line: 'candidates.intrinsic.z: data holds 8 base64 characters, ...'."""
    parts = []
    for err in errors[:MAX_ERRORS_SHOWN]:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{'.'.join(loc) or 'body'}: {msg}")
    more = len(errors) - MAX_ERRORS_SHOWN
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "") + " (the schemas are at /docs)"


async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = list(exc.errors())
    bad_json = [e for e in errors if e.get("type") == "json_invalid"]
    if bad_json:
        e = bad_json[0]
        where = e["loc"][-1] if e.get("loc") else "?"
        reason = e.get("ctx", {}).get("error", "decode error")
        return error_response(400, "invalid_json", f"the body is not valid JSON: {reason} at character {where}")
    detail = describe_validation(errors)
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        detail += "; send the body as JSON with 'Content-Type: application/json'"
    return error_response(422, "invalid_request", detail)


async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = _STATUS_KINDS.get(exc.status_code, "http_error")
    detail = str(exc.detail)
    if exc.status_code == 400:  # FastAPI could not decode the body (e.g. bytes that are not UTF-8)
        detail = f"the body could not be read as JSON: it must be UTF-8 JSON text ({detail})"
    elif exc.status_code == 404:
        detail = f"no route {request.method} {request.url.path}; protocol v1 lives under /v1 (see /docs)"
    return error_response(exc.status_code, kind, detail, headers=getattr(exc, "headers", None))


async def _unauthorized(request: Request, exc: Unauthorized) -> JSONResponse:
    return error_response(401, "unauthorized", str(exc), headers={"WWW-Authenticate": "Bearer"})


async def _model_not_found(request: Request, exc: ModelNotFound) -> JSONResponse:
    return error_response(404, "model_not_found", str(exc))


async def _config(request: Request, exc: ConfigError) -> JSONResponse:
    return error_response(422, "invalid_request", str(exc))


def _account(request: Request) -> str:
    return getattr(request.state, "account", "?")


async def _too_many(request: Request, exc: QuotaExhausted | RateLimited) -> JSONResponse:
    kind = "quota_exhausted" if isinstance(exc, QuotaExhausted) else "rate_limited"
    log.info("%s: account %s, %s %s", kind, _account(request), request.method, request.url.path)
    return error_response(429, kind, str(exc), headers={"Retry-After": str(exc.retry_after)})


async def _key_reused(request: Request, exc: KeyReused) -> JSONResponse:
    return error_response(422, "idempotency_key_reused", str(exc))


async def _upstream(request: Request, exc: BackendError) -> JSONResponse:
    """The engine this server relays to (`bbt serve --upstream`) failed: down (503, worth a retry)
    or refusing (422, with its reason)."""
    if isinstance(exc, ServerUnavailable):
        return error_response(503, "upstream_unavailable", f"the engine behind this server: {exc}",
                              headers={"Retry-After": "5"})
    return error_response(422, "upstream_refused", f"the engine behind this server refused: {exc}")


def _internal(scope: Scope, exc: Exception) -> JSONResponse:
    account = scope.get("state", {}).get("account", "?")  # request.state lives in the scope
    log.error("unexpected %s on %s %s (account %s)", type(exc).__name__, scope.get("method"), scope.get("path"),
              account, exc_info=exc)
    return error_response(500, "internal_error", f"the server failed on this request ({type(exc).__name__}); "
                          "it is logged, and the server is still up")


def install_error_handlers(app: FastAPI) -> None:
    # Starlette picks the handler of the first class in the exception's MRO: ModelNotFound
    # (a ConfigError too) gets 404, other ConfigErrors 422.
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(Unauthorized, _unauthorized)
    app.add_exception_handler(ModelNotFound, _model_not_found)
    app.add_exception_handler(ConfigError, _config)
    app.add_exception_handler(QuotaExhausted, _too_many)
    app.add_exception_handler(RateLimited, _too_many)
    app.add_exception_handler(KeyReused, _key_reused)
    app.add_exception_handler(BackendError, _upstream)
    # Anything else is caught by RequestGuard: Starlette's own catch-all re-raises into uvicorn,
    # which then drops the keep-alive connection under the client's next request.


class RequestGuard:
    """ASGI middleware: refuse bodies over `max_bytes` with 413 before anything parses them, and
    answer 500 for any unexpected exception (logged; the connection and the server stay up).

    The declared Content-Length is checked first, then the bytes actually read (a chunked body
    declares none). An oversized body is read and dropped up to `drain_bytes` before answering, so
    that a client still uploading sees the 413 rather than a reset connection; beyond that the
    connection is closed after the answer.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, drain_bytes: int | None = None):
        self.app = app
        self.max_bytes = max_bytes
        self.drain_bytes = drain_bytes if drain_bytes is not None else max(4 * max_bytes, 8 * 2**20)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                answer = error_response(400, "invalid_request", f"Content-Length {declared[:40]!r} is not a number")
                await answer(scope, receive, send)
                return
            if size > self.max_bytes:
                await self._too_large(size, scope, receive, send, drained=0)
                return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left; nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large(size, scope, receive, send, drained=size, more=message.get("more_body", False))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as Starlette expects

        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, replay, watch)
        except Exception as exc:
            if started:  # half an answer is out: nothing clean left to send; uvicorn closes the connection
                raise
            await _internal(scope, exc)(scope, receive, send)

    async def _too_large(self, size: int, scope: Scope, receive: Receive, send: Send, *, drained: int,
                         more: bool = True) -> None:
        while more and drained < self.drain_bytes:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            drained += len(message.get("body", b""))
            more = message.get("more_body", False)
        detail = (f"the request body has {'at least ' if more else ''}{max(size, drained)} bytes; this server takes at "
                  f"most {self.max_bytes} (bbt serve --max-body-mb): send fewer candidates or inputs per request, "
                  "or candidates as intrinsic vectors")
        await error_response(413, "request_too_large", detail)(scope, receive, send)
