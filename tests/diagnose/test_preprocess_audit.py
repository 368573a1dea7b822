"""Preprocessing audit: a simulated broken deployment is named from its field predictions; a correct one is not."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from PIL import Image

from cvdeploy.diagnose.preprocess_audit import (
    ALL,
    CORRECT,
    MISTAKES,
    Sample,
    audit_with_labels,
    audit_with_predictions,
    parse_field_predictions,
    resolve_mistakes,
    simulate_deployment,
)
from cvdeploy.errors import InputError
from cvdeploy.evaluate.coco import load_yolo_split
from cvdeploy.predict import Predictor
from cvdeploy.vision.letterbox import LetterboxSpec

N_IMAGES = 24  # enough for every candidate to leave its mark, few enough for 2 cores


@pytest.fixture(scope="module")
def predictor(demo_bundle: Path) -> Iterator[Predictor]:
    p = Predictor(demo_bundle)
    yield p
    p.close()


@pytest.fixture(scope="module")
def images(shapes_data: Path) -> list[Path]:
    paths = sorted((shapes_data / "images" / "val").glob("*.jpg"))[:N_IMAGES]
    assert len(paths) == N_IMAGES
    shapes = {cv2.imread(str(p)).shape[:2] for p in paths}
    assert any(h != w for h, w in shapes), "square_letterbox needs non-square images"
    return paths


def _as_server_json(field: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Through JSON, as recorded from the image API."""
    return json.loads(json.dumps(field))


def _print(report: Any) -> None:
    print("\n" + report.to_text())  # shown with -s; docs/preprocessing-audit.md quotes these tables


# -- the candidates themselves (no engine) ---------------------------------------------------------


def test_each_mistake_builds_the_input_that_deployment_would() -> None:
    spec = LetterboxSpec(imgsz=(256, 256))
    img = np.random.default_rng(0).integers(0, 256, (210, 320, 3), dtype=np.uint8)
    s = Sample(img)
    ref, ref_p = CORRECT.prepare(s, spec)
    assert ref.shape == (1, 3, 192, 256) and ref_p.top == 12 and ref.min() >= 0.0 and ref.max() <= 1.0
    out = {name: m.prepare(s, spec) for name, m in MISTAKES.items()}
    t, _ = out["bgr_rgb_swap"]
    np.testing.assert_array_equal(t[:, ::-1], ref)
    t, p = out["stretch_resize"]
    assert t.shape == (1, 3, 256, 256) and p.gain_xy == pytest.approx((256 / 320, 256 / 210)) and (p.top, p.left) == (0, 0)
    t, p = out["square_letterbox"]
    assert t.shape == (1, 3, 256, 256) and p.top == 44
    assert out["missing_normalization"][0].max() > 200 and np.allclose(out["missing_normalization"][0] / 255, ref)
    assert out["double_normalization"][0].max() <= 1 / 255 + 1e-9
    assert out["wrong_imgsz_large"][0].shape == (1, 3, 448, 640)
    assert out["wrong_imgsz_small"][0].shape == (1, 3, 96, 128)
    t, p = out["wrong_pad_value"]
    assert p == ref_p and not np.array_equal(t, ref)
    assert (t[0, :, : p.top] == 0).all() and (ref[0, :, : p.top] == 114 / 255).all()
    np.testing.assert_array_equal(out["exif_ignored"][0], ref)  # no file, no orientation: nothing to ignore
    # The explanation follows the bundle: a BGR model is fed RGB by this mistake.
    bgr_text, fix = MISTAKES["bgr_rgb_swap"].describe(replace(spec, channel_order="BGR"))
    assert "feeds RGB where the model was trained on BGR" in bgr_text and "COLOR_RGB2BGR" in fix


def test_mistake_names_are_resolved_and_unknown_ones_refused() -> None:
    assert [m.name for m in resolve_mistakes(["wrong_imgsz", "bgr_rgb_swap", "wrong_imgsz_small"])] == [
        "wrong_imgsz_large", "wrong_imgsz_small", "bgr_rgb_swap"]
    assert [m.name for m in resolve_mistakes(ALL)] == list(MISTAKES)
    with pytest.raises(InputError, match=r"unknown preprocessing mistake\(s\): rgb_swap, resize .*known: bgr_rgb_swap"):
        resolve_mistakes(["rgb_swap", "bgr_rgb_swap", "resize"])
    with pytest.raises(InputError, match="no candidate"):
        resolve_mistakes([])


