"""`cvdeploy doctor` on seeded faults: a clean field, a darker field, a deployment that swaps colour channels."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import pytest


def doctor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cvdeploy", "doctor", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "COLUMNS": "200"})


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from cvdeploy.demo.shapes import generate_shapes

    root = tmp_path_factory.mktemp("doctor")
    base = generate_shapes(root / "base", n_train=0, n_val=35, seed=11).parent / "images" / "val"
    field = generate_shapes(root / "field", n_train=0, n_val=35, seed=12).parent / "images" / "val"
    return base, field


@pytest.mark.slow
def test_a_clean_field_has_no_serious_finding(demo_bundle: Path, sets: tuple[Path, Path], tmp_path: Path) -> None:
    base, field = sets
    r = doctor(str(demo_bundle), "--field", str(field), "--baseline", str(base), "--json", str(tmp_path / "d.json"))
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads((tmp_path / "d.json").read_text())
    assert doc["serious"] == 0 and {f["step"] for f in doc["findings"]} <= {"environment", "data", "speed"}
    assert doc["steps"] == ["environment", "speed", "data"] and doc["sections"]["speed"]["figures"]["calls"] > 0
    assert "golden parity holds on this machine for onnx-fp32" in r.stdout


@pytest.mark.slow
def test_a_darker_field_and_a_channel_swap_are_named(demo_bundle: Path, sets: tuple[Path, Path], tmp_path: Path) -> None:
    from cvdeploy import Predictor
    from cvdeploy.diagnose.preprocess_audit import simulate_deployment

    base, field = sets
    dark = tmp_path / "dark"
    dark.mkdir()
    for p in sorted(field.glob("*.jpg")):
        cv2.imwrite(str(dark / p.name), cv2.convertScaleAbs(cv2.imread(str(p)), alpha=0.45))
    page = tmp_path / "report" / "doctor.html"
    r = doctor(str(demo_bundle), "--field", str(dark), "--baseline", str(base), "--json", "-", "--out", str(page), "--no-speed")
    assert r.returncode == 1, r.stderr
    doc = json.loads(r.stdout)  # --json -: the findings alone on stdout, the human result on stderr
    top = doc["findings"][0]
    assert top["severity"] == "serious" and top["step"] == "data" and "darker" in top["message"]
    assert doc["steps"] == ["environment", "data"] and doc["sections"]["data"]["drifts"]
    text = page.read_text()  # the HTML report: the same findings, a drift plot, nothing loaded from elsewhere
    assert top["message"].split(":")[0] in text and "<svg" in text and "Data consistency" in text
    assert "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in text

    images = sorted(field.glob("*.jpg"))
    answers = simulate_deployment(Predictor(demo_bundle), images, "bgr_rgb_swap")  # a deployment feeding BGR
    (tmp_path / "answers.json").write_text(json.dumps(answers))
    r = doctor(str(demo_bundle), "--field", str(field), "--predictions", str(tmp_path / "answers.json"), "--json", "-", "--no-speed")
    assert r.returncode == 1, r.stderr
    pre = [f for f in json.loads(r.stdout)["findings"] if f["step"] == "preprocessing"]
    assert pre[0]["severity"] == "serious" and pre[0]["message"].startswith("bgr_rgb_swap") and pre[0]["fix"]


def test_bad_requests_are_one_line(demo_bundle: Path, tmp_path: Path) -> None:
    for args, message in (((str(demo_bundle), "--field", str(tmp_path / "none")), "--field"),
                          ((str(demo_bundle), "--predictions", str(demo_bundle / "manifest.json")), "needs --field")):
        r = doctor(*args)
        assert r.returncode == 1 and r.stderr.strip().startswith("error:") and message in r.stderr and "Traceback" not in r.stderr


def test_predict_log_io_feeds_the_doctor(demo_bundle: Path, sets: tuple[Path, Path], tmp_path: Path) -> None:
    """`predict --log-io` records what it saw and answered; `doctor --io-log` reads it back as the field."""
    base, field = sets
    dark = tmp_path / "dark"
    dark.mkdir()
    for p in sorted(field.glob("*.jpg")):
        cv2.imwrite(str(dark / p.name), cv2.convertScaleAbs(cv2.imread(str(p)), alpha=0.45))
    log = tmp_path / "iolog"
    r = subprocess.run([sys.executable, "-m", "cvdeploy", "predict", str(demo_bundle), str(dark), "--log-io", str(log),
                        "--log-io-sample", "1", "--log-io-store", "image"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for f in sorted(log.glob("records-*.jsonl")) for line in f.read_text().splitlines()]
    assert len(records) == len(list(dark.glob("*.jpg"))) and all(rec["meta"]["source"].startswith(str(dark)) for rec in records)
    r = doctor(str(demo_bundle), "--io-log", str(log), "--baseline", str(base), "--no-speed", "--json", "-")
    assert r.returncode == 1, r.stderr
    top = json.loads(r.stdout)["findings"][0]
    assert (top["severity"], top["step"]) == ("serious", "data") and "darker" in top["message"]
