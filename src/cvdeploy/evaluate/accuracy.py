"""Accuracy of a Predictor on a labelled split, for every task, in the task's own figure.

| task | primary figure (`TaskMetrics.primary`) | also |
| --- | --- | --- |
| detect | box mAP50-95, COCO protocol (faster-coco-eval, `evaluate_detect`) | mAP50 |
| segment | mask mAP50-95 | mask mAP50, box mAP50-95 and mAP50 |
| pose | keypoint (OKS) mAP50-95 | pose mAP50, box mAP50-95 and mAP50 |
| obb | rotated-box (probiou) mAP50-95 | mAP50 |
| classify | top-1 accuracy | top-5 |

The predictions are cvdeploy's own: the Predictor's stages (decode, letterbox, engine, task decoder), one image at a
time, at Ultralytics' validation thresholds (conf 0.001, iou 0.7, max_det 300), with the validator's multi-label NMS
(`cvdeploy.evaluate.val_predict`). segment, pose and obb are scored with Ultralytics' `val` protocol
(`cvdeploy.evaluate.metrics`) so that the figure is the one `yolo val` prints for the same model and data;
`tests/evaluate/test_task_accuracy.py` holds each within 0.02 of it. Boxes, keypoints and rotated boxes are compared in
the image's pixels; masks at the network input's size (the Predictor's masks) against labels drawn there as
Ultralytics draws them (`TaskLabels.overlap_masks`).

For segment, pose and obb, `map50_95` and `map50` hold the primary figure (mask, keypoint, rotated box) so that
every consumer of a variant's `map50_95` (budget, report, card, registry) reads the task's figure; the `box_`,
`mask_` and `pose_` keys name each one explicitly.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cvdeploy.errors import InputError
from cvdeploy.evaluate import metrics as M
from cvdeploy.evaluate.labels import TaskLabels, load_classify_split, load_task_split
from cvdeploy.evaluate.val_predict import val_detections
from cvdeploy.vision.letterbox import LetterboxParams
from cvdeploy.vision.postprocess import DetectOptions

VAL_CONF, VAL_IOU, VAL_MAX_DET = 0.001, 0.7, 300  # Ultralytics' validation thresholds
PRIMARY = {"detect": "map50_95", "segment": "map50_95", "pose": "map50_95", "obb": "map50_95", "classify": "top1"}
LABELS = {"detect": "mAP50-95", "segment": "mask mAP50-95", "pose": "keypoint mAP50-95", "obb": "rotated-box mAP50-95",
          "classify": "top-1"}
TASKS = tuple(PRIMARY)


@dataclass(frozen=True)
class TaskMetrics:
    """A task's figures on a split; `values[primary]` is the one the variant budget and `verify` hold."""

    task: str
    values: dict[str, float]
    images: int
    instances: int  # labelled objects (classify: images)
    per_class: dict[str, float] = field(default_factory=dict)  # primary figure by class name

    @property
    def primary(self) -> str:
        return PRIMARY[self.task]

    @property
    def score(self) -> float:
        return self.values[self.primary]

    @property
    def label(self) -> str:
        return LABELS[self.task]

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "metric": self.label, "primary": self.primary, "score": round(self.score, 5),
                **{k: round(v, 5) for k, v in self.values.items()}, "images": self.images, "instances": self.instances,
                "per_class": {k: round(v, 5) for k, v in self.per_class.items()}}


def primary_key(task: str) -> str:
    if task not in PRIMARY:
        raise InputError(f"no accuracy figure for task {task!r}; tasks: {', '.join(TASKS)}")
    return PRIMARY[task]


# -- box tasks ------------------------------------------------------------------------------------------


@dataclass
class _Stats:
    """Per-prediction true positives (one array per figure), confidences and classes over the whole split."""

    tp: dict[str, list[np.ndarray]] = field(default_factory=dict)
    conf: list[np.ndarray] = field(default_factory=list)
    pred_cls: list[np.ndarray] = field(default_factory=list)
    target_cls: list[np.ndarray] = field(default_factory=list)

    def add(self, conf: np.ndarray, pred_cls: np.ndarray, target_cls: np.ndarray, **tp: np.ndarray) -> None:
        self.conf.append(conf)
        self.pred_cls.append(pred_cls)
        self.target_cls.append(target_cls)
        for k, v in tp.items():
            self.tp.setdefault(k, []).append(v)

    def ap(self, key: str) -> np.ndarray:
        return M.average_precision(np.concatenate(self.tp[key]), np.concatenate(self.conf),
                                   np.concatenate(self.pred_cls), np.concatenate(self.target_cls))

    def classes(self) -> np.ndarray:
        return np.unique(np.concatenate(self.target_cls)) if self.target_cls else np.zeros(0, np.int64)


