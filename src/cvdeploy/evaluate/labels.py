"""Ultralytics' label formats read back for every task: segment polygons, pose keypoints, obb corners, classify folders.

The ground truth is held in the original image's pixels, the space a cvdeploy `Result` answers in, so that a
prediction is scored exactly as the Predictor returns it. What Ultralytics' validation does to a label before it is
compared is done here too, because the figures must agree with its `val`:

- segment: every polygon of an image is rasterised into one map where each pixel belongs to one object, larger objects
  drawn first so that a smaller one on top keeps its pixels (`polygons2masks_overlap`, its default `overlap_mask=True`);
  the box of a polygon is its extent (`segments2boxes`).
- pose: keypoints `x y [v]` per `kpt_shape`; a point with visibility 0 does not count in OKS; the box is the label's.
- obb: the 4 corners become centre, size and angle by OpenCV's minimum-area rectangle (`xyxyxyxy2xywhr`).
- classify: `SPLIT/<class name>/*.jpg`, the class named by its folder (the layout `cvdeploy data shapes --task classify`
  and Ultralytics' ImageFolder reader use).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from cvdeploy.errors import InputError
from cvdeploy.evaluate.coco import read_dataset_yaml
from cvdeploy.vision.image import image_files
from cvdeploy.vision.letterbox import LetterboxParams

BOX_TASKS = ("segment", "pose", "obb")


@dataclass(frozen=True)
class TaskLabels:
    """One image's labels in its own pixels; the task's field is set, the others are None."""

    path: Path
    height: int
    width: int
    class_id: np.ndarray  # (n,) int64
    xyxy: np.ndarray  # (n, 4): the polygon's extent (segment), the label's box (pose), the corners' extent (obb)
    polygons: list[np.ndarray] | None = None  # segment: (k, 2) each
    keypoints: np.ndarray | None = None  # pose: (n, K, 3) x, y, visibility (1 where the label gives none)
    xywhr: np.ndarray | None = None  # obb: (n, 5) centre, size, angle (rad)

    def overlap_masks(self, params: LetterboxParams, ratio: int = 4) -> np.ndarray:
        """(n, H, W) bool in the network input's pixels (`params`), drawn as Ultralytics' validator draws them: each
        polygon filled at the input's size (coordinates truncated), resized down by `ratio` (its mask_ratio), ranked
        by that area, larger first so that a smaller object on top keeps its pixels (overlap_mask), then resized back
        up bilinearly and thresholded at 0.5 (`val`'s labels for masks at the input's size)."""
        assert self.polygons is not None
        h, w = params.input_shape
        gx, gy = params.gain_xy
        small = []
        for poly in self.polygons:
            full = np.zeros((h, w), np.uint8)
            pts = poly * [gx, gy] + [params.left, params.top]
            cv2.fillPoly(full, [pts.astype(np.int32).reshape(-1, 1, 2)], 1)
            small.append(cv2.resize(full, (w // ratio, h // ratio)))
        index = np.zeros((h // ratio, w // ratio), np.int32)
        order = np.argsort([-int(m.sum()) for m in small], kind="stable")
        for rank, i in enumerate(order):
            index[small[i] > 0] = rank + 1
        masks = np.zeros((len(small), h, w), bool)
        for rank, i in enumerate(order):
            masks[i] = cv2.resize((index == rank + 1).astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR) > 0.5
        return masks


@dataclass(frozen=True)
class DatasetInfo:
    """What a data.yaml says beyond its images: class names, and for pose the keypoint shape and OKS sigmas."""

    names: dict[int, str]
    kpt_shape: tuple[int, int] | None = None
    kpt_oks_sigmas: np.ndarray | None = None


def split_dir(data: str | os.PathLike[str], split: str = "val") -> tuple[Path, dict[str, Any]]:
    """The image directory of `split` and the data.yaml's contents ({} for a classify directory given as such)."""
    p = Path(data)
    if p.is_dir():  # Ultralytics' classify `data=`: the dataset directory with train/ and val/
        if (p / split).is_dir():
            return p / split, {}
        if (p / "data.yaml").is_file():
            p = p / "data.yaml"
        else:
            raise InputError(f"{p} has no {split}/ folder (a classify dataset holds {split}/<class>/*.jpg)")
    if not p.is_file():
        raise InputError(f"dataset not found: {p}")
    doc = read_dataset_yaml(p)
    if split not in doc:
        raise InputError(f"{p} has no {split!r} split")
    root = Path(doc.get("path") or p.parent)
    if not root.is_absolute():
        root = (p.parent / root).resolve()
    folder = root / str(doc[split])
    if not folder.is_dir():
        raise InputError(f"{split} images not found: {folder}")
    return folder, doc


