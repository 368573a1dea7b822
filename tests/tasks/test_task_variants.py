"""Issue 14: each task's bundle (segment, pose, obb, classify) takes onnx-fp16 and onnx-int8 variants with --data, each
verified (golden parity of every output, and a budget of 1 point on the task's own figure: mask, keypoint or
rotated-box mAP50-95, top-1), and `cvdeploy verify --data` re-measures that figure for every variant.

Small on purpose: the packaged demo models at 160 px (classify: 128), 16 calibration images, a 30-image val split,
one INT8 recipe (u8s8-w7: exact on every x86-64 CPU), latencies injected (timing is not what is tested here).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cvdeploy.build.variants import add_variants
from cvdeploy.bundle.bundle import Bundle
from cvdeploy.evaluate.verify import verify_bundle

SIZES = {"segment": 160, "pose": 160, "obb": 160, "classify": 128}
FIGURE = {"segment": ("map50_95", "mask mAP50-95", "mask_map50_95"), "pose": ("map50_95", "keypoint mAP50-95", "pose_map50_95"),
          "obb": ("map50_95", "rotated-box mAP50-95", "map50_95"), "classify": ("top1", "top-1", "top1")}

pytestmark = pytest.mark.slow  # builds four bundles and quantizes them: about 2 minutes on 2 cores


def _fake_ms(label: str, call: object) -> float:
    return {"onnx-fp32": 10.0, "onnx-fp16": 12.0}.get(label, 8.0)


@pytest.fixture(scope="module", params=list(SIZES))
def task_bundle(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path, list]:
    from cvdeploy.build import build_bundle
    from cvdeploy.demo import TASK_MODELS
    from cvdeploy.demo.shapes import generate_shapes

    task = request.param
    work = tmp_path_factory.mktemp(f"variants-{task}")
    data = generate_shapes(work / "data", n_train=16 if task != "classify" else 18, n_val=30, seed=5, task=task)
    bundle = build_bundle(TASK_MODELS[task], work / f"{task}.cvd", imgsz=SIZES[task]).root
    assert bundle is not None
    outcomes = add_variants(bundle, ["onnx-fp16", "onnx-int8"], data=data, calib_images=16, int8_recipes=["u8s8-w7"],
                            timer=_fake_ms)
    return task, bundle, Path(data), outcomes


def test_fp32_fp16_and_int8_are_built_with_data_and_hold_the_task_budget(task_bundle: tuple[str, Path, Path, list]) -> None:
    task, bundle, _, outcomes = task_bundle
    assert [(o.name, o.written) for o in outcomes] == [("onnx-fp32", True), ("onnx-fp16", True), ("onnx-int8", True)], \
        [(o.name, o.reason, o.tried) for o in outcomes]
    m = Bundle.load(bundle).manifest  # every hash holds
    key, _, explicit = FIGURE[task]
    fp32 = m.variants["onnx-fp32"].metrics
    assert fp32[key] == fp32[explicit] and fp32[key] > (0.8 if task == "classify" else 0.2), fp32  # a model that works
    for name in ("onnx-fp16", "onnx-int8"):
        v = m.variants[name]
        assert v.parity is not None and v.parity.passed and set(v.parity.outputs) == {o.name for o in m.outputs}
        assert v.metrics[f"{key}_drop_points"] <= 1.0  # the default budget, in the task's figure
        assert v.metrics[f"{key}_drop_points"] == pytest.approx(100 * (fp32[key] - v.metrics[key]), abs=2e-3)
    if task == "classify":
        assert {"top1", "top5"} <= set(fp32) and "map50_95" not in fp32
    else:
        assert {"box_map50_95", "box_map50"} <= set(fp32) or task == "obb"
    q = m.variants["onnx-int8"].quantization
    assert q["head_in_float"] is True and q["calib_images"] == 16 and q["recipe"] == "u8s8-w7"
    # The drift baseline: every box task is profiled; a classifier is not (its predictions are not boxes).
    assert (m.profile is None) == (task == "classify")


def test_verify_with_data_remeasures_the_task_figure_of_every_variant(task_bundle: tuple[str, Path, Path, list]) -> None:
    task, bundle, data, _ = task_bundle
    key, label, _ = FIGURE[task]
    checks = verify_bundle(bundle, data=data)
    recorded = Bundle.load(bundle).manifest.variants
    assert [c.name for c in checks] == ["onnx-fp32", "onnx-fp16", "onnx-int8"]
    for c in checks:
        assert c.ok, c.problems
        assert c.metric == label and c.accuracy == pytest.approx(recorded[c.name].metrics[key], abs=1e-4)
        assert c.to_dict()["recorded_accuracy"] == recorded[c.name].metrics[key]


@pytest.mark.parametrize("task_bundle", ["classify"], indirect=True)  # the classifier, whose --data used to crash verify
def test_verify_cli_on_a_classifier_reports_top1_and_names_a_drift(task_bundle: tuple[str, Path, Path, list], tmp_path: Path) -> None:
    task, bundle, data, _ = task_bundle
    assert task == "classify"
    from cvdeploy.bundle.bundle import manifest_content_hash

    copy = tmp_path / "c.cvd"
    shutil.copytree(bundle, copy)

    def verify(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cvdeploy", "verify", str(copy), *extra], capture_output=True, text=True,
                              env={**os.environ, "COLUMNS": "200"}, timeout=300)

    ok = verify("--data", str(data), "--json", str(tmp_path / "v.json"))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "top-1 at build" in ok.stdout and "verified: 3 variant(s)" in ok.stdout
    doc = json.loads((tmp_path / "v.json").read_text())
    assert [c["metric"] for c in doc] == ["top-1"] * 3 and all(c["ok"] and c["accuracy"] > 0.8 for c in doc)
    m = json.loads((copy / "manifest.json").read_text())
    m["variants"]["onnx-int8"]["metrics"]["top1"] += 0.05  # the figure recorded at build is now 5 points better
    m["content_sha256"] = manifest_content_hash(m)
    (copy / "manifest.json").write_text(json.dumps(m))
    drifted = verify("--data", str(data))
    assert drifted.returncode == 1 and "onnx-int8: top-1" in drifted.stdout and "points below" in drifted.stdout
    assert drifted.stderr.strip() == "error: 1 of 3 variant(s) drifted: onnx-int8"
