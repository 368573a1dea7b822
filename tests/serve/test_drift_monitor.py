"""Live drift monitoring against a real server: a bundle with a baseline profile, streams of real images (in
distribution, darker, rescaled), /admin/drift and the Prometheus gauges; a bundle without a profile is not monitored."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tests.serve.conftest import Running, start_server, stop_server

MODEL = "yolo11n-shapes"
PREDICT = f"/v1/models/{MODEL}/predict"
WINDOW, EVERY, MIN, K = 100, 10, 40, 3


def scenes(seed: int, n: int, transform: Callable[[np.ndarray], np.ndarray] = lambda x: x) -> list[bytes]:
    """`n` demo scenes (the generator the baseline came from, another seed), transformed, as the generator's JPEGs."""
    from cvdeploy.demo.shapes import iter_scenes

    return [cv2.imencode(".jpg", transform(s.image), [cv2.IMWRITE_JPEG_QUALITY, 92])[1].tobytes() for s in iter_scenes(seed, "val", n)]


def darker(img: np.ndarray) -> np.ndarray:
    return (img.astype(np.float32) * 0.45).astype(np.uint8)


def halved(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    return cv2.resize(img, (max(16, w // 3), max(16, h // 3)), interpolation=cv2.INTER_AREA)


def send(url: str, blobs: list[bytes], concurrency: int = 8, params: dict | None = None) -> list[int]:
    """Every blob POSTed to the image API, `concurrency` at a time; every status, in order."""

    async def run() -> list[int]:
        sem = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            async def one(b: bytes) -> int:
                async with sem:
                    return (await client.post(PREDICT, content=b, params=params)).status_code
            return list(await asyncio.gather(*(one(b) for b in blobs)))

    return asyncio.run(run())


def report(r: Running) -> dict:
    got = httpx.get(f"{r.url}/admin/drift", params={"sync": "true"}, timeout=30)
    assert got.status_code == 200, got.text
    (version,) = [m for m in got.json()["models"] if m["model"] == MODEL]
    return version


@pytest.fixture(scope="module")
def profiled_bundle(demo_bundle: Path, shapes_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo bundle with the baseline `cvdeploy build --data` writes: the 60 images of `shapes_data` (seed 123)."""
    from cvdeploy.build.profile_step import write_profile
    from cvdeploy.bundle.bundle import Bundle

    out = tmp_path_factory.mktemp("profiled") / "demo.cvd"
    shutil.copytree(demo_bundle, out)
    b = Bundle.load(out)
    write_profile(b, shapes_data / "data.yaml")
    b.save_manifest()
    return out


@pytest.fixture()
def monitored(profiled_bundle: Path) -> Iterator[Running]:
    r = start_server([str(profiled_bundle)], max_batch=4, drift_window=WINDOW, drift_every=EVERY, drift_min_requests=MIN,
                     drift_consecutive=K, drift_sample=1.0, drift_cpu_budget=1.0)  # every request's pixels: no budget cut
    yield r
    stop_server(r)


def test_in_distribution_stays_quiet_and_darker_images_raise_the_alert_within_the_window(monitored: Running) -> None:
    statuses = send(monitored.url, scenes(321, WINDOW))
    assert statuses == [200] * WINDOW
    quiet = report(monitored)
    assert quiet["monitoring"] and quiet["window"] == quiet["pixel_samples"] == WINDOW and quiet["evaluations"] == (WINDOW - MIN) // EVERY + 1
    assert not quiet["alert"], [f for f in quiet["findings"] if f["severity"] == "serious"]
    tested = {f["statistic"] for f in quiet["findings"] if f["test"] != "none"}
    assert {"brightness", "sharpness", "size", "confidence", "class_mix", "boxes_per_image"} <= tested

    # A client's own thresholds change the predictions, not the data: such requests are not monitored.
    assert send(monitored.url, scenes(322, 5), params={"conf": "0.6"}) == [200] * 5
    assert report(monitored)["requests_seen"] == WINDOW

    dark, alert_at = scenes(321, WINDOW, darker), None
    for i in range(0, WINDOW, EVERY):
        assert send(monitored.url, dark[i:i + EVERY]) == [200] * EVERY
        now = report(monitored)
        if now["alert"]:
            alert_at = now["alert_since"] - WINDOW
            break
    assert alert_at is not None and alert_at <= WINDOW, "darker images did not raise the alert within one window"
    # Darker images move the gray level and every channel with it (the ratios contrast, saturation, sharpness barely).
    assert set(now["alert_statistics"]) <= {"brightness", "mean_b", "mean_g", "mean_r", "std_b", "std_g", "std_r"}
    worst = now["findings"][0]
    assert (worst["statistic"], worst["severity"]) == ("brightness", "serious") and "darker" in worst["message"]

    text = httpx.get(f"{monitored.url}/metrics", timeout=30).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    (alert,) = [s for s in families["cvdeploy_drift_alert"].samples if s.labels["model"] == MODEL]
    assert alert.value == 1.0 and alert.labels["version"] == "1"
    scores = {s.labels["statistic"]: s.value for s in families["cvdeploy_drift_score"].samples}
    assert scores["brightness"] > 1.0 and 0 <= scores["aspect"] < 1.0


def test_rescaled_images_raise_the_alert(monitored: Running) -> None:
    assert send(monitored.url, scenes(400, MIN)) == [200] * MIN
    assert not report(monitored)["alert"]
    small = scenes(401, 2 * WINDOW, halved)
    for i in range(0, len(small), EVERY):
        send(monitored.url, small[i:i + EVERY])
        now = report(monitored)
        if now["alert"]:
            break
    assert now["alert"], now["findings"][:3]
    assert {"size", "sharpness"} & set(now["alert_statistics"]), now["alert_statistics"]


def test_a_bundle_without_a_baseline_is_served_unmonitored_and_says_why(demo_bundle: Path, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    with caplog.at_level(logging.INFO, logger="cvdeploy.serve"):
        r = start_server([str(demo_bundle)], max_batch=4)
        try:
            assert send(r.url, scenes(5, 8)) == [200] * 8
            got = report(r)
            assert got["monitoring"] is False and "profile.json" in got["reason"] and "--data" in got["reason"]
            assert httpx.get(f"{r.url}/admin/drift", params={"model": "nope"}, timeout=30).status_code == 404
            assert httpx.get(f"{r.url}/admin/drift", params={"sync": "maybe"}, timeout=30).status_code == 400
            assert "cvdeploy_drift_alert{" not in httpx.get(f"{r.url}/metrics", timeout=30).text
        finally:
            stop_server(r)
    assert any("drift monitoring off" in rec.getMessage() for rec in caplog.records)


def test_the_window_profile_is_the_profilers_profile(profiled_bundle: Path, shapes_data: Path) -> None:
    """What the server keeps per request makes the same DataProfile as the doctor's Profiler on the same images."""
    from cvdeploy.bundle.bundle import Bundle
    from cvdeploy.diagnose.profile import Profiler, compare
    from cvdeploy.predict import Predictor
    from cvdeploy.serve.monitor import image_sample, prediction_sample, window_profile

    files = sorted((shapes_data / "images" / "val").glob("*.jpg"))[:20]
    with Predictor(Bundle.load(profiled_bundle)) as p:
        prof = Profiler(p)
        samples = []
        for f in files:
            prof.add(f)
            data = f.read_bytes()
            img = p.decode(data)
            s = image_sample(img.shape, data, img)
            samples.append(prediction_sample(p.predict(img), s))
        model = {"bundle": p.bundle.name, "variant": p.variant, "conf": p.options.conf, "iou": p.options.iou, "max_det": p.options.max_det}
    ours, theirs = window_profile(samples, model), prof.profile()
    # The same statistics, counts and categories; the sketches equal but for the six-digit rounding of a saved profile.
    assert (ours.images, ours.categorical, ours.model, ours.confidence_histogram) == \
        (theirs.images, theirs.categorical, theirs.model, theirs.confidence_histogram)
    assert ours.numeric.keys() == theirs.numeric.keys()
    for k, a in ours.numeric.items():
        b = theirs.numeric[k]
        assert a.count == b.count and np.allclose([a.mean, a.std, *a.quantiles], [b.mean, b.std, *b.quantiles], rtol=1e-5), k
    # Compared, they agree to the sketches' resolution (KS reads its CDFs in steps of 0.01; the rounding may move one).
    assert [(d.statistic, d.value) for d in compare(theirs, ours) if d.test != "none" and (d.severity != "ok" or d.value > 0.0101)] == []


def test_the_monitor_keeps_to_its_cpu_budget_by_skipping_pixel_statistics(profiled_bundle: Path, shapes_data: Path) -> None:
    """A tiny budget: sizes and predictions of every request are kept, the pixel statistics of few, and it is counted."""
    from cvdeploy.predict import Predictor
    from cvdeploy.serve.metrics import ServerMetrics
    from cvdeploy.serve.monitor import MonitorHub
    from cvdeploy.serve.settings import ServeSettings

    metrics = ServerMetrics()
    hub = MonitorHub(ServeSettings(drift_sample=1.0, drift_cpu_budget=0.001, drift_min_requests=50), metrics)
    files = sorted((shapes_data / "images" / "val").glob("*.jpg")) * 4  # 240 requests, all drawn for pixel statistics
    with Predictor(profiled_bundle) as p:
        mon = hub.open(MODEL, "1", p)
        hub.register(mon)
        for f in files:
            data = f.read_bytes()
            img = p.decode(data)
            hub.submit(mon, img, data, p.predict(img))
        hub.drain()
    got = mon.report()
    hub.close()
    assert got["requests_seen"] == len(files) and got["window"] == 200
    skipped = metrics.drift_pixels_skipped._value.get()
    assert len(files) / 2 < skipped < len(files)  # a burst allowance (50 ms of CPU), then a trickle
    assert got["pixel_samples"] <= len(files) - skipped
    assert metrics.drift_work._value.get() > 0
