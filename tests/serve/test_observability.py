"""What an operator reads: /metrics as Prometheus parses it (naming conventions, process metrics, build info), JSON-only
logs from the real `cvdeploy serve` process (probes left out), and /docs served from packaged assets."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin, urlparse

import cv2
import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

MODEL = "yolo11n-shapes"
PREDICT = f"/v1/models/{MODEL}/predict"
PROBES = ("/v2/health/live", "/v2/health/ready", f"/v2/models/{MODEL}/ready", "/metrics")
SNAKE = re.compile(r"^[a-z][a-z0-9_]*$")


@pytest.fixture(scope="module")
def jpeg() -> bytes:
    img = np.random.default_rng(5).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    return cv2.imencode(".jpg", img)[1].tobytes()


def test_metrics_follow_prometheus_conventions(server, jpeg: bytes) -> None:
    assert httpx.post(server.url + PREDICT, content=jpeg, timeout=60).status_code == 200  # histograms get samples
    r = httpx.get(f"{server.url}/metrics", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    problems = []
    for f in families.values():
        if not SNAKE.match(f.name) or not f.name.startswith(("cvdeploy_", "process_", "python_")):
            problems.append(f"{f.name}: not snake_case with a cvdeploy_, process_ or python_ prefix")
        if f.type == "histogram" and not f.name.endswith(("_seconds", "_bytes")):
            problems.append(f"{f.name}: a histogram without a unit (_seconds, _bytes)")
        if f.type != "counter" and f.name.endswith("_total"):
            problems.append(f"{f.name}: only counters end in _total")
        for s in f.samples:
            if s.name.endswith("_created"):
                problems.append(f"{s.name}: a _created series")
            if f.type == "counter" and not s.name.endswith("_total"):
                problems.append(f"{s.name}: a counter sample without _total")
    assert not problems, problems
    for name in ("process_cpu_seconds", "process_resident_memory_bytes", "process_open_fds", "python_info",
                 "cvdeploy_request_duration_seconds", "cvdeploy_stage_duration_seconds", "cvdeploy_request_body_bytes",
                 "cvdeploy_requests", "cvdeploy_model_load_failures", "cvdeploy_server_ready", "cvdeploy_build_info"):
        assert name in families, name
    (info,) = families["cvdeploy_build_info"].samples
    import onnxruntime

    from cvdeploy import __version__
    assert info.value == 1 and info.labels == {"version": __version__, "python": sys.version.split()[0],
                                                "onnxruntime": onnxruntime.__version__}
    body = [s for s in families["cvdeploy_request_body_bytes"].samples if s.name.endswith("_sum") and s.labels["route"] == "images"]
    assert body and body[0].value >= len(jpeg)
    # the scrape does not see itself in flight (nothing else runs now)
    (in_flight,) = families["cvdeploy_requests_in_flight"].samples
    assert in_flight.value == 0


class _Assets(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.urls += [v for k, v in attrs if k in ("src", "href", "spec-url") and v]


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_api_pages_load_nothing_from_outside_the_server(server, page: str) -> None:
    r = httpx.get(server.url + page, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    outside = [u for u in re.findall(r"https?://[^\s\"'<>)]+", r.text) if not u.startswith(server.url)]
    assert not outside, outside
    parser = _Assets()
    parser.feed(r.text)
    assets = [urljoin(server.url + page, u) for u in parser.urls] + [urljoin(server.url, "/openapi.json")]
    assert len(assets) >= 3, parser.urls  # a script, the page's style or icon, the OpenAPI document
    for url in assets:
        assert urlparse(url).netloc == urlparse(server.url).netloc, url
        got = httpx.get(url, timeout=30)
        assert got.status_code == 200 and got.content, url


def _serve(args: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    """`cvdeploy serve` as a process on an ephemeral port; its URL, read from its own (JSON) startup line."""
    with log.open("wb") as out:
        p = subprocess.Popen([sys.executable, "-m", "cvdeploy", "serve", *args, "--port", "0"], stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and p.poll() is None:
        found = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", log.read_text(errors="replace"))
        if found:
            return p, found.group(1)
        time.sleep(0.05)
    p.kill()
    raise AssertionError(f"the server did not start: {log.read_text(errors='replace')[-2000:]}")


def _stop(p: subprocess.Popen, log: Path) -> list[dict]:
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled once it has stopped
    lines = [ln for ln in log.read_text().splitlines() if ln.strip()]
    docs = []
    for ln in lines:
        doc = json.loads(ln)  # every line, stdout and stderr, uvicorn's included, is one JSON object
        assert isinstance(doc, dict) and {"ts", "level", "logger", "message"} <= set(doc), ln
        docs.append(doc)
    return docs


def _ready(url: str, **kw) -> None:
    deadline = time.monotonic() + 120
    while httpx.get(f"{url}/v2/health/ready", timeout=10, **kw).status_code != 200:
        assert time.monotonic() < deadline, "not ready in time"
        time.sleep(0.05)


def test_the_server_logs_json_only_and_leaves_probes_out(demo_bundle: Path, tmp_path: Path, jpeg: bytes) -> None:
    from cvdeploy.security.auth import KeyStore

    store = KeyStore(tmp_path / "keys.db")
    _, key = store.create("ops", "operator")
    auth = {"Authorization": f"Bearer {key}"}
    log = tmp_path / "serve.log"
    p, url = _serve([str(demo_bundle), "--auth-keys", str(tmp_path / "keys.db"), "--public-health"], log)
    try:
        _ready(url)  # no credentials: --public-health
        for path in PROBES:
            assert httpx.get(url + path, headers=auth, timeout=30).status_code == 200, path
        assert httpx.post(url + PREDICT, content=jpeg, headers=auth | {"x-request-id": "req-1"}, timeout=60).status_code == 200
        assert httpx.get(f"{url}/v2/models/nope", headers=auth, timeout=30).status_code == 404
        assert httpx.get(f"{url}/v2/models/{MODEL}", timeout=30).status_code == 401  # only the health routes are public
    finally:
        docs = _stop(p, log)
    access = [d for d in docs if d["logger"] == "cvdeploy.access"]
    assert {d["path"] for d in access} == {PREDICT, f"/v2/models/{MODEL}", "/v2/models/nope"}, access  # no probe, no scrape
    (req,) = [d for d in access if d.get("request_id") == "req-1"]
    assert req["status"] == 200 and req["method"] == "POST" and req["ms"] > 0
    assert any(d["logger"].startswith("uvicorn") for d in docs)  # uvicorn's own lines went through the JSON formatter
    assert any(d["logger"] == "cvdeploy.serve" and d["message"].startswith("ready") for d in docs)


def test_log_probes_puts_probes_and_scrapes_in_the_access_log(demo_bundle: Path, tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    p, url = _serve([str(demo_bundle), "--log-probes"], log)
    try:
        _ready(url)
        for path in PROBES:
            assert httpx.get(url + path, timeout=30).status_code == 200, path
    finally:
        docs = _stop(p, log)
    logged = {d["path"] for d in docs if d["logger"] == "cvdeploy.access"}
    assert set(PROBES) <= logged, logged


def test_a_wrong_log_level_is_one_error_line(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "cvdeploy", "serve", str(tmp_path), "--log-level", "loud"], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 1 and p.stderr.strip() == "error: --log-level 'loud': one of critical, error, warning, info, debug, trace"
