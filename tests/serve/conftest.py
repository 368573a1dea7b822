"""A real uvicorn server on 127.0.0.1 (a free port), serving the demo bundle, for the whole module."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    def __init__(self, url: str, server, thread: threading.Thread, repo) -> None:
        self.url, self.server, self.thread, self.repo = url, server, thread, repo
        self.hostport = url.split("://", 1)[1]


def start_server(sources: list[str], repository: str | None = None, *, tls: dict | None = None, client_verify=None,
                 wait: bool = True, before_load=None, repo=None, **settings) -> Running:
    """Serve `sources` (or a repository built beforehand, `repo`); with `wait`, return once every model is warm (read from
    the repository itself: with authentication on, the probe answers 401 whatever the state)."""
    import uvicorn

    from cvdeploy.serve.app import build_repository, create_app, uvicorn_config
    from cvdeploy.serve.repository import ServeSettings

    repo = repo or build_repository(sources, repository, ServeSettings(**settings))
    port = free_port()
    config = uvicorn_config(create_app(repo, before_load=before_load), "127.0.0.1", port, log_level="warning",
                            settings=repo.settings, **(tls or {}))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    listening = False
    while time.monotonic() < deadline and thread.is_alive():
        if not listening:  # one answer (any status) says the socket is bound; more would spend rate-limit tokens
            try:
                httpx.get(f"{url}/v2/health/live", timeout=2, verify=client_verify if tls else True)
                listening = True
            except httpx.HTTPError:
                pass
        if listening and (not wait or repo.ready()):
            return Running(url, server, thread, repo)
        time.sleep(0.05)
    server.should_exit = True
    raise RuntimeError("the server did not become ready")


def stop_server(r: Running) -> None:
    r.server.should_exit = True
    r.thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(demo_bundle: Path) -> Iterator[Running]:
    r = start_server([str(demo_bundle)], max_batch=4, max_delay_ms=5.0, max_body_bytes=4 * 1024 * 1024)
    yield r
    stop_server(r)


@pytest.fixture(scope="session")
def server_factory():
    """start_server / stop_server for tests that need their own server (TLS, other settings)."""
    started: list[Running] = []

    def start(*args, **kwargs) -> Running:
        r = start_server(*args, **kwargs)
        started.append(r)
        return r

    yield start
    for r in started:
        stop_server(r)