def dataset_info(doc: dict[str, Any]) -> DatasetInfo:
    raw = doc.get("names", {})
    names = dict(enumerate(raw)) if isinstance(raw, list) else {int(k): str(v) for k, v in raw.items()}
    shape = doc.get("kpt_shape")
    sigmas = doc.get("kpt_oks_sigmas")
    return DatasetInfo(names, tuple(int(v) for v in shape) if shape else None,  # type: ignore[arg-type]
                       np.asarray(sigmas, np.float64).ravel() if sigmas else None)


def split_images(data: str | os.PathLike[str], split: str = "val") -> list[Path]:
    """Every image of a split, whatever the task's layout (for profiling and calibration)."""
    folder, _ = split_dir(data, split)
    found = image_files(folder)
    if not found:
        raise InputError(f"no images in {folder}")
    return found


def _rows(label: Path) -> list[np.ndarray]:
    if not label.is_file():
        return []
    out = []
    for i, line in enumerate(label.read_text().splitlines(), 1):
        if line.strip():
            try:
                out.append(np.array(line.split(), np.float64))
            except ValueError as e:
                raise InputError(f"{label}:{i}: not a YOLO label line: {line.strip()[:60]!r}") from e
    return out


def _label_path(image: Path) -> Path:
    # Ultralytics' convention: .../images/... -> .../labels/... with a .txt suffix.
    return Path(str(image.parent).replace(f"{os.sep}images", f"{os.sep}labels", 1)) / f"{image.stem}.txt"


def _parse(task: str, rows: list[np.ndarray], h: int, w: int, kpt_shape: tuple[int, int] | None, where: Path) -> dict[str, Any]:
    scale = np.array([w, h], np.float64)
    cls = np.array([int(r[0]) for r in rows], np.int64)
    if task == "segment":
        polys = []
        for r in rows:
            pts = r[1:]
            if len(pts) == 4:  # a box row in a segment set: its rectangle
                cx, cy, bw, bh = pts
                pts = np.array([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2, cx - bw / 2, cy + bh / 2])
            if len(pts) < 6 or len(pts) % 2:
                raise InputError(f"{where}: a segment label is `class x1 y1 x2 y2 x3 y3 ...`, got {len(r)} values")
            polys.append(pts.reshape(-1, 2) * scale)
        xyxy = np.array([[*p.min(0), *p.max(0)] for p in polys]).reshape(-1, 4)
        return {"class_id": cls, "xyxy": xyxy, "polygons": polys}
    if task == "pose":
        if kpt_shape is None:
            raise InputError("pose labels need the keypoint shape (kpt_shape in the data.yaml, or the model's)")
        k, d = kpt_shape
        if any(len(r) != 5 + k * d for r in rows):
            raise InputError(f"{where}: a pose label with kpt_shape {list(kpt_shape)} has {5 + k * d} values per line")
        arr = np.stack(rows) if rows else np.zeros((0, 5 + k * d))
        cx, cy, bw, bh = arr[:, 1] * w, arr[:, 2] * h, arr[:, 3] * w, arr[:, 4] * h
        kpts = arr[:, 5:].reshape(-1, k, d)
        xy = kpts[..., :2] * scale
        vis = kpts[..., 2:3] if d == 3 else np.ones((len(arr), k, 1))
        return {"class_id": cls, "xyxy": np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1),
                "keypoints": np.concatenate([xy, vis], 2)}
    if any(len(r) != 9 for r in rows):
        raise InputError(f"{where}: an obb label is `class x1 y1 x2 y2 x3 y3 x4 y4` (9 values per line)")
    corners = [r[1:].reshape(4, 2) * scale for r in rows]
    xywhr = []
    for c in corners:
        (cx, cy), (bw, bh), angle = cv2.minAreaRect(c.astype(np.float32))
        theta = angle / 180 * np.pi
        if bw < bh:  # Ultralytics' canonical form: w the longer side, the angle in [-pi/4, 3pi/4)
            bw, bh, theta = bh, bw, theta + np.pi / 2
        theta = (theta + np.pi / 4) % np.pi - np.pi / 4
        xywhr.append([cx, cy, bw, bh, theta])
    xyxy = np.array([[*c.min(0), *c.max(0)] for c in corners]).reshape(-1, 4)
    return {"class_id": cls, "xyxy": xyxy, "xywhr": np.array(xywhr, np.float64).reshape(-1, 5)}


