"""Knowledge distillation of a YOLO11 detector: a frozen teacher's outputs guide a student through Ultralytics' trainer.

The loss is Ultralytics' own detection loss plus two terms read from the teacher on the same (augmented) batch:
- logits: binary cross-entropy of the student's class logits against the teacher's class probabilities, on every
  anchor (background included: the teacher also says where there is nothing), normalised like the detection loss'
  own class term (by the sum of the targets);
- box distributions: the KL divergence between the teacher's and the student's DFL distributions (4 sides x reg_max
  bins), weighted per anchor by the teacher's highest class probability, so that the boxes of objects are taught and
  the background's meaningless distributions are not.
Optional feature imitation is Ultralytics' own (`distill_model`: score-weighted L2 between projected neck features),
switched on with `feature_weight > 0`.

Teacher and student must share the class count, the strides and reg_max (any YOLO11 detector of the same data does).
The student is a .pt (a pruned model: its weights are the start) or a YAML (a narrower YOLO11, from scratch).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cvdeploy.errors import InputError


class DistillLoss:
    """Ultralytics' v8DetectionLoss plus the teacher's logit and box-distribution targets (see the module doc)."""

    def __init__(self, student: Any, teacher: Any, *, cls_weight: float = 1.0, dfl_weight: float = 1.0,
                 temperature: float = 1.0) -> None:
        from ultralytics.utils.loss import v8DetectionLoss

        s_head, t_head = student.model[-1], teacher.model[-1]
        if (s_head.nc, s_head.reg_max) != (t_head.nc, t_head.reg_max) or not torch.equal(s_head.stride, t_head.stride):
            raise InputError(f"teacher and student heads differ (classes, reg_max, strides): "
                             f"{t_head.nc}, {t_head.reg_max}, {t_head.stride.tolist()} against "
                             f"{s_head.nc}, {s_head.reg_max}, {s_head.stride.tolist()}")
        self.base = v8DetectionLoss(student)
        self.teacher = teacher
        self.reg_max = s_head.reg_max
        self.cls_weight, self.dfl_weight, self.t = cls_weight, dfl_weight, temperature

    def __call__(self, preds: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, items = self.base(preds, batch)
        kd = self.kd(self.base.parse_output(preds), batch["img"])
        items = {**items, "kd_loss": kd.detach()}
        return torch.cat([loss, (kd * batch["img"].shape[0]).view(1)]), items

    def kd(self, student: dict[str, torch.Tensor], img: torch.Tensor) -> torch.Tensor:
        """The distillation term for one batch (a scalar), from the student's raw head outputs."""
        with torch.no_grad():
            out = self.teacher(img)
        teacher = out[1] if isinstance(out, tuple) else out
        t = self.t
        s_cls, t_cls = student["scores"], teacher["scores"].to(student["scores"].dtype)  # (batch, nc, anchors)
        target = (t_cls / t).sigmoid()
        kd_cls = F.binary_cross_entropy_with_logits(s_cls / t, target, reduction="sum") / target.sum().clamp(min=1.0)
        b, _, a = student["boxes"].shape
        s_box = student["boxes"].view(b, 4, self.reg_max, a)
        t_box = teacher["boxes"].view(b, 4, self.reg_max, a).to(s_box.dtype)
        kl = F.kl_div(F.log_softmax(s_box / t, 2), F.softmax(t_box / t, 2), reduction="none").sum(2).mean(1)  # (b, a)
        weight = t_cls.sigmoid().amax(1)  # the teacher's confidence that an object is there
        kd_dfl = (kl * weight).sum() / weight.sum().clamp(min=1.0)
        return (self.cls_weight * kd_cls + self.dfl_weight * kd_dfl) * t * t


def load_teacher(teacher: str | os.PathLike[str] | Any) -> Any:
    """The teacher's module, float, frozen, in eval mode (eval: its head answers raw outputs and the decoded ones)."""
    from cvdeploy.build.compress.common import load_torch_model

    net = load_torch_model(teacher)
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval()


