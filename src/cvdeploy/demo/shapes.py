"""Deterministic synthetic "shapes" dataset: scenes of polygons on textured, noisy backgrounds.

Every object is kept as a polygon, so the one scene description can be written as detection
boxes today and as segmentation polygons, oriented boxes, keypoints (vertices) or
classification labels later without changing the generator.
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


def sample_scene(rng: np.random.Generator, config: ShapesConfig = ShapesConfig()) -> Scene:
    """Draw one scene; the same generator state always gives the same scene."""
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


def iter_scenes(seed: int, split: str, n: int, config: ShapesConfig = ShapesConfig()) -> Iterator[Scene]:
    """Scenes of one split; each split has its own stream so n_train never changes the val images."""
    stream = {"train": 0, "val": 1, "test": 2}.get(split)
    if stream is None:
        raise CvdeployError(f"shapes: unknown split {split!r}; use train, val or test")
    for i in range(n):
        yield sample_scene(np.random.default_rng([seed, stream, i]), config)


def generate_shapes(
    out: str | Path,
    *,
    n_train: int = 400,
    n_val: int = 100,
    seed: int = 0,
    config: ShapesConfig = ShapesConfig(),
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write a YOLO-format dataset (images/, labels/, data.yaml) and return the data.yaml path."""
    if n_train < 0 or n_val < 1:
        raise CvdeployError(f"shapes: need n_train >= 0 and n_val >= 1, got {n_train} and {n_val}")
    root = Path(out).resolve()
    for split, n in (("train", n_train), ("val", n_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i, scene in enumerate(iter_scenes(seed, split, n, config)):
            stem = f"{split}_{i:06d}"
            ok, buf = cv2.imencode(".jpg", scene.image, [cv2.IMWRITE_JPEG_QUALITY, config.jpeg_quality])
            if not ok:
                raise CvdeployError(f"shapes: could not encode image {stem}")
            (root / "images" / split / f"{stem}.jpg").write_bytes(buf.tobytes())
            (root / "labels" / split / f"{stem}.txt").write_text("\n".join(detect_label_lines(scene)) + "\n")
            if progress:
                progress(1)
    names = "\n".join(f"  {i}: {name}" for i, name in enumerate(CLASS_NAMES))
    data_yaml = root / "data.yaml"
    data_yaml.write_text(f"# generated by cvdeploy data shapes (seed={seed})\npath: {root}\ntrain: images/train\nval: images/val\nnames:\n{names}\n")
    (root / "generator.json").write_text(
        json.dumps({"generator": "cvdeploy.shapes", "seed": seed, "n_train": n_train, "n_val": n_val, "config": config.__dict__}, indent=2)
    )
    return data_yaml
