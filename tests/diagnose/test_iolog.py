"""Inference I/O logging: sampled records within a size bound, anomalies flagged, the server's log read by the doctor."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest

from cvdeploy import Predictor
from cvdeploy.diagnose.iolog import IOLog, anomalies_of, read_iolog
from cvdeploy.errors import InputError
from cvdeploy.vision.detections import Detections
from cvdeploy.vision.result import Result


@pytest.fixture(scope="module")
def predicted(demo_bundle: Path, shapes_data: Path) -> tuple[np.ndarray, bytes, Result]:
    path = sorted((shapes_data / "images" / "val").glob("*.jpg"))[0]
    p = Predictor(demo_bundle)
    return p.decode(path), path.read_bytes(), p.predict(path)


def test_the_log_never_holds_more_than_its_bound(tmp_path: Path, predicted) -> None:
    image, data, result = predicted
    log = IOLog(tmp_path / "io", sample=1.0, store="image", max_bytes=1024 * 1024, seed=0)
    for i in range(300):  # ~300 x 13 kB of images: several times the bound
        assert log.record(model="m@1", image=image, data=data, result=result, meta={"i": i})
        if i % 50 == 49:
            log.flush()
            assert log.disk_bytes() <= 1024 * 1024  # while it is written, not only at the end
    log.close()
    assert log.disk_bytes() <= 1024 * 1024
    records = list(read_iolog(tmp_path / "io"))
    kept = [r["meta"]["i"] for r in records]
    assert kept == sorted(kept) and kept[-1] == 299 and kept[0] > 0  # the newest kept, the oldest rotated out
    assert all(Path(r["path"]).read_bytes() == data for r in records)  # store=image keeps the bytes as sent
    assert records[0]["result"] == result.to_dict() and records[0]["sha256"] and records[0]["shape"] == list(image.shape[:2])


def test_sampling_stores_and_anomalies(tmp_path: Path, predicted) -> None:
    image, data, result = predicted
    log = IOLog(tmp_path / "s", sample=0.05, store="thumbnail", seed=1)
    sampled = sum(log.record(model="m", image=image, data=data, result=result) for _ in range(2000))
    assert 60 <= sampled <= 140  # 5 % of 2000, binomial: 3 sigma is ~30
    black = np.zeros_like(image)
    assert log.record(model="m", image=black, data=None, result=result)  # always recorded, whatever the draw
    empty = Result("detect", result.names, image.shape[:2], detections=Detections(np.zeros((0, 4), np.float32),
                                                                                   np.zeros(0, np.float32), np.zeros(0, int)))
    log.record(model="m", image=image, data=data, result=empty)
    log.close()
    records = list(read_iolog(tmp_path / "s"))
    assert len(records) in (sampled + 1, sampled + 2)
    thumbs = [r for r in records if r.get("path")]
    assert thumbs and all(r["path"].endswith(".jpg") for r in thumbs)
    assert max(Path(r["path"]).stat().st_size for r in thumbs) < len(data)  # a thumbnail, not the image
    assert ["input all black"] in [r["anomalies"] for r in records]
    assert log.stats.anomalies["input all black"] == 1 and log.stats.anomalies["no detection"] == 1
    hashed = IOLog(tmp_path / "h", sample=1.0, store="hash")
    hashed.record(model="m", image=image, data=data, result=result)
    hashed.close()
    (only,) = read_iolog(tmp_path / "h")
    assert "path" not in only and only["sha256"]


def test_anomalies_of_outputs() -> None:
    nan = Result("detect", {0: "a"}, (10, 10), detections=Detections(np.array([[0, 0, np.nan, 5]], np.float32),
                                                                      np.array([0.9], np.float32), np.array([0])))
    assert anomalies_of(None, nan) == ["NaN or inf in the outputs"]
    low = Result("detect", {0: "a"}, (10, 10), detections=Detections(np.array([[0, 0, 5, 5]], np.float32),
                                                                      np.array([0.3], np.float32), np.array([0])))
    assert anomalies_of(None, low, usual_top_conf=0.9)[0].startswith("confidence collapse")
    assert anomalies_of(np.full((8, 8, 3), 255, np.uint8), low, usual_top_conf=0.5) == ["input saturated"]


def test_bad_settings_and_empty_logs(tmp_path: Path) -> None:
    for kwargs, message in (({"sample": 1.5}, "sample rate"), ({"store": "raw"}, "stores one of"), ({"max_bytes": 10}, "at least")):
        with pytest.raises(InputError, match=message):
            IOLog(tmp_path / "x", **kwargs)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no I/O log records"):
        list(read_iolog(tmp_path / "empty"))


def test_the_server_logs_what_it_answers(demo_bundle: Path, shapes_data: Path, tmp_path: Path) -> None:
    from tests.serve.conftest import start_server, stop_server

    images = sorted((shapes_data / "images" / "val").glob("*.jpg"))[:5]
    s = start_server([str(demo_bundle)], io_log=str(tmp_path / "io"), io_log_sample=1.0, io_log_store="image")
    try:
        answers = [httpx.post(f"{s.url}/v1/models/yolo11n-shapes/predict", content=p.read_bytes(), timeout=60).json()
                   for p in images]
        s.repo.iolog.flush()  # what is queued is on disk
    finally:
        stop_server(s)
    records = list(read_iolog(tmp_path / "io"))
    assert len(records) == 5 and [Path(r["path"]).read_bytes() for r in records] == [p.read_bytes() for p in images]
    assert [r["result"]["detections"] for r in records] == [a["detections"] for a in answers]
    assert records[0]["model"] == "yolo11n-shapes@1" and records[0]["meta"]["input_shape"]


@pytest.mark.slow
def test_doctor_reads_a_log_of_a_channel_swapping_deployment(demo_bundle: Path, shapes_data: Path, tmp_path: Path) -> None:
    from cvdeploy.diagnose.preprocess_audit import simulate_deployment

    images = sorted((shapes_data / "images" / "val").glob("*.jpg"))[:24]
    p = Predictor(demo_bundle)
    answers = simulate_deployment(p, images, "bgr_rgb_swap")
    log = IOLog(tmp_path / "io", sample=1.0, store="image")
    for path, answer in zip(images, answers, strict=True):  # what a broken deployment's server would have logged
        log.record(model="yolo11n-shapes@1", image=p.decode(path), data=path.read_bytes(),
                   result=SimpleNamespace(detections=None, to_dict=lambda a=answer: a))
    log.close()
    r = subprocess.run([sys.executable, "-m", "cvdeploy", "doctor", str(demo_bundle), "--io-log", str(tmp_path / "io"), "--json", "-"],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 1, r.stderr
    pre = [f for f in json.loads(r.stdout)["findings"] if f["step"] == "preprocessing"]
    assert pre and pre[0]["severity"] == "serious" and pre[0]["message"].startswith("bgr_rgb_swap")
