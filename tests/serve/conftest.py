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
        self.hostport = url.removeprefix("http://")


def start_server(sources: list[str], repository: str | None = None, **settings) -> Running:
    import uvicorn

    from cvdeploy.serve.app import build_repository, create_app
    from cvdeploy.serve.repository import ServeSettings

    repo = build_repository(sources, repository, ServeSettings(**settings))
    port = free_port()
    config = uvicorn.Config(create_app(repo), host="127.0.0.1", port=port, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                return Running(url, server, thread, repo)
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
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
