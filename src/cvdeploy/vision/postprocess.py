"""Task decoders: raw network outputs to Detections / Classifications in original-image pixels."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cvdeploy.errors import InputError
from cvdeploy.vision.detections import Classifications, Detections
from cvdeploy.vision.letterbox import LetterboxParams

MAX_WH = 7680  # per-class box offset for class-aware NMS, as in Ultralytics
MAX_NMS = 30000  # candidates kept (by confidence) before NMS
_MATRIX_NMS_LIMIT = 2500  # above this, the IoU matrix costs more memory than the loop saves


@dataclass(frozen=True)
class DetectOptions:
    """Postprocessing thresholds; the bundle's manifest stores the defaults."""

    conf: float = 0.25
    iou: float = 0.7
    max_det: int = 300
    classes: tuple[int, ...] | None = None
    agnostic: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.conf <= 1.0:
            raise InputError(f"conf must be between 0 and 1, got {self.conf}")
        if not 0.0 <= self.iou <= 1.0:
            raise InputError(f"iou must be between 0 and 1, got {self.iou}")
        if self.max_det < 1:
            raise InputError(f"max_det must be at least 1, got {self.max_det}")


def _iou_one_to_many(box: np.ndarray, boxes: np.ndarray, areas: np.ndarray, area: np.float32) -> np.ndarray:
    w = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    h = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = w * h
    return inter / (area + areas - inter)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, *, max_keep: int | None = None) -> np.ndarray:
    """Greedy NMS (torchvision semantics: suppress IoU > threshold); returns kept indices, best first."""
    if max_keep is not None and max_keep <= 0:
        return np.zeros(0, dtype=np.int64)
    threshold = np.float64(iou_threshold)  # compare in double, as torchvision does (float32 IoU ties at 0.3 etc.)
    order = np.argsort(-scores, kind="stable")
    boxes = boxes[order]
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    n = len(order)
    limit = n if max_keep is None else max_keep
    keep: list[int] = []
    if n <= _MATRIX_NMS_LIMIT:
        # One vectorised IoU matrix, then a cheap boolean sweep.
        lt = np.maximum(boxes[:, None, :2], boxes[None, :, :2])
        rb = np.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
        wh = np.clip(rb - lt, 0, None)
        inter = wh[..., 0] * wh[..., 1]
        over = inter / (areas[:, None] + areas[None, :] - inter) > threshold
        suppressed = np.zeros(n, dtype=bool)
        for i in range(n):
            if suppressed[i]:
                continue
            keep.append(i)
            if len(keep) == limit:
                break
            suppressed |= over[i]
    else:
        alive = np.arange(n)
        while alive.size and len(keep) < limit:
            i = alive[0]
            keep.append(int(i))
            rest = alive[1:]
            alive = rest[_iou_one_to_many(boxes[i], boxes[rest], areas[rest], areas[i]) <= threshold]
    return order[np.asarray(keep, dtype=np.int64)]


def scale_boxes(xyxy: np.ndarray, params: LetterboxParams) -> np.ndarray:
    """Map boxes from network-input pixels back to original-image pixels, clipped to the image."""
    gx, gy = params.gain_xy
    h0, w0 = params.orig_shape
    out = xyxy.copy()
    out[:, [0, 2]] = ((out[:, [0, 2]] - params.left) / gx).clip(0, w0)
    out[:, [1, 3]] = ((out[:, [1, 3]] - params.top) / gy).clip(0, h0)
    return out


def decode_detect(output: np.ndarray, params: LetterboxParams, options: DetectOptions) -> Detections:
    """Decode one image's YOLO head output (4 + nc, anchors): xywh boxes then class scores."""
    if output.ndim != 2 or output.shape[0] < 5:
        raise InputError(f"detect output: expected shape (4 + classes, anchors), got {output.shape}")
    scores = output[4:]
    best = scores.max(0)
    cand = np.flatnonzero(best > options.conf)
    if cand.size == 0:
        return Detections.empty()
    conf = best[cand]
    cls = scores[:, cand].argmax(0)
    if options.classes is not None:
        sel = np.isin(cls, options.classes)
        cand, conf, cls = cand[sel], conf[sel], cls[sel]
    if cand.size > MAX_NMS:
        top = np.argsort(-conf, kind="stable")[:MAX_NMS]
        cand, conf, cls = cand[top], conf[top], cls[top]
    xywh = output[:4, cand].T
    half = xywh[:, 2:] / 2
    xyxy = np.concatenate([xywh[:, :2] - half, xywh[:, :2] + half], 1)
    offset = (cls[:, None] * (0 if options.agnostic else MAX_WH)).astype(xyxy.dtype)
    keep = nms(xyxy + offset, conf, options.iou, max_keep=options.max_det)
    return Detections(scale_boxes(xyxy[keep], params), conf[keep], cls[keep])


def decode_end2end(output: np.ndarray, params: LetterboxParams, options: DetectOptions) -> Detections:
    """Decode one image's NMS-free output (rows of x1, y1, x2, y2, conf, class), e.g. YOLO26 or nms=True exports."""
    if output.ndim != 2 or output.shape[1] < 6:
        raise InputError(f"end-to-end output: expected shape (detections, 6), got {output.shape}")
    keep = output[:, 4] > options.conf
    if options.classes is not None:
        keep &= np.isin(output[:, 5].astype(np.int64), options.classes)
    rows = output[keep][: options.max_det]
    return Detections(scale_boxes(rows[:, :4], params), rows[:, 4], rows[:, 5].astype(np.int64))


def decode_detect_batch(
    output: np.ndarray, params: Sequence[LetterboxParams], options: DetectOptions, *, end2end: bool = False
) -> list[Detections]:
    if output.ndim != 3 or output.shape[0] != len(params):
        raise InputError(f"detect output: expected a batch of {len(params)}, got shape {output.shape}")
    decode = decode_end2end if end2end else decode_detect
    return [decode(o, p, options) for o, p in zip(output, params, strict=True)]


def decode_classify(output: np.ndarray, *, top_k: int = 5) -> Classifications:
    """One image's class probabilities (softmax applied if the graph returned logits) to its top-k classes."""
    probs = np.asarray(output, dtype=np.float32).reshape(-1)
    if probs.size == 0:
        raise InputError("classify output is empty")
    if probs.min() < 0 or abs(float(probs.sum()) - 1.0) > 1e-3:
        e = np.exp(probs - probs.max())
        probs = e / e.sum()
    k = min(top_k, probs.size)
    top = np.argsort(-probs, kind="stable")[:k]
    return Classifications(top, probs[top])
