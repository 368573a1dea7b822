"""HTTP plumbing shared by the routes: the one map from cvdeploy errors to statuses, and reading request bodies."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from cvdeploy.errors import (
    AuthError,
    ClientAbortError,
    CvdeployError,
    DeadlineError,
    NotFoundError,
    OutputNotRepresentableError,
    PayloadTooLargeError,
    RequestTimeoutError,
    ServerBusyError,
)


def status_of(e: CvdeployError) -> int:
    """The one place a cvdeploy error becomes an HTTP status (the tree in `cvdeploy.errors` lists them)."""
    if isinstance(e, AuthError):
        return e.status
    for kind, status in ((NotFoundError, 404), (PayloadTooLargeError, 413), (OutputNotRepresentableError, 422),
                         (RequestTimeoutError, 408), (ServerBusyError, 503), (DeadlineError, 504), (ClientAbortError, 499)):
        if isinstance(e, kind):
            return status
    return 400  # every other refusal is about what the client sent


def error_response(e: CvdeployError) -> JSONResponse:
    """`{"error": message}` with the status and the headers the status calls for (Retry-After, WWW-Authenticate)."""
    status = status_of(e)
    headers: dict[str, str] = {}
    if status in (429, 503):
        wait = e.retry_after if isinstance(e, AuthError) and e.retry_after else 1.0
        headers["Retry-After"] = str(max(1, int(wait + 0.999)))
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="cvdeploy"'
    message = e.message if isinstance(e, AuthError) else str(e)
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


def install_error_handlers(app: FastAPI) -> None:
    """Every error a client can cause answers `{"error": ...}` with a 4xx (503/504 for load), the framework's too."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(CvdeployError)
    async def _cvdeploy_error(_: Request, e: CvdeployError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:  # unknown routes, wrong methods
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()))
        return JSONResponse({"error": f"invalid request at {where}: {first.get('msg', 'invalid')}"}, status_code=400)


async def read_body(request: Request, limit: int, *, timeout: float | None = None, budget: Any = None, lease: Any = None) -> bytes:
    """The request body, refused as soon as it passes `limit` (declared or streamed), when it does not arrive within
    `timeout` seconds (a slow-body client holds a connection and memory), and when `budget` (the server's bytes in
    flight) cannot admit it; what it admits is charged to `lease`, released with the request."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"request body of {declared} bytes is larger than the limit ({limit} bytes)")
    weight = budget.weight(request.headers.get("content-type")) if budget is not None else 1
    if budget is not None and declared is not None and declared.isdigit():
        budget.admit(lease, int(declared) * weight)
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLargeError(f"request body is larger than the limit ({limit} bytes)")
                if budget is not None and (declared is None or not declared.isdigit()):
                    budget.admit(lease, len(chunk) * weight)
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeoutError(f"the request body did not arrive within {timeout:g} s") from None
    except ClientDisconnect:
        raise ClientAbortError("the client disconnected before its request was read") from None
    return b"".join(chunks)


async def gather_all(aws: list[Any]) -> list[Any]:
    """Await every awaitable: one directly (the common single-image request, without gather's task), several gathered."""
    return [await aws[0]] if len(aws) == 1 else list(await asyncio.gather(*aws))
