"""Pose: on the same ONNX, cvdeploy's boxes and keypoints match `ultralytics.YOLO(onnx).predict`; the bundle and a plain
.onnx both carry the keypoint shape; keypoints are drawn with their skeleton."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from cvdeploy import Bundle, Predictor

pytestmark = pytest.mark.slow
CONF = 0.25


@pytest.fixture(scope="module")
def pose_bundle(build_task_bundle: Callable[..., Path]) -> Path:
    return build_task_bundle("yolo11n-pose.yaml")


def test_build_records_the_keypoint_shape(pose_bundle: Path) -> None:
    m = Bundle.load(pose_bundle).manifest
    assert m.task == "pose" and m.task_info is not None and m.task_info.kpt_shape == (17, 3)
    assert m.task_info.flip_idx == [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15]  # from the training data.yaml
    parity = m.variants["onnx-fp32"].parity
    assert parity is not None and parity.passed
    assert parity.outputs["output0"].max_abs_extra is not None and parity.outputs["output0"].max_abs_extra < 0.05  # pixels


@pytest.mark.parametrize("source", ["bundle", "onnx"])
def test_keypoints_match_ultralytics_on_the_same_onnx(pose_bundle: Path, task_images: list[Path], match_boxes: Callable,
                                                      source: str) -> None:
    from ultralytics import YOLO

    onnx = Bundle.load(pose_bundle).variant_path()
    ours = Predictor(pose_bundle if source == "bundle" else onnx, conf=CONF)  # a plain .onnx: kpt_shape from its metadata
    theirs = YOLO(str(onnx), task="pose")
    total, worst_px, worst_vis, worst_conf = 0, 0.0, 0.0, 0.0
    for path in task_images:
        r = ours.predict(path)
        u = theirs.predict(str(path), imgsz=256, conf=CONF, verbose=False)[0]
        assert len(r.boxes) == len(u.boxes), f"{path.name}: {len(r.boxes)} detections, ultralytics {len(u.boxes)}"
        if not len(u.boxes):
            continue
        total += len(u.boxes)
        best = match_boxes(r.boxes.xyxy, r.boxes.cls, u.boxes.xyxy.numpy(), u.boxes.cls.numpy())
        worst_conf = max(worst_conf, float(np.abs(r.boxes.conf - u.boxes.conf.numpy()[best]).max()))
        k, uk = r.keypoints, u.keypoints
        assert k.data.shape == uk.data[best].shape == (len(best), 17, 3)
        worst_px = max(worst_px, float(np.abs(k.xy - uk.xy.numpy()[best]).max()))
        worst_vis = max(worst_vis, float(np.abs(k.conf - uk.conf.numpy()[best]).max()))
        np.testing.assert_allclose(k.xyn, uk.xyn.numpy()[best], atol=1e-4)
    print(f"\npose parity ({source}): {total} objects on {len(task_images)} images, worst keypoint {worst_px:.2e} px, "
          f"worst |dvisibility| {worst_vis:.2e}, worst |dconf| {worst_conf:.2e}")
    assert total >= 100
    assert worst_px <= 0.5 and worst_vis <= 1e-3 and worst_conf <= 1e-3


def test_keypoints_in_to_dict_summary_and_plot(pose_bundle: Path, task_images: list[Path]) -> None:
    p = Predictor(pose_bundle, conf=CONF)
    r = next(r for r in (p.predict(path) for path in task_images) if len(r.detections))
    h, w = r.orig_shape
    row = r.to_dict()["detections"][0]
    kpts = np.array(row["keypoints"])
    assert kpts.shape == (17, 3) and (kpts[:, 0] <= w).all() and (kpts[:, 1] <= h).all() and (kpts >= 0).all()
    np.testing.assert_allclose(kpts, r.keypoints.data[0], atol=0.006)
    s = r.summary(normalize=True)[0]["keypoints"]
    assert set(s) == {"x", "y", "visible"} and max(s["x"]) <= 1 and max(s["y"]) <= 1
    # The skeleton is drawn only where both of a limb's keypoints are visible.
    with_lines, without = r.plot(boxes=False, kpt_line=True), r.plot(boxes=False, kpt_line=False)
    assert (without != r.orig_img).any()
    visible = (r.keypoints.conf >= 0.25).sum(1)
    assert ((with_lines != without).any() if (visible >= 2).any() else (with_lines == without).all())
