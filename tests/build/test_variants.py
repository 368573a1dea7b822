"""Optimized variants: made, verified against the source, written with their figures, or refused with a reason."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from cvdeploy.build.variants import add_variants
from cvdeploy.bundle.bundle import Bundle
from cvdeploy.bundle.manifest import Variant
from cvdeploy.errors import BundleError, InputError
from cvdeploy.evaluate.parity import box_agreement
from cvdeploy.predict import Predictor, choose_variant


@pytest.fixture(scope="module")
def controlled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small controlled set: train images calibrate INT8, val images check the mAP."""
    from cvdeploy.demo.shapes import generate_shapes

    return generate_shapes(tmp_path_factory.mktemp("controlled"), n_train=24, n_val=40, seed=321)


@pytest.fixture(scope="module")
def with_variants(demo_bundle: Path, controlled: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    b = tmp_path_factory.mktemp("variants") / "v.cvd"
    shutil.copytree(demo_bundle, b)
    steps: list[tuple[str, str]] = []
    outcomes = add_variants(b, ["onnx-fp16", "onnx-int8", "openvino-fp32", "openvino-int8"], data=controlled, calib_images=16,
                            on_step=lambda v, s: steps.append((v, s)))
    return b, outcomes


ALL = ["onnx-fp32", "onnx-fp16", "onnx-int8", "openvino-fp32", "openvino-int8"]


def test_every_variant_is_verified_and_written_with_its_figures(with_variants: tuple[Path, list]) -> None:
    b, outcomes = with_variants
    assert [(o.name, o.written) for o in outcomes] == [(n, True) for n in ALL], [(o.name, o.reason, o.tried) for o in outcomes]
    m = Bundle.load(b).manifest  # hashes of the new files hold
    fp32, fp16, int8, ov32, ov8 = (m.variants[n] for n in ALL)
    assert fp32.metrics["map50_95"] > 0.3 and fp32.metrics["latency_ms_b1"] > 0  # a set the demo model detects well
    for v in (fp16, int8, ov32, ov8):
        assert v.parity is not None and v.parity.passed
        assert {"map50_95", "map50", "map50_95_drop_points", "latency_ms_b1", "box_agreement", "speedup_vs_fp32"} <= set(v.metrics)
        assert v.metrics["map50_95_drop_points"] <= 1.0  # the default budget held
        assert (b / v.file).is_file()
    assert fp16.precision == "fp16" and fp16.parity.outputs["output0"].max_abs_scores < 1e-2
    assert int8.precision == "int8" and int8.size_bytes < 0.4 * fp32.size_bytes
    q = int8.quantization
    assert q["head_in_float"] is True and q["calib_images"] == 16 and q["float_nodes"] > 0 and q["reason"]
    report = (b / "report.html").read_text()
    assert report.count("<circle") == 5 and all(f"<td>{n}" in report for n in ALL)  # the table and the plot
    assert ov32.engine == ov8.engine == "openvino" and ov32.file == "variants/openvino-fp32/model.xml"
    assert list(ov8.companions) == ["variants/openvino-int8/model.bin"] and ov8.quantization["tool"] == "nncf"
    assert ov32.parity.outputs["output0"].max_abs_scores < 1e-3  # the IR computes what the ONNX model does
    assert sorted(p.name for p in (b / "variants").iterdir()) == ["onnx-fp16.onnx", "onnx-fp32.onnx", "onnx-int8.onnx",
                                                                  "openvino-fp32", "openvino-int8"]  # nothing else left behind


def test_variants_run_in_the_predictor_and_agree_with_fp32(with_variants: tuple[Path, list], controlled: Path) -> None:
    b, _ = with_variants
    image = sorted((controlled.parent / "images" / "val").glob("*.jpg"))[0]
    ref = Predictor(b, "onnx-fp32").predict(image)
    for name in ALL[1:]:
        got = Predictor(b, name).predict(image)
        assert got.detections.class_id.tolist() == ref.detections.class_id.tolist() or len(ref.detections) == 0


def test_tampered_variant_is_refused_naming_it(with_variants: tuple[Path, list], tmp_path: Path) -> None:
    b, _ = with_variants
    copy = tmp_path / "t.cvd"
    shutil.copytree(b, copy)
    f = copy / "variants" / "onnx-int8.onnx"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"variant 'onnx-int8' file variants/onnx-int8.onnx does not match"):
        Bundle.load(copy)
    shutil.copyfile(b / "variants" / "onnx-int8.onnx", f)
    weights = copy / "variants" / "openvino-int8" / "model.bin"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(BundleError, match=r"variant 'openvino-int8' file variants/openvino-int8/model.bin does not match"):
        Bundle.load(copy)


