"""COCO-protocol mAP: exact on perfect predictions, lower on worse ones, and the demo model's accuracy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cvdeploy.errors import InputError
from cvdeploy.evaluate import evaluate_detect, load_yolo_split
from cvdeploy.evaluate.coco import coco_map


@pytest.fixture(scope="module")
def small_split(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cvdeploy.demo.shapes import generate_shapes

    return generate_shapes(tmp_path_factory.mktemp("eval"), n_train=0, n_val=8, seed=11)


def test_labels_are_read_back_in_pixels(small_split: Path) -> None:
    items, names = load_yolo_split(small_split)
    assert len(items) == 8 and names[0] == "circle"
    for it in items:
        assert len(it.xyxy) == len(it.class_id) > 0
        assert (it.xyxy[:, 2] > it.xyxy[:, 0]).all() and (it.xyxy[:, 2] <= it.width + 1e-6).all()


def test_perfect_predictions_score_one_and_shifted_ones_less(small_split: Path) -> None:
    items, names = load_yolo_split(small_split)
    perfect = [(it.xyxy, np.ones(len(it.xyxy)), it.class_id) for it in items]
    m = coco_map(items, perfect, nc=len(names))
    assert m.map50_95 == pytest.approx(1.0) and m.map50 == pytest.approx(1.0)
    shifted = [(it.xyxy + np.array([3.0, 3.0, 3.0, 3.0]), np.ones(len(it.xyxy)), it.class_id) for it in items]
    worse = coco_map(items, shifted, nc=len(names))
    assert worse.map50_95 < 0.95 and worse.map50 > 0.5
    wrong_class = [(it.xyxy, np.ones(len(it.xyxy)), (it.class_id + 1) % len(names)) for it in items]
    assert coco_map(items, wrong_class, nc=len(names)).map50 == pytest.approx(0.0)


def test_bad_dataset_files(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        load_yolo_split(tmp_path / "missing.yaml")
    bad = tmp_path / "data.yaml"
    bad.write_text("path: .\ntrain: images/train\n")
    with pytest.raises(InputError, match="no 'val' split"):
        load_yolo_split(bad)


@pytest.mark.slow
def test_demo_model_reaches_the_documented_accuracy(demo_bundle: Path, tmp_path: Path) -> None:
    """Issue 2: mAP50-95 >= 0.60 on the generated validation split (seed 0, 200 images) at 256."""
    from cvdeploy import Predictor
    from cvdeploy.demo.shapes import generate_shapes

    data = generate_shapes(tmp_path, n_train=0, n_val=200, seed=0)  # the split the model was validated on
    m = evaluate_detect(Predictor(demo_bundle), data)
    assert m.images == 200 and m.instances > 500
    assert m.map50_95 >= 0.60, m