def _similarities(task: str, g: TaskLabels, det: Any, params: LetterboxParams, sigma: np.ndarray | None) -> dict[str, np.ndarray]:
    """(n_gt, n_pred) similarity per figure: box IoU and the task's own (mask IoU, OKS, probiou)."""
    if task == "obb":
        return {"obb": M.batch_probiou(g.xywhr, det.data["xywhr"].astype(np.float64))}  # type: ignore[arg-type]
    out = {"box": M.box_iou(g.xyxy, det.xyxy.astype(np.float64))}
    if task == "segment":
        # Masks are cropped to their boxes: a prediction whose box meets no same-class label box has IoU 0 with all.
        pairs = (out["box"] > 0) & (g.class_id[:, None] == det.class_id[None, :])
        gx, gy = params.gain_xy  # the masks are the Predictor's, at the network input's size: labels are drawn there
        boxes = det.xyxy * [gx, gy, gx, gy] + [params.left, params.top, params.left, params.top]
        out["mask"] = M.mask_iou_where(g.overlap_masks(params), det.data["masks"].astype(bool), boxes, pairs)
    else:
        wh = g.xyxy[:, 2:] - g.xyxy[:, :2]
        area = wh.prod(1) * 0.53  # xtcocotools' keypoint area from the box, as Ultralytics
        out["pose"] = M.kpt_iou(g.keypoints, det.data["keypoints"].astype(np.float64), area, sigma)  # type: ignore[arg-type]
    return out


def _box_task(predictor: Any, data: str | os.PathLike[str], split: str, progress: Callable[[int], None] | None,
              rect: bool) -> TaskMetrics:
    task = predictor.task
    kpt_shape = predictor.head.kpt_shape if task == "pose" else None
    gt, info = load_task_split(data, task, split, kpt_shape=kpt_shape)
    sigma = M.oks_sigmas(info.kpt_shape, info.kpt_oks_sigmas) if task == "pose" else None  # type: ignore[arg-type]
    stats = _Stats()
    options = DetectOptions(conf=VAL_CONF, iou=VAL_IOU, max_det=VAL_MAX_DET)
    for g in gt:
        det, params = val_detections(predictor, g.path, options, rect=rect)
        order = np.argsort(-det.confidence, kind="stable")  # the matching walks predictions best first
        det = det[order]
        n = len(det)
        if n and len(g.class_id):
            tps = {k: M.match_predictions(det.class_id, g.class_id, v) for k, v in _similarities(task, g, det, params, sigma).items()}
        else:
            keys = ("obb",) if task == "obb" else ("box", {"segment": "mask", "pose": "pose"}[task])
            tps = {k: np.zeros((n, len(M.IOU_THRESHOLDS)), bool) for k in keys}
        stats.add(det.confidence.astype(np.float64), det.class_id, g.class_id, **tps)
        if progress:
            progress(1)
    values: dict[str, float] = {}
    classes = stats.classes()
    per_class: dict[str, float] = {}
    for key in stats.tp:
        ap = stats.ap(key)
        m, m50 = M.summarize(ap)
        prefix = "" if key == "obb" else f"{key}_"
        values[f"{prefix}map50_95"], values[f"{prefix}map50"] = m, m50
        if key in ("mask", "pose", "obb"):
            values["map50_95"], values["map50"] = m, m50
            per_class = {predictor.names.get(int(c), str(c)): float(a) for c, a in zip(classes, ap.mean(1), strict=True)}
    return TaskMetrics(task, values, len(gt), int(sum(len(g.class_id) for g in gt)), per_class)


# -- classify and detect --------------------------------------------------------------------------------


def _classify(predictor: Any, data: str | os.PathLike[str], split: str, progress: Callable[[int], None] | None) -> TaskMetrics:
    items = load_classify_split(data, predictor.names, split)
    k = min(5, len(predictor.names))
    top1 = top5 = 0
    hits: dict[int, list[bool]] = {}
    for path, cls in items:
        probs = predictor.predict(path).probabilities
        top = np.argsort(-probs, kind="stable")[:k]
        top1 += int(top[0] == cls)
        top5 += int(cls in top)
        hits.setdefault(cls, []).append(bool(top[0] == cls))
        if progress:
            progress(1)
    n = len(items)
    per_class = {predictor.names[c]: float(np.mean(h)) for c, h in sorted(hits.items())}
    return TaskMetrics("classify", {"top1": top1 / n, "top5": top5 / n}, n, n, per_class)


def _detect(predictor: Any, data: str | os.PathLike[str], split: str, progress: Callable[[int], None] | None) -> TaskMetrics:
    from cvdeploy.evaluate.coco import evaluate_detect

    m = evaluate_detect(predictor, data, split=split, conf=VAL_CONF, iou=VAL_IOU, max_det=VAL_MAX_DET, progress=progress)
    return TaskMetrics("detect", {"map50_95": m.map50_95, "map50": m.map50}, m.images, m.instances)


def evaluate(predictor: Any, data: str | os.PathLike[str], *, split: str = "val", rect: bool = True,
             progress: Callable[[int], None] | None = None) -> TaskMetrics:
    """The accuracy of `predictor` (a cvdeploy Predictor) on `split` of `data`: a data.yaml for detect, segment, pose and
    obb; the dataset directory (or its data.yaml) for classify. The task is the predictor's. `rect=False` letterboxes
    segment, pose and obb images to the square input size, as `val(rect=False)` does (the default is the Predictor's
    own letterbox, as it serves)."""
    task = predictor.task
    if task == "classify":
        return _classify(predictor, data, split, progress)
    if task == "detect":
        return _detect(predictor, data, split, progress)
    if task in ("segment", "pose", "obb"):
        return _box_task(predictor, data, split, progress, rect)
    raise InputError(f"no accuracy figure for task {task!r}; tasks: {', '.join(TASKS)}")