def test_quantizing_the_head_is_caught_and_repaired_or_refused(demo_bundle: Path, controlled: Path, tmp_path: Path) -> None:
    b = tmp_path / "h.cvd"
    shutil.copytree(demo_bundle, b)
    (broken,) = [o for o in add_variants(b, ["onnx-int8"], data=controlled, calib_images=8, quantize_head=True, repair_rounds=0)
                 if o.name == "onnx-int8"]
    assert not broken.written and ("scores" in broken.reason or "mAP50-95 drops" in broken.reason or "boxes" in broken.reason)
    assert "onnx-int8" not in Bundle.load(b).manifest.variants and not (b / "variants" / "onnx-int8.onnx").exists()
    (repaired,) = [o for o in add_variants(b, ["onnx-int8"], data=controlled, calib_images=8, quantize_head=True, repair_rounds=3,
                                           layers_per_round=8) if o.name == "onnx-int8"]
    assert len(repaired.tried) >= 2 and "round 1" in repaired.tried[1]  # the guard moved layers back to float and retried
    if repaired.written:
        assert repaired.variant.metrics["map50_95_drop_points"] <= 1.0
    else:
        assert repaired.reason and len(repaired.tried) == 4


def test_bad_requests(demo_bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="unknown variant"):
        add_variants(demo_bundle, ["tflite-int8"])
    with pytest.raises(InputError, match="openvino-int8 needs --data"):
        add_variants(demo_bundle, ["openvino-int8"])
    with pytest.raises(InputError, match="needs --data"):
        add_variants(demo_bundle, ["onnx-int8"])


def test_box_agreement() -> None:
    import numpy as np

    out = np.zeros((4 + 2, 3), np.float32)
    out[:4, 0] = [50, 50, 20, 20]
    out[4, 0] = 0.9
    out[:4, 1] = [150, 150, 20, 20]
    out[5, 1] = 0.8
    assert box_agreement(out, out) == 1.0
    moved = out.copy()
    moved[0, 1] += 15  # one box shifted by most of its width
    assert box_agreement(out, moved) == 0.5
    assert box_agreement(np.zeros_like(out), np.zeros_like(out)) == 1.0


def test_the_predictor_picks_a_clearly_faster_verified_variant(demo_bundle: Path) -> None:
    b = Bundle.load(demo_bundle)
    m = b.manifest.model_copy(deep=True)
    fp32 = m.variants["onnx-fp32"]
    fp32.metrics["latency_ms_b1"] = 10.0
    m.variants["onnx-int8"] = Variant(file=fp32.file, precision="int8", sha256=fp32.sha256, size_bytes=1, parity=fp32.parity,
                                      metrics={"latency_ms_b1": 9.5})
    m.variants["onnx-fp16"] = Variant(file=fp32.file, precision="fp16", sha256=fp32.sha256, size_bytes=1, parity=fp32.parity,
                                      metrics={"latency_ms_b1": 1.0})
    bb = Bundle(m, b.root)
    assert choose_variant(bb, ["CPUExecutionProvider"]) == "onnx-fp32"  # 5 % faster is noise; fp16 is for GPUs
    m.variants["onnx-int8"].metrics["latency_ms_b1"] = 6.0
    assert choose_variant(bb, ["CPUExecutionProvider"]) == "onnx-int8"
    assert choose_variant(bb, ["CUDAExecutionProvider", "CPUExecutionProvider"]) == "onnx-fp16"
    assert Predictor(bb).variant == "onnx-int8"


