"""Deterministic synthetic "shapes" dataset: scenes of polygons on textured, noisy backgrounds.

Every object is kept as a polygon, so the one scene description is written for every task:

- detect: `class cx cy w h` (the polygon's axis-aligned box);
- segment: `class x1 y1 x2 y2 ...` (the drawn polygon, amodal: a part hidden by a later object
  stays in the label);
- pose: the box plus K=4 keypoints per object, the shape's extreme points in the fixed order
  top, right, bottom, left (see `extreme_keypoints`), with COCO visibility (2 visible, 1 hidden
  under an object drawn later); `kpt_shape: [4, 3]`, `flip_idx: [0, 3, 2, 1]`;
- obb: `class x1 y1 ... x4 y4`, the minimum-area rotated rectangle of the polygon; scenes for
  this task are drawn with half of the objects elongated (ellipses, rectangles, flattened
  polygons at any angle) so that the angle matters, and with every rectangle inside the image;
- classify: an ImageNet-style folder tree `train/<class>/*.jpg`, `val/<class>/*.jpg` of square
  crops centred on single objects, balanced over the classes.

The detect output for a seed is byte-identical to what it was before the other tasks existed
(the packaged detect model and its tests depend on it): segment and pose label the very same
scenes, obb and classify draw from their own parameters or random streams.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from cvdeploy.errors import CvdeployError

CLASS_NAMES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "cross")
TASKS: tuple[str, ...] = ("detect", "segment", "pose", "obb", "classify")
KPT_NAMES: tuple[str, ...] = ("top", "right", "bottom", "left")
KPT_SHAPE: tuple[int, int] = (len(KPT_NAMES), 3)
FLIP_IDX: tuple[int, ...] = (0, 3, 2, 1)  # a horizontal flip swaps right and left
OBB_ELONGATED_FRACTION = 0.5  # of the objects of an obb scene
CLASSIFY_CROP_PX = 96  # side of the classification crops


@dataclass(frozen=True)
class ShapesConfig:
    """How scenes are drawn; the defaults are the ones the demo model was trained on."""

    min_side: int = 160
    max_side: int = 384
    min_aspect: float = 0.5  # width / height
    max_aspect: float = 2.0
    min_objects: int = 1
    max_objects: int = 8
    min_object_px: float = 16.0  # circumscribed diameter, in pixels
    max_object_frac: float = 0.5  # of the shorter image side
    max_overlap_iou: float = 0.35  # boxes may overlap, but no object is hidden
    noise_sigma: tuple[float, float] = (2.0, 10.0)
    jpeg_quality: int = 92

    def __post_init__(self) -> None:
        if not 32 <= self.min_side <= self.max_side:
            raise CvdeployError(f"shapes: need 32 <= min_side <= max_side, got {self.min_side}, {self.max_side}")
        if not 0 < self.min_aspect <= self.max_aspect:
            raise CvdeployError("shapes: need 0 < min_aspect <= max_aspect")
        if not 1 <= self.min_objects <= self.max_objects:
            raise CvdeployError("shapes: need 1 <= min_objects <= max_objects")


@dataclass
class ShapeObject:
    """One drawn object: its class and its outline in pixel coordinates (float, (k, 2))."""

    class_id: int
    polygon: np.ndarray
    vertices: np.ndarray  # the shape's defining points (corners, star tips), usable as keypoints

    @property
    def xyxy(self) -> np.ndarray:
        return np.concatenate([self.polygon.min(0), self.polygon.max(0)])

    def rotated_rect(self) -> np.ndarray:
        """The minimum-area rotated rectangle of the polygon: its 4 corners, (4, 2), in pixels."""
        return cv2.boxPoints(cv2.minAreaRect(self.polygon.astype(np.float32))).astype(np.float64)

    def keypoints(self) -> np.ndarray:
        """K=4 keypoints (top, right, bottom, left), (4, 2), in pixels: see `extreme_keypoints`."""
        return extreme_keypoints(self.polygon)


def extreme_keypoints(polygon: np.ndarray, band: float = 0.04, samples: int = 512) -> np.ndarray:
    """The outline's extreme points in the order top, right, bottom, left.

    Each is the mean of the outline points (resampled evenly along the perimeter) that lie within
    `band` x the object's size of the extreme line, so that an edge lying flat on the box side
    gives its middle, a corner gives the corner, and the point moves continuously in between as
    the shape turns (no jump between two equally high corners).
    """
    closed = np.vstack([polygon, polygon[:1]])
    seg = np.linalg.norm(np.diff(closed, axis=0), axis=1)
    at = np.concatenate([[0.0], np.cumsum(seg)])
    t = np.linspace(0.0, at[-1], samples, endpoint=False)
    pts = np.stack([np.interp(t, at, closed[:, 0]), np.interp(t, at, closed[:, 1])], 1)
    size = float(max(np.ptp(polygon[:, 0]), np.ptp(polygon[:, 1])))
    tol = band * size
    x, y = pts[:, 0], pts[:, 1]
    masks = (y <= y.min() + tol, x >= x.max() - tol, y >= y.max() - tol, x <= x.min() + tol)
    return np.stack([pts[m].mean(0) for m in masks])


@dataclass
class Scene:
    image: np.ndarray  # BGR uint8
    objects: list[ShapeObject] = field(default_factory=list)


def _regular(n: int, radius: float, rot: float) -> np.ndarray:
    a = rot + np.arange(n) * 2 * math.pi / n
    return np.stack([np.cos(a), np.sin(a)], 1) * radius


def _outline(class_id: int, radius: float, rot: float) -> tuple[np.ndarray, np.ndarray]:
    """Polygon (dense outline) and defining vertices of a shape centred on the origin."""
    name = CLASS_NAMES[class_id]
    if name == "circle":
        return _regular(72, radius, rot), _regular(4, radius, rot)
    if name == "square":
        v = _regular(4, radius, rot)
        return v, v
    if name == "triangle":
        v = _regular(3, radius, rot)
        return v, v
    if name == "hexagon":
        v = _regular(6, radius, rot)
        return v, v
    if name == "star":
        outer = _regular(5, radius, rot)
        inner = _regular(5, radius * 0.42, rot + math.pi / 5)
        poly = np.empty((10, 2))
        poly[0::2], poly[1::2] = outer, inner
        return poly, outer
    if name == "cross":
        t = radius * 0.3
        r = radius / math.sqrt(1 + 0.09)  # arms end on the circumscribed circle
        pts = np.array(
            [(-t, -r), (t, -r), (t, -t), (r, -t), (r, t), (t, t), (t, r), (-t, r), (-t, t), (-r, t), (-r, -t), (-t, -t)]
        )
        c, s = math.cos(rot), math.sin(rot)
        poly = pts @ np.array([[c, s], [-s, c]])
        return poly, poly[[0, 3, 6, 9]]
    raise AssertionError(name)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Smooth gradient + multi-scale value noise + a few strokes: texture the model must ignore."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(40, 215, 3).astype(np.float32)
    grad = rng.uniform(-60, 60, (2, 3)).astype(np.float32)
    img = base + (xx[..., None] / w - 0.5) * grad[0] + (yy[..., None] / h - 0.5) * grad[1]
    for cells, amp in ((4, 35.0), (16, 20.0), (64, 10.0)):
        coarse = rng.normal(0, 1, (cells, max(2, cells * w // h), 3)).astype(np.float32)
        img += cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC) * amp * rng.uniform(0.3, 1.0)
    img = np.clip(img, 0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(0, 7))):
        p1 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        p2 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        cv2.line(img, p1, p2, color, int(rng.integers(1, 4)), cv2.LINE_AA)
    return img


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _contains(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(a[0] <= b[0] and a[1] <= b[1] and a[2] >= b[2] and a[3] >= b[3])


def _rotate(pts: np.ndarray, rot: float) -> np.ndarray:
    c, s = math.cos(rot), math.sin(rot)
    return pts @ np.array([[c, s], [-s, c]])


def _elongated(rng: np.random.Generator, class_id: int, radius: float, rot: float) -> tuple[np.ndarray, np.ndarray]:
    """For oriented scenes: the shape, possibly flattened along its own axis, then turned by `rot`."""
    if rng.random() >= OBB_ELONGATED_FRACTION:
        return _outline(class_id, radius, rot)
    ratio = rng.uniform(0.35, 0.7)  # short side / long side
    base = math.pi / 4 if CLASS_NAMES[class_id] == "square" else 0.0  # flatten a square into a rectangle
    poly, verts = _outline(class_id, radius, base)
    squash = np.array([1.0, ratio])
    return _rotate(poly * squash, rot), _rotate(verts * squash, rot)


def sample_scene(rng: np.random.Generator, config: ShapesConfig = ShapesConfig(), *, oriented: bool = False) -> Scene:
    """Draw one scene; the same generator state always gives the same scene.

    `oriented` (the obb task) flattens half of the objects and keeps every object's rotated
    rectangle inside the image; without it the scene is exactly the detect scene.
    """
    h = int(rng.integers(config.min_side, config.max_side + 1))
    aspect = math.exp(rng.uniform(math.log(config.min_aspect), math.log(config.max_aspect)))
    w = int(np.clip(round(h * aspect), config.min_side // 2, config.max_side * 2))
    image = _background(rng, h, w)
    objects: list[ShapeObject] = []
    n = int(rng.integers(config.min_objects, config.max_objects + 1))
    max_d = max(config.min_object_px + 1, config.max_object_frac * min(h, w))
    for _ in range(n * 6):  # bounded rejection sampling
        if len(objects) == n:
            break
        d = math.exp(rng.uniform(math.log(config.min_object_px), math.log(max_d)))
        class_id = int(rng.integers(0, len(CLASS_NAMES)))
        if oriented:
            poly, verts = _elongated(rng, class_id, d / 2, rng.uniform(0, 2 * math.pi))
            rect = cv2.boxPoints(cv2.minAreaRect(poly.astype(np.float32))).astype(np.float64)
            ext = np.maximum(np.abs(rect).max(0), np.abs(poly).max(0)) + 1.0
            if ext[0] * 2 >= w or ext[1] * 2 >= h:
                continue
            centre = np.array([rng.uniform(ext[0], w - ext[0]), rng.uniform(ext[1], h - ext[1])])
            # near-tied rectangles (hexagon, star) may turn differently once moved: check the final one
            rect = cv2.boxPoints(cv2.minAreaRect((poly + centre).astype(np.float32)))
            if rect.min() < 0 or rect[:, 0].max() > w or rect[:, 1].max() > h:
                continue
        else:
            poly, verts = _outline(class_id, d / 2, rng.uniform(0, 2 * math.pi))
            centre = np.array([rng.uniform(d / 2, w - d / 2), rng.uniform(d / 2, h - d / 2)])
        poly, verts = poly + centre, verts + centre
        box = np.concatenate([poly.min(0), poly.max(0)])
        if any(_iou(box, o.xyxy) > config.max_overlap_iou or _contains(box, o.xyxy) for o in objects):
            continue
        colour = rng.integers(0, 256, 3)
        local = image[int(box[1]) : int(box[3]) + 1, int(box[0]) : int(box[2]) + 1].reshape(-1, 3).mean(0)
        if np.abs(colour - local).sum() < 150:  # keep a visible contrast against the background
            colour = np.where(local > 127, rng.integers(0, 60, 3), rng.integers(196, 256, 3))
        cv2.fillPoly(image, [np.round(poly * 16).astype(np.int32)], tuple(int(c) for c in colour), cv2.LINE_AA, 4)
        objects.append(ShapeObject(class_id, poly, verts))
    sigma = rng.uniform(*config.noise_sigma)
    noisy = image.astype(np.float32) + rng.normal(0, sigma, image.shape).astype(np.float32)
    image = np.clip(noisy, 0, 255).astype(np.uint8)
    if rng.random() < 0.3:
        image = cv2.GaussianBlur(image, (3, 3), 0)
    return Scene(image=image, objects=objects)


def detect_label_lines(scene: Scene) -> list[str]:
    """YOLO detection labels: `class cx cy w h`, normalized to the image size."""
    h, w = scene.image.shape[:2]
    lines = []
    for o in scene.objects:
        x1, y1, x2, y2 = np.clip(o.xyxy, 0, [w, h, w, h])
        lines.append(f"{o.class_id} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}")
    return lines


def _fmt(v: np.ndarray) -> str:
    return " ".join(f"{x:.6f}" for x in v)


def segment_label_lines(scene: Scene) -> list[str]:
    """YOLO segmentation labels: `class x1 y1 x2 y2 ...`, the polygon normalized to the image size."""
    h, w = scene.image.shape[:2]
    return [f"{o.class_id} {_fmt(np.clip(o.polygon / [w, h], 0, 1).ravel())}" for o in scene.objects]


def keypoint_visibility(scene: Scene, index: int, points: np.ndarray) -> np.ndarray:
    """COCO visibility of an object's points: 2 visible, 1 under an object drawn after it."""
    vis = np.full(len(points), 2, dtype=int)
    for later in scene.objects[index + 1 :]:
        contour = later.polygon.astype(np.float32).reshape(-1, 1, 2)
        for k, (x, y) in enumerate(points):
            if cv2.pointPolygonTest(contour, (float(x), float(y)), False) > 0:
                vis[k] = 1
    return vis


