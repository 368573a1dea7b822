"""A compressed model enters a bundle through `add_compressed_variant`: parity against its own torch model (stored
with the variant), mAP against onnx-fp32, latency with every variant, its training record in the manifest and the
report; a variant that fails a check leaves the bundle as it was. Real ONNX exports of real (pruned) YOLO11 models,
tiny data (64 px, 8 val images): behaviour, not accuracy."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("ultralytics")
pytest.importorskip("torch_pruning")

from cvdeploy.build.compress.common import (  # noqa: E402
    add_compressed_variant,
    own_golden,
    precision_of,
    save_checkpoint,
    training_record,
)
from cvdeploy.bundle.bundle import Bundle  # noqa: E402
from cvdeploy.errors import InputError  # noqa: E402

RECORD = {"method": "test", "data": "shapes seed 5", "epochs": 1, "seed": 0, "wall_time_s": 1.5}


def fixed_timer(label: str, call) -> float:  # injected latencies: the test is about what is recorded, not the clock
    return {"onnx-fp32": 10.0}.get(label, 5.0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, demo_pt: Path) -> tuple[Path, Path, Path]:
    """(bundle of the demo model at 64 px, data.yaml with 8 val images, a pruned copy of the model as .pt)."""
    from cvdeploy.build import build_bundle
    from cvdeploy.build.compress.common import load_torch_model
    from cvdeploy.build.compress.prune import prune
    from cvdeploy.demo.shapes import generate_shapes

    root = tmp_path_factory.mktemp("compress-common")
    data = generate_shapes(root / "data", n_train=0, n_val=8, seed=5)
    bundle = build_bundle(demo_pt, root / "tiny.cvd", imgsz=64, n_golden=1)
    pruned = prune(load_torch_model(demo_pt), imgsz=64, macs_ratio=0.8)
    return bundle.root, data, save_checkpoint(pruned.model, root / "pruned.pt", imgsz=64)


def test_names_say_the_precision_and_never_shadow_the_builds_variants() -> None:
    assert precision_of("onnx-pruned50-fp32") == "fp32"
    assert precision_of("onnx-qat-int8") == "int8"
    for bad in ("onnx-fp32", "onnx-int8", "pruned-fp32", "onnx-pruned50", "onnx-Pruned-fp32", "onnx-x-fp16"):
        with pytest.raises(InputError):
            precision_of(bad)


def test_a_pruned_model_enters_verified_against_its_own_torch_model(tiny: tuple[Path, Path, Path], tmp_path: Path) -> None:
    src, data, pruned = tiny
    b = tmp_path / "b.cvd"
    shutil.copytree(src, b)
    o = add_compressed_variant(b, "onnx-pruned20-fp32", pruned, training=RECORD, data=data, max_map_drop=100.0,
                               timer=fixed_timer)
    assert o.written, o.reason
    bundle = Bundle.load(b)  # every sha256 checked, the companions included
    v = bundle.manifest.variants["onnx-pruned20-fp32"]
    assert v.parity is not None and v.parity.passed and v.parity.reference.startswith("its own torch model")
    # Its golden outputs are its own, not the source's: the pruned model answers differently on the same inputs.
    own, source = next(own_golden(bundle, "onnx-pruned20-fp32").golden()), next(bundle.golden())
    assert (own.input == source.input).all()
    out = next(iter(source.outputs))
    assert abs(own.outputs[out] - source.outputs[out]).max() > 1e-2
    assert training_record(bundle, "onnx-pruned20-fp32") == RECORD
    assert {"map50_95", "map50_95_drop_points", "box_agreement"} <= set(v.metrics)
    assert v.metrics["latency_ms_b1"] == 5.0 and v.metrics["speedup_vs_fp32"] == 2.0  # the injected timer, all variants
    assert bundle.manifest.variants["onnx-fp32"].metrics["latency_ms_b1"] == 10.0
    report = (b / "report.html").read_text()
    assert "onnx-pruned20-fp32" in report and "shapes seed 5" in report


def test_a_variant_that_fails_a_check_leaves_the_bundle_as_it_was(tiny: tuple[Path, Path, Path], tmp_path: Path) -> None:
    src, data, pruned = tiny
    b = tmp_path / "b.cvd"
    shutil.copytree(src, b)
    before = (b / "manifest.json").read_bytes()
    # The source's ONNX does not compute what the pruned torch model computes: parity against its own model fails.
    o = add_compressed_variant(b, "onnx-pruned20-fp32", pruned, onnx=b / "variants" / "onnx-fp32.onnx", training=RECORD,
                               timer=fixed_timer)
    assert not o.written and o.reason.startswith("parity against its own torch model")
    # The pruned model, not fine-tuned, loses far more than a 1-point budget against onnx-fp32.
    o = add_compressed_variant(b, "onnx-pruned20-fp32", pruned, training=RECORD, data=data, max_map_drop=1.0,
                               timer=fixed_timer)
    assert not o.written and "mAP50-95 drops by" in o.reason, o.reason
    assert o.variant is not None and o.variant.metrics["map50_95_drop_points"] > 1.0
    assert not (b / "variants" / "onnx-pruned20-fp32.onnx").exists()
    assert not (b / "golden" / "onnx-pruned20-fp32").exists()
    assert not (b / "variants" / "onnx-pruned20-fp32.training.json").exists()
    manifest = json.loads((b / "manifest.json").read_text())
    assert "onnx-pruned20-fp32" not in manifest["variants"]
    assert json.loads(before)["variants"].keys() == manifest["variants"].keys()


def test_bad_input_fails_before_any_work(tiny: tuple[Path, Path, Path], tmp_path: Path) -> None:
    src, _, pruned = tiny
    with pytest.raises(InputError, match="onnx-<what>-fp32"):
        add_compressed_variant(src, "onnx-fp32", pruned, training=RECORD)
    with pytest.raises(TypeError):
        add_compressed_variant(src, "onnx-p-fp32", pruned, training={"not json": object()})
    with pytest.raises(InputError, match="not found"):
        add_compressed_variant(src, "onnx-p-fp32", tmp_path / "missing.pt", training=RECORD)
