"""COCO-protocol mAP (faster-coco-eval) of a Predictor on a YOLO-format split."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from cvdeploy.errors import InputError, MissingDependencyError
from cvdeploy.vision.image import image_files


@dataclass(frozen=True)
class LabelledImage:
    path: Path
    height: int
    width: int
    xyxy: np.ndarray  # (n, 4) pixels
    class_id: np.ndarray  # (n,)


@dataclass(frozen=True)
class DetectionMetrics:
    map50_95: float
    map50: float
    images: int
    instances: int

    def to_dict(self) -> dict[str, float | int]:
        return {"map50_95": round(self.map50_95, 4), "map50": round(self.map50, 4), "images": self.images, "instances": self.instances}


def read_dataset_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise InputError(f"cannot read dataset file {path}: {e}") from e
    if not isinstance(data, dict):
        raise InputError(f"{path} is not a dataset description (expected a mapping with path/train/val/names)")
    return data


def load_yolo_split(data_yaml: str | os.PathLike[str], split: str = "val") -> tuple[list[LabelledImage], dict[int, str]]:
    """Images and their labels (YOLO txt: class cx cy w h, normalized) of one split of a data.yaml."""
    from cvdeploy.evaluate.labels import split_dir

    yml = Path(data_yaml)
    if not yml.is_file():
        raise InputError(f"dataset file not found: {yml}")
    img_dir, data = split_dir(yml, split)
    names_raw = data.get("names", {})
    names = dict(enumerate(names_raw)) if isinstance(names_raw, list) else {int(k): str(v) for k, v in names_raw.items()}
    items = []
    for p in image_files(img_dir):
        # Ultralytics' convention: .../images/... -> .../labels/... with a .txt suffix.
        label = Path(str(p.parent).replace(f"{os.sep}images", f"{os.sep}labels", 1)) / f"{p.stem}.txt"
        img = cv2.imread(str(p))
        if img is None:
            raise InputError(f"unreadable image in the dataset: {p}")
        h, w = img.shape[:2]
        rows = np.zeros((0, 5), np.float64)
        if label.is_file() and label.read_text().strip():
            rows = np.loadtxt(label, ndmin=2)[:, :5]
        cx, cy, bw, bh = rows[:, 1] * w, rows[:, 2] * h, rows[:, 3] * w, rows[:, 4] * h
        xyxy = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1) if len(rows) else np.zeros((0, 4))
        items.append(LabelledImage(p, h, w, xyxy, rows[:, 0].astype(np.int64)))
    if not items:
        raise InputError(f"no images in {img_dir}")
    return items, names


def coco_dataset(gt: Sequence[LabelledImage], preds: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]
                 ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """COCO images, annotations (labels) and detections of a split and its predictions ((xyxy, confidence, class_id) per
    image): the one construction every COCO figure of the project starts from, so that they agree."""
    images, anns, dets = [], [], []
    for i, (g, (xyxy, conf, cls)) in enumerate(zip(gt, preds, strict=True)):
        images.append({"id": i, "width": g.width, "height": g.height, "file_name": g.path.name})
        for b, c in zip(g.xyxy, g.class_id, strict=True):
            w, h = float(b[2] - b[0]), float(b[3] - b[1])
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(c), "bbox": [float(b[0]), float(b[1]), w, h],
                         "area": w * h, "iscrowd": 0})
        for b, s, c in zip(xyxy, conf, cls, strict=True):
            dets.append({"image_id": i, "category_id": int(c), "score": float(s),
                         "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]})
    return images, anns, dets


def coco_eval(images: list[dict[str, Any]], anns: list[dict[str, Any]], dets: list[dict[str, Any]], nc: int,
              **options: Any) -> Any:
    """faster-coco-eval's evaluator, evaluated, accumulated and summarised (options: e.g. ranges= for size buckets)."""
    try:
        from faster_coco_eval import COCO, COCOeval_faster
    except ImportError as e:
        raise MissingDependencyError("faster-coco-eval", "build", "measuring mAP") from e
    coco_gt = COCO({"images": images, "annotations": anns, "categories": [{"id": k} for k in range(nc)]})
    ev = COCOeval_faster(coco_gt, coco_gt.loadRes(dets), "bbox", **options)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return ev


def coco_map(gt: list[LabelledImage], preds: list[tuple[np.ndarray, np.ndarray, np.ndarray]], nc: int) -> DetectionMetrics:
    """mAP50-95 and mAP50 by the COCO protocol; preds are (xyxy, confidence, class_id) per image."""
    images, anns, dets = coco_dataset(gt, preds)
    if not dets:
        return DetectionMetrics(0.0, 0.0, len(gt), len(anns))
    ev = coco_eval(images, anns, dets, nc)
    return DetectionMetrics(float(ev.stats[0]), float(ev.stats[1]), len(gt), len(anns))


def evaluate_detect(
    predictor: Any, data_yaml: str | os.PathLike[str], *, split: str = "val", conf: float = 0.001, iou: float = 0.7,
    max_det: int = 300, progress: Callable[[int], None] | None = None,
) -> DetectionMetrics:
    """Run `predictor` (a cvdeploy Predictor) over a split at validation thresholds and score it."""
    gt, _ = load_yolo_split(data_yaml, split)
    preds = []
    for g in gt:
        d = predictor.predict(g.path, conf=conf, iou=iou, max_det=max_det).detections
        preds.append((d.xyxy, d.confidence, d.class_id))
        if progress:
            progress(1)
    return coco_map(gt, preds, nc=len(predictor.names))
