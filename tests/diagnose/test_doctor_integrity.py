"""The doctor against an FP16 overflow injected into a copy of the graph (issue 13): a bundle whose onnx-fp16 was made
from a graph that computes the same in FP32 but overflows FP16 in one layer. Golden parity fails for onnx-fp16; the
top finding names the injected layer (integrity step), not only the failed parity (environment step)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cvdeploy.diagnose.doctor import diagnose


@pytest.fixture(scope="module")
def overflowing(demo_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    from cvdeploy.build.quantize import convert_fp16
    from cvdeploy.build.variants import add_variants
    from cvdeploy.bundle.bundle import Bundle, sha256_file
    from cvdeploy.diagnose.bisect import inject_fp16_overflow

    root = tmp_path_factory.mktemp("overflow")
    copy = root / "demo.cvd"
    shutil.copytree(demo_bundle, copy)
    assert {o.name: o for o in add_variants(copy, ["onnx-fp16"])}["onnx-fp16"].written
    b = Bundle.load(copy)
    fp32, fp16 = b.variant_path("onnx-fp32"), b.variant_path("onnx-fp16")
    # The model itself has a layer whose values exceed FP16's range (FP32 computes it fine), and its fp16 variant was
    # converted from it: the bundle was shipped like that, its hashes hold.
    fault = inject_fp16_overflow(fp32, root / "injected-fp32.onnx")
    shutil.copyfile(root / "injected-fp32.onnx", fp32)
    convert_fp16(fp32, fp16)
    for name, path in (("onnx-fp32", fp32), ("onnx-fp16", fp16)):
        v = b.manifest.variants[name]
        v.sha256, v.size_bytes = sha256_file(path), path.stat().st_size
    b.save_manifest()
    return copy, fault.node


@pytest.mark.slow
def test_an_fp16_overflow_is_named_by_its_layer(overflowing: tuple[Path, str], tmp_path: Path) -> None:
    bundle, node = overflowing
    report = diagnose(bundle, speed=False)
    top = report.top
    assert top is not None and (top.severity, top.step) == ("serious", "integrity"), [f.to_dict() for f in report.findings[:3]]
    assert top.evidence["variant"] == "onnx-fp16" and top.evidence["node"] == node and top.evidence["op"] == "Mul"
    assert node in top.message and "float32" in top.fix
    assert any(f.step == "environment" and f.severity == "serious" and "onnx-fp16" in f.message for f in report.findings)
    section = report.sections["integrity"]["divergences"][0]
    assert section["candidate"] == "onnx-fp16" and section["profile"]  # the per-node profile the HTML report plots

    from cvdeploy.report.doctor_html import doctor_report

    page = doctor_report(report)
    assert "Export integrity" in page and "<polyline" in page and node in page


@pytest.mark.slow
def test_a_reference_model_that_matches_gives_no_divergence(demo_bundle: Path) -> None:
    report = diagnose(demo_bundle, reference=demo_bundle / "variants" / "onnx-fp32.onnx", speed=False)
    assert report.steps_run[:2] == ["environment", "integrity"]
    assert [f.severity for f in report.findings if f.step == "integrity"] == ["ok"]
    assert not report.serious
