"""`build_bundle`: the ONNX export matches torch on the golden inputs, and the build refuses bad requests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cvdeploy.bundle import Bundle
from cvdeploy.errors import InputError, ModelFormatError
from cvdeploy.runtime import OrtEngine


def test_onnx_matches_torch_on_golden_inputs_and_is_recorded(demo_bundle: Path) -> None:
    b = Bundle.load(demo_bundle)
    parity = b.manifest.variants["onnx-fp32"].parity
    assert parity is not None and parity.passed and parity.reference.startswith("torch")
    out = parity.outputs["output0"]
    assert out.max_abs_scores is not None and out.max_abs_scores <= 1e-3
    # Re-run the variant on the stored golden inputs: the recorded contract holds on this machine too.
    engine = OrtEngine(b.variant_path())
    for case in b.golden():
        got = engine.run({engine.inputs[0].name: case.input})["output0"]
        ref = case.outputs["output0"]
        assert np.abs(got[:, 4:] - ref[:, 4:]).max() <= 1e-3
        assert np.abs(got[:, :4] - ref[:, :4]).max() <= 0.05  # pixels


def test_exported_graph_has_dynamic_dims_and_no_nms(demo_bundle: Path) -> None:
    engine = OrtEngine(Bundle.load(demo_bundle).variant_path())
    assert engine.inputs[0].shape == (None, 3, None, None)
    assert [o.name for o in engine.outputs] == ["output0"]
    out = engine.run({"images": np.zeros((3, 3, 160, 320), np.float32)})["output0"]
    assert out.shape == (3, 10, (160 // 8) * (320 // 8) + (160 // 16) * (320 // 16) + (160 // 32) * (320 // 32))


def test_build_refuses_bad_requests(demo_pt: Path, demo_bundle: Path, tmp_path: Path) -> None:
    from cvdeploy.build import build_bundle

    with pytest.raises(InputError, match="already exists"):
        build_bundle(demo_pt, demo_bundle)
    with pytest.raises(InputError, match="not found"):
        build_bundle(tmp_path / "missing.pt", tmp_path / "x.cvd")
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"x")
    with pytest.raises(ModelFormatError, match=r"\.pt"):
        build_bundle(onnx, tmp_path / "x.cvd")
    with pytest.raises(InputError, match="multiple of 32"):
        build_bundle(demo_pt, tmp_path / "x.cvd", imgsz=100)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ModelFormatError, match="not an Ultralytics model"):
        build_bundle(garbage, tmp_path / "y.cvd")
    assert not (tmp_path / "x.cvd").exists() and not (tmp_path / "y.cvd").exists()
    assert not list(tmp_path.glob(".*-*"))  # no staging directory left behind


@pytest.mark.slow
def test_two_builds_of_the_same_model_give_the_same_onnx_bytes(demo_bundle: Path, demo_pt: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    # Another process (another hash seed, another clock): what varied between builds before.
    out = tmp_path / "again.cvd"
    p = subprocess.run([sys.executable, "-m", "cvdeploy", "build", str(demo_pt), "-o", str(out), "--name", "yolo11n-shapes"],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    again = Bundle.load(out)
    first = Bundle.load(demo_bundle).manifest.variants["onnx-fp32"]
    assert again.manifest.variants["onnx-fp32"].sha256 == first.sha256  # a rebuild can be checked against a published hash
    meta = OrtEngine(again.variant_path()).metadata
    assert meta["date"] != "" and meta["task"] == "detect"  # the checkpoint's date, not the export's clock
