"""The HTTP server's factory: `create_app(repository)` wires the routes (health, v2, images, admin, docs), the access
middleware and the error map; the models load and warm up in the background once the socket is bound (`health`), and
the server reports ready when they are warm.

Client errors are 4xx with ``{"error": ...}``; a full queue or memory budget is 503 with Retry-After; nothing a
client sends produces a 500. The modules: `routes_v2`, `routes_images`, `routes_stream`, `routes_admin` (thin routes),
`model_info` (v2 metadata and config: outputs and task facts), `stream_options`, `pipeline` (the Predictor's stages
around the batcher), `access` (authentication, audit, access log), `http` (errors to statuses, bodies), `protocol` (v2
encoding), `batcher`, `repository` (which versions serve) and `loaded` (one version: opened, warmed, drained), `canary`
and `canary_arms`, `monitor`, `limits`, `metrics`, `health` (startup and probes), `docs` (the API pages from packaged
assets).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from cvdeploy import __version__
from cvdeploy.errors import InputError
from cvdeploy.serve import docs, health, routes_admin, routes_images, routes_stream, routes_v2
from cvdeploy.serve.access import AccessMiddleware
from cvdeploy.serve.http import install_error_handlers
from cvdeploy.serve.metrics import ServerMetrics
from cvdeploy.serve.repository import Repository, ServeSettings


def create_app(repository: Repository, *, load_all: bool = True, background: bool = True,
               before_load: Callable[[], Any] | None = None) -> FastAPI:
    """The app serving `repository`. Its models load when the app starts (`load_all`): in the background once the
    socket is bound (`background`, so that probes get answers at once), or before it is bound (the workers of
    `serve --workers`, so that the kernel never hands a connection to a worker that is not warm). `before_load`, a
    blocking callable run in a worker thread, runs before the first load (see `health.Startup`)."""
    repo = repository
    startup = health.Startup(repo, before_load=before_load)
    repo.metrics.track_readiness(repo.ready)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Decoding, letterboxing and loads run in the loop's default executor: named threads, as many as asyncio's default.
        from concurrent.futures import ThreadPoolExecutor

        from cvdeploy.serve.batcher import os_thread_namer

        workers = min(32, (os.cpu_count() or 1) + 4)
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cvdeploy-work", initializer=os_thread_namer("cvd-work")))
        anchors = None
        if repo.settings.audit is not None:
            from cvdeploy.security.audit import AnchorWriter, DenialAggregator

            # A flood of refusals makes a few entries per client and 10 s (the first 20 with their details), not thousands.
            repo.denials = DenialAggregator(repo.settings.audit, burst=20)
            if repo.settings.audit_anchors is not None:  # signed checkpoints kept apart: truncation or a wipe shows
                anchors = AnchorWriter(repo.settings.audit, repo.settings.audit_anchors, every_s=repo.settings.audit_anchor_every_s)
                anchors.start()
        if repo.settings.io_log is not None:
            from cvdeploy.diagnose.iolog import IOLog

            s = repo.settings
            repo.iolog = IOLog(s.io_log, sample=s.io_log_sample, store=s.io_log_store, max_bytes=s.io_log_max_bytes)
        if load_all:
            task = startup.begin(background=background)
            if not background:
                await task
        yield
        await startup.stop()
        await repo.close()  # graceful: drain what was accepted
        if repo.denials is not None:
            repo.denials.flush()
        if anchors is not None:
            anchors.stop()
        if repo.iolog is not None:
            repo.iolog.close()

    app = FastAPI(title="cvdeploy", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Open Inference Protocol v2 (KServe, Triton-compatible) and an image API for YOLO bundles.")
    app.state.startup = startup

    install_error_handlers(app)
    app.add_middleware(AccessMiddleware, repo=repo)
    health.register(app, repo)
    routes_v2.register(app, repo)
    routes_images.register(app, repo)
    routes_stream.register(app, repo)
    routes_admin.register(app, repo)
    docs.register(app)
    return app


def build_repository(sources: list[str], repository_dir: str | None, settings: ServeSettings, *, registry: str | None = None,
                     follow: list[str] | None = None) -> Repository:
    """The models to serve: bundles, a repository folder, and registry aliases (`follow`: NAME@ALIAS, polled for moves)."""
    repo = Repository(settings, ServerMetrics())
    if repository_dir:
        repo.add_repository(repository_dir)
    for s in sources:
        repo.add_source(s)
    if follow:
        from cvdeploy.serve.follow import follow_alias

        for ref in follow:
            follow_alias(repo, registry, ref)
    if not repo.sources():
        raise InputError("nothing to serve: give bundles or --repository DIR")
    return repo


WS_FRAME_SLACK = 1 << 20  # bytes a WebSocket message may exceed max_body_bytes by and still get a 413 answer


def ws_max_size(settings: ServeSettings) -> int:
    """The largest WebSocket message the protocol layer accepts: the body limit plus some slack. Why: a frame over the
    body limit must get the HTTP routes' answer (413, the stream goes on); uvicorn's fixed default (16 MiB) under a
    larger body limit closed the socket with 1009 instead. Past the slack a message is cut by the protocol (1009)
    before it is buffered whole: a client that far over the limit is not sending one slightly large frame."""
    return settings.max_body_bytes + WS_FRAME_SLACK


def uvicorn_config(app: FastAPI, host: str, port: int, *, tls_cert: str | None = None, tls_key: str | None = None,
                   tls_client_ca: str | None = None, log_level: str = "info", settings: ServeSettings | None = None) -> Any:
    """A loaded uvicorn Config; with TLS, its SSL context is cvdeploy's hardened one (TLS 1.2+, AEAD, optional mTLS).
    The HTTP protocol drops slow-header clients and connections past the cap (`settings`, default ServeSettings()); the
    WebSocket protocol takes messages up to `ws_max_size(settings)`."""
    import uvicorn

    from cvdeploy.serve.limits import guarded_protocol

    s = settings or ServeSettings()
    if (tls_cert is None) != (tls_key is None):
        raise InputError("TLS needs both --tls-cert and --tls-key")
    if tls_client_ca is not None and tls_cert is None:
        raise InputError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    kw: dict[str, Any] = {}
    if tls_cert is not None:
        from cvdeploy.security.tls import server_context

        context = server_context(tls_cert, tls_key, tls_client_ca)  # type: ignore[arg-type]
        kw = {"ssl_certfile": tls_cert, "ssl_keyfile": tls_key}
    # log_config=None: uvicorn's loggers keep no handler of their own and reach the process's (cvdeploy.logs.server_logs:
    # JSON lines); its access log is off, cvdeploy's own (serve.access) replaces it.
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False, log_config=None,
                            timeout_graceful_shutdown=30,
                            http=guarded_protocol(s.header_timeout_s, s.max_connections),
                            timeout_keep_alive=s.keep_alive_timeout_s, ws_max_size=ws_max_size(s), **kw)  # type: ignore[arg-type]
    config.load()
    if tls_cert is not None:
        config.ssl = context  # replaces uvicorn's default context
    return config
