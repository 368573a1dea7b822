"""Acceptance: on the same ONNX file, cvdeploy's detections match `ultralytics.YOLO(onnx).predict`."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from cvdeploy import Bundle, Predictor

pytestmark = pytest.mark.slow


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), 2)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


@pytest.mark.parametrize("conf", [0.25, 0.05])
def test_detections_match_ultralytics_on_the_same_onnx(demo_bundle: Path, shapes_data: Path, conf: float) -> None:
    from ultralytics import YOLO

    onnx = Bundle.load(demo_bundle).variant_path()
    imgsz = Bundle.load(demo_bundle).manifest.preprocess.imgsz[0]
    ours = Predictor(onnx, conf=conf)  # the plain .onnx path, metadata read from the file
    theirs = YOLO(str(onnx), task="detect")
    images = sorted((shapes_data / "images" / "val").glob("*.jpg"))
    shapes = {cv2.imread(str(p)).shape[:2] for p in images}
    assert len(images) >= 50
    assert any(h != w for h, w in shapes) and len({h / w > 1 for h, w in shapes}) == 2  # portrait and landscape
    total = 0
    for path in images:
        r = ours.predict(path).detections
        u = theirs.predict(str(path), imgsz=imgsz, conf=conf, iou=0.7, verbose=False)[0].boxes
        u_xyxy, u_conf, u_cls = u.xyxy.numpy(), u.conf.numpy(), u.cls.numpy().astype(int)
        assert len(r) == len(u_xyxy), f"{path.name}: {len(r)} boxes, ultralytics {len(u_xyxy)}"
        total += len(r)
        if not len(r):
            continue
        iou = _iou(r.xyxy, u_xyxy)
        # Match each of our boxes to the best same-class Ultralytics box.
        iou[r.class_id[:, None] != u_cls[None, :]] = -1
        best = iou.argmax(1)
        assert len(set(best.tolist())) == len(r), f"{path.name}: two boxes matched the same Ultralytics box"
        assert (iou[np.arange(len(r)), best] >= 0.99).all(), f"{path.name}: IoU {iou.max(1)}"
        assert np.abs(r.confidence - u_conf[best]).max() <= 1e-3
    assert total >= 100  # the comparison is not vacuous
