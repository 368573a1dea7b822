"""Oriented boxes (xywhr, radians) as Ultralytics handles them: probabilistic IoU, rotated fast NMS, corners, scaling.

Ultralytics' rotated NMS is Fast-NMS (not greedy): after sorting by confidence, a box is dropped when ANY more confident
box, kept or not, overlaps it by more than the threshold, overlap being the probabilistic IoU of the boxes' Gaussians
(`batch_probiou`). Predicted angles are not canonicalised (this Ultralytics returns them as the head gives them:
width may be shorter than height); `regularize_rboxes` gives the canonical form for whoever needs it.
"""

from __future__ import annotations

import math

import numpy as np

from cvdeploy.vision.letterbox import LetterboxParams

_EPS = np.float32(1e-7)
_BLOCK = 1024  # columns of the IoU matrix computed at once: memory stays O(n * block)


def _covariance(boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a = boxes[:, 2] ** 2 / np.float32(12)
    b = boxes[:, 3] ** 2 / np.float32(12)
    cos, sin = np.cos(boxes[:, 4]), np.sin(boxes[:, 4])
    cos2, sin2 = cos**2, sin**2
    return a * cos2 + b * sin2, a * sin2 + b * cos2, (a - b) * cos * sin


def batch_probiou(obb1: np.ndarray, obb2: np.ndarray) -> np.ndarray:
    """(n, m) probabilistic IoU of xywhr boxes (Ultralytics' `batch_probiou`, in float32)."""
    b1, b2 = np.asarray(obb1, np.float32), np.asarray(obb2, np.float32)
    x1, y1 = b1[:, 0:1], b1[:, 1:2]
    x2, y2 = b2[None, :, 0], b2[None, :, 1]
    a1, bb1, c1 = (v[:, None] for v in _covariance(b1))
    a2, bb2, c2 = (v[None, :] for v in _covariance(b2))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        den = (a1 + a2) * (bb1 + bb2) - (c1 + c2) ** 2
        t1 = (((a1 + a2) * (y1 - y2) ** 2 + (bb1 + bb2) * (x1 - x2) ** 2) / (den + _EPS)) * np.float32(0.25)
        t2 = (((c1 + c2) * (x2 - x1) * (y1 - y2)) / (den + _EPS)) * np.float32(0.5)
        det = np.clip(a1 * bb1 - c1**2, 0, None) * np.clip(a2 * bb2 - c2**2, 0, None)
        t3 = np.log(den / (4 * np.sqrt(det) + _EPS) + _EPS) * np.float32(0.5)
        bd = np.clip(t1 + t2 + t3, _EPS, np.float32(100.0))
        hd = np.sqrt(np.float32(1.0) - np.exp(-bd) + _EPS)
    return (np.float32(1) - hd).astype(np.float32, copy=False)


def nms_rotated(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, *, max_keep: int | None = None) -> np.ndarray:
    """Ultralytics' rotated NMS (`TorchNMS.fast_nms` with `batch_probiou`): indices kept, best first."""
    n = len(boxes)
    if n == 0 or (max_keep is not None and max_keep <= 0):
        return np.zeros(0, np.int64)
    order = np.argsort(-scores, kind="stable")
    b = np.asarray(boxes, np.float32)[order]
    suppressed = np.zeros(n, bool)
    for start in range(0, n, _BLOCK):
        stop = min(n, start + _BLOCK)
        iou = batch_probiou(b[:stop], b[start:stop])  # rows: every box up to the block's end; columns: the block
        earlier = np.arange(stop)[:, None] < np.arange(start, stop)[None, :]  # the upper triangle: more confident rows
        suppressed[start:stop] = ((iou > iou_threshold) & earlier).any(0)
    keep = order[~suppressed]
    return keep if max_keep is None else keep[:max_keep]


def xywhr2xyxyxyxy(rboxes: np.ndarray) -> np.ndarray:
    """(n, 5) xywhr -> (n, 4, 2) corners, counter-clockwise as drawn, from the +w/2, +h/2 corner (Ultralytics' order)."""
    r = np.asarray(rboxes, np.float32)
    ctr = r[..., :2]
    w, h, angle = (r[..., i : i + 1] for i in range(2, 5))
    cos, sin = np.cos(angle), np.sin(angle)
    vec1 = np.concatenate([w / 2 * cos, w / 2 * sin], -1)
    vec2 = np.concatenate([-h / 2 * sin, h / 2 * cos], -1)
    return np.stack([ctr + vec1 + vec2, ctr + vec1 - vec2, ctr - vec1 - vec2, ctr - vec1 + vec2], -2)


def corners_to_xyxy(corners: np.ndarray) -> np.ndarray:
    """(n, 4, 2) corners -> (n, 4) axis-aligned boxes enclosing them (Ultralytics' `OBB.xyxy`)."""
    x, y = corners[..., 0], corners[..., 1]
    return np.stack([x.min(1), y.min(1), x.max(1), y.max(1)], -1) if len(corners) else np.zeros((0, 4), np.float32)


def regularize_rboxes(rboxes: np.ndarray) -> np.ndarray:
    """The canonical form of xywhr boxes: angle in [0, pi/2), width and height swapped where that needs it."""
    r = np.asarray(rboxes, np.float32).copy()
    swap = r[:, 4] % math.pi >= math.pi / 2
    r[swap, 2], r[swap, 3] = r[swap, 3], r[swap, 2].copy()
    r[:, 4] = r[:, 4] % (math.pi / 2)
    return r


def scale_rboxes(rboxes: np.ndarray, params: LetterboxParams) -> np.ndarray:
    """xywhr boxes from network-input pixels to original-image pixels (Ultralytics' `scale_boxes(..., xywh=True)`:
    centre shifted by the padding, centre and size divided by the per-axis gains, the angle kept, nothing clipped)."""
    gx, gy = params.gain_xy
    out = np.asarray(rboxes, np.float32).copy()
    out[:, 0] = (out[:, 0] - params.left) / gx
    out[:, 1] = (out[:, 1] - params.top) / gy
    out[:, 2] /= gx
    out[:, 3] /= gy
    return out
