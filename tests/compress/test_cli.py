"""`cvdeploy compress prune|distill ... --json -` as a user runs them: a real subprocess, tiny data (64 px, 16 images,
one epoch), the outcome and training record alone on stdout, the variant written into the bundle."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("ultralytics")
pytest.importorskip("torch_pruning")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, demo_pt: Path) -> tuple[Path, Path]:
    from cvdeploy.build import build_bundle
    from cvdeploy.demo.shapes import generate_shapes

    root = tmp_path_factory.mktemp("compress-cli")
    data = generate_shapes(root / "data", n_train=16, n_val=8, seed=5)
    return build_bundle(demo_pt, root / "tiny.cvd", imgsz=64, n_golden=1).root, data


def _run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cvdeploy", "compress", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


def _manifest_variants(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())["variants"]


@pytest.mark.slow
def test_prune_json_on_stdout_and_the_variant_in_the_bundle(tiny: tuple[Path, Path], demo_pt: Path, tmp_path: Path) -> None:
    src, data = tiny
    bundle = tmp_path / "b.cvd"
    shutil.copytree(src, bundle)
    p = _run("prune", bundle, "--model", demo_pt, "--data", data, "-o", tmp_path / "run", "--macs-ratio", "0.8",
             "--epochs", "1", "--imgsz", "64", "--batch", "8", "--workers", "0", "--max-map-drop", "100", "--json", "-")
    assert p.returncode == 0, p.stderr[-3000:]
    doc = json.loads(p.stdout)  # stdout is the JSON alone: Ultralytics' progress went to stderr
    assert doc["written"] is True and doc["variant"].startswith("onnx-pruned") and doc["variant"].endswith("-fp32")
    variant = _manifest_variants(bundle)[doc["variant"]]
    assert variant["training"]["method"] == "prune + fine-tune" and variant["training"]["epochs"] == 1
    assert variant["training"]["macs_ratio"] <= 0.8


@pytest.mark.slow
def test_distill_json_on_stdout_and_the_variant_in_the_bundle(tiny: tuple[Path, Path], demo_pt: Path, tmp_path: Path) -> None:
    src, data = tiny
    bundle = tmp_path / "b.cvd"
    shutil.copytree(src, bundle)
    p = _run("distill", bundle, "--teacher", demo_pt, "--student", "yolo11n.yaml", "--width", "0.125", "--data", data,
             "-o", tmp_path / "run", "--epochs", "1", "--imgsz", "64", "--batch", "8", "--workers", "0",
             "--max-map-drop", "100", "--json", "-")
    assert p.returncode == 0, p.stderr[-3000:]
    doc = json.loads(p.stdout)
    assert doc["written"] is True and doc["variant"] == "onnx-distilled-fp32", doc
    variant = _manifest_variants(bundle)[doc["variant"]]
    assert variant["training"]["method"] == "distill" and variant["training"]["teacher"] == str(demo_pt)


@pytest.mark.slow
def test_qat_json_on_stdout_and_the_variant_in_the_bundle(tiny: tuple[Path, Path], demo_pt: Path, tmp_path: Path) -> None:
    src, data = tiny
    bundle = tmp_path / "b.cvd"
    shutil.copytree(src, bundle)
    p = _run("qat", bundle, "--model", demo_pt, "--data", data, "-o", tmp_path / "run", "--train-images", "16",
             "--epochs", "1", "--calib-images", "4", "--val-images", "4", "--max-map-drop", "100", "--json", "-",
             "--calib-method", "percentile", "--openvino")
    assert p.returncode == 0, p.stderr[-3000:]
    record = json.loads(p.stdout)  # the training record alone on stdout; the variant table went to stderr
    assert record["epochs"] == 1 and record["train_images"] == 16
    # started from the percentile PTQ graph's scales; the graph got the trained ranges (checked tensor by tensor)
    assert record["config"]["calib_method"] == "percentile" and record["ranges"]["trained"] is True
    # the same QDQ graph as OpenVINO IR, verified against the same fake-quantized torch model
    assert record["openvino"]["written"] is True, record["openvino"]
    ov = _manifest_variants(bundle)["openvino-qat-int8"]
    assert ov["engine"] == "openvino" and ov["file"].endswith(".xml") and ov["parity"]["passed"]
    assert any(c.endswith(".bin") for c in ov["companions"]) and "map50_95" in ov["metrics"]
    variant = _manifest_variants(bundle)["onnx-qat-int8"]
    assert variant["precision"] == "int8" and variant["training"]["epochs"] == 1
    assert "onnx-qat-int8" in p.stderr  # the variants table, on stderr
