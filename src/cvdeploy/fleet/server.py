"""The update server: an HTTP app over a `FleetRoot` (routes in `cvdeploy.fleet.protocol`), behind the fleet token."""

from __future__ import annotations

import hmac
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from cvdeploy.errors import AuthError, InputError, NotFoundError
from cvdeploy.fleet.protocol import API, DEVICE_HEADER, StatusReport, check_name
from cvdeploy.fleet.publish import FleetRoot

MAX_REPORT_BYTES = 256 << 10
CHUNK = 1 << 16
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


def create_fleet_app(root: str | os.PathLike[str], token: str) -> FastAPI:
    """The update server for the directory `root`; every route but /v1/health needs `Authorization: Bearer <token>`."""
    from pydantic import ValidationError

    from cvdeploy.serve.http import install_error_handlers, read_body

    store = FleetRoot(root)
    expected = token.encode()

    def authorized(request: Request) -> None:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # compare_digest: the time taken does not tell how much of a guessed token was right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
            raise AuthError(401, "a valid fleet token is required (Authorization: Bearer <token>)")

    app = FastAPI(title="cvdeploy fleet update server", docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)
    guarded = [Depends(authorized)]

    @app.get(f"{API}/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(f"{API}/channels", dependencies=guarded)
    def channels() -> JSONResponse:
        return JSONResponse({c.channel: c.version for c in store.channels()})

    @app.get(f"{API}/channels/{{channel}}", dependencies=guarded)
    def channel(channel: str) -> Response:
        return Response(store.channel(channel).model_dump_json(), media_type="application/json")

    @app.get(f"{API}/versions/{{version}}/{{name}}", dependencies=guarded)
    def version_file(version: str, name: str) -> Response:
        return Response(store.version_file(version, name), media_type="application/json")

    @app.get(f"{API}/files/{{sha256}}", dependencies=guarded)
    def file(sha256: str, request: Request) -> Response:
        return _serve_file(store, sha256, request.headers.get("range"), request.headers.get(DEVICE_HEADER, ""))

    @app.post(f"{API}/devices/{{device}}/status", dependencies=guarded)
    async def report(device: str, request: Request) -> dict[str, Any]:
        check_name(device, "device")
        body = await read_body(request, MAX_REPORT_BYTES, timeout=30.0)
        try:
            doc = StatusReport.model_validate_json(body)
        except ValidationError as e:
            first = e.errors()[0]
            raise InputError(f"not a status report: {'.'.join(str(x) for x in first['loc'])}: {first['msg']}") from None
        if doc.device != device:
            raise InputError(f"the report is about device {doc.device!r}, posted for {device!r}")
        store.record_report(doc)
        return {"recorded": device}

    @app.get(f"{API}/devices", dependencies=guarded)
    def devices() -> JSONResponse:
        return JSONResponse([r.model_dump(mode="json") for r in store.reports()])

    return app


def _serve_file(store: FleetRoot, sha256: str, range_header: str | None, device: str) -> Response:
    """The file by content, whole (200) or from a byte on (206, `Range: bytes=N-` or `bytes=N-M`); 416 past its end."""
    path: Path = store.blob(sha256)
    if not path.is_file():
        raise NotFoundError(f"no file {sha256} on this server")
    size = path.stat().st_size
    start, end, status = 0, size - 1, 200
    if range_header:
        m = _RANGE.match(range_header.strip())
        if m is None:
            raise InputError(f"unsupported Range {range_header!r}: this server answers one range, bytes=N- or bytes=N-M")
        start = int(m.group(1))
        end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
        if start >= size or end < start:
            store.log_download({"device": device, "sha256": sha256, "range": range_header, "status": 416, "bytes": 0})
            return JSONResponse({"error": f"range {range_header} is outside the file ({size} bytes)"}, status_code=416,
                                headers={"Content-Range": f"bytes */{size}"})
        status = 206
    headers = {"Accept-Ranges": "bytes", "Content-Length": str(end - start + 1), "ETag": f'"{sha256}"',
               "Cache-Control": "public, max-age=31536000, immutable"}  # content-addressed: the bytes never change
    if status == 206:
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    entry = {"device": device, "sha256": sha256, "range": range_header, "status": status}
    return FileSlice(path, start, end, status, headers,
                     lambda sent, complete: store.log_download({**entry, "bytes": sent, "complete": complete}))


class FileSlice(Response):
    """Bytes start..end of a file, sent chunk by chunk; `on_done(bytes sent, complete)` is called once the answer ends,
    whole or cut by the client (a download log that counts what a dropped connection took, at the time it dropped)."""

    def __init__(self, path: Path, start: int, end: int, status: int, headers: dict[str, str],
                 on_done: Callable[[int, bool], None]) -> None:
        super().__init__(status_code=status, headers=headers, media_type="application/octet-stream")
        self.path, self.start, self.end, self.on_done = path, start, end, on_done

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        sent, complete = 0, False
        try:
            async with anyio.create_task_group() as group:

                async def watch() -> None:  # a client that goes away ends the answer now, not after the last chunk
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    group.cancel_scope.cancel()

                group.start_soon(watch)
                await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
                with open(self.path, "rb") as f:
                    f.seek(self.start)
                    left = self.end - self.start + 1
                    while left > 0:
                        chunk = await anyio.to_thread.run_sync(f.read, min(CHUNK, left))
                        if not chunk:
                            break
                        left -= len(chunk)
                        await send({"type": "http.response.body", "body": chunk, "more_body": left > 0})
                        sent += len(chunk)
                complete = left == 0
                group.cancel_scope.cancel()
        finally:
            self.on_done(sent, complete)
