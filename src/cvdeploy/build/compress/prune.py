"""Structured channel pruning of a YOLO11 detector to a MACs or parameter budget, then fine-tuning.

How: torch-pruning's dependency graph removes whole channels (every layer that shares them shrinks together), ranked
by the L2 norm of the group's weights (`magnitude`) or by |weight x gradient| of the detection loss on a few training
images (`taylor`). What is never pruned: the detect head's last convolutions and its DFL (the output keeps its
4 x reg_max + nc channels, so the bundle's decoding and golden shapes still apply) and the C2PSA attention block (its
heads reshape channels; pruning them would need head-aware surgery for little gain on a model this small).

Why the C2f/C3k2 rewrite: their forward splits one convolution's output in two halves (`chunk`), which the dependency
graph cannot prune consistently. `split_c2f` replaces that convolution by two (`C2fSplit`, outputs identical to the
float32 bit), so each half is pruned on its own; the pruned model keeps `C2fSplit` (its checkpoints need cvdeploy
importable, which is true wherever the build runs).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from cvdeploy.errors import InputError, MissingDependencyError

IMPORTANCE = ("magnitude", "taylor")


def _tp() -> Any:
    try:
        import torch_pruning as tp
    except ImportError as e:
        raise MissingDependencyError("torch-pruning", "build", "cvdeploy compress prune") from e
    return tp


def _half_conv(conv: Any, lo: int, hi: int) -> Any:
    """Output channels lo:hi of an Ultralytics Conv (conv + batch norm + activation)."""
    c = copy.deepcopy(conv)
    c.conv.weight = nn.Parameter(conv.conv.weight.data[lo:hi].clone())
    c.conv.out_channels = hi - lo
    for attr in ("weight", "bias"):
        setattr(c.bn, attr, nn.Parameter(getattr(conv.bn, attr).data[lo:hi].clone()))
    c.bn.running_mean = conv.bn.running_mean[lo:hi].clone()
    c.bn.running_var = conv.bn.running_var[lo:hi].clone()
    c.bn.num_features = hi - lo
    return c


class C2fSplit(nn.Module):
    """C2f/C3k2 with its first convolution as two (cv0: the half that skips the bottlenecks, cv1: the half they read)."""

    def __init__(self, src: Any) -> None:
        super().__init__()
        if not hasattr(src.cv1, "bn"):
            raise InputError("pruning needs the model with its batch norms (not fused)")
        c = src.c
        self.cv0, self.cv1 = _half_conv(src.cv1, 0, c), _half_conv(src.cv1, c, 2 * c)
        self.cv2, self.m = src.cv2, src.m
        for attr in ("i", "f", "type", "np"):  # Ultralytics routes layers by these
            if hasattr(src, attr):
                setattr(self, attr, getattr(src, attr))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv0(x), self.cv1(x)]
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


def split_c2f(net: Any) -> int:
    """Replace every C2f/C3k2 of `net.model` by an equivalent C2fSplit, in place; return how many."""
    from ultralytics.nn.modules import C2f

    n = 0
    for i, m in enumerate(net.model):
        if isinstance(m, C2f):
            net.model[i] = C2fSplit(m)
            n += 1
    return n


def protected_layers(net: Any) -> list[Any]:
    """Modules whose output channels are kept: the head's output convolutions and DFL, and C2PSA blocks."""
    from ultralytics.nn.modules import C2PSA, Detect

    keep: list[Any] = []
    for m in net.modules():
        if isinstance(m, Detect):
            keep += [s[-1] for s in m.cv2] + [s[-1] for s in m.cv3] + [m.dfl]
        elif isinstance(m, C2PSA):
            keep.append(m)
    return keep


def head_channels(net: Any) -> list[int]:
    """Output channels of the head's box and class convolutions: pruning must leave them unchanged."""
    head = net.model[-1]
    return [s[-1].out_channels for s in head.cv2] + [s[-1].out_channels for s in head.cv3]


@dataclass
class PruneResult:
    model: Any
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    steps: int
    importance: str
    round_to: int | None = None

    @property
    def macs_ratio(self) -> float:
        return self.macs_after / self.macs_before

    @property
    def params_ratio(self) -> float:
        return self.params_after / self.params_before

    def record(self) -> dict[str, Any]:
        return {"macs_before": self.macs_before, "macs_after": self.macs_after, "macs_ratio": round(self.macs_ratio, 4),
                "params_before": self.params_before, "params_after": self.params_after,
                "params_ratio": round(self.params_ratio, 4), "importance": self.importance, "prune_steps": self.steps, "round_to": self.round_to}