def test_field_predictions_are_read_in_every_accepted_shape() -> None:
    server = {"model_name": "m", "image": {"height": 10, "width": 20},
              "detections": [{"box": {"x1": 1, "y1": 2, "x2": 5, "y2": 6}, "confidence": 0.9, "class_id": 2, "class_name": "x"}]}
    bare = [{"xyxy": [1, 2, 5, 6], "confidence": 0.9, "class_id": 2}]
    columns = {"xyxy": [[1, 2, 5, 6]], "confidence": [0.9], "class_id": [2]}
    parsed = parse_field_predictions({"predictions": [server, bare, columns, {"detections": []}]}, 4)
    for f in parsed[:3]:
        np.testing.assert_allclose(f.detections.xyxy, [[1, 2, 5, 6]])
        assert f.detections.class_id.tolist() == [2]
    assert parsed[0].shape == (10, 20) and parsed[1].shape is None and len(parsed[3].detections) == 0
    with pytest.raises(InputError, match=r"3 field prediction\(s\) for 2 image\(s\)"):
        parse_field_predictions([[], [], []], 2)
    with pytest.raises(InputError, match="field prediction 1, detection 0: needs a numeric 'confidence'"):
        parse_field_predictions([[], [{"box": {"x1": 0, "y1": 0, "x2": 1, "y2": 1}, "class_id": 0}]], 2)
    with pytest.raises(InputError, match="field prediction 0: expected the image API's answer"):
        parse_field_predictions([{"boxes": []}], 1)


# -- audit_with_predictions: the broken deployment is named --------------------------------------


@pytest.mark.parametrize("mistake", ["bgr_rgb_swap", "stretch_resize", "square_letterbox", "missing_normalization",
                                     "double_normalization", "wrong_imgsz_large", "wrong_imgsz_small", "wrong_pad_value"])
def test_field_predictions_of_a_broken_deployment_name_its_mistake(predictor: Predictor, images: list[Path], mistake: str) -> None:
    field = _as_server_json(simulate_deployment(predictor, images, mistake))
    report = audit_with_predictions(predictor, images, field)
    _print(report)
    assert report.cause == [mistake], report.verdict
    assert report.findings[0].mistake == mistake and not report.looks_right
    best = report.findings[0]
    assert best.score > 0.98 and best.evidence["box_f1"] > 0.98  # it reproduces the field, up to JSON rounding
    assert report.baseline.score < best.score - 0.02  # and the correct pipeline clearly does not
    assert f"reproduced by {mistake}" in report.verdict and best.fix in report.verdict
    assert "exif_ignored" in report.skipped  # plain files: nothing to rotate


def test_field_predictions_of_the_correct_pipeline_name_no_mistake(predictor: Predictor, images: list[Path]) -> None:
    calls: list[tuple[str, int, int]] = []
    field = _as_server_json(simulate_deployment(predictor, images))
    report = audit_with_predictions(predictor, images, field, on_progress=lambda *a: calls.append(a))
    _print(report)
    assert report.cause == [] and report.looks_right
    assert report.verdict.startswith("the preprocessing looks right")
    assert report.baseline.score > 0.99
    assert all(f.score < report.baseline.score - 0.02 for f in report.findings)
    assert [f.score for f in report.findings] == sorted((f.score for f in report.findings), reverse=True)
    assert calls[-1][1] == calls[-1][2] == N_IMAGES * (1 + len(ALL))  # skipped candidates count as done
    d = json.loads(json.dumps(report.to_dict()))
    assert d["looks_right"] and d["baseline"]["mistake"] == "correct" and len(d["findings"]) == len(report.findings)
    assert set(d["findings"][0]["evidence"]) >= {"agreement", "box_f1", "matched", "mean_iou", "mean_abs_dconf", "conf_corr",
                                                "dets_per_image", "images_changed"}


