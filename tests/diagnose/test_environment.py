"""Environment diff: a bundle whose build record names another engine or OpenCV version gets that version named first;
a clean bundle gets no warning; CPU flags and precision are judged from injected facts, never the real CPU."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cvdeploy.bundle import Bundle
from cvdeploy.bundle.bundle import read_golden, sha256_file, write_golden
from cvdeploy.bundle.manifest import Manifest, OutputParity, ParityReport, Variant
from cvdeploy.diagnose.environment import (
    Cores,
    Finding,
    compare_environment,
    diagnose_environment,
    rank,
    thread_settings,
    version_change,
)
from cvdeploy.evaluate.verify import VariantCheck

VERSION_TOPICS = {"onnxruntime", "openvino", "opencv-python-headless", "opencv-python", "numpy", "cvdeploy", "python"}
VNNI_CPU = ["sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"]


def _serious_or_warning(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity in ("serious", "warning")]


@pytest.fixture()
def rewrite(demo_bundle: Path, tmp_path: Path) -> Callable[..., Path]:
    """A copy of the demo bundle whose manifest is changed through the project's own writer (so it still loads)."""

    def make(packages: dict[str, str] | None = None, golden_shift: float = 0.0) -> Path:
        root = tmp_path / "seeded.cvd"
        shutil.copytree(demo_bundle, root)
        bundle = Bundle.load(root)
        m = bundle.manifest
        if packages:
            env = json.loads(json.dumps(m.environment))
            env["packages"].update(packages)
            m.environment = env
        if golden_shift:  # the stored expected outputs move: parity fails here, for real
            for case in m.golden:
                inputs, outputs = read_golden(root / case.file)
                shifted = {k: v.copy() for k, v in outputs.items()}
                for v in shifted.values():
                    v[:, 4:] += golden_shift  # class-score channels (detect: 4 box rows first)
                write_golden(root / case.file, inputs, shifted)
                case.sha256 = sha256_file(root / case.file)
        bundle.save_manifest()
        Bundle.load(root)  # hashes and content hash still hold: only the record differs
        return root

    return make


# -- pure pieces -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("built", "here", "level"), [
    ("1.14.1", "1.23.0", "minor"), ("1.23.0", "1.23.2", "patch"), ("1.23.2", "2.0.0", "major"),
    ("4.10.0.84", "4.10.0.86", "patch"), ("2.14.1", "2.14.1+cu130", "build"), ("1.23.2", "1.23.2", None),
    ("2024.4.0", "2025.1.0", "major"), (None, "1.0", "added"), ("1.0", None, "removed"), ("nightly", "1.0", "major"),
])
def test_version_change(built: str | None, here: str | None, level: str | None) -> None:
    assert version_change(built, here) == level


def test_cores_and_threads_from_injected_facts() -> None:
    container = Cores(logical=64, physical=32, affinity=64, quota=1.5)
    assert container.usable == 2
    default = thread_settings("onnxruntime", 0, "engine default", cores=container, environ={"OMP_NUM_THREADS": "8"})
    assert default.effective == 32 and default.oversubscribed  # ORT's default does not see the quota
    assert default.variables == {"OMP_NUM_THREADS": "8"}
    assert "32 here" in default.describe()
    pinned = thread_settings("onnxruntime", 2, "asked for", cores=container, environ={})
    assert pinned.effective == 2 and not pinned.oversubscribed


def test_rank_orders_by_severity_then_likelihood() -> None:
    fs = [Finding("info", "low", "a", ""), Finding("warning", "medium", "b", ""), Finding("warning", "high", "c", ""),
          Finding("serious", "medium", "d", ""), Finding("ok", "none", "e", "")]
    assert [f.topic for f in rank(fs)] == ["d", "c", "b", "a", "e"]


# -- the real bundle, seeded faults ------------------------------------------------------------------


def test_clean_bundle_gives_no_warning(demo_bundle: Path) -> None:
    report = diagnose_environment(demo_bundle)
    assert _serious_or_warning(report.findings) == [], [f.message for f in report.findings]
    parity = [f for f in report.findings if f.topic == "parity"]
    assert parity and parity[0].severity == "ok" and report.served in parity[0].message
    assert any(f.topic == "threads" for f in report.findings)
    json.dumps(report.to_dict())  # what the doctor's --json writes


