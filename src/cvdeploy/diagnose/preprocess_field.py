"""The field's side of the preprocessing audit: recorded answers parsed into detections (`parse_field_predictions`),
and how well a re-run agrees with them (`agreement`: box F1 x (1 - mean |Δconf|) x mean IoU)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cvdeploy.errors import InputError
from cvdeploy.vision.detections import Detections
from cvdeploy.vision.result import Result

__all__ = ["IOU_MATCH", "FieldPrediction", "agreement", "parse_field_predictions"]

IOU_MATCH = 0.5  # a field box and a re-run box are the same detection: same class, IoU >= 0.5 (as evaluate.parity)


# -- field predictions ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldPrediction:
    """One image's recorded field answer."""

    detections: Detections
    shape: tuple[int, int] | None = None  # (height, width) the field reported, when it did


def _box_of(det: Mapping[str, Any], where: str) -> list[float]:
    box = det.get("box", det.get("xyxy"))
    if isinstance(box, Mapping):
        try:
            return [float(box[k]) for k in ("x1", "y1", "x2", "y2")]
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{where}: a box needs numbers x1, y1, x2, y2, got {dict(box)!r}") from None
    if isinstance(box, Sequence) and len(box) == 4:
        try:
            return [float(v) for v in box]
        except (TypeError, ValueError):
            raise InputError(f"{where}: box values must be numbers, got {box!r}") from None
    raise InputError(f"{where}: each detection needs a 'box' {{x1, y1, x2, y2}} (or 'xyxy': [x1, y1, x2, y2]) in pixels")


def _detections_of(item: Any, where: str) -> FieldPrediction:
    if isinstance(item, Result):
        if item.detections is None:
            raise InputError(f"{where}: a {item.task} result has no detections")
        return FieldPrediction(item.detections, tuple(item.orig_shape))  # type: ignore[arg-type]
    if isinstance(item, Detections):
        return FieldPrediction(item)
    shape = None
    if isinstance(item, Mapping):
        img = item.get("image")
        if isinstance(img, Mapping) and "height" in img and "width" in img:
            shape = (int(img["height"]), int(img["width"]))
        if "detections" not in item and "xyxy" in item:  # column form: parallel lists
            try:
                xyxy = np.asarray(item["xyxy"], np.float32).reshape(-1, 4)
                conf = np.asarray(item.get("confidence", item.get("conf")), np.float32).reshape(-1)
                cls = np.asarray(item.get("class_id", item.get("cls")), np.int64).reshape(-1)
                return FieldPrediction(Detections(xyxy, conf, cls), shape)
            except (TypeError, ValueError) as e:
                raise InputError(f"{where}: xyxy, confidence and class_id must be parallel lists of numbers ({e})") from None
        if "detections" not in item:
            raise InputError(f"{where}: expected the image API's answer ({{'detections': [...]}}), "
                             f"got keys {', '.join(map(str, item)) or 'none'}")
        item = item["detections"]
    if not isinstance(item, Sequence) or isinstance(item, str | bytes):
        raise InputError(f"{where}: expected a list of detections, got {type(item).__name__}")
    boxes, confs, classes = [], [], []
    for j, det in enumerate(item):
        if not isinstance(det, Mapping):
            raise InputError(f"{where}, detection {j}: expected an object with box, confidence and class_id")
        boxes.append(_box_of(det, f"{where}, detection {j}"))
        try:
            confs.append(float(det["confidence"]))
            classes.append(int(det["class_id"]))
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{where}, detection {j}: needs a numeric 'confidence' and an integer 'class_id'") from None
    return FieldPrediction(Detections(np.asarray(boxes, np.float32).reshape(-1, 4), confs, classes), shape)


def parse_field_predictions(field_predictions: Any, n_images: int) -> list[FieldPrediction]:
    """Field answers, one per image in order: the image API's JSON (`{"detections": [{"box": {x1..y2}, "confidence",
    "class_id"}, ...]}`), a bare list of such detections, columns (`{"xyxy", "confidence", "class_id"}`), or Result /
    Detections objects. A `{"predictions": [...]}` or `{"results": [...]}` wrapper is unwrapped."""
    if isinstance(field_predictions, Mapping):
        for key in ("predictions", "results"):
            if key in field_predictions:
                field_predictions = field_predictions[key]
                break
        else:
            raise InputError("field predictions: expected a list with one answer per image")
    if not isinstance(field_predictions, Sequence) or isinstance(field_predictions, str | bytes):
        raise InputError("field predictions: expected a list with one answer per image")
    if len(field_predictions) != n_images:
        raise InputError(f"{len(field_predictions)} field prediction(s) for {n_images} image(s): give one answer per image, "
                         "in the same order as the images")
    return [_detections_of(p, f"field prediction {i}") for i, p in enumerate(field_predictions)]


# -- agreement between two sets of predictions -----------------------------------------------------


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = (x2 - x1).clip(0) * (y2 - y1).clip(0)
    union = (box[2] - box[0]) * (box[3] - box[1]) + (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-9), 0.0)


def agreement(field: Sequence[Detections], rerun: Sequence[Detections], conf: float) -> dict[str, Any]:
    """Greedy matching (field boxes by confidence, same class, IoU >= 0.5), pooled over images.

    `rerun` is predicted at half the field's threshold so that a box just below it still matches; its unmatched boxes
    count only above the threshold.
    """
    matched = n_field = n_rerun = 0
    ious: list[float] = []
    pairs: list[tuple[float, float]] = []
    rerun_kept, rerun_conf = 0, 0.0
    for f, r in zip(field, rerun, strict=True):
        n_field += len(f)
        above = r.confidence >= conf
        rerun_kept += int(above.sum())
        rerun_conf += float(r.confidence[above].sum())
        used = np.zeros(len(r), bool)
        for j in np.argsort(-f.confidence, kind="stable"):
            if len(r) == 0:
                break
            iou = _iou(f.xyxy[j], r.xyxy)
            iou[(r.class_id != f.class_id[j]) | used] = 0
            k = int(iou.argmax())
            if iou[k] >= IOU_MATCH:
                used[k] = True
                ious.append(float(iou[k]))
                pairs.append((float(f.confidence[j]), float(r.confidence[k])))
        matched += int(used.sum())
        n_rerun += int((above | used).sum())
    total = n_field + n_rerun
    f1 = 1.0 if total == 0 else 2 * matched / total
    mean_iou = float(np.mean(ious)) if ious else (1.0 if total == 0 else 0.0)
    dconf = float(np.mean([abs(a - b) for a, b in pairs])) if pairs else (0.0 if total == 0 else 1.0)
    corr = None
    if len(pairs) >= 3:
        a, b = np.asarray(pairs).T
        if a.std() > 1e-9 and b.std() > 1e-9:
            corr = round(float(np.corrcoef(a, b)[0, 1]), 4)
    score = f1 * (1.0 - dconf) * mean_iou if matched or total == 0 else 0.0
    return {"agreement": round(score, 4), "box_f1": round(f1, 4), "matched": matched, "field_boxes": n_field,
            "rerun_boxes": n_rerun, "mean_iou": round(mean_iou, 4), "mean_abs_dconf": round(dconf, 4), "conf_corr": corr,
            "dets_per_image": round(rerun_kept / max(len(rerun), 1), 3),
            "mean_conf": round(rerun_conf / rerun_kept, 4) if rerun_kept else None}
