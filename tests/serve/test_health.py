"""Health that probes can use: listening at once, live before ready, ready only when every model is warm, a failed
warm-up reported (ready body, metric, log), and --public-health opening the two health routes (and only those)."""

from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest

from cvdeploy.security.auth import AuthPolicy, KeyStore

MODEL = "yolo11n-shapes"
PREDICT = f"/v1/models/{MODEL}/predict"


@pytest.fixture(scope="module")
def jpeg() -> bytes:
    img = np.random.default_rng(3).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    return cv2.imencode(".jpg", img)[1].tobytes()


def metric(url: str, name: str, **labels: str) -> float | None:
    """One sample's value from /metrics, parsed as Prometheus does."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


def until(check, seconds: float = 120.0):
    """Poll `check` until it returns something truthy, within a bounded deadline (no fixed sleeps)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"not within {seconds} s")


def test_listens_and_is_live_at_once_then_ready_after_the_warm_up(demo_bundle: Path, server_factory, jpeg: bytes) -> None:
    gate = threading.Event()
    s = server_factory([str(demo_bundle)], wait=False, before_load=lambda: gate.wait(120))  # holds the warm-up back
    try:
        live = httpx.get(f"{s.url}/v2/health/live", timeout=10)
        assert live.status_code == 200 and live.json() == {"live": True}
        ready = httpx.get(f"{s.url}/v2/health/ready", timeout=10)
        assert ready.status_code == 503 and ready.json() == {"ready": False, "models": {MODEL: {"state": "loading", "versions": []}}}
        for r in (httpx.post(s.url + PREDICT, content=jpeg, timeout=10), httpx.get(f"{s.url}/v2/models/{MODEL}/ready", timeout=10)):
            assert r.status_code == 503 and r.headers["retry-after"] == "1" and "loading" in r.json()["error"], r.text
        assert httpx.get(f"{s.url}/v2/models/nope/ready", timeout=10).status_code == 404  # unknown stays unknown
        assert httpx.post(f"{s.url}/v2/repository/index", timeout=10).json() == [{"name": MODEL, "version": "1", "state": "LOADING"}]
        assert metric(s.url, "cvdeploy_server_ready") == 0 and metric(s.url, "cvdeploy_startup_duration_seconds") == 0
    finally:
        gate.set()
    ready = until(lambda: (r := httpx.get(f"{s.url}/v2/health/ready", timeout=10)).status_code == 200 and r)
    assert ready.json() == {"ready": True, "models": {MODEL: {"state": "ready", "versions": ["1"]}}}
    assert httpx.get(f"{s.url}/v2/models/{MODEL}/ready", timeout=10).json() == {"name": MODEL, "version": "1", "ready": True}
    assert httpx.post(s.url + PREDICT, content=jpeg, timeout=60).status_code == 200
    assert metric(s.url, "cvdeploy_server_ready") == 1 and metric(s.url, "cvdeploy_model_ready", model=MODEL, version="1") == 1
    assert metric(s.url, "cvdeploy_startup_duration_seconds") > 0


def test_a_failed_warm_up_keeps_the_server_not_ready_and_says_why(demo_bundle: Path, server_factory, tmp_path: Path, jpeg: bytes,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    from cvdeploy.serve.app import build_repository
    from cvdeploy.serve.settings import ServeSettings

    bundle = shutil.copytree(demo_bundle, tmp_path / "b.cvd")
    repo = build_repository([str(bundle)], None, ServeSettings())
    variant = next((bundle / "variants").glob("*.onnx"))
    good = variant.read_bytes()
    variant.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # damaged after the server checked it: its load fails
    with caplog.at_level(logging.ERROR, logger="cvdeploy.serve"):
        s = server_factory([], repo=repo, wait=False)
        body = until(lambda: (r := httpx.get(f"{s.url}/v2/health/ready", timeout=10)).json()["models"][MODEL]["state"] == "failed"
                     and r.json())
    assert body["ready"] is False and "sha256" in body["models"][MODEL]["error"].lower(), body
    assert httpx.get(f"{s.url}/v2/health/ready", timeout=10).status_code == 503
    assert httpx.get(f"{s.url}/v2/health/live", timeout=10).status_code == 200
    refused = httpx.post(s.url + PREDICT, content=jpeg, timeout=10)
    assert refused.status_code == 503 and refused.headers["retry-after"] and "could not be loaded" in refused.json()["error"]
    assert metric(s.url, "cvdeploy_model_load_failures_total", model=MODEL) == 1 and metric(s.url, "cvdeploy_server_ready") == 0
    (logged,) = [r for r in caplog.records if r.name == "cvdeploy.serve" and r.levelno == logging.ERROR]
    assert MODEL in logged.getMessage() and "not ready" in logged.getMessage()
    variant.write_bytes(good)  # repaired: a reload makes it ready, no restart
    assert httpx.post(f"{s.url}/v2/repository/models/{MODEL}/load", timeout=120).status_code == 200
    assert httpx.get(f"{s.url}/v2/health/ready", timeout=10).status_code == 200
    assert httpx.post(s.url + PREDICT, content=jpeg, timeout=60).status_code == 200


@pytest.mark.parametrize("public", [False, True])
def test_public_health_opens_the_two_health_routes_and_nothing_else(demo_bundle: Path, server_factory, tmp_path: Path,
                                                                     jpeg: bytes, public: bool) -> None:
    store = KeyStore(tmp_path / "keys.db")
    _, key = store.create("ops", "operator")
    s = server_factory([str(demo_bundle)], auth=AuthPolicy(store), public_health=public)
    for path in ("/v2/health/live", "/v2/health/ready"):
        assert httpx.get(s.url + path, timeout=10).status_code == (200 if public else 401), path
        assert httpx.get(s.url + path, headers={"Authorization": f"Bearer {key}"}, timeout=10).status_code == 200
    # everything else still needs credentials, the model-level probe and the server metadata included
    for method, path in (("GET", "/v2"), ("GET", f"/v2/models/{MODEL}/ready"), ("GET", f"/v2/models/{MODEL}"), ("GET", "/metrics"),
                         ("GET", "/docs"), ("GET", "/v2/health/other"), ("POST", PREDICT), ("POST", "/v2/repository/index")):
        assert httpx.request(method, s.url + path, content=jpeg if method == "POST" else None, timeout=30).status_code == 401, path
    assert httpx.post(s.url + PREDICT, content=jpeg, headers={"Authorization": f"Bearer {key}"}, timeout=60).status_code == 200
    # the API page's packaged assets need what the page needs (the operator role has the docs permission)
    assert httpx.get(f"{s.url}/docs/assets/swagger-ui.css", headers={"Authorization": f"Bearer {key}"}, timeout=30).status_code == 200
    assert httpx.get(f"{s.url}/docs/assets/swagger-ui.css", timeout=30).status_code == 401


def test_public_health_from_the_environment_and_config() -> None:
    from cvdeploy.serve.settings import ServeSettings

    assert ServeSettings.load(env={}).public_health is False and ServeSettings.load(env={}).log_probes is False
    s = ServeSettings.load(env={"CVDEPLOY_SERVE_PUBLIC_HEALTH": "1", "CVDEPLOY_SERVE_LOG_PROBES": "true"})
    assert s.public_health is True and s.log_probes is True