def scaled_yaml(out: Path, *, base: str = "yolo11n.yaml", width: float | None = None, depth: float | None = None,
                nc: int | None = None) -> Path:
    """A YOLO11 YAML with its scale's width (and depth) multiplier replaced: a narrower student with the same head."""
    import yaml
    from ultralytics.nn.tasks import guess_model_scale, yaml_model_load

    try:
        d = yaml_model_load(base)
    except (FileNotFoundError, OSError) as e:
        raise InputError(f"student YAML not found: {base}") from e
    scale = guess_model_scale(base) or "n"
    depth0, width0, max_ch = d["scales"][scale]
    if width is not None and not 0.03 <= width <= 2.0:
        raise InputError(f"width multiplier must be in [0.03, 2], got {width}")
    d["scales"] = {scale: [depth if depth is not None else depth0, width if width is not None else width0, max_ch]}
    d["scale"] = scale
    if nc is not None:
        d["nc"] = nc
    d.pop("yaml_file", None)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(d, sort_keys=False))
    # Ultralytics reads the scale letter from the file name (yolo11n.yaml -> n): keep it there.
    return out


def distill_callbacks(teacher: Any, *, cls_weight: float, dfl_weight: float, temperature: float) -> dict[str, Any]:
    """The trainer callback that puts DistillLoss on the student once the trainer has built it (after its EMA copy,
    so that neither the EMA nor the checkpoints carry the teacher)."""

    def attach(trainer: Any) -> None:
        model = trainer.model
        student = getattr(model, "student_model", model)  # Ultralytics' feature-distillation wrapper, if on
        student.criterion = DistillLoss(student, teacher, cls_weight=cls_weight, dfl_weight=dfl_weight,
                                        temperature=temperature)

    return {"on_pretrain_routine_end": attach}


def distill(
    data: str | os.PathLike[str],
    *,
    teacher: str | os.PathLike[str],
    student: str | os.PathLike[str] | Any,
    project: str | os.PathLike[str],
    name: str,
    epochs: int,
    imgsz: int,
    seed: int = 0,
    batch: int = 16,
    workers: int = 2,
    lr0: float = 0.001,
    width: float | None = None,
    cls_weight: float = 1.0,
    dfl_weight: float = 1.0,
    temperature: float = 1.0,
    feature_weight: float = 0.0,
    teach: bool = True,
    resume: bool = False,
    progress: Any = None,
) -> Any:
    """Train `student` on `data` with the teacher's targets (`teach=False`: the same run without them, the baseline).

    Returns the `TrainResult`; its record says what was distilled from what.
    """
    from cvdeploy.build.compress.common import load_torch_model
    from cvdeploy.build.compress.trainer import run_dir, train

    if not Path(teacher).is_file():
        raise InputError(f"teacher model not found: {teacher}")
    t_net = load_teacher(teacher)
    module, cfg = None, None
    student_desc = str(student) if not hasattr(student, "model") else "a torch module"
    if hasattr(student, "model"):
        module = student
    elif str(student).endswith(".pt"):
        module = load_torch_model(student)
    elif str(student).endswith((".yaml", ".yml")):
        stem = Path(str(student)).stem
        cfg = str(scaled_yaml(run_dir(project, name) / f"{stem}.yaml", base=str(student), width=width, nc=t_net.model[-1].nc))
        student_desc = f"{student} (width {width})" if width is not None else str(student)
    else:
        raise InputError(f"student must be a .pt or a model YAML, got {student}")
    overrides: dict[str, Any] = {}
    if feature_weight > 0 and teach:
        overrides = {"distill_model": str(teacher), "dis": feature_weight}
    callbacks = distill_callbacks(t_net, cls_weight=cls_weight, dfl_weight=dfl_weight, temperature=temperature) if teach else {}
    result = train(data, project=project, name=name, module=module, cfg=cfg, epochs=epochs, imgsz=imgsz, seed=seed,
                   batch=batch, workers=workers, lr0=lr0, resume=resume, overrides=overrides, callbacks=callbacks,
                   progress=progress)
    result.record.update({"method": "distill" if teach else "baseline (no distillation)", "teacher": str(teacher),
                          "student": student_desc, "distillation": {
                              "logit_weight": cls_weight, "dfl_weight": dfl_weight, "temperature": temperature,
                              "feature_weight": feature_weight} if teach else None})
    return result