def test_verify_passes_then_names_what_drifted(with_variants: tuple[Path, list], controlled: Path, tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    b, _ = with_variants
    copy = tmp_path / "c.cvd"
    shutil.copytree(b, copy)

    def verify(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cvdeploy", "verify", str(copy), *extra], capture_output=True, text=True,
                              env={**__import__("os").environ, "COLUMNS": "200"}, timeout=600)

    ok = verify("--data", str(controlled), "--json", str(tmp_path / "v.json"))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "verified: 5 variant(s)" in ok.stdout
    assert all(c["ok"] for c in json.loads((tmp_path / "v.json").read_text()))

    m = json.loads((copy / "manifest.json").read_text())  # the int8 figure recorded at build is now 5 points better
    m["variants"]["onnx-int8"]["metrics"]["map50_95"] += 0.05
    (copy / "manifest.json").write_text(json.dumps(m))
    drifted = verify("--data", str(controlled))
    assert drifted.returncode == 1 and "DRIFTED" in drifted.stdout
    assert "onnx-int8: mAP50-95" in drifted.stdout and "points below" in drifted.stdout
    assert drifted.stderr.strip() == "error: 1 of 5 variant(s) drifted: onnx-int8"

    f = copy / "variants" / "onnx-fp16.onnx"
    f.write_bytes(f.read_bytes()[:-10])
    tampered = verify()
    assert tampered.returncode == 1 and "variant 'onnx-fp16'" in tampered.stderr and "Traceback" not in tampered.stderr


def test_openvino_variants_can_be_tuned_and_profiled(with_variants: tuple[Path, list], tmp_path: Path) -> None:
    import numpy as np

    from cvdeploy.bench.profile import profile_openvino
    from cvdeploy.bench.tune import hint_from, tune
    from cvdeploy.runtime.openvino import OvOptions

    b, _ = with_variants
    copy = tmp_path / "t.cvd"
    shutil.copytree(b, copy)
    bundle = Bundle.load(copy)
    xml = bundle.variant_path("openvino-int8")
    x = np.random.default_rng(0).random((1, 3, 256, 256), dtype=np.float32)
    result = tune(xml, x, engine_kind="openvino", rounds=1, per_round=2, warmup=1,
                  space=[OvOptions(hint="THROUGHPUT"), OvOptions(num_threads=1)])
    assert len(result.trials) == 3 and result.default.options == OvOptions()
    bundle.manifest.runtime = [hint_from(result, "openvino-int8", batch=1, concurrency=1, cpu="test")]
    bundle.save_manifest()
    with Predictor(copy, "openvino-int8") as p:
        assert p.engine.options == result.best.options  # the Predictor applies the OpenVINO hint
    prof = profile_openvino(xml, {"images": x}, runs=2, warmup=1, trace_out=tmp_path / "ov.json")
    assert prof.nodes and sum(n.share for n in prof.nodes) == pytest.approx(1.0) and (tmp_path / "ov.json").is_file()


def test_bench_layers_sets_two_variants_side_by_side(with_variants: tuple[Path, list], tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cvdeploy", "bench", "layers", *args], capture_output=True, text=True,
                              timeout=300, env={**os.environ, "COLUMNS": "200"})

    b, _ = with_variants
    out = tmp_path / "layers.json"
    r = cli(str(b), "--rounds", "2", "--runs", "2", "--top", "5", "--json", str(out))
    assert r.returncode == 0, r.stderr
    assert "convolutions: onnx-int8 runs them" in r.stdout and "by kind of op" in r.stdout
    doc = json.loads(out.read_text())
    assert (doc["a"], doc["b"]) == ("onnx-fp32", "onnx-int8") and doc["precisions"]["onnx-int8"] == "int8"
    assert doc["rounds"] == 2 and len(doc["convolution_speedup_per_round"]) == 2
    assert doc["categories"]["convolution"][0] > 0 and doc["categories"]["convolution"][1] > 0
    assert doc["categories"]["quantize/dequantize"][0] == 0  # FP32 has no Q/DQ work; the INT8 graph may fuse all of it
    blocks = {row["layer"] for row in doc["layers"]}
    assert "/model.0" in blocks and "/model.23" in blocks  # nodes are matched through their Ultralytics blocks
    ov = cli(str(b), "--variants", "openvino-fp32,openvino-int8", "--rounds", "1", "--runs", "1")
    assert ov.returncode == 0 and "convolutions: openvino-int8" in ov.stdout, ov.stderr
    bad = cli(str(b), "--variants", "onnx-fp32,onnx-int4")
    assert bad.returncode != 0 and "no variant 'onnx-int4'" in bad.stderr