def pose_label_lines(scene: Scene) -> list[str]:
    """YOLO pose labels: `class cx cy w h` then `x y v` for each of the 4 keypoints, normalized."""
    h, w = scene.image.shape[:2]
    lines = []
    for i, (box, o) in enumerate(zip(detect_label_lines(scene), scene.objects, strict=True)):
        kpts = o.keypoints()
        vis = keypoint_visibility(scene, i, kpts)
        xy = np.clip(kpts / [w, h], 0, 1)
        lines.append(box + "".join(f" {x:.6f} {y:.6f} {v}" for (x, y), v in zip(xy, vis, strict=True)))
    return lines


def obb_label_lines(scene: Scene) -> list[str]:
    """YOLO-OBB labels: `class x1 y1 x2 y2 x3 y3 x4 y4`, the polygon's minimum-area rotated rectangle."""
    h, w = scene.image.shape[:2]
    return [f"{o.class_id} {_fmt(np.clip(o.rotated_rect() / [w, h], 0, 1).ravel())}" for o in scene.objects]


LABELLERS: dict[str, Callable[[Scene], list[str]]] = {
    "detect": detect_label_lines,
    "segment": segment_label_lines,
    "pose": pose_label_lines,
    "obb": obb_label_lines,
}


def _stream(split: str) -> int:
    stream = {"train": 0, "val": 1, "test": 2}.get(split)
    if stream is None:
        raise CvdeployError(f"shapes: unknown split {split!r}; use train, val or test")
    return stream


