"""Results of every task without a model: the Ultralytics-shaped views, to_dict, summary and drawing."""

from __future__ import annotations

import numpy as np
import pytest

from cvdeploy.errors import InputError
from cvdeploy.vision import OBB, Detections, Keypoints, Masks, Probs, Result, rle_decode
from cvdeploy.vision.postprocess import decode_classify

NAMES = {0: "a", 1: "b", 2: "c"}


def _segment() -> Result:
    masks = np.zeros((2, 64, 96), np.uint8)  # network-input size (letterboxed 100 x 150 image -> 64 x 96)
    masks[0, 10:30, 20:50] = 1
    masks[1, 40:60, 60:90] = 1
    d = Detections([[30, 15, 80, 47], [95, 62, 140, 94]], [0.9, 0.6], [0, 2], {"masks": masks})
    return Result("segment", NAMES, (100, 150), detections=d, orig_img=np.full((100, 150, 3), 50, np.uint8))


def test_segment_views_and_json() -> None:
    r = _segment()
    m = r.masks
    assert isinstance(m, Masks) and m.data.shape == (2, 64, 96) and len(m) == 2 and m[0].data.shape == (1, 64, 96)
    assert m.on_image.shape == (2, 100, 150)
    xy = m.xy[0]
    assert xy.min(0) == pytest.approx([31.25, 15.625], abs=0.01) and xy.max(0) == pytest.approx([76.56, 45.31], abs=0.01)
    np.testing.assert_allclose(m.xyn[0], xy / [150, 100], atol=1e-6)
    rows = r.to_dict()["detections"]
    assert rows[1]["class_name"] == "c" and rows[0]["mask"]["size"] == [100, 150]
    np.testing.assert_array_equal(rle_decode(rows[0]["mask"]), m.on_image[0])
    assert r.keypoints is None and r.obb is None and r.probs is None and r.boxes is not None
    assert r.summary()[0]["segments"]["x"][0] == pytest.approx(float(xy[0, 0]), abs=1e-5)
    drawn = r.plot(labels=False, boxes=False)
    assert (drawn[20, 60] != 50).any() and (drawn[5, 5] == 50).all()


def test_pose_views_and_json() -> None:
    kpts = np.array([[[10, 20, 0.9], [30, 40, 0.1], [50, 60, 0.8]]], np.float32)
    r = Result("pose", NAMES, (100, 200), detections=Detections([[5, 5, 60, 70]], [0.8], [1], {"keypoints": kpts}))
    k = r.keypoints
    assert isinstance(k, Keypoints) and k.has_visible and k.conf.shape == (1, 3)
    np.testing.assert_allclose(k.xyn[0, 2], [0.25, 0.6])
    assert r.to_dict()["detections"][0]["keypoints"] == [[10.0, 20.0, 0.9], [30.0, 40.0, 0.1], [50.0, 60.0, 0.8]]
    assert r.summary()[0]["keypoints"]["visible"] == pytest.approx([0.9, 0.1, 0.8])
    img = np.zeros((100, 200, 3), np.uint8)
    drawn = r.plot(img=img, boxes=False, kpt_line=False)
    assert drawn[20, 10].any() and not drawn[40, 30].any()  # visibility 0.1 < 0.25: not drawn


def test_obb_views_and_json() -> None:
    xywhr = np.array([[50, 40, 40, 10, np.pi / 2]], np.float32)
    corners_xyxy = [45, 20, 55, 60]
    r = Result("obb", NAMES, (100, 100), detections=Detections([corners_xyxy], [0.7], [2], {"xywhr": xywhr}))
    o = r.obb
    assert isinstance(o, OBB) and o.data.shape == (1, 7) and r.boxes is None
    np.testing.assert_allclose(o.xyxy, [corners_xyxy], atol=1e-4)
    assert o.cls.tolist() == [2.0] and o.conf.tolist() == pytest.approx([0.7])
    row = r.to_dict()["detections"][0]
    assert row["obb"]["angle"] == pytest.approx(np.pi / 2, abs=1e-5) and len(row["polygon"]) == 4
    assert set(r.summary()[0]["box"]) == {"x1", "y1", "x2", "y2", "x3", "y3", "x4", "y4"}


def test_classify_views_and_json() -> None:
    probs = np.array([0.1, 0.6, 0.3], np.float32)
    r = Result("classify", NAMES, (10, 10), classes=decode_classify(probs), probabilities=probs)
    p = r.probs
    assert isinstance(p, Probs) and p.top1 == 1 and p.top5 == [1, 2, 0] and float(p.top1conf) == pytest.approx(0.6)
    d = r.to_dict()
    assert d["probs"] == pytest.approx([0.1, 0.6, 0.3]) and d["classes"][0]["class_name"] == "b"
    assert r.boxes is None and r.masks is None


def test_views_refuse_bad_shapes() -> None:
    with pytest.raises(InputError, match="masks"):
        Masks(np.zeros((2, 3, 4, 5)), (4, 5))
    with pytest.raises(InputError, match="keypoints"):
        Keypoints(np.zeros((1, 17, 4)), (4, 5))
    with pytest.raises(InputError, match="obb"):
        OBB(np.zeros((1, 6)), (4, 5))
    with pytest.raises(InputError, match="probs"):
        Probs(np.zeros((2, 3)))
