"""OBB: on the same ONNX, cvdeploy's rotated boxes (xywhr, corners) match `ultralytics.YOLO(onnx).predict`, with
Ultralytics' probabilistic-IoU Fast-NMS."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from cvdeploy import Bundle, Predictor

pytestmark = pytest.mark.slow
CONF = 0.25


def _area(poly: np.ndarray) -> float:
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * float(x @ np.roll(y, -1) - y @ np.roll(x, -1))  # signed: > 0 counter-clockwise (y up)


def polygon_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two convex polygons (k, 2), by Sutherland-Hodgman clipping in float64 (OpenCV's intersectConvexConvex
    loses whole triangles on nearly identical polygons)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    if _area(a) < 0:
        a = a[::-1]
    if _area(b) < 0:
        b = b[::-1]
    out = a
    for p, q in zip(b, np.roll(b, -1, 0), strict=True):
        if not len(out):
            break
        side = (q[0] - p[0]) * (out[:, 1] - p[1]) - (q[1] - p[1]) * (out[:, 0] - p[0])  # >= 0: inside (left of p->q)
        clipped = []
        for i in range(len(out)):
            j = (i + 1) % len(out)
            if side[i] >= 0:
                clipped.append(out[i])
            if (side[i] >= 0) != (side[j] >= 0):
                t = side[i] / (side[i] - side[j])
                clipped.append(out[i] + t * (out[j] - out[i]))
        out = np.array(clipped).reshape(-1, 2)
    inter = _area(out) if len(out) >= 3 else 0.0
    union = abs(_area(a)) + abs(_area(b)) - inter
    return inter / union if union > 1e-9 else float(np.allclose(a, b, atol=1e-3))


@pytest.fixture(scope="module")
def obb_bundle(build_task_bundle: Callable[..., Path]) -> Path:
    return build_task_bundle("yolo11n-obb.yaml")


def test_polygon_iou_is_a_real_measure() -> None:
    square = np.array([[0, 0], [2, 0], [2, 2], [0, 2]], float)
    assert polygon_iou(square, square) == pytest.approx(1.0)
    assert polygon_iou(square, square + np.array([1, 0])) == pytest.approx(1 / 3)
    assert polygon_iou(square, square[::-1] + np.array([0, 1])) == pytest.approx(1 / 3)  # either winding
    assert polygon_iou(square, square + np.array([3, 0])) == 0.0
    diamond = np.array([[1, -0.4142], [2.4142, 1], [1, 2.4142], [-0.4142, 1]])  # the square turned 45 degrees
    assert polygon_iou(square, diamond) == pytest.approx(0.7071, abs=1e-3)


def test_rotated_boxes_match_ultralytics_on_the_same_onnx(obb_bundle: Path, task_images: list[Path]) -> None:
    from ultralytics import YOLO

    ours = Predictor(obb_bundle, conf=CONF)
    theirs = YOLO(str(Bundle.load(obb_bundle).variant_path()), task="obb")
    total, worst_iou, worst_conf, worst_angle = 0, 1.0, 0.0, 0.0
    for path in task_images:
        r = ours.predict(path)
        u = theirs.predict(str(path), imgsz=256, conf=CONF, verbose=False)[0]
        assert r.boxes is None and u.boxes is None  # Ultralytics' obb results have no upright boxes
        assert len(r.obb) == len(u.obb), f"{path.name}: {len(r.obb)} rotated boxes, ultralytics {len(u.obb)}"
        if not len(u.obb):
            continue
        total += len(u.obb)
        ours_c, theirs_c = r.obb.xyxyxyxy, u.obb.xyxyxyxy.numpy()
        for i in range(len(ours_c)):
            same = np.flatnonzero(u.obb.cls.numpy() == r.obb.cls[i])
            ious = [polygon_iou(ours_c[i], theirs_c[j]) for j in same]
            j = same[int(np.argmax(ious))]
            worst_iou = min(worst_iou, max(ious))
            worst_conf = max(worst_conf, abs(float(r.obb.conf[i] - u.obb.conf[j])))
            worst_angle = max(worst_angle, abs(float(r.obb.xywhr[i, 4] - u.obb.xywhr[j, 4])))
        np.testing.assert_allclose(r.obb.xyxy, u.obb.xyxy.numpy(), atol=0.05)  # same order: best first
        np.testing.assert_allclose(r.obb.xyxyxyxyn, u.obb.xyxyxyxyn.numpy(), atol=1e-4)
        np.testing.assert_allclose(r.detections.xyxy, r.obb.xyxy)  # cvdeploy's detections: the enclosing boxes
    print(f"\nobb parity: {total} rotated boxes on {len(task_images)} images, worst rotated IoU {worst_iou:.4f}, "
          f"worst |dconf| {worst_conf:.2e}, worst |dangle| {worst_angle:.2e} rad")
    assert total >= 100
    assert worst_iou >= 0.99 and worst_conf <= 1e-3


def test_obb_in_to_dict_and_plot(obb_bundle: Path, task_images: list[Path]) -> None:
    p = Predictor(obb_bundle, conf=CONF)
    r = next(r for r in (p.predict(path) for path in task_images) if len(r.detections))
    row = r.to_dict()["detections"][0]
    cx, cy, w, h, a = r.obb.xywhr[0]
    assert row["obb"] == pytest.approx({"cx": cx, "cy": cy, "width": w, "height": h, "angle": a}, abs=0.006)
    assert np.array(row["polygon"]).shape == (4, 2)
    assert set(r.summary()[0]["box"]) == {f"{c}{i}" for i in range(1, 5) for c in "xy"}
    drawn = r.plot(labels=False)
    corner = np.round(r.obb.xyxyxyxy[0]).astype(int)
    x, y = np.clip(corner[0], 0, [r.orig_shape[1] - 1, r.orig_shape[0] - 1])
    assert (drawn[max(0, y - 2) : y + 3, max(0, x - 2) : x + 3] != r.orig_img[max(0, y - 2) : y + 3, max(0, x - 2) : x + 3]).any()