def load_task_split(data: str | os.PathLike[str], task: str, split: str = "val", *,
                    kpt_shape: tuple[int, int] | None = None) -> tuple[list[TaskLabels], DatasetInfo]:
    """The images and labels of one split of a segment, pose or obb data.yaml. `kpt_shape` (the model's) is used when
    the data.yaml gives none, and must agree with it when it does."""
    if task not in BOX_TASKS:
        raise InputError(f"load_task_split reads {', '.join(BOX_TASKS)} labels, not {task!r}")
    folder, doc = split_dir(data, split)
    if not doc:
        raise InputError(f"{data}: a {task} dataset is a data.yaml (path, {split}, names), not a folder")
    info = dataset_info(doc)
    if task == "pose":
        if info.kpt_shape is not None and kpt_shape is not None and tuple(info.kpt_shape) != tuple(kpt_shape):
            raise InputError(f"{data} has kpt_shape {list(info.kpt_shape)}; the model predicts {list(kpt_shape)}")
        shape = info.kpt_shape or kpt_shape
        info = DatasetInfo(info.names, shape, info.kpt_oks_sigmas)
    items = []
    for p in image_files(folder):
        img = cv2.imread(str(p))
        if img is None:
            raise InputError(f"unreadable image in the dataset: {p}")
        h, w = img.shape[:2]
        fields = _parse(task, _rows(_label_path(p)), h, w, info.kpt_shape, _label_path(p))
        items.append(TaskLabels(p, h, w, **fields))
    if not items:
        raise InputError(f"no images in {folder}")
    return items, info


def load_classify_split(data: str | os.PathLike[str], names: dict[int, str], split: str = "val") -> list[tuple[Path, int]]:
    """(image, class id) for each image of `split`/<class>/, the class id the model's (`names`) for the folder's name.
    A folder whose name the model does not know is refused: its images could only be counted wrong."""
    folder, _ = split_dir(data, split)
    ids = {v: k for k, v in names.items()}
    classes = sorted(d for d in folder.iterdir() if d.is_dir())
    if not classes:
        raise InputError(f"{folder} has no class folders (a classify split holds <class name>/*.jpg)")
    unknown = [d.name for d in classes if d.name not in ids]
    if unknown:
        raise InputError(f"{folder}: class folder(s) {', '.join(unknown[:5])} are not among the model's classes "
                         f"({', '.join(list(ids)[:10])})")
    items = [(p, ids[d.name]) for d in classes for p in image_files(d)]
    if not items:
        raise InputError(f"no images under {folder}")
    return items