def prune(net: Any, *, imgsz: int, macs_ratio: float | None = None, params_ratio: float | None = None,
          importance: str = "magnitude", taylor_batch: dict[str, Any] | None = None, round_to: int | None = None,
          steps: int = 100) -> PruneResult:
    """Prune a copy of `net` step by step until its MACs (or parameters) are at most the target share of the original.

    `taylor` needs `taylor_batch` (an Ultralytics training batch: img, batch_idx, cls, bboxes) for the gradients.
    `round_to=8` would keep channel counts multiples of 8 (what CPU kernels vectorise over), but on YOLO11n's 16-channel
    layers the first step already halves them (15.9 kept rounds down to 8) and the model loses everything: off by default.
    """
    tp = _tp()
    if (macs_ratio is None) == (params_ratio is None):
        raise InputError("give exactly one target: a MACs ratio or a parameter ratio")
    target = macs_ratio if macs_ratio is not None else params_ratio
    assert target is not None
    if not 0.05 <= target < 1.0:
        raise InputError(f"the target ratio must be in [0.05, 1), got {target}")
    if importance not in IMPORTANCE:
        raise InputError(f"importance must be one of {', '.join(IMPORTANCE)}, got {importance!r}")
    if importance == "taylor" and taylor_batch is None:
        raise InputError("taylor importance needs training images (--data)")
    model = copy.deepcopy(net).float()
    split_c2f(model)
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    example = torch.zeros(1, 3, imgsz, imgsz)
    macs0, params0 = (int(v) for v in tp.utils.count_ops_and_params(model, example))
    head0 = head_channels(model)
    imp = tp.importance.GroupMagnitudeImportance(p=2) if importance == "magnitude" else tp.importance.GroupTaylorImportance()
    pruner = tp.pruner.MetaPruner(model, example, importance=imp, pruning_ratio=0.9, iterative_steps=steps,
                                  ignored_layers=protected_layers(model), round_to=round_to,
                                  output_transform=lambda o: o[0] if isinstance(o, tuple | list) else o)
    macs, params, done = macs0, params0, 0
    for step in range(1, steps + 1):
        done = step
        if importance == "taylor":
            model.zero_grad()
            _taylor_loss(model, taylor_batch).backward()  # type: ignore[arg-type]
        pruner.step()
        macs, params = (int(v) for v in tp.utils.count_ops_and_params(model, example))
        if (macs / macs0 if macs_ratio is not None else params / params0) <= target:
            break
    else:
        raise InputError(f"could not reach {target:.0%} after {steps} steps (at {macs / macs0:.0%} of the MACs)")
    if head_channels(model) != head0:
        raise AssertionError(f"pruning changed the detect head's outputs: {head0} -> {head_channels(model)}")
    model.zero_grad(set_to_none=True)
    return PruneResult(model, macs0, macs, params0, params, done, importance, round_to)


def _taylor_loss(model: Any, batch: dict[str, Any]) -> Any:
    """The detection loss on one batch, in train mode (the gradients Taylor importance reads)."""
    from types import SimpleNamespace

    from ultralytics.cfg import DEFAULT_CFG_DICT

    model.train()
    if not hasattr(model, "args") or isinstance(model.args, dict):
        model.args = SimpleNamespace(**{**DEFAULT_CFG_DICT, **(model.args if isinstance(getattr(model, "args", None), dict) else {})})
    model.criterion = None
    loss, _ = model.loss(batch)
    model.criterion = None
    model.eval()
    return loss.sum()


def taylor_batch(data: str, imgsz: int, n: int = 16) -> dict[str, Any]:
    """`n` training images of a YOLO data.yaml, stretched to imgsz (normalized boxes are unchanged by a stretch)."""
    import cv2
    import numpy as np

    from cvdeploy.evaluate.coco import load_yolo_split
    from cvdeploy.vision.image import load_image

    try:
        images, _ = load_yolo_split(data, "train")
    except InputError:
        images, _ = load_yolo_split(data, "val")
    if not images:
        raise InputError(f"{data}: no images for taylor importance")
    imgs, idx, cls, boxes = [], [], [], []
    for i, im in enumerate(images[:n]):
        bgr = load_image(im.path)
        h, w = bgr.shape[:2]
        rgb = cv2.resize(bgr, (imgsz, imgsz), interpolation=cv2.INTER_LINEAR)[:, :, ::-1]
        imgs.append(np.ascontiguousarray(rgb.transpose(2, 0, 1)))
        for b, c in zip(im.xyxy, im.class_id, strict=True):  # xyxy pixels -> normalized xywh
            x1, y1, x2, y2 = (float(v) for v in b)
            boxes.append([(x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h])
            cls.append([float(c)])
            idx.append(float(i))
    return {"img": torch.from_numpy(np.stack(imgs)).float() / 255.0, "batch_idx": torch.tensor(idx),
            "cls": torch.tensor(cls).view(-1, 1), "bboxes": torch.tensor(boxes).view(-1, 4)}
