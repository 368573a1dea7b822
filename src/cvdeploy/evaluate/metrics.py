"""Ultralytics' validation protocol in numpy: matching at 10 IoU thresholds, 101-point AP, and the task similarities.

Why a copy and not `ultralytics.utils.metrics`: the evaluator runs wherever a bundle runs, and the inference install
has no torch. Each function is Ultralytics' (8.4) in numpy, and `tests/evaluate/test_task_metrics.py` holds every one
to the original on the same inputs:

- `match_predictions`: `BaseValidator.match_predictions` (greedy, detections in descending confidence, each takes the
  unclaimed same-class target of highest IoU at each threshold)
- `average_precision`: the AP part of `ap_per_class` (precision envelope, 101-point interpolation, trapezoid rule; one
  row per class that has labels, a class without predictions scoring 0)
- `box_iou`, `mask_iou`, `kpt_iou` (OKS, with the 0.53 x box area of xtcocotools), `batch_probiou` (rotated boxes as
  Gaussians)
"""

from __future__ import annotations

import numpy as np

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
# COCO's person keypoints; Ultralytics uses 1/K per point for any other skeleton.
OKS_SIGMA_COCO = np.array([0.26, 0.25, 0.25, 0.35, 0.35, 0.79, 0.79, 0.72, 0.72, 0.62, 0.62, 1.07, 1.07, 0.87, 0.87, 0.89,
                           0.89]) / 10.0
_AP_X = np.linspace(0, 1, 101)
_EPS = 1e-7


def oks_sigmas(kpt_shape: tuple[int, int], custom: np.ndarray | None = None) -> np.ndarray:
    """The sigmas Ultralytics' pose validator uses: the data.yaml's `kpt_oks_sigmas`, COCO's for (17, 3), else 1/K."""
    k = int(kpt_shape[0])
    if custom is not None:
        return np.asarray(custom, np.float64)
    if tuple(kpt_shape) == (17, 3):
        return OKS_SIGMA_COCO
    return np.full(k, 1.0 / k)


def match_predictions(pred_cls: np.ndarray, true_cls: np.ndarray, iou: np.ndarray,
                      thresholds: np.ndarray = IOU_THRESHOLDS) -> np.ndarray:
    """(n_pred, T) bool: which predictions (in descending confidence) are true positives at each threshold;
    `iou` is (n_true, n_pred)."""
    correct = np.zeros((len(pred_cls), len(thresholds)), bool)
    if not len(pred_cls) or not len(true_cls):
        return correct
    iou = iou * (true_cls[:, None] == pred_cls[None, :])
    matched = np.zeros((iou.shape[0], len(thresholds)), bool)
    cols = np.arange(len(thresholds))
    for j in np.flatnonzero((iou >= thresholds.min()).any(0)):
        available = np.where(matched, 0, iou[:, j, None])
        k = available.argmax(0)
        correct[j] = available[k, cols] >= thresholds
        matched[k, cols] |= correct[j]
    return correct


def _ap(recall: np.ndarray, precision: np.ndarray) -> float:
    mrec = np.concatenate(([0.0], recall, [recall[-1] if len(recall) else 1.0], [1.0]))
    mpre = np.concatenate(([1.0], precision, [0.0], [0.0]))
    mpre = np.flip(np.maximum.accumulate(np.flip(mpre)))
    return float(np.trapezoid(np.interp(_AP_X, mrec, mpre), _AP_X))


def average_precision(tp: np.ndarray, conf: np.ndarray, pred_cls: np.ndarray, target_cls: np.ndarray) -> np.ndarray:
    """(classes with labels, T) AP of every labelled class at every threshold of `tp` (n_pred, T)."""
    order = np.argsort(-conf)
    tp, conf, pred_cls = tp[order], conf[order], pred_cls[order]
    classes, counts = np.unique(target_cls, return_counts=True)
    ap = np.zeros((len(classes), tp.shape[1]))
    for ci, (c, n_l) in enumerate(zip(classes, counts, strict=True)):
        sel = pred_cls == c
        if not sel.any():
            continue
        tpc = tp[sel].cumsum(0)
        fpc = (1 - tp[sel]).cumsum(0)
        recall = tpc / (n_l + 1e-16)
        precision = tpc / (tpc + fpc)
        for j in range(tp.shape[1]):
            ap[ci, j] = _ap(recall[:, j], precision[:, j])
    return ap


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) IoU of xyxy boxes."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(2)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter + _EPS)


