"""Detection decoding and NMS shared by every box task: raw head outputs to Detections / Classifications.

`select_candidates` is Ultralytics' `non_max_suppression` (and its end-to-end branch) on one image: it returns the kept
rows in network-input pixels with their extra channels (mask coefficients, keypoints, angle) for the task decoders of
`cvdeploy.vision.tasks` to finish; `decode_detect` finishes a plain detect output.
"""

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
    retina_masks: bool = False  # segment: masks at the original image's size (Ultralytics' retina_masks), else the input's

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


@dataclass
class Candidates:
    """One image's detections after NMS, in network-input pixels: `boxes` xyxy (or xywh when rotated), and the extra
    channels after the class scores (mask coefficients, keypoints, angle), best first."""

    boxes: np.ndarray  # (n, 4) float32
    confidence: np.ndarray  # (n,) float32
    class_id: np.ndarray  # (n,) int64
    extra: np.ndarray  # (n, e) float32

    @classmethod
    def empty(cls, n_extra: int = 0) -> Candidates:
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64), np.zeros((0, n_extra), np.float32))

    def __len__(self) -> int:
        return len(self.boxes)


def select_candidates(output: np.ndarray, options: DetectOptions, *, nc: int | None = None, rotated: bool = False) -> Candidates:
    """Ultralytics' `non_max_suppression` on one image's head output (4 + nc + extra, anchors): best class per anchor,
    conf strictly above the threshold, the classes filter, the 30,000 most confident, class-aware NMS (greedy,
    torchvision's; rotated: Fast-NMS on probabilistic IoU, the angle being the last extra channel), max_det."""
    nc = output.shape[0] - 4 if nc is None else nc
    if output.ndim != 2 or nc < 1 or output.shape[0] < 4 + nc:
        raise InputError(f"detect output: expected shape (4 + {nc} classes + extra, anchors), got {output.shape}")
    n_extra = output.shape[0] - 4 - nc
    scores = output[4 : 4 + nc]
    best = scores.max(0)
    cand = np.flatnonzero(best > options.conf)
    if cand.size == 0:
        return Candidates.empty(n_extra)
    conf = best[cand]
    cls = scores[:, cand].argmax(0)
    if options.classes is not None:
        sel = np.isin(cls, options.classes)
        cand, conf, cls = cand[sel], conf[sel], cls[sel]
    if cand.size > MAX_NMS:
        top = np.argsort(-conf, kind="stable")[:MAX_NMS]
        cand, conf, cls = cand[top], conf[top], cls[top]
    if rotated and n_extra < 1:
        raise InputError(f"obb output: expected an angle channel after the {nc} class scores, got shape {output.shape}")
    return suppress(output[:4, cand].T, conf, cls, output[4 + nc :, cand].T, options, rotated=rotated)


def suppress(xywh: np.ndarray, conf: np.ndarray, cls: np.ndarray, extra: np.ndarray, options: DetectOptions, *,
             rotated: bool = False) -> Candidates:
    """Class-aware NMS of selected rows (boxes as xywh, one class each), `max_det` kept: greedy IoU NMS on xyxy boxes,
    or rotated Fast-NMS on probabilistic IoU with the angle as the last extra channel. Shared by `select_candidates`
    and the validator's multi-label selection (`evaluate.val_predict`)."""
    offset = (cls[:, None] * (0 if options.agnostic else MAX_WH)).astype(np.float32)
    if rotated:
        from cvdeploy.vision.obb import nms_rotated

        rboxes = np.concatenate([xywh[:, :2] + offset, xywh[:, 2:4], extra[:, -1:]], 1)
        keep = nms_rotated(rboxes, conf, options.iou, max_keep=options.max_det)
        boxes = xywh
    else:
        half = xywh[:, 2:] / 2
        boxes = np.concatenate([xywh[:, :2] - half, xywh[:, :2] + half], 1)
        keep = nms(boxes + offset, conf, options.iou, max_keep=options.max_det)
    return Candidates(boxes[keep], conf[keep], cls[keep].astype(np.int64), np.ascontiguousarray(extra[keep], dtype=np.float32))


def select_end2end(output: np.ndarray, options: DetectOptions) -> Candidates:
    """Ultralytics' end-to-end branch on one image's rows (x1, y1, x2, y2 or x, y, w, h for obb, conf, class, extra...):
    conf strictly above the threshold, the classes filter, the first max_det rows; no NMS."""
    if output.ndim != 2 or output.shape[1] < 6:
        raise InputError(f"end-to-end output: expected shape (detections, 6 + extra), got {output.shape}")
    keep = output[:, 4] > options.conf
    if options.classes is not None:
        keep &= np.isin(output[:, 5].astype(np.int64), options.classes)
    rows = output[keep][: options.max_det].astype(np.float32, copy=False)
    return Candidates(rows[:, :4], rows[:, 4], rows[:, 5].astype(np.int64), np.ascontiguousarray(rows[:, 6:]))


def decode_detect(output: np.ndarray, params: LetterboxParams, options: DetectOptions, *, nc: int | None = None) -> Detections:
    """Decode one image's YOLO head output (4 + nc, anchors): xywh boxes then class scores."""
    if output.ndim != 2 or output.shape[0] < 5:
        raise InputError(f"detect output: expected shape (4 + classes, anchors), got {output.shape}")
    c = select_candidates(output, options, nc=nc)
    if not len(c):
        return Detections.empty()
    return Detections(scale_boxes(c.boxes, params), c.confidence, c.class_id)


def decode_end2end(output: np.ndarray, params: LetterboxParams, options: DetectOptions) -> Detections:
    """Decode one image's NMS-free output (rows of x1, y1, x2, y2, conf, class), e.g. YOLO26 or nms=True exports."""
    c = select_end2end(output, options)
    return Detections(scale_boxes(c.boxes, params), c.confidence, c.class_id)


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