def iter_scenes(seed: int, split: str, n: int, config: ShapesConfig = ShapesConfig(), *, oriented: bool = False) -> Iterator[Scene]:
    """Scenes of one split; each split has its own stream so n_train never changes the val images."""
    stream = _stream(split)
    for i in range(n):
        yield sample_scene(np.random.default_rng([seed, stream, i]), config, oriented=oriented)


def crop_object(image: np.ndarray, obj: ShapeObject, rng: np.random.Generator, size: int = CLASSIFY_CROP_PX) -> np.ndarray:
    """A square crop centred (with a little jitter) on one object, 1.2-1.6 x its box, resized to `size`."""
    x1, y1, x2, y2 = obj.xyxy
    side = max(x2 - x1, y2 - y1) * rng.uniform(1.2, 1.6)
    cx, cy = (x1 + x2) / 2 + rng.uniform(-0.1, 0.1) * side, (y1 + y2) / 2 + rng.uniform(-0.1, 0.1) * side
    half = max(4, round(side / 2))
    pad = cv2.copyMakeBorder(image, half, half, half, half, cv2.BORDER_REFLECT_101)
    cx_p, cy_p = round(cx) + half, round(cy) + half
    crop = pad[cy_p - half : cy_p + half, cx_p - half : cx_p + half]
    interp = cv2.INTER_AREA if crop.shape[0] > size else cv2.INTER_LINEAR
    return cv2.resize(crop, (size, size), interpolation=interp)


