"""What every kind of variant is measured with: its accuracy on the controlled set in the task's own figure
(`cvdeploy.evaluate.accuracy`), the budget against onnx-fp32, and the calibration tensors INT8 recipes share.
Used by `build.variants`, `build.edge` and `build.compress`."""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from cvdeploy.bundle.bundle import Bundle
from cvdeploy.bundle.manifest import Variant
from cvdeploy.errors import InputError


def with_variant(bundle: Bundle, name: str, variant: Variant) -> Bundle:
    """The bundle as if `variant` were recorded under `name` (in memory; nothing is written)."""
    manifest = bundle.manifest.model_copy(update={"variants": {**bundle.manifest.variants, name: variant}})
    return Bundle(manifest, bundle.root)


def map_of(bundle: Bundle, name: str, data: str | os.PathLike[str], progress: Callable[[int], None] | None = None) -> dict[str, float]:
    """The variant's accuracy figures on the controlled set, by the bundle's task (`cvdeploy.evaluate.evaluate`):
    detect {map50_95, map50}; segment, pose and obb also their box/mask/pose keys, `map50_95` being the task's own
    figure; classify {top1, top5}."""
    from cvdeploy.evaluate import evaluate
    from cvdeploy.predict import Predictor

    with Predictor(bundle, name) as p:
        m = evaluate(p, data, progress=progress)
    return {k: round(v, 5) for k, v in m.values.items()}


def accuracy_key(task: str) -> str:
    """The metrics key the budget holds for `task`: `map50_95` (each box task's own mAP) or `top1` (classify)."""
    from cvdeploy.evaluate.accuracy import primary_key

    return primary_key(task)


def drop_key(task: str) -> str:
    """Where a variant's drop against onnx-fp32 is recorded: `map50_95_drop_points` or `top1_drop_points`."""
    return f"{accuracy_key(task)}_drop_points"


def accuracy_check(bundle: Bundle, name: str, variant: Variant, data: str | os.PathLike[str], budget: float,
                   step: Callable[[str, str], None] | None = None) -> str | None:
    """The variant's accuracy on the controlled set, recorded in `variant.metrics`; the problem when it drops more than
    `budget` points against the bundle's onnx-fp32, in the task's own figure (mask, keypoint or rotated-box
    mAP50-95, top-1: 1 point = 0.01). Every kind of variant (ONNX, OpenVINO, edge, compressed) is held to it."""
    from cvdeploy.evaluate.accuracy import LABELS

    task = bundle.manifest.task
    key = accuracy_key(task)
    if step is not None:
        step(name, LABELS.get(task, "accuracy"))
    variant.metrics.update(map_of(with_variant(bundle, name, variant), name, data))
    drop = 100.0 * (bundle.manifest.variants["onnx-fp32"].metrics[key] - variant.metrics[key])
    variant.metrics[drop_key(task)] = round(drop, 3)
    if drop > budget:
        return f"{LABELS.get(task, key)} drops by {drop:.2f} points (budget {budget:g})"
    return None


def calibration_tensors(bundle: Bundle, data: str | os.PathLike[str], n: int) -> list[np.ndarray]:
    """`n` training images (val if the set has no train split) through the bundle's own preprocessing, square.

    Any task's layout: a YOLO data.yaml (images/train) or a classify dataset (train/<class>/), whose crops go through
    the classify center crop the manifest records."""
    from dataclasses import replace

    from cvdeploy.evaluate.labels import split_images
    from cvdeploy.vision.image import load_image
    from cvdeploy.vision.letterbox import preprocess

    if n < 1:
        raise InputError(f"calibration needs at least 1 image, got {n}")
    try:
        images = split_images(data, "train")
    except InputError:
        images = split_images(data, "val")
    spec = replace(bundle.manifest.preprocess.letterbox(), rect=False)
    step = max(1, len(images) // n)
    return [preprocess([load_image(path)], spec)[0] for path in images[::step][:n]]
