"""Health that probes can use: the models' first load and warm-up run in the background once the socket is bound, and
the v2 health routes report it (live at once; ready, server-wide and per model, only when loaded and warm).

Why in the background: uvicorn binds its socket only after the app's startup has returned, so a server that warmed its
models first answered nothing at all for seconds (minutes for a large model on a small CPU): a liveness probe could
not tell "starting" from "hung", and restarted it. Now the socket answers at once: `/v2/health/live` 200,
`/v2/health/ready` 503 with what is loading or failed, inference 503 with Retry-After, until every model is warm.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from cvdeploy.serve.repository import READY, Repository

log = logging.getLogger("cvdeploy.serve")
HEALTH_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})


class Startup:
    """The first load and warm-up of every model: `begin()` in the app's startup, `stop()` in its shutdown.

    `before_load` (a blocking callable, run in a worker thread) runs first: an embedder's step the models need
    (fetching bundles, waiting for a key service); tests hold it to observe the server before it is ready.
    """

    def __init__(self, repo: Repository, *, before_load: Callable[[], Any] | None = None) -> None:
        self.repo, self.before_load = repo, before_load
        self.task: asyncio.Task | None = None
        self.done = False

    def begin(self, *, background: bool = True) -> asyncio.Task:
        """Mark every model loading (so that requests meanwhile get 503, not 404) and start loading them."""
        self.repo.mark_loading(self.repo.sources())
        self.task = asyncio.create_task(self._run(), name="cvdeploy-warmup")
        if background:
            log.info("listening; %d model(s) loading in the background", len(self.repo.sources()))
        return self.task

    async def stop(self) -> None:
        """Shutdown during the warm-up: stop loading (a load in a worker thread finishes there, and is dropped)."""
        if self.task is not None and not self.task.done():
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    async def _run(self) -> None:
        t0 = time.monotonic()
        metrics = self.repo.metrics
        try:
            if self.before_load is not None:
                await asyncio.to_thread(self.before_load)
            for name in self.repo.sources():
                t = time.monotonic()
                try:
                    versions = await self.repo.load(name)
                except Exception as e:  # any failure: the model stays failed, the server not ready; the rest still load
                    _, why = self.repo.state(name)
                    log.error("model %s could not be loaded: %s; the server stays not ready (reload it with POST "
                              "/v2/repository/models/%s/load)", name, why or e, name, extra={"model": name})
                    continue
                log.info("model %s loaded and warmed up in %.2f s (versions %s)", name, time.monotonic() - t,
                         ",".join(versions), extra={"model": name})
        finally:
            self.done = True
            metrics.startup.set(time.monotonic() - t0)
        if self.repo.ready():
            log.info("ready: every model loaded and warmed up in %.2f s", time.monotonic() - t0)


def register(app: FastAPI, repo: Repository) -> None:
    """Add the v2 health routes (server live and ready, model ready) to `app`.

    A 503 here is the server's true state, not a client error: it is what KServe's model server answers while a model
    is not ready, and what Kubernetes' probes read as "not yet" (any status from 400 up fails a probe).
    """

    @app.get("/v2/health/live")
    async def live() -> JSONResponse:
        return JSONResponse({"live": True})

    @app.get("/v2/health/ready")
    async def ready() -> JSONResponse:
        ok = repo.ready()
        models: dict[str, dict[str, Any]] = {}
        for name in repo.sources():
            state, why = repo.state(name)
            models[name] = {"state": state, "versions": repo.versions(name)} | ({"error": why} if why else {})
        return JSONResponse({"ready": ok, "models": models}, status_code=200 if ok else 503)

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str | None = None) -> JSONResponse:
        m = repo.get(name, version)  # 503 with Retry-After while loading or after a failed load, 404 if unknown
        return JSONResponse({"name": m.name, "version": m.version, "ready": repo.state(name)[0] == READY})