def iter_crops(seed: int, split: str, n: int, config: ShapesConfig = ShapesConfig()) -> Iterator[tuple[int, str, np.ndarray]]:
    """`n` classification crops (class id, name stem, image), balanced over the classes.

    Scenes of the split are walked in order and each object is cropped while its class still
    needs crops; class c gets n // 6 crops, plus one for the first n % 6 classes.
    """
    stream = _stream(split)
    nc = len(CLASS_NAMES)
    quota = [n // nc + (1 if c < n % nc else 0) for c in range(nc)]
    for i in range(20 * n + 100):  # bounded: every class is drawn with probability 1/6 per object
        if not any(quota):
            return
        scene = sample_scene(np.random.default_rng([seed, stream, i]), config)
        crop_rng = np.random.default_rng([seed, stream, i, 1])  # its own stream: the scene is the detect scene
        for j, o in enumerate(scene.objects):
            if quota[o.class_id] > 0:
                quota[o.class_id] -= 1
                yield o.class_id, f"{split}_{i:06d}_{j}", crop_object(scene.image, o, crop_rng)
    raise CvdeployError("shapes: could not draw enough crops for every class")  # pragma: no cover


def _write_jpg(path: Path, image: np.ndarray, quality: int) -> None:
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise CvdeployError(f"shapes: could not encode image {path.name}")
    path.write_bytes(buf.tobytes())


def generate_shapes(
    out: str | Path,
    *,
    n_train: int = 400,
    n_val: int = 100,
    seed: int = 0,
    config: ShapesConfig = ShapesConfig(),
    progress: Callable[[int], None] | None = None,
    task: str = "detect",
) -> Path:
    """Write a dataset for `task` and return what Ultralytics' `data=` takes.

    detect, segment, pose, obb: YOLO format (images/, labels/, data.yaml), `n_train`/`n_val`
    images; the data.yaml path is returned. classify: `train/<class>/*.jpg`, `val/<class>/*.jpg`,
    `n_train`/`n_val` crops balanced over the classes (n_val >= 6, so no class folder is empty);
    the dataset directory is returned (a data.yaml with the names is written there too).
    """
    if task not in TASKS:
        raise CvdeployError(f"shapes: unknown task {task!r}; use one of {', '.join(TASKS)}")
    if n_train < 0 or n_val < 1:
        raise CvdeployError(f"shapes: need n_train >= 0 and n_val >= 1, got {n_train} and {n_val}")
    if task == "classify" and n_val < len(CLASS_NAMES):
        raise CvdeployError(f"shapes: classify needs n_val >= {len(CLASS_NAMES)} (one crop per class), got {n_val}")
    root = Path(out).resolve()
    names = "\n".join(f"  {i}: {name}" for i, name in enumerate(CLASS_NAMES))
    header = f"# generated by cvdeploy data shapes (task={task}, seed={seed})\npath: {root}\n"
    if task == "classify":
        for split, n in (("train", n_train), ("val", n_val)):
            for name in CLASS_NAMES:
                (root / split / name).mkdir(parents=True, exist_ok=True)
            for class_id, stem, crop in iter_crops(seed, split, n, config):
                _write_jpg(root / split / CLASS_NAMES[class_id] / f"{stem}.jpg", crop, config.jpeg_quality)
                if progress:
                    progress(1)
        (root / "data.yaml").write_text(f"{header}train: train\nval: val\nnames:\n{names}\n")
        result = root
    else:
        labeller = LABELLERS[task]
        for split, n in (("train", n_train), ("val", n_val)):
            (root / "images" / split).mkdir(parents=True, exist_ok=True)
            (root / "labels" / split).mkdir(parents=True, exist_ok=True)
            for i, scene in enumerate(iter_scenes(seed, split, n, config, oriented=task == "obb")):
                stem = f"{split}_{i:06d}"
                _write_jpg(root / "images" / split / f"{stem}.jpg", scene.image, config.jpeg_quality)
                (root / "labels" / split / f"{stem}.txt").write_text("\n".join(labeller(scene)) + "\n")
                if progress:
                    progress(1)
        extra = ""
        if task == "pose":
            extra = (f"kpt_shape: [{KPT_SHAPE[0]}, {KPT_SHAPE[1]}]\nflip_idx: [{', '.join(map(str, FLIP_IDX))}]\n"
                     f"# keypoints: {', '.join(KPT_NAMES)} (the shape's extreme points)\n")
        result = root / "data.yaml"
        # detect keeps its historical header line byte for byte
        first = f"# generated by cvdeploy data shapes (seed={seed})\npath: {root}\n" if task == "detect" else header
        result.write_text(f"{first}train: images/train\nval: images/val\n{extra}names:\n{names}\n")
    meta = {"generator": "cvdeploy.shapes", "seed": seed, "n_train": n_train, "n_val": n_val, "config": config.__dict__}
    if task != "detect":
        meta["task"] = task
    (root / "generator.json").write_text(json.dumps(meta, indent=2))
    return result
