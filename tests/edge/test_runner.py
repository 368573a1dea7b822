"""`python -m cvdeploy.edge run`: no torch, no server, no other engine imported; the Predictor's detections."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cvdeploy.bundle import Bundle
from cvdeploy.edge import choose_edge_variant
from cvdeploy.errors import InputError
from cvdeploy.predict import Predictor

NEVER = {"torch", "torchvision", "ultralytics", "fastapi", "uvicorn", "starlette", "typer", "rich", "tensorflow", "jax",
         "litert_torch", "pnnx", "onnx", "openvino", "nncf"}
OTHER_ENGINES = {"ncnn": {"ai_edge_litert", "tflite_runtime", "onnxruntime"},
                 "litert": {"ncnn", "onnxruntime"}}


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-X", "importtime", "-m", "cvdeploy.edge", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def _imported(stderr: str) -> set[str]:
    """Top-level packages `python -X importtime` saw imported."""
    return {line.rsplit("|", 1)[1].strip().split(".")[0] for line in stderr.splitlines()
            if line.startswith("import time:") and "|" in line} - {"imported package"}


def _detections(stdout: str) -> dict[str, list[dict]]:
    return {row["source"]: row["detections"] for row in map(json.loads, stdout.splitlines())}


@pytest.mark.slow
@pytest.mark.parametrize(("fixture", "variant"), [("ncnn_bundle", "ncnn-fp16"), ("litert_bundle", "litert-fp32")])
def test_the_runner_imports_only_its_engine_and_answers_as_the_predictor(fixture: str, variant: str, shapes_data: Path,
                                                                         request: pytest.FixtureRequest) -> None:
    bundle = request.getfixturevalue(fixture)[0]
    folder = shapes_data / "images" / "val"
    done = _run("run", str(bundle), "--source", str(folder), "--variant", variant, "--json", "--max-frames", "8")
    assert done.returncode == 0, done.stderr[-2000:]
    imported = _imported(done.stderr)
    kind = variant.split("-")[0]
    assert {"numpy", "cv2", {"ncnn": "ncnn", "litert": "ai_edge_litert"}[kind]} <= imported
    assert not imported & NEVER, f"the edge runner imported {sorted(imported & NEVER)}"
    assert not imported & OTHER_ENGINES[kind], f"the edge runner imported another engine: {sorted(imported & OTHER_ENGINES[kind])}"
    got = _detections(done.stdout)
    images = sorted(p for p in folder.iterdir() if p.suffix == ".jpg")[:8]
    assert list(got) == [str(p) for p in images]
    with Predictor(bundle, variant) as p:
        for path in images:
            want = p.predict(path).summary()
            rows = got[str(path)]
            assert [r["class"] for r in rows] == [w["class"] for w in want]
            for r, w in zip(rows, want, strict=True):
                assert r["confidence"] == pytest.approx(w["confidence"], abs=1e-5)
                assert np.allclose(list(r["box"].values()), list(w["box"].values()), atol=1e-4)
    assert sum(len(v) for v in got.values()) > 0


@pytest.mark.slow
def test_the_runner_reads_a_video_and_prints_a_line_per_frame(ncnn_bundle: tuple[Path, list], shapes_data: Path,
                                                             tmp_path: Path) -> None:
    import cv2

    frame = cv2.imread(str(sorted((shapes_data / "images" / "val").iterdir())[0]))
    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 5, (frame.shape[1], frame.shape[0]))
    for _ in range(4):
        writer.write(frame)
    writer.release()
    done = _run("run", str(ncnn_bundle[0]), "--source", str(video), "--max-frames", "3")
    assert done.returncode == 0, done.stderr[-2000:]
    heads = [ln for ln in done.stdout.splitlines() if not ln.startswith("  ")]
    assert [h.split(":")[0] for h in heads] == [f"{video}#{i}" for i in range(3)]
    assert "ncnn-fp32" in done.stderr  # the default on x86: NCNN computes fp16 weights in f32 there anyway


def test_a_missing_bundle_is_one_error_line() -> None:
    done = subprocess.run([sys.executable, "-m", "cvdeploy.edge", "run", "/nonexistent.cvd", "--source", "0"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip().splitlines() == ["error: model not found: /nonexistent.cvd"]


def test_variant_choice_follows_the_device(demo_bundle: Path) -> None:
    bundle = Bundle.load(demo_bundle)  # onnx-fp32 only: the fallback where only ONNX Runtime runs
    assert choose_edge_variant(bundle)[0] == "onnx-fp32"
    with pytest.raises(InputError, match="no variant 'ncnn-fp16'"):
        choose_edge_variant(bundle, "ncnn-fp16")
    fake = bundle.manifest.model_copy(deep=True)
    for name in ("ncnn-fp32", "ncnn-fp16", "litert-fp32"):
        fake.variants[name] = fake.variants["onnx-fp32"].model_copy(update={"engine": name.split("-")[0]})
    two = Bundle(fake, bundle.root)
    assert choose_edge_variant(two, machine="aarch64")[0] == "ncnn-fp16"  # Arm computes fp16 natively
    assert choose_edge_variant(two, machine="x86_64")[0] == "ncnn-fp32"
