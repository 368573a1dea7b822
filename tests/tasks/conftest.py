"""Task models for the parity tests: Ultralytics architectures built from their YAML (no download), made to give
non-trivial outputs, saved as .pt checkpoints and built into bundles once per test module.

YOLO11 segment, pose, obb and classify models take the packaged detect demo model's weights for every layer they share
with it (backbone, neck, box and class branches), so boxes and scores are those of a trained model; the task branches
(mask coefficients and prototypes, keypoints, angle, classifier) keep their seeded random initialisation. YOLO26 models
(end-to-end heads) share too little with it: their batch-norm statistics are set from real images (one forward pass in
training mode) so that activations neither vanish nor explode, and the class logits are offset so that scores spread
over (0, 1). Parity compares cvdeploy and Ultralytics on the same exported ONNX, so the weights need not be good.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")

NAMES = ("circle", "square", "triangle", "star", "hexagon", "cross")
FLIP_IDX = [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15]  # COCO's person keypoints


def _calibrate_batchnorm(model, images: list[np.ndarray], imgsz: int) -> None:
    import cv2
    import torch

    batch = np.stack([cv2.resize(im, (imgsz, imgsz))[..., ::-1] for im in images]).transpose(0, 3, 1, 2)
    x = torch.from_numpy(np.ascontiguousarray(batch)).float() / 255
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:
        bn.momentum = 1.0  # running statistics := this batch's
    model.train()
    with torch.no_grad():
        model(x)
    for bn in bns:
        bn.momentum = 0.03
    model.eval()


def make_task_model(cfg: str, out_dir: Path, images: list[np.ndarray], *, seed: int = 0, imgsz: int = 256) -> Path:
    """An Ultralytics checkpoint (.pt) of the architecture `cfg` (e.g. "yolo11n-seg.yaml") with 6 classes."""
    import torch
    import yaml
    from ultralytics import YOLO
    from ultralytics.nn.tasks import yaml_model_load

    from cvdeploy.demo import DEMO_MODEL

    torch.manual_seed(seed)
    spec = yaml_model_load(cfg)  # the scale (n) is read from the file name, which is kept
    spec["nc"] = len(NAMES)
    spec.pop("yaml_file", None)
    spec.pop("scale", None)
    cfg_file = out_dir / "cfg" / cfg
    cfg_file.parent.mkdir(parents=True, exist_ok=True)
    cfg_file.write_text(yaml.safe_dump(spec))
    yolo = YOLO(str(cfg_file))
    head = yolo.model.model[-1]
    if getattr(head, "one2one_cv3", None) is not None:  # YOLO26: end-to-end head
        _calibrate_batchnorm(yolo.model, images[:8], imgsz)
        with torch.no_grad():
            for branch in (head.one2one_cv3, head.cv3):
                for seq in branch:
                    seq[-1].bias.fill_(-3.0)
    else:
        yolo.load(str(DEMO_MODEL))
        if yolo.task == "classify":  # a random classifier answers ~1/nc for every class: spread the logits
            with torch.no_grad():
                head.linear.weight.mul_(20.0)
    yolo.model.names = dict(enumerate(NAMES))
    if yolo.task == "pose":  # the training data.yaml a checkpoint points to: where the build reads flip_idx from
        data = out_dir / "data.yaml"
        data.write_text(f"kpt_shape: [17, 3]\nflip_idx: {FLIP_IDX}\nnames: {list(NAMES)}\n")
        yolo.model.args = {**(getattr(yolo.model, "args", None) or {}), "data": str(data)}
        if yolo.ckpt:  # the detect demo's own training arguments came with its weights
            yolo.ckpt["train_args"] = {**(yolo.ckpt.get("train_args") or {}), "data": str(data), "task": "pose"}
    pt = out_dir / cfg.replace(".yaml", ".pt")
    yolo.save(str(pt))
    return pt


@pytest.fixture(scope="session")
def task_images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """48 generated detect scenes: sizes 160-384 px, aspect ratios 0.5-2, portrait and landscape."""
    from cvdeploy.demo.shapes import generate_shapes

    root = generate_shapes(tmp_path_factory.mktemp("task-images"), n_train=0, n_val=48, seed=2024).parent
    images = sorted((root / "images" / "val").glob("*.jpg"))
    assert len(images) >= 40
    return images


@pytest.fixture(scope="module")
def build_task_bundle(tmp_path_factory: pytest.TempPathFactory, task_images: list[Path]) -> Callable[..., Path]:
    """cfg -> a bundle built by `build_bundle` from a task checkpoint (one per cfg and module)."""
    import cv2

    from cvdeploy.build import build_bundle

    built: dict[tuple[str, int], Path] = {}

    def build(cfg: str, imgsz: int = 256) -> Path:
        if (cfg, imgsz) not in built:
            work = tmp_path_factory.mktemp(cfg.replace(".yaml", ""))
            pt = make_task_model(cfg, work, [cv2.imread(str(p)) for p in task_images[:8]], imgsz=imgsz)
            built[cfg, imgsz] = build_bundle(pt, work / f"{pt.stem}.cvd", imgsz=imgsz).root  # type: ignore[assignment]
        return built[cfg, imgsz]

    return build


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), 2)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-9)


def _match_boxes(ours_xyxy: np.ndarray, ours_cls: np.ndarray, theirs_xyxy: np.ndarray, theirs_cls: np.ndarray,
                 iou_min: float = 0.99) -> np.ndarray:
    iou = box_iou(ours_xyxy, theirs_xyxy)
    iou[ours_cls[:, None] != theirs_cls[None, :]] = -1
    best = iou.argmax(1)
    assert len(set(best.tolist())) == len(best), "two of our boxes matched the same Ultralytics box"
    assert (iou[np.arange(len(best)), best] >= iou_min).all(), f"box IoU {iou.max(1).min():.4f} < {iou_min}"
    return best


@pytest.fixture(scope="session")
def match_boxes() -> Callable[..., np.ndarray]:
    """(our xyxy, our classes, their xyxy, their classes) -> for each of our boxes the index of the best same-class
    Ultralytics box; asserts the pairing is one-to-one and every pair's IoU >= 0.99."""
    return _match_boxes
