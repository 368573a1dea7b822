"""The shapes generator: deterministic, varied, valid YOLO labels, splits independent of each other."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from cvdeploy.demo.shapes import CLASS_NAMES, ShapesConfig, detect_label_lines, generate_shapes, iter_scenes
from cvdeploy.errors import CvdeployError


def test_same_seed_same_dataset(tmp_path: Path) -> None:
    a = generate_shapes(tmp_path / "a", n_train=3, n_val=3, seed=5).parent
    b = generate_shapes(tmp_path / "b", n_train=3, n_val=3, seed=5).parent
    c = generate_shapes(tmp_path / "c", n_train=3, n_val=3, seed=6).parent
    for rel in ("images/train/train_000002.jpg", "labels/val/val_000001.txt", "images/val/val_000000.jpg"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes()
    assert (a / "images/val/val_000000.jpg").read_bytes() != (c / "images/val/val_000000.jpg").read_bytes()


def test_val_split_does_not_depend_on_train_size() -> None:
    v1 = next(iter_scenes(0, "val", 1)).image
    v2 = next(iter_scenes(0, "val", 1)).image
    t = next(iter_scenes(0, "train", 1)).image
    assert np.array_equal(v1, v2) and not (v1.shape == t.shape and np.array_equal(v1, t))


def test_layout_labels_and_data_yaml(tmp_path: Path) -> None:
    data_yaml = generate_shapes(tmp_path, n_train=4, n_val=30, seed=1)
    text = data_yaml.read_text()
    assert "train: images/train" in text and "val: images/val" in text
    assert all(f"{i}: {n}" in text for i, n in enumerate(CLASS_NAMES))
    shapes, classes, small = set(), set(), 0
    for img in sorted((tmp_path / "images" / "val").glob("*.jpg")):
        h, w = cv2.imread(str(img)).shape[:2]
        shapes.add((h, w))
        lines = (tmp_path / "labels" / "val" / f"{img.stem}.txt").read_text().split()
        rows = np.array(lines, dtype=float).reshape(-1, 5)
        assert len(rows) >= 1
        assert ((rows[:, 1:] >= 0) & (rows[:, 1:] <= 1)).all()
        classes.update(rows[:, 0].astype(int).tolist())
        small += int(((rows[:, 3] * w) * (rows[:, 4] * h) < 32 * 32).sum())
    assert len(shapes) > 20 and any(h != w for h, w in shapes)
    assert any(w > 1.4 * h for h, w in shapes) and any(h > 1.4 * w for h, w in shapes)
    assert classes == set(range(len(CLASS_NAMES)))
    assert small > 0  # small objects are present


def test_scene_keeps_polygons_for_other_tasks() -> None:
    scene = next(iter_scenes(3, "val", 1))
    assert scene.objects
    for o in scene.objects:
        assert o.polygon.ndim == 2 and o.polygon.shape[1] == 2 and len(o.polygon) >= 3
        assert len(o.vertices) >= 3
    assert len(detect_label_lines(scene)) == len(scene.objects)


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CvdeployError, match="n_val"):
        generate_shapes(tmp_path, n_train=1, n_val=0)
    with pytest.raises(CvdeployError, match="min_side"):
        ShapesConfig(min_side=10)
    with pytest.raises(CvdeployError, match="unknown split"):
        next(iter_scenes(0, "holdout", 1))
