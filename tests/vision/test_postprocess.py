"""Task decoders and NMS: the same detections as Ultralytics' non_max_suppression + scale_boxes, without torch."""

from __future__ import annotations

import os

os.environ.setdefault("YOLO_OFFLINE", "1")  # before any ultralytics import: no hub, font or asset download

import numpy as np
import pytest
import torch
import torchvision
from ultralytics.utils.nms import non_max_suppression
from ultralytics.utils.ops import scale_boxes as ul_scale_boxes

from cvdeploy.errors import InputError
from cvdeploy.vision.detections import Classifications, Detections
from cvdeploy.vision.letterbox import LetterboxParams, LetterboxSpec, letterbox_params
from cvdeploy.vision.postprocess import (
    _MATRIX_NMS_LIMIT,
    DetectOptions,
    decode_classify,
    decode_detect,
    decode_detect_batch,
    decode_end2end,
    nms,
    scale_boxes,
)

NC = 6
ORIG = (300, 517)  # (h, w): non-square, so both gains and paddings matter


# ---------------------------------------------------------------- nms


def _random_boxes(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Boxes in overlapping clusters (so suppression really happens), distinct scores (no tie ambiguity)."""
    rng = np.random.default_rng(seed)
    centers = rng.uniform(0, 600, (max(1, n // 8), 2))
    c = centers[rng.integers(0, len(centers), n)] + rng.normal(0, 8, (n, 2))
    wh = rng.uniform(10, 120, (n, 2))
    boxes = np.concatenate([c - wh / 2, c + wh / 2], 1).astype(np.float32)
    scores = ((rng.permutation(n) + 1) / (n + 1)).astype(np.float32)
    assert len(np.unique(scores)) == n
    return boxes, scores


def _tv_nms(boxes: np.ndarray, scores: np.ndarray, thr: float) -> np.ndarray:
    return torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), thr).numpy()


NMS_CASES = [(n, thr, seed) for n in (0, 1, 5, 300, 3000) for thr in (0.3, 0.5, 0.7) for seed in (0,)]
NMS_CASES += [(5, 0.5, 1), (300, 0.5, 2), (300, 0.3, 3), (3000, 0.7, 4), (40, 0.45, 5)]


def test_nms_cases_cover_both_branches() -> None:
    assert any(n > _MATRIX_NMS_LIMIT for n, _, _ in NMS_CASES)
    assert any(0 < n <= _MATRIX_NMS_LIMIT for n, _, _ in NMS_CASES)
    assert len(NMS_CASES) == 20


@pytest.mark.parametrize(("n", "thr", "seed"), NMS_CASES)
def test_nms_matches_torchvision(n: int, thr: float, seed: int) -> None:
    boxes, scores = _random_boxes(n, seed)
    ours = nms(boxes, scores, thr)
    theirs = _tv_nms(boxes, scores, thr)
    assert ours.dtype.kind == "i"
    assert ours.tolist() == theirs.tolist()
    if n >= 300:
        assert 0 < len(ours) < n  # the clusters do get suppressed: the comparison is not trivial


@pytest.mark.parametrize("n", [300, 3000])
def test_nms_max_keep_truncates(n: int) -> None:
    boxes, scores = _random_boxes(n, 10)
    full = _tv_nms(boxes, scores, 0.5)
    assert len(full) > 50
    for k in (1, 7, 50):
        assert nms(boxes, scores, 0.5, max_keep=k).tolist() == full[:k].tolist()
    assert nms(boxes, scores, 0.5, max_keep=10**6).tolist() == full.tolist()


def test_nms_suppresses_only_strictly_above_the_threshold() -> None:
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 5], [20, 20, 30, 30]], np.float32)  # IoU(0, 1) == 0.5 exactly
    scores = np.array([0.9, 0.8, 0.7], np.float32)
    assert nms(boxes, scores, 0.5).tolist() == [0, 1, 2] == _tv_nms(boxes, scores, 0.5).tolist()
    assert nms(boxes, scores, 0.49).tolist() == [0, 2] == _tv_nms(boxes, scores, 0.49).tolist()


@pytest.mark.parametrize(("w", "thr"), [(1, 0.1), (2, 0.2), (3, 0.3), (6, 0.6)])
def test_nms_threshold_ties_match_torchvision(w: int, thr: float) -> None:
    boxes = np.array([[0, 0, 10, 10], [0, 0, w, 10]], np.float32)  # IoU = w / 10 exactly (in float32)
    scores = np.array([0.9, 0.8], np.float32)
    assert nms(boxes, scores, thr).tolist() == _tv_nms(boxes, scores, thr).tolist()


def test_nms_max_keep_zero_keeps_nothing() -> None:
    boxes, scores = _random_boxes(5, 0)
    assert len(nms(boxes, scores, 0.5, max_keep=0)) == 0


# ---------------------------------------------------------------- decode_detect vs Ultralytics


def _raw_output(input_hw: tuple[int, int], n: int, seed: int, n_pass: int = 300) -> np.ndarray:
    """A synthetic (1, 4 + NC, n) head output: xywh boxes in clusters, distinct best scores, n_pass above 0.25."""
    rng = np.random.default_rng(seed)
    h, w = input_hw
    centers = np.stack([rng.uniform(0, w, 40), rng.uniform(0, h, 40)], 1)
    sizes = rng.uniform(8, 0.6 * min(h, w), (40, 2))
    k = rng.integers(0, 40, n)
    xy = centers[k] + rng.normal(0, 3, (n, 2))
    wh = sizes[k] * rng.uniform(0.8, 1.25, (n, 2))  # some boxes cross the input's edges: clipping is exercised
    best = np.empty(n)
    passing = rng.choice(n, n_pass, replace=False)
    mask = np.zeros(n, bool)
    mask[passing] = True
    best[mask] = rng.permutation(np.linspace(0.26, 0.97, n_pass))
    best[~mask] = rng.permutation(np.linspace(0.0005, 0.24, n - n_pass))
    scores = best[None] * rng.uniform(0.0, 0.9, (NC, n))  # other classes strictly below the best one
    scores[rng.integers(0, NC, n), np.arange(n)] = best
    out = np.concatenate([xy.T, wh.T, scores], 0)[None].astype(np.float32)
    assert len(np.unique(out[0, 4:].max(0))) == n  # distinct confidences: no tie ambiguity in NMS order
    return out


def _params(auto: bool, imgsz: tuple[int, int] = (256, 256)) -> LetterboxParams:
    params, _, _ = letterbox_params(ORIG, LetterboxSpec(imgsz=imgsz, stride=32), auto=auto)
    return params


def _ultralytics(output: np.ndarray, params: LetterboxParams, options: DetectOptions) -> np.ndarray:
    classes = None if options.classes is None else list(options.classes)
    [det] = non_max_suppression(
        torch.from_numpy(output.copy()), options.conf, options.iou, classes, options.agnostic, max_det=options.max_det
    )
    det = det.clone()
    det[:, :4] = ul_scale_boxes(params.input_shape, det[:, :4], params.orig_shape)
    return det.numpy()


def _assert_same(ours: Detections, theirs: np.ndarray) -> None:
    assert len(ours) == len(theirs)
    np.testing.assert_allclose(ours.xyxy, theirs[:, :4], atol=1e-3, rtol=0)
    np.testing.assert_allclose(ours.confidence, theirs[:, 4], atol=1e-6, rtol=0)
    assert ours.class_id.tolist() == theirs[:, 5].astype(np.int64).tolist()
    assert ours.xyxy.dtype == np.float32 and ours.confidence.dtype == np.float32 and ours.class_id.dtype == np.int64


DETECT_CASES = {
    "default": DetectOptions(conf=0.25, iou=0.7),
    "iou0.5": DetectOptions(conf=0.25, iou=0.5),
    "conf0.001": DetectOptions(conf=0.001, iou=0.7),
    "classes1,3": DetectOptions(conf=0.25, iou=0.7, classes=(1, 3)),
    "classes1,3-conf0.001": DetectOptions(conf=0.001, iou=0.6, classes=(1, 3)),
    "max_det5": DetectOptions(conf=0.25, iou=0.7, max_det=5),
    "agnostic": DetectOptions(conf=0.25, iou=0.7, agnostic=True),
    "agnostic-conf0.001": DetectOptions(conf=0.001, iou=0.5, agnostic=True),
}


@pytest.mark.parametrize("auto", [True, False], ids=["rect", "square"])
@pytest.mark.parametrize("name", list(DETECT_CASES))
def test_decode_detect_matches_ultralytics(name: str, auto: bool) -> None:
    options = DETECT_CASES[name]
    params = _params(auto)
    assert params.input_shape == ((160, 256) if auto else (256, 256))
    output = _raw_output(params.input_shape, 1344, seed=7)
    ours = decode_detect(output[0], params, options)
    theirs = _ultralytics(output, params, options)
    _assert_same(ours, theirs)
    assert len(ours) > (4 if name == "max_det5" else 20)  # a real comparison, not two empty sets
    if name == "max_det5":
        assert len(ours) == 5
    if options.classes is not None:
        assert set(ours.class_id.tolist()) == {1, 3}
    h0, w0 = ORIG
    assert (ours.xyxy >= 0).all() and (ours.xyxy[:, [0, 2]] <= w0).all() and (ours.xyxy[:, [1, 3]] <= h0).all()
    clipped = (ours.xyxy[:, :2] == 0).any() or (ours.xyxy[:, 2] == w0).any() or (ours.xyxy[:, 3] == h0).any()
    assert clipped or name == "max_det5"  # boxes crossing the input's edges end on the image's edges


@pytest.mark.parametrize("agnostic", [False, True])
def test_decode_detect_thousands_of_candidates_matches_ultralytics(agnostic: bool) -> None:
    """8400 anchors (a 640 input), conf 0.001: thousands of candidates, the loop NMS branch, max_det=300 binding."""
    params = _params(auto=False, imgsz=(640, 640))
    output = _raw_output(params.input_shape, 8400, seed=11, n_pass=600)
    options = DetectOptions(conf=0.001, iou=0.7, agnostic=agnostic)
    assert (output[0, 4:].max(0) > options.conf).sum() > _MATRIX_NMS_LIMIT
    ours = decode_detect(output[0], params, options)
    _assert_same(ours, _ultralytics(output, params, options))
    assert len(ours) == 300 if not agnostic else len(ours) > 100  # 40 clusters: agnostic NMS keeps fewer


def test_decode_detect_nothing_above_conf_is_empty() -> None:
    params = _params(auto=True)
    output = _raw_output(params.input_shape, 1344, seed=3)
    none = decode_detect(output[0], params, DetectOptions(conf=0.99))
    assert len(none) == 0 and none.xyxy.shape == (0, 4)
    absent = decode_detect(output[0], params, DetectOptions(conf=0.25, classes=(NC + 5,)))
    assert len(absent) == 0 and absent.xyxy.shape == (0, 4)


def test_decode_detect_rejects_a_wrong_shape() -> None:
    with pytest.raises(InputError, match="expected shape"):
        decode_detect(np.zeros((1, 10, 100), np.float32), _params(True), DetectOptions())
    with pytest.raises(InputError, match="expected shape"):
        decode_detect(np.zeros((4, 100), np.float32), _params(True), DetectOptions())


def test_decode_detect_batch_decodes_each_image_with_its_params() -> None:
    params = [_params(True), _params(True)]
    output = np.concatenate([_raw_output(params[0].input_shape, 1344, seed=s) for s in (1, 2)])
    options = DetectOptions()
    dets = decode_detect_batch(output, params, options)
    assert len(dets) == 2
    for i, det in enumerate(dets):
        _assert_same(det, _ultralytics(output[i : i + 1], params[i], options))
    with pytest.raises(InputError, match="batch of 3"):
        decode_detect_batch(output, [*params, params[0]], options)


# ---------------------------------------------------------------- decode_end2end


def _end2end_output(params: LetterboxParams, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    h, w = params.input_shape
    xy = rng.uniform(-10, [w, h], (300, 2))
    wh = rng.uniform(5, 100, (300, 2))
    conf = np.sort(rng.permutation(np.linspace(0.001, 0.95, 300)))[::-1]  # end-to-end heads sort by confidence
    cls = rng.integers(0, NC, 300)
    return np.concatenate([xy, xy + wh, conf[:, None], cls[:, None]], 1).astype(np.float32)


@pytest.mark.parametrize(
    "options",
    [DetectOptions(conf=0.25), DetectOptions(conf=0.5, classes=(0, 2)), DetectOptions(conf=0.05, max_det=17)],
    ids=["conf", "classes", "max_det"],
)
def test_decode_end2end_filters_and_scales_like_ultralytics(options: DetectOptions) -> None:
    params = _params(auto=True)
    out = _end2end_output(params)
    ours = decode_end2end(out, params, options)
    theirs = _ultralytics(out[None], params, options)
    _assert_same(ours, theirs)
    # the same rules, spelled out
    rows = out[out[:, 4] > options.conf]
    if options.classes is not None:
        rows = rows[np.isin(rows[:, 5], options.classes)]
        assert set(ours.class_id.tolist()) <= set(options.classes)
    assert len(ours) == min(len(rows), options.max_det) > 0
    assert (ours.confidence > options.conf).all()
    np.testing.assert_allclose(ours.xyxy, scale_boxes(rows[: options.max_det, :4], params))


def test_decode_end2end_rejects_a_wrong_shape() -> None:
    with pytest.raises(InputError, match="expected shape"):
        decode_end2end(np.zeros((300, 5), np.float32), _params(True), DetectOptions())


# ---------------------------------------------------------------- scale_boxes


def test_scale_boxes_maps_input_pixels_to_original_pixels() -> None:
    params = _params(auto=True)  # 300x517 -> new_unpad (256, 149), padded to 160x256
    assert params.new_unpad == (256, 149) and (params.top, params.left) == (5, 0)
    gx, gy = params.gain_xy
    orig = np.array([[10.0, 20.0, 200.0, 150.0]], np.float32)
    net = orig * np.array([gx, gy, gx, gy], np.float32) + np.array([0, 5, 0, 5], np.float32)
    np.testing.assert_allclose(scale_boxes(net, params), orig, atol=1e-3)


def test_scale_boxes_clips_to_the_original_image_and_does_not_modify_its_input() -> None:
    params = _params(auto=True)
    boxes = np.array([[-50, -50, 400, 400], [10, 10, 20, 20], [300, 100, 900, 900]], np.float32)
    before = boxes.copy()
    out = scale_boxes(boxes, params)
    h0, w0 = params.orig_shape
    assert out[0].tolist() == [0, 0, w0, h0]
    assert out[2, 2] == w0 and out[2, 3] == h0
    assert (out >= 0).all()
    assert np.array_equal(boxes, before)
    theirs = ul_scale_boxes(params.input_shape, torch.from_numpy(boxes.copy()), params.orig_shape).numpy()
    np.testing.assert_allclose(out, theirs, atol=1e-4)


# ---------------------------------------------------------------- decode_classify


def test_decode_classify_probabilities_give_top5_sorted() -> None:
    rng = np.random.default_rng(0)
    probs = rng.permutation(np.arange(1, 11, dtype=np.float32))
    probs /= probs.sum()
    top = decode_classify(probs)
    assert isinstance(top, Classifications) and len(top) == 5
    assert top.class_id.tolist() == np.argsort(-probs)[:5].tolist()
    np.testing.assert_array_equal(top.confidence, probs[top.class_id])  # already probabilities: not re-softmaxed
    assert (np.diff(top.confidence) < 0).all()


def test_decode_classify_softmaxes_logits() -> None:
    logits = np.array([[2.0, -1.0, 0.5, 3.0, -4.0, 1.0, 0.0]], np.float32)  # (1, nc): the graph's batch axis
    top = decode_classify(logits, top_k=3)
    expected = torch.softmax(torch.from_numpy(logits[0]), 0).numpy()
    assert top.class_id.tolist() == [3, 0, 5]
    np.testing.assert_allclose(top.confidence, expected[[3, 0, 5]], rtol=1e-5)
    all_k = decode_classify(logits, top_k=100)
    assert len(all_k) == 7
    np.testing.assert_allclose(all_k.confidence.sum(), 1.0, rtol=1e-5)


def test_decode_classify_empty_is_an_input_error() -> None:
    with pytest.raises(InputError, match="empty"):
        decode_classify(np.zeros((1, 0), np.float32))


# ---------------------------------------------------------------- DetectOptions


@pytest.mark.parametrize(("kwargs", "word"), [({"conf": 1.5}, "conf"), ({"iou": -0.1}, "iou"), ({"max_det": 0}, "max_det")])
def test_detect_options_reject_bad_values(kwargs: dict, word: str) -> None:
    with pytest.raises(InputError, match=word):
        DetectOptions(**kwargs)


def test_detect_options_defaults_are_ultralytics_predict_defaults() -> None:
    o = DetectOptions()
    assert (o.conf, o.iou, o.max_det, o.classes, o.agnostic) == (0.25, 0.7, 300, None, False)