def _jitter(field: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """What another engine or precision does: confidences and box edges off by a little."""
    rng = np.random.default_rng(seed)
    field = copy.deepcopy(field)
    for f in field:
        for d in f["detections"]:
            d["confidence"] = float(np.clip(d["confidence"] + rng.normal(0, 0.01), 0, 1))
            d["box"] = {k: v + float(rng.normal(0, 0.7)) for k, v in d["box"].items()}
    return field


def test_engine_noise_neither_hides_a_mistake_nor_invents_one(predictor: Predictor, images: list[Path]) -> None:
    right = audit_with_predictions(predictor, images, _jitter(simulate_deployment(predictor, images), 1),
                                   mistakes=["bgr_rgb_swap", "square_letterbox", "wrong_pad_value", "stretch_resize"])
    assert right.cause == [] and right.looks_right, right.verdict
    swapped = audit_with_predictions(predictor, images, _jitter(simulate_deployment(predictor, images, "bgr_rgb_swap"), 2),
                                     mistakes=["bgr_rgb_swap", "square_letterbox", "wrong_pad_value", "stretch_resize"])
    assert swapped.cause == ["bgr_rgb_swap"], swapped.verdict


def test_ignored_exif_orientation_is_named_on_rotated_photos(predictor: Predictor, images: list[Path], tmp_path: Path) -> None:
    rotated = []
    for i, path in enumerate(images[:8]):
        exif = Image.Exif()
        exif[0x0112] = 6 if i % 2 else 8  # "rotate 90° clockwise / counter-clockwise to display", as phones write
        out = tmp_path / f"phone_{i}.jpg"
        Image.open(path).save(out, exif=exif.tobytes(), quality=95)
        rotated.append(out)
    field = _as_server_json(simulate_deployment(predictor, rotated, "exif_ignored"))
    assert (field[0]["image"]["height"], field[0]["image"]["width"]) == cv2.imread(str(images[0])).shape[:2]  # unrotated
    report = audit_with_predictions(predictor, rotated, field, mistakes=["exif_ignored", "bgr_rgb_swap", "stretch_resize"])
    _print(report)
    assert report.cause == ["exif_ignored"] and report.baseline.score < 0.2
    assert report.finding("exif_ignored").evidence["images_changed"] == 8
    # The same photos decoded upright by the field: nothing to name.
    upright = audit_with_predictions(predictor, rotated, simulate_deployment(predictor, rotated),
                                     mistakes=["exif_ignored", "bgr_rgb_swap"])
    assert upright.looks_right and upright.cause == []


def test_bad_inputs_are_refused_with_a_clear_message(predictor: Predictor, images: list[Path]) -> None:
    with pytest.raises(InputError, match="no images to audit"):
        audit_with_predictions(predictor, [], [])
    with pytest.raises(InputError, match=r"2 field prediction\(s\) for 3 image\(s\)"):
        audit_with_predictions(predictor, images[:3], [[], []])
    with pytest.raises(InputError, match="unknown preprocessing mistake"):
        audit_with_predictions(predictor, images[:1], [[]], mistakes=["bgr_swap"])
    swapped = [{"image": {"height": 1, "width": 2}, "detections": []}, {"detections": []}]
    with pytest.raises(InputError, match=r"field prediction 0 is for a 2x1 image .* same order as the images"):
        audit_with_predictions(predictor, images[:2], swapped)
    with pytest.raises(InputError, match="image 0 not found"):
        audit_with_predictions(predictor, [images[0].with_name("missing.jpg")], [[]])


# -- audit_with_labels: the mAP each mistake costs ------------------------------------------------


def test_labelled_audit_ranks_mistakes_by_harm_and_matches_a_field_map(predictor: Predictor, shapes_data: Path) -> None:
    gt, _ = load_yolo_split(shapes_data / "data.yaml")
    gt = gt[:N_IMAGES]
    chosen = ["missing_normalization", "bgr_rgb_swap", "stretch_resize"]
    report = audit_with_labels(predictor, gt, mistakes=chosen)
    _print(report)
    base = report.baseline.score
    assert base > 0.5 and report.cause == []
    assert all(f.score < base for f in report.findings)  # the bundle's own preprocessing scores best
    scores = {f.mistake: f.score for f in report.findings}
    assert scores["missing_normalization"] < 0.25 * base  # and a missing /255 wrecks it
    assert report.findings[0].mistake == "missing_normalization"  # ranked most harmful first
    assert report.finding("missing_normalization").evidence["drop"] > 0.4
    # A field that measured the stretch's mAP: the stretch is named.
    field = audit_with_labels(predictor, gt, mistakes=chosen, field_map=scores["stretch_resize"])
    assert field.cause == ["stretch_resize"] and field.findings[0].mistake == "stretch_resize", field.verdict
    with pytest.raises(InputError, match=r"field_map must be within 0\.\.1"):
        audit_with_labels(predictor, gt, field_map=31.0)