def test_old_onnxruntime_record_is_the_top_finding(rewrite: Callable[..., Path]) -> None:
    import onnxruntime

    report = diagnose_environment(rewrite({"onnxruntime": "1.14.1"}))
    top = report.top
    assert top is not None and top.topic == "onnxruntime"
    assert "1.14.1" in top.message and onnxruntime.__version__ in top.message
    assert top.likelihood == "high" and top.severity == "warning"  # parity still holds here: a warning, not serious
    assert "parity holds" in top.message
    assert top.evidence["built"] == "1.14.1" and top.evidence["variants"] == [report.served]
    assert "cvdeploy verify" in top.fix


def test_old_opencv_record_is_the_top_finding(rewrite: Callable[..., Path], demo_bundle: Path) -> None:
    recorded = Bundle.load(demo_bundle).manifest.environment["packages"]
    wheels = [p for p in ("opencv-python-headless", "opencv-python") if p in recorded]  # type: ignore[operator]
    assert wheels
    report = diagnose_environment(rewrite(dict.fromkeys(wheels, "4.8.0.76")))
    top = report.top
    assert top is not None and top.topic in wheels
    assert "4.8.0.76" in top.message and recorded[top.topic] in top.message  # type: ignore[index]
    assert top.likelihood == "medium" and top.severity == "warning"
    assert "cannot see it" in top.message  # golden parity starts from tensors: it cannot clear a preprocessing library


def test_parity_failure_names_the_version_as_likely_cause(rewrite: Callable[..., Path]) -> None:
    report = diagnose_environment(rewrite({"onnxruntime": "1.14.1"}, golden_shift=0.5))
    top = report.top
    assert top is not None and top.severity == "serious" and top.topic == "onnxruntime"
    assert "1.14.1" in top.message and "fails" in top.message
    parity = [f for f in report.findings if f.topic == "parity"]
    assert parity and parity[0].severity == "serious"
    assert "likely cause: onnxruntime 1.14.1" in parity[0].message and parity[0].evidence["cause"] == "onnxruntime"


def test_parity_failure_without_a_difference_says_so(rewrite: Callable[..., Path]) -> None:
    report = diagnose_environment(rewrite(golden_shift=0.5))
    top = report.top
    assert top is not None and top.severity == "serious" and top.topic == "parity"
    assert "no recorded difference" in top.message and top.evidence["cause"] is None
    assert not [f for f in report.findings if f.topic in VERSION_TOPICS and f.severity != "info"]


# -- injected CPU flags and precisions -------------------------------------------------------------


def _manifest(demo_bundle: Path, **variants: Variant) -> Manifest:
    m = Bundle.load(demo_bundle).manifest.model_copy(deep=True)
    m.variants.update(variants)
    env = json.loads(json.dumps(m.environment))
    env["cpu"] = {"model": "Build CPU", "machine": "x86_64", "logical_cpus": 8, "flags": VNNI_CPU}
    m.environment = env
    return m


def _parity(precision: str | None = None, provider: str | None = "CPUExecutionProvider") -> ParityReport:
    return ParityReport(reference="torch", tolerance_scores=0.25, passed=True, provider=provider, engine_precision=precision,
                        outputs={"output0": OutputParity(max_abs=0.05, mean_abs=0.001, max_rel=0.1, max_abs_scores=0.04)})


def _int8() -> Variant:
    return Variant(file="variants/onnx-int8.onnx", precision="int8", sha256="0" * 64, size_bytes=1, parity=_parity(),
                   quantization={"recipe": "u8s8", "reduce_range": False})


def _check(name: str, *, ok: bool = True, precision: str | None = None, provider: str = "CPUExecutionProvider") -> VariantCheck:
    c = VariantCheck(name, provider, 0.3 if not ok else 0.04, 0.04, 0.25, 0.7 if not ok else 1.0, engine_precision=precision)
    if not ok:
        c.problems.append("class scores differ by 0.3 > tolerance 0.25")
    return c


def _here(manifest: Manifest, flags: list[str], **packages: str) -> dict[str, Any]:
    env = json.loads(json.dumps(manifest.environment))
    env["cpu"] = {"model": "Serving CPU", "machine": "x86_64", "logical_cpus": 8, "flags": flags}
    env["packages"].update(packages)
    return env