def mask_iou(gt: np.ndarray, pred: np.ndarray, chunk: int = 64) -> np.ndarray:
    """(n_gt, n_pred) IoU of binary masks (n, H, W), by chunks of predictions to bound the memory."""
    g = gt.reshape(len(gt), -1).astype(np.float32)
    g_area = g.sum(1)
    out = np.zeros((len(gt), len(pred)))
    for s in range(0, len(pred), chunk):
        p = pred[s : s + chunk].reshape(min(chunk, len(pred) - s), -1).astype(np.float32)
        inter = g @ p.T
        out[:, s : s + len(p)] = inter / (g_area[:, None] + p.sum(1)[None, :] - inter + _EPS)
    return out


def mask_iou_where(gt: np.ndarray, pred: np.ndarray, pred_boxes: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """`mask_iou` computed only for the (gt, pred) `pairs` (bool, n_gt x n_pred), 0 elsewhere; each prediction's mask
    must lie inside its xyxy box `pred_boxes` (in the masks' pixels), as a cropped YOLO mask does. The same figure as
    `mask_iou` for those pairs, at a fraction of its cost: a split has hundreds of low-confidence masks per image."""
    out = np.zeros(pairs.shape)
    if not pairs.any():
        return out
    h, w = gt.shape[1:]
    g_area = gt.reshape(len(gt), -1).sum(1)
    for j in np.flatnonzero(pairs.any(0)):
        x1, y1 = (max(0, int(np.floor(v))) for v in pred_boxes[j, :2])
        x2, y2 = min(w, int(np.ceil(pred_boxes[j, 2])) + 1), min(h, int(np.ceil(pred_boxes[j, 3])) + 1)
        p = pred[j, y1:y2, x1:x2]
        p_area = int(pred[j].sum())
        for i in np.flatnonzero(pairs[:, j]):
            inter = int(np.count_nonzero(gt[i, y1:y2, x1:x2] & p))
            out[i, j] = inter / (g_area[i] + p_area - inter + _EPS)
    return out


def kpt_iou(gt: np.ndarray, pred: np.ndarray, area: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """(n_gt, n_pred) object keypoint similarity; `gt` (n, K, 3) with visibility, `pred` (m, K, >=2), `area` (n,)."""
    d = (gt[:, None, :, 0] - pred[None, :, :, 0]) ** 2 + (gt[:, None, :, 1] - pred[None, :, :, 1]) ** 2
    visible = gt[..., 2] != 0
    e = d / ((2 * sigma) ** 2 * (area[:, None, None] + _EPS) * 2)
    return (np.exp(-e) * visible[:, None]).sum(-1) / (visible.sum(-1)[:, None] + _EPS)


def _covariance(r: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a, b = r[:, 2] ** 2 / 12, r[:, 3] ** 2 / 12
    cos, sin = np.cos(r[:, 4]), np.sin(r[:, 4])
    return a * cos**2 + b * sin**2, a * sin**2 + b * cos**2, (a - b) * cos * sin


def batch_probiou(gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """(n_gt, n_pred) probabilistic IoU of rotated boxes xywhr (1 - Hellinger distance of their Gaussians)."""
    x1, y1 = gt[:, 0:1], gt[:, 1:2]
    x2, y2 = pred[None, :, 0], pred[None, :, 1]
    a1, b1, c1 = (v[:, None] for v in _covariance(gt))
    a2, b2, c2 = (v[None, :] for v in _covariance(pred))
    den = (a1 + a2) * (b1 + b2) - (c1 + c2) ** 2
    t1 = ((a1 + a2) * (y1 - y2) ** 2 + (b1 + b2) * (x1 - x2) ** 2) / (den + _EPS) * 0.25
    t2 = ((c1 + c2) * (x2 - x1) * (y1 - y2)) / (den + _EPS) * 0.5
    t3 = np.log(den / (4 * np.sqrt(np.clip(a1 * b1 - c1**2, 0, None) * np.clip(a2 * b2 - c2**2, 0, None)) + _EPS) + _EPS) * 0.5
    bd = np.clip(t1 + t2 + t3, _EPS, 100.0)
    return 1 - np.sqrt(1.0 - np.exp(-bd) + _EPS)


def summarize(ap: np.ndarray) -> tuple[float, float]:
    """(mAP50-95, mAP50) of `average_precision`'s array; 0 when no class has labels."""
    if not ap.size:
        return 0.0, 0.0
    return float(ap.mean()), float(ap[:, 0].mean())
