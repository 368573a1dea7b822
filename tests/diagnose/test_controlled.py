"""Controlled-dataset comparison: figures consistent with evaluate/coco.py and with COCO's own identities, and a variant
with one class hurt (a real ONNX graph whose score channel for that class is scaled down) named by its worst class."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cvdeploy.bundle.bundle import Bundle, sha256_file
from cvdeploy.bundle.manifest import Variant
from cvdeploy.diagnose.controlled import (
    COCO_AREAS,
    MIN_SLICE_LABELS,
    Breakdown,
    ControlledReport,
    Score,
    coco_breakdown,
    compare_breakdowns,
    controlled_report,
    findings_of,
)
from cvdeploy.errors import InputError
from cvdeploy.evaluate.coco import evaluate_detect, load_yolo_split
from cvdeploy.predict import Predictor

HURT_CLASS = 3  # "star": 39 labels in shapes_data, enough for a serious verdict
HURT_SCALE = 0.05


def _hurt_copy(src: Path, dest: Path, class_id: int, scale: float) -> Path:
    """A copy of the bundle with a variant "onnx-hurt": onnx-fp32 whose class `class_id` score channel is multiplied by
    `scale` (a Mul node appended to the graph's output), hashed into the manifest like any variant."""
    import onnx
    from onnx import helper, numpy_helper

    shutil.copytree(src, dest)
    model = onnx.load(str(dest / "variants" / "onnx-fp32.onnx"))
    out = model.graph.output[0].name
    for node in model.graph.node:
        node.output[:] = [f"{out}_unscaled" if o == out else o for o in node.output]
    nc = len(Bundle.load(dest).names)
    factors = np.ones((1, 4 + nc, 1), np.float32)  # rows: 4 box coordinates, then one score per class
    factors[0, 4 + class_id, 0] = scale
    model.graph.initializer.append(numpy_helper.from_array(factors, "class_factors"))
    model.graph.node.append(helper.make_node("Mul", [f"{out}_unscaled", "class_factors"], [out], name="hurt_class"))
    onnx.checker.check_model(model)
    target = dest / "variants" / "onnx-hurt.onnx"
    onnx.save(model, str(target))
    bundle = Bundle.load(dest)
    bundle.manifest.variants["onnx-hurt"] = Variant(file="variants/onnx-hurt.onnx", sha256=sha256_file(target),
                                                    size_bytes=target.stat().st_size)
    bundle.save_manifest()
    return dest


@pytest.fixture(scope="module")
def hurt_bundle(demo_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _hurt_copy(demo_bundle, tmp_path_factory.mktemp("hurt") / "hurt.cvd", HURT_CLASS, HURT_SCALE)


@pytest.fixture(scope="module")
def report(hurt_bundle: Path, shapes_data: Path) -> ControlledReport:
    return controlled_report(hurt_bundle, shapes_data / "data.yaml")


def test_the_overall_figures_are_evaluate_coco_s(report: ControlledReport, hurt_bundle: Path, shapes_data: Path) -> None:
    with Predictor(hurt_bundle, "onnx-fp32") as p:
        m = evaluate_detect(p, shapes_data / "data.yaml")
    src = report.source_scores
    assert report.source == "onnx-fp32" and src.images == m.images == 60 and src.overall.labels == m.instances
    assert src.overall.map50_95 == m.map50_95 and src.overall.map50 == m.map50  # the same protocol on the same boxes
    assert 0.3 < m.map50_95 < 1.0  # a set the demo model detects: the comparisons below mean something


def test_per_class_and_per_bucket_figures_obey_coco_s_identities(report: ControlledReport, shapes_data: Path) -> None:
    src = report.source_scores
    gt, _ = load_yolo_split(shapes_data / "data.yaml", "val")
    classes = np.concatenate([g.class_id for g in gt])
    assert {k: s.labels for k, s in src.per_class.items()} == {k: int((classes == k).sum()) for k in range(6)}
    assert all(s.labels > 0 for s in src.per_class.values())  # every class has labels here ...
    for s in [*src.per_class.values(), *src.per_bucket.values()]:
        assert s.map50_95 is not None and s.map50 is not None and 0.0 <= s.map50_95 <= s.map50 <= 1.0
    # ... so COCO's overall AP (the mean of its precision entries over every category with labels) is the per-class mean.
    assert abs(np.mean([s.map50_95 for s in src.per_class.values()]) - src.overall.map50_95) < 1e-9  # type: ignore[arg-type]
    assert abs(np.mean([s.map50 for s in src.per_class.values()]) - src.overall.map50) < 1e-9  # type: ignore[arg-type]
    areas = np.concatenate([(g.xyxy[:, 2] - g.xyxy[:, 0]) * (g.xyxy[:, 3] - g.xyxy[:, 1]) for g in gt])
    assert [src.per_bucket[b].labels for b in COCO_AREAS] == [int(((areas >= lo) & (areas <= hi)).sum()) for lo, hi in COCO_AREAS.values()]
    assert sum(s.labels for s in src.per_bucket.values()) == src.overall.labels  # no box sits exactly on 32² or 96² here
    assert min(s.labels for s in src.per_bucket.values()) >= MIN_SLICE_LABELS  # COCO's buckets suit the shapes sizes


def test_the_hurt_class_is_named_worst_and_serious(report: ControlledReport) -> None:
    hurt = report.variant("onnx-hurt")
    star = report.names[HURT_CLASS]
    assert report.worst_class("onnx-hurt") == star
    assert hurt.worst_classes()[0] == HURT_CLASS
    assert hurt.delta_class[HURT_CLASS] is not None and hurt.delta_class[HURT_CLASS] < -5.0  # type: ignore[operator]
    # The other classes' own scores are untouched: what they lose or gain comes only from boxes the hurt class gave up.
    assert all(abs(d) < abs(hurt.delta_class[HURT_CLASS]) / 3 for k, d in hurt.delta_class.items() if k != HURT_CLASS)  # type: ignore[arg-type]
    named = [f for f in report.serious if f.variant == "onnx-hurt" and f"points on class {star!r}" in f.message]
    assert named and "39 labels" in named[0].message and named[0].fix
    assert report.serious[0].variant == "onnx-hurt"  # findings are ranked, serious first
    assert [v.name for v in report.variants] == ["onnx-hurt"] and not report.skipped


def test_a_class_loss_the_overall_budget_hides_is_still_serious(hurt_bundle: Path, shapes_data: Path) -> None:
    """With a budget the overall loss keeps to, the class loss is the only verdict, and it says what the mAP hides."""
    r = controlled_report(hurt_bundle, shapes_data / "data.yaml", max_map_drop=10.0)
    hurt = r.variant("onnx-hurt")
    assert -hurt.delta_overall < 10.0
    (finding,) = [f for f in r.serious if f"points on class {r.names[HURT_CLASS]!r}" in f.message]
    assert "hides" in finding.message
    assert not [f for f in r.serious if "overall (" in f.message]  # no over-budget finding
    loose = controlled_report(hurt_bundle, shapes_data / "data.yaml", max_map_drop=10.0, max_slice_drop=50.0)
    assert not loose.serious and [f.severity for f in loose.findings] == ["ok"]  # the thresholds are what decide


def test_a_loss_on_few_labels_is_a_warning_not_a_verdict() -> None:
    """The rule alone, on given figures: the same 20-point class loss is serious on 10 labels and a warning on 9."""

    def breakdown(ap_rare: float, rare_labels: int) -> Breakdown:
        per_class = {0: Score(0.7, 0.9, 200), 1: Score(ap_rare, 0.9, rare_labels)}
        return Breakdown(Score(0.7, 0.9, 200 + rare_labels), per_class, {"all sizes": Score(0.7, 0.9, 200 + rare_labels)}, 50)

    for labels, severity in ((MIN_SLICE_LABELS, "serious"), (MIN_SLICE_LABELS - 1, "warning")):
        v = compare_breakdowns("onnx-int8", "int8", breakdown(0.5, labels), breakdown(0.7, labels))
        (f,) = findings_of(v, breakdown(0.7, labels), {0: "common", 1: "rare"}, source_name="onnx-fp32",
                           max_map_drop=1.0, max_slice_drop=3.0)
        assert f.severity == severity and "points on class 'rare'" in f.message and "hides" in f.message
        assert ("calibration images" in f.fix) == (severity == "serious")  # an INT8 fix, only for a verdict


def test_to_dict_and_table(report: ControlledReport) -> None:
    d = json.loads(json.dumps(report.to_dict()))  # plain JSON types all the way down
    star = report.names[HURT_CLASS]
    v = d["variants"]["onnx-hurt"]
    assert v["worst_classes"][0] == star and v["delta_points"]["per_class"][star] < -5.0
    assert set(v["per_bucket"]) == set(COCO_AREAS) and set(d["source_scores"]["per_class"]) == set(report.names.values())
    assert d["source_scores"]["overall"]["map50_95"] == round(report.source_scores.overall.map50_95, 4)  # type: ignore[arg-type]
    assert any(f["severity"] == "serious" for f in d["findings"])
    text = report.table()
    assert f"class {star}" in text and "size small" in text and "onnx-hurt" in text
    row = next(line for line in text.splitlines() if line.startswith(f"class {star} "))
    assert f"({v['delta_points']['per_class'][star]:+.1f})" in row
    assert f"worst for onnx-hurt: class {star}" in text


def test_the_source_pt_through_ultralytics_agrees_with_onnx_fp32(hurt_bundle: Path, shapes_data: Path, demo_pt: Path) -> None:
    r = controlled_report(hurt_bundle, shapes_data / "data.yaml", source_pt=demo_pt, variants=["onnx-fp32"])
    assert r.source == f"torch ({demo_pt.name})"
    fp32 = r.variant("onnx-fp32")
    assert abs(fp32.delta_overall) < 0.1 and fp32.worst_classes() == [] and [f.severity for f in r.findings] == ["ok"]


def test_an_empty_prediction_set_scores_zero_where_there_are_labels(shapes_data: Path) -> None:
    gt, _ = load_yolo_split(shapes_data / "data.yaml", "val")
    empty = [(np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64)) for _ in gt]
    b = coco_breakdown(gt, empty, nc=7)  # a seventh class without labels
    assert b.overall.map50_95 == 0.0 and b.per_class[0].map50_95 == 0.0
    assert b.per_class[6].map50_95 is None and b.per_class[6].labels == 0


def test_bad_requests_are_refused_with_a_message(hurt_bundle: Path, shapes_data: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="has no variant onnx-int8"):
        controlled_report(hurt_bundle, shapes_data / "data.yaml", variants=["onnx-int8"])
    with pytest.raises(InputError, match="budgets must be >= 0"):
        controlled_report(hurt_bundle, shapes_data / "data.yaml", max_slice_drop=-1)
    with pytest.raises(InputError, match="size bucket 'tiny'"):
        controlled_report(hurt_bundle, shapes_data / "data.yaml", area_ranges={"tiny": (10.0, 5.0)})
    renamed = tmp_path / "data.yaml"
    renamed.write_text((shapes_data / "data.yaml").read_text().replace("3: star", "3: asterisk"))  # its path: is absolute
    with pytest.raises(InputError, match="names its classes otherwise"):
        controlled_report(hurt_bundle, renamed)