def test_vnni_lost_under_served_int8_is_high(demo_bundle: Path) -> None:
    m = _manifest(demo_bundle, **{"onnx-int8": _int8()})
    here = _here(m, [f for f in VNNI_CPU if f != "avx512_vnni"])
    holds = compare_environment(m, here, [_check("onnx-fp32"), _check("onnx-int8")], served="onnx-int8")
    top = holds[0]
    assert top.topic == "cpu-flags" and top.severity == "warning" and top.likelihood == "high"
    assert "avx512_vnni" in top.message and "onnx-int8" in top.message and "saturate" in top.message
    fails = compare_environment(m, here, [_check("onnx-fp32"), _check("onnx-int8", ok=False)], served="onnx-int8")
    assert fails[0].severity == "serious" and fails[0].topic == "cpu-flags"
    parity = next(f for f in fails if f.topic == "parity" and f.severity == "serious")
    assert "avx512_vnni lost under an INT8 variant" in parity.message
    # the same CPU change under FP32 alone is a note, not a warning
    fp32_only = _manifest(demo_bundle)
    notes = compare_environment(fp32_only, _here(fp32_only, [f for f in VNNI_CPU if f != "avx512_vnni"]),
                                [_check("onnx-fp32")], served="onnx-fp32")
    assert _serious_or_warning(notes) == []
    cpu = next(f for f in notes if f.topic == "cpu")
    assert "avx512_vnni" in cpu.message and cpu.severity == "info"


def test_precision_and_engine_of_an_unserved_variant(demo_bundle: Path) -> None:
    ov = Variant(file="variants/openvino-fp32/model.xml", format="openvino", engine="openvino", sha256="0" * 64,
                 size_bytes=1, parity=_parity("f32", provider="OpenVINO CPU (latency)"))
    m = _manifest(demo_bundle, **{"openvino-fp32": ov})
    built_ov = m.environment["packages"].get("openvino", "2024.4.0")  # type: ignore[union-attr]
    m.environment["packages"]["openvino"] = built_ov  # type: ignore[index]
    here = _here(m, VNNI_CPU, openvino="1999.1.0")
    checks = [_check("onnx-fp32"), _check("openvino-fp32", precision="bf16", provider="OpenVINO CPU (latency)")]
    out = compare_environment(m, here, checks, served="onnx-fp32")
    precision = next(f for f in out if f.topic == "precision")
    assert precision.likelihood == "high" and precision.severity == "warning"
    assert "bf16" in precision.message and "f32" in precision.message
    engine = next(f for f in out if f.topic == "openvino")
    assert engine.likelihood == "medium" and "not the served variant" in engine.message
    assert out[0] is precision  # high before medium


def test_provider_change_only_for_onnxruntime_variants(demo_bundle: Path) -> None:
    ov = Variant(file="variants/openvino-fp32/model.xml", format="openvino", engine="openvino", sha256="0" * 64,
                 size_bytes=1, parity=_parity("f32", provider="OpenVINO CPU (latency)"))
    m = _manifest(demo_bundle, **{"onnx-int8": _int8(), "openvino-fp32": ov})
    # verify reports ONNX Runtime's provider for every variant, OpenVINO's included: no false provider change
    checks = [_check("onnx-int8", provider="CUDAExecutionProvider"),
              _check("openvino-fp32", precision="f32", provider="CUDAExecutionProvider")]
    out = compare_environment(m, _here(m, VNNI_CPU), checks, served="onnx-int8")
    providers = [f for f in out if f.topic == "provider"]
    assert [f.evidence["variant"] for f in providers] == ["onnx-int8"]
    assert providers[0].likelihood == "high" and "CUDAExecutionProvider" in providers[0].message


def test_opencv_wheel_swapped_is_compared_by_version(demo_bundle: Path) -> None:
    m = _manifest(demo_bundle)
    m.environment["packages"] = {"opencv-python-headless": "4.8.0.76"}  # type: ignore[index]
    here = _here(m, VNNI_CPU)
    here["packages"] = {"opencv-python": "4.10.0.84"}
    top = compare_environment(m, here, [_check("onnx-fp32")], served="onnx-fp32")[0]
    assert top.topic == "opencv-python" and top.likelihood == "medium"
    assert "opencv-python-headless -> opencv-python 4.8.0.76 at build, 4.10.0.84 here" in top.message
    here["packages"] = {"opencv-python": "4.8.0.76"}  # the other wheel, same OpenCV: nothing to say
    assert not [f for f in compare_environment(m, here, [_check("onnx-fp32")], served="onnx-fp32")
                if f.topic.startswith("opencv")]
