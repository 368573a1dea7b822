"""Quantization-aware fine-tuning of an Ultralytics detect model, starting from the PTQ graph it must beat.

The PTQ variant made with the same recipe is the starting point and the contract: its QDQ graph says which tensors are
quantized (`qat_fakequant.quant_plan`) and with which scales (the starting ranges, whatever calibration made them), and
the fine-tuned weights are quantized at the end by the same ONNX Runtime call. The weights are trained under the
quantization they will be served with, and so are the activation ranges (the scale and zero point of every quantized
tensor). The loss is distillation towards the float source (the distill command's class-probability and box
distribution terms), optionally plus Ultralytics' detection loss on the labels. Every epoch ends with a checkpoint, so
a run can resume.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cvdeploy.errors import InputError

CHECKPOINT = "qat_last.pt"
# What the fake quantization simulates (qat_fakequant): 1 = convolutions and SiLU; 2 = also residual Adds and attention;
# 3 = one quantizer per ONNX tensor (a Split's outputs use its input's scale, as in the graph) with trainable ranges.
# A checkpoint trained under another simulation has other quantizers: it is not resumed.
SIMULATION = 3


@dataclass(frozen=True)
class QatConfig:
    """Everything that decides a QAT run's result: recorded in the manifest, compared on resume."""

    recipe: str = "u8s8-w7"  # the INT8 recipe (cvdeploy.build.quantize.INT8_RECIPES), as for PTQ
    per_channel: bool = True
    calib_method: str = "minmax"  # the PTQ graph's; QAT starts from that graph's scales, whatever the method
    calib_images: int = 64
    quantize_head: bool = False  # as onnx-int8's --quantize-head: the head's decoding stays float by default
    train_split: str = "train"
    train_images: int = 192
    epochs: int = 4
    batch: int = 8
    lr: float = 5e-5  # SGD, momentum 0.9: low, so that the float accuracy does not drift (2e-4 lost 0.5 point in float)
    distill: float = 1.0  # weight of the distillation term towards the float model (distill.DistillLoss.kd); 0 = none
    labels: float = 0.0  # weight of Ultralytics' detection loss on the labels; 0 = distillation only (the default:
    # fitting 192 images' labels moved the float model away from what its 24 epochs had found)
    range_lr: float = 3e-2  # Adam learning rate of the activation ranges (log of the factors on the calibrated min and
    # max, exported as ONNX Runtime range overrides); 0 = ranges not trained, min/max re-calibrated after training
    seed: int = 0
    val_images: int = 100  # the fake-quantized model's mAP50-95 after each epoch on this many val images; 0 = none

    def __post_init__(self) -> None:
        from cvdeploy.build.quantize import CALIB_METHODS, INT8_RECIPES

        if self.recipe not in INT8_RECIPES:
            raise InputError(f"unknown INT8 recipe {self.recipe!r}; choose from {', '.join(INT8_RECIPES)}")
        if self.calib_method not in CALIB_METHODS:
            raise InputError(f"calibration method must be one of {', '.join(CALIB_METHODS)}, got {self.calib_method!r}")
        for name in ("calib_images", "train_images", "epochs", "batch"):
            if getattr(self, name) < 1:
                raise InputError(f"QAT {name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.lr < 1:
            raise InputError(f"QAT learning rate must be in (0, 1), got {self.lr}")
        if self.distill < 0 or self.labels < 0 or self.val_images < 0 or self.range_lr < 0:
            raise InputError("QAT distill and labels weights, range-lr and val-images must be >= 0")
        if self.distill == 0 and self.labels == 0:
            raise InputError("QAT needs a loss: a distill or a labels weight above 0")

    def int8_recipe(self) -> Any:
        from cvdeploy.build.quantize import int8_recipe

        return int8_recipe(self.recipe, self.calib_method, self.per_channel)

    def same_run(self, other: dict[str, Any]) -> list[str]:
        """Fields that differ from a checkpoint's config (epochs may grow: resuming to train longer is allowed)."""
        return [k for k, v in asdict(self).items() if k != "epochs" and other.get(k) != v]


@dataclass
class EpochRecord:
    epoch: int
    loss: float  # mean training loss (Ultralytics' box + cls + dfl, summed over the batch), plus distillation
    box: float
    cls: float
    dfl: float
    map50_95: float | None  # the fake-quantized torch model on the val subset
    seconds: float


@dataclass
class QatRun:
    """The fine-tuned float model (fake quantizers removed) and how it was trained."""

    model: Any  # the fused Ultralytics DetectionModel, fake quantizers in place, trained weights
    fake_quant: Any = None
    history: list[EpochRecord] = field(default_factory=list)
    resumed_from_epoch: int = 0
    train_seconds: float = 0.0

    def float_model(self, source_pt: str | os.PathLike[str]) -> Any:
        """The trained weights in a plain float model: what is exported to ONNX and quantized for real."""
        from cvdeploy.build.compress.qat_fakequant import float_state

        net = load_fused(source_pt)
        net.load_state_dict(float_state(self.model))
        return net.eval()

    def record(self, config: QatConfig, data: str | os.PathLike[str], n_train: int) -> dict[str, Any]:
        """The training record a manifest and a report carry."""
        return {"method": "qat", "tool": "cvdeploy (torch fake-quant mirroring ONNX Runtime QDQ)", "config": asdict(config),
                "data": str(data), "train_images": n_train, "epochs": len(self.history), "seed": config.seed,
                "train_seconds": round(self.train_seconds, 1), "resumed_from_epoch": self.resumed_from_epoch,
                "history": [asdict(h) for h in self.history], "simulation": SIMULATION,
                "unsimulated": list(self.fake_quant.unsimulated) if self.fake_quant is not None else None}


Progress = Callable[[str, dict[str, Any]], None]


def load_fused(source_pt: str | os.PathLike[str]) -> Any:
    """The source .pt as a float, BatchNorm-folded DetectionModel with the hyperparameters its loss needs."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    from ultralytics import YOLO
    from ultralytics.cfg import DEFAULT_CFG_DICT
    from ultralytics.utils import IterableSimpleNamespace

    yolo = YOLO(str(source_pt))
    if yolo.task != "detect":
        raise InputError(f"QAT fine-tunes detect models (the loss is Ultralytics' detection loss); {source_pt} is {yolo.task}")
    model = yolo.model.float()
    model.fuse(verbose=False)
    args = model.args if isinstance(model.args, dict) else vars(model.args)
    model.args = IterableSimpleNamespace(**{**DEFAULT_CFG_DICT, **args})
    for p in model.parameters():
        p.requires_grad_(True)
    for m in model.modules():  # DFL's fixed projection stays fixed, as in Ultralytics' trainer
        if type(m).__name__ == "DFL":
            for p in m.parameters():
                p.requires_grad_(False)
    return model


def torch_map(model: Any, bundle: Any, data: str | os.PathLike[str], n: int) -> float:
    """mAP50-95 of a torch model through the bundle's own Predictor stages (prepare, finish): what the graph will score."""
    import torch

    from cvdeploy.build.export import torch_outputs
    from cvdeploy.evaluate.coco import coco_map, load_yolo_split
    from cvdeploy.predict import Predictor
    from cvdeploy.vision.image import load_image

    gt, _ = load_yolo_split(data, "val")
    gt = gt[:: max(1, len(gt) // n)][:n]
    preds = []
    was_training = model.training
    model.eval()
    with Predictor(bundle, "onnx-fp32") as p, torch.inference_mode():
        options = p.detect_options(conf=0.001, iou=0.7, max_det=300)
        for g in gt:
            prepared = p.prepare([load_image(g.path)])
            out = torch_outputs(model(torch.from_numpy(prepared.tensor)))[0].numpy()
            d = p.finish(prepared, out, options=options)[0].detections
            preds.append((d.xyxy, d.confidence, d.class_id))
    model.train(was_training)
    return float(coco_map(gt, preds, nc=len(bundle.manifest.names)).map50_95)


def _save(path: Path, state: dict[str, Any]) -> None:
    import torch

    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # a run killed while saving keeps the previous checkpoint


def finetune(
    bundle: Any,
    source_pt: str | os.PathLike[str],
    data: str | os.PathLike[str],
    config: QatConfig,
    plan: Any,
    calib: Sequence[np.ndarray],
    work_dir: str | os.PathLike[str],
    *,
    scales: dict[str, tuple[float, int]] | None = None,
    resume: bool = True,
    progress: Progress | None = None,
) -> QatRun:
    """Fine-tune `source_pt` under fake quantization (`plan`, ranges calibrated on `calib`, then set to the PTQ graph's
    `scales` where given: `qat_export.graph_scales`); checkpoint each epoch in `work_dir` and, with `resume`, continue
    from a checkpoint of the same configuration."""
    import torch

    from cvdeploy.build.compress.distill import DistillLoss
    from cvdeploy.build.compress.qat_data import batches, load_samples
    from cvdeploy.build.compress.qat_fakequant import insert_fake_quant

    say = progress or (lambda _e, _d: None)
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    ckpt_path = work / CHECKPOINT
    torch.manual_seed(config.seed)
    model = load_fused(source_pt)
    teacher = copy.deepcopy(model).eval() if config.distill > 0 else None
    fq = insert_fake_quant(model, config.int8_recipe(), plan)
    say("calibrate", {"images": len(calib)})
    fq.calibrate(model, calib)  # the PTQ calibration, on the float model: ONNX Runtime's MinMax ranges
    if scales:  # the PTQ graph's own scales: the same as min/max for minmax, the calibrator's for percentile or entropy
        fq.set_scales(scales)
    ranges = fq.learn_ranges() if config.range_lr > 0 else []
    params = [p for p in model.parameters() if p.requires_grad and not any(p is r for r in ranges)]
    optimizer = torch.optim.SGD(params, lr=config.lr, momentum=0.9, nesterov=True)
    # The ranges are log-factors on very different scales of tensor: Adam's per-parameter steps suit them.
    range_optimizer = torch.optim.Adam(ranges, lr=config.range_lr) if ranges else None
    run = QatRun(model)
    rng = np.random.default_rng(config.seed)
    if resume and ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if state.get("simulation") != SIMULATION:
            raise InputError(f"{ckpt_path} was trained under another version of cvdeploy's fake quantization "
                             f"({state.get('simulation', 1)}, this one is {SIMULATION}); pass --no-resume or another work directory")
        if diff := config.same_run(state["config"]):
            raise InputError(f"{ckpt_path} was made with other QAT settings ({', '.join(diff)}); pass --no-resume or "
                             "another work directory")
        model.load_state_dict(state["model"])
        fq.activations.load_state_dict(state["activations"])
        optimizer.load_state_dict(state["optimizer"])
        if range_optimizer is not None:
            range_optimizer.load_state_dict(state["range_optimizer"])
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        run.history = [EpochRecord(**h) for h in state["history"]]
        run.resumed_from_epoch = len(run.history)
        run.train_seconds = state["train_seconds"]
        say("resume", {"epoch": run.resumed_from_epoch, "checkpoint": str(ckpt_path)})
    samples = load_samples(bundle, data, config.train_split, config.train_images)
    # The detection loss on the labels, and the float source as teacher: its class probabilities on every anchor and
    # its box distributions where it sees an object (the distill command's loss), so training pulls the quantized
    # model towards what the float model outputs rather than only towards the 192 images' labels.
    criterion = DistillLoss(model, teacher if teacher is not None else model)
    for epoch in range(len(run.history) + 1, config.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        sums = np.zeros(4)
        epoch_batches = batches(samples, config.batch, rng)
        for i, batch in enumerate(epoch_batches, 1):
            preds = model(batch["img"])
            # With labels 0 the detection loss is only logged (box, cls, dfl): no autograd graph and backward through it.
            with torch.set_grad_enabled(config.labels > 0):
                loss, items = criterion.base(preds, batch)
            loss = config.labels * loss.sum()
            if teacher is not None:
                loss = loss + config.distill * criterion.kd(criterion.base.parse_output(preds), batch["img"]) * len(batch["img"])
            optimizer.zero_grad(set_to_none=True)
            if range_optimizer is not None:
                range_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 10.0)  # Ultralytics' own clip
            optimizer.step()
            if range_optimizer is not None:
                range_optimizer.step()
            parts = list(items.values()) if isinstance(items, dict) else list(items)  # box, cls, dfl
            sums += [float(loss.detach()), *(float(x) for x in parts[:3])]
            say("step", {"epoch": epoch, "epochs": config.epochs, "step": i, "steps": len(epoch_batches),
                        "loss": float(loss.detach())})
        mean = sums / max(1, len(epoch_batches))
        m = torch_map(model, bundle, data, config.val_images) if config.val_images else None
        secs = time.perf_counter() - t0
        run.history.append(EpochRecord(epoch, round(mean[0], 5), round(mean[1], 5), round(mean[2], 5), round(mean[3], 5),
                                       None if m is None else round(m, 5), round(secs, 1)))
        run.train_seconds += secs
        _save(ckpt_path, {"simulation": SIMULATION, "config": asdict(config), "model": model.state_dict(), "activations": fq.activations.state_dict(),
                          "optimizer": optimizer.state_dict(), "rng": rng.bit_generator.state,
                          "range_optimizer": None if range_optimizer is None else range_optimizer.state_dict(),
                          "torch_rng": torch.get_rng_state(), "history": [asdict(h) for h in run.history],
                          "train_seconds": run.train_seconds})
        say("epoch", asdict(run.history[-1]) | {"epochs": config.epochs})
    (work / "qat_history.json").write_text(json.dumps([asdict(h) for h in run.history], indent=2))
    if range_optimizer is None and config.calib_method == "minmax":  # min/max again on the fine-tuned weights, as PTQ
        fq.calibrate(model, calib)  # would; another method's ranges stay the PTQ graph's
    fq.freeze_ranges()
    model.eval()
    run.fake_quant = fq
    return run
