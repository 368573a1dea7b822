"""Training batches for quantization-aware fine-tuning: a YOLO split through the bundle's own letterbox.

The network is fine-tuned on exactly the tensors it will be served (the bundle's square letterbox and scaling), with
the labels moved into that frame; a horizontal flip is the only augmentation (a short fine-tune from trained weights
needs no mosaic). Batches are the dicts Ultralytics' detection loss takes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from cvdeploy.errors import InputError


@dataclass
class Sample:
    tensor: np.ndarray  # (3, H, W) float32, the network input
    cls: np.ndarray  # (n,) class ids
    xywh: np.ndarray  # (n, 4) box centres and sizes, normalized to the network input


def load_samples(bundle: Any, data: str | os.PathLike[str], split: str, n: int) -> list[Sample]:
    """The first `n` images of `split` (evenly spaced when the split is larger), preprocessed as the bundle serves."""
    from cvdeploy.evaluate.coco import load_yolo_split
    from cvdeploy.vision.image import load_image
    from cvdeploy.vision.letterbox import preprocess

    if n < 1:
        raise InputError(f"QAT needs at least 1 training image, got {n}")
    images, _ = load_yolo_split(data, split)
    spec = replace(bundle.manifest.preprocess.letterbox(), rect=False)
    step = max(1, len(images) // n)
    out = []
    for im in images[::step][:n]:
        tensor, (params,) = preprocess([load_image(im.path)], spec)
        gx, gy = params.gain_xy
        ih, iw = params.input_shape
        xyxy = im.xyxy * np.array([gx, gy, gx, gy]) + np.array([params.left, params.top] * 2)
        xywh = np.stack([(xyxy[:, 0] + xyxy[:, 2]) / 2 / iw, (xyxy[:, 1] + xyxy[:, 3]) / 2 / ih,
                         (xyxy[:, 2] - xyxy[:, 0]) / iw, (xyxy[:, 3] - xyxy[:, 1]) / ih], 1) if len(xyxy) else np.zeros((0, 4))
        out.append(Sample(tensor[0], im.class_id.astype(np.float32), xywh.astype(np.float32)))
    return out


def batches(samples: list[Sample], batch: int, rng: np.random.Generator, *, flip: bool = True) -> list[dict[str, Any]]:
    """One epoch of shuffled batches in Ultralytics' loss format (img, batch_idx, cls, bboxes as normalized xywh)."""
    import torch

    order = rng.permutation(len(samples))
    out = []
    for start in range(0, len(order), batch):
        imgs, idx, cls, boxes = [], [], [], []
        for j, k in enumerate(order[start:start + batch]):
            s = samples[int(k)]
            t, b = s.tensor, s.xywh.copy()
            if flip and rng.random() < 0.5:
                t = t[:, :, ::-1]
                b[:, 0] = 1.0 - b[:, 0]
            imgs.append(np.ascontiguousarray(t))
            idx.append(np.full(len(b), j, np.float32))
            cls.append(s.cls)
            boxes.append(b)
        out.append({"img": torch.from_numpy(np.stack(imgs)), "batch_idx": torch.from_numpy(np.concatenate(idx)),
                    "cls": torch.from_numpy(np.concatenate(cls))[:, None], "bboxes": torch.from_numpy(np.concatenate(boxes))})
    return out
