"""Clients of a cvdeploy server (sync and async), over its image API and health endpoints.

>>> from cvdeploy.client import Client
>>> with Client("http://127.0.0.1:8000") as c:
...     result = c.predict("yolo11n-shapes", "image.jpg", conf=0.3)
...     result["detections"]
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cvdeploy.errors import CvdeployError, InputError


class ServerError(CvdeployError):
    """The server refused the request; `status` is its HTTP status and the message its error text."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"server answered {status}: {message}")
        self.status = status


def _httpx() -> Any:
    try:
        import httpx
    except ImportError as e:
        from cvdeploy.errors import MissingDependencyError

        raise MissingDependencyError("httpx", "serve", "talking to a cvdeploy server") from e
    return httpx


def _blob(image: str | os.PathLike[str] | bytes) -> bytes:
    if isinstance(image, bytes | bytearray):
        return bytes(image)
    p = Path(image)
    if not p.is_file():
        raise InputError(f"image not found: {p}")
    return p.read_bytes()


def _params(conf: float | None, iou: float | None, max_det: int | None, classes: list[int] | None, annotate: bool) -> dict:
    out: dict[str, Any] = {k: v for k, v in (("conf", conf), ("iou", iou), ("max_det", max_det)) if v is not None}
    if classes:
        out["classes"] = ",".join(str(int(c)) for c in classes)
    if annotate:
        out["annotate"] = "true"
    return out


def _answer(r: Any) -> dict[str, Any]:
    if r.status_code >= 400:
        try:
            msg = r.json().get("error", r.text)
        except ValueError:
            msg = r.text
        raise ServerError(r.status_code, msg)
    return r.json()


class ConnectionFailed(CvdeployError):
    """The server could not be reached (refused, timed out, TLS failure)."""


def _call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    httpx = _httpx()
    try:
        return fn(*args, **kwargs)
    except httpx.HTTPError as e:
        raise ConnectionFailed(f"cannot reach the server: {type(e).__name__}: {e}") from e


async def _acall(fn: Any, *args: Any, **kwargs: Any) -> Any:
    httpx = _httpx()
    try:
        return await fn(*args, **kwargs)
    except httpx.HTTPError as e:
        raise ConnectionFailed(f"cannot reach the server: {type(e).__name__}: {e}") from e


class Client:
    def __init__(self, url: str, *, timeout: float = 30.0, headers: dict[str, str] | None = None, verify: Any = True) -> None:
        self._c = _httpx().Client(base_url=url.rstrip("/"), timeout=timeout, headers=headers, verify=verify)

    def ready(self) -> bool:
        return _call(self._c.get, "/v2/health/ready").status_code == 200

    def models(self) -> list[dict[str, str]]:
        return _answer(_call(self._c.post, "/v2/repository/index"))  # type: ignore[return-value]

    def predict(self, model: str, image: str | os.PathLike[str] | bytes, *, conf: float | None = None, iou: float | None = None,
                max_det: int | None = None, classes: list[int] | None = None, annotate: bool = False) -> dict[str, Any]:
        return _answer(_call(self._c.post, f"/v1/models/{model}/predict", content=_blob(image),
                                    params=_params(conf, iou, max_det, classes, annotate),
                                    headers={"content-type": "application/octet-stream"}))

    def close(self) -> None:
        self._c.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    def __init__(self, url: str, *, timeout: float = 30.0, headers: dict[str, str] | None = None, verify: Any = True) -> None:
        self._c = _httpx().AsyncClient(base_url=url.rstrip("/"), timeout=timeout, headers=headers, verify=verify)

    async def ready(self) -> bool:
        return (await _acall(self._c.get, "/v2/health/ready")).status_code == 200

    async def predict(self, model: str, image: str | os.PathLike[str] | bytes, *, conf: float | None = None,
                      iou: float | None = None, max_det: int | None = None, classes: list[int] | None = None,
                      annotate: bool = False) -> dict[str, Any]:
        return _answer(await _acall(self._c.post, f"/v1/models/{model}/predict", content=_blob(image),
                                          params=_params(conf, iou, max_det, classes, annotate),
                                          headers={"content-type": "application/octet-stream"}))

    async def aclose(self) -> None:
        await self._c.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
