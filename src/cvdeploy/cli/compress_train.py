"""`cvdeploy compress prune|distill`: structured pruning or distillation, fine-tuned with Ultralytics' trainer, each
result added to the bundle as a verified variant."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from cvdeploy.cli.app import err_console, fail
from cvdeploy.cli.compress import compress_app


def _epoch_line(d: dict[str, Any]) -> None:
    losses = " ".join(f"{k.removesuffix('_loss')} {v:.3f}" for k, v in d.items() if k.endswith("_loss"))
    err_console.print(f"epoch {d['epoch']}/{d['epochs']} · {losses} · mAP50-95 (Ultralytics val) {d['map50_95']:.4f}",
                      highlight=False)


def _step(variant: str, step: str) -> None:
    err_console.print(f"{variant}: {step}", highlight=False, soft_wrap=True)


def _finish(bundle: Path, outcome: Any, record: dict[str, Any], json_out: Path | None) -> None:
    from cvdeploy.bundle.bundle import Bundle
    from cvdeploy.cli.info import variants_table
    from cvdeploy.cli.output import result_console, write_json

    if json_out is not None:
        write_json(json_out, {"variant": outcome.name, "written": outcome.written, "reason": outcome.reason,
                              "metrics": outcome.variant.metrics if outcome.variant else None, "training": record})
    if outcome.written:
        result_console(json_out).print(variants_table(Bundle.load(bundle).manifest))
    elif outcome.variant is not None and "map50_95" in outcome.variant.metrics:
        err_console.print(f"{outcome.name}: mAP50-95 {outcome.variant.metrics['map50_95']:.4f}", highlight=False)
    if not outcome.written:
        raise fail(f"{outcome.name} not written: {outcome.reason} (the trained weights stay in the run directory)")
    err_console.print(f"training: {record['epochs']} epoch(s), seed {record['seed']}, {record['wall_time_s']:.0f} s; "
                      f"run in {record['run_dir']}", highlight=False, soft_wrap=True)


@compress_app.command("prune")
def prune_cmd(
    bundle: Path = typer.Argument(..., help="The bundle (built from MODEL) to add the pruned variant to."),
    model: Path = typer.Option(..., "--model", help="The bundle's source Ultralytics .pt (detect)."),
    data: Path = typer.Option(..., "--data", help="data.yaml: train split to fine-tune on, val split for mAP."),
    out: Path = typer.Option(..., "-o", "--out", help="Run directory: pruned start, checkpoints (resume), progress."),
    macs_ratio: float | None = typer.Option(None, "--macs-ratio", help="Prune to at most this share of the MACs "
                                            "(default 0.5 when no --params-ratio)."),
    params_ratio: float | None = typer.Option(None, "--params-ratio", help="Prune to at most this share of the parameters."),
    importance: str = typer.Option("magnitude", help="Channel importance: magnitude (L2) or taylor (loss gradients)."),
    round_to: int | None = typer.Option(None, "--round-to", min=2, help="Keep channel counts multiples of this (16: "
                                        "AVX-512's float block, 8: AVX2's) so that fewer MACs run faster; default: off."),
    epochs: int = typer.Option(4, min=1, help="Fine-tuning epochs."),
    imgsz: int | None = typer.Option(None, help="Training size (default: the bundle's)."),
    batch: int = typer.Option(16, min=1),
    workers: int = typer.Option(2, min=0, help="Data loader workers."),
    seed: int = typer.Option(0),
    lr0: float = typer.Option(0.001, help="AdamW learning rate."),
    name: str | None = typer.Option(None, help="Variant name (default onnx-prunedNN-fp32, NN = % of MACs removed)."),
    max_map_drop: float = typer.Option(2.0, min=0.0, help="Largest mAP50-95 drop (points) against onnx-fp32."),
    distill_weight: float = typer.Option(0.0, min=0.0, help="Fine-tune with MODEL as teacher (logit + DFL distillation "
                                         "at this weight); 0: labels only."),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted fine-tuning in OUT."),
    json_out: Path | None = typer.Option(None, "--json", help="Write the outcome and training record as JSON ('-': stdout)."),
) -> None:
    """Prune MODEL's channels to a MACs or parameter budget (the detect head's outputs kept), fine-tune it on DATA with
    the Ultralytics trainer and add it to BUNDLE as a verified variant (parity against its own torch model, mAP budget
    against onnx-fp32, latency interleaved with every variant)."""
    from cvdeploy.build.compress.pipeline import prune_to_variant

    if macs_ratio is None and params_ratio is None:
        macs_ratio = 0.5
    outcome, record = prune_to_variant(bundle, model=model, data=data, out=out, macs_ratio=macs_ratio,
                                       params_ratio=params_ratio, importance=importance, round_to=round_to,
                                       epochs=epochs, imgsz=imgsz,
                                       batch=batch, workers=workers, seed=seed, lr0=lr0, name=name,
                                       max_map_drop=max_map_drop, distill_weight=distill_weight, resume=resume,
                                       progress=_epoch_line, on_step=_step)
    err_console.print(f"pruned to {record['macs_ratio']:.1%} of the MACs, {record['params_ratio']:.1%} of the parameters",
                      highlight=False)
    _finish(bundle, outcome, record, json_out)


@compress_app.command("distill")
def distill_cmd(
    bundle: Path = typer.Argument(..., help="The bundle to add the distilled student to."),
    teacher: Path = typer.Option(..., "--teacher", help="Teacher Ultralytics .pt (detect; same classes as the bundle)."),
    student: str = typer.Option(..., "--student", help="Student: a .pt (e.g. a pruned model) or a YOLO11 YAML (from scratch)."),
    data: Path = typer.Option(..., "--data", help="data.yaml: train split to train on, val split for mAP."),
    out: Path = typer.Option(..., "-o", "--out", help="Run directory: checkpoints (resume), progress."),
    width: float | None = typer.Option(None, help="YAML student: width multiplier (yolo11n is 0.25)."),
    epochs: int = typer.Option(4, min=1),
    imgsz: int | None = typer.Option(None, help="Training size (default: the bundle's)."),
    batch: int = typer.Option(16, min=1),
    workers: int = typer.Option(2, min=0),
    seed: int = typer.Option(0),
    lr0: float = typer.Option(0.001, help="AdamW learning rate."),
    logit_weight: float = typer.Option(1.0, min=0.0, help="Weight of the class-logit distillation term."),
    dfl_weight: float = typer.Option(1.0, min=0.0, help="Weight of the box-distribution (DFL) distillation term."),
    temperature: float = typer.Option(1.0, min=0.1),
    feature_weight: float = typer.Option(0.0, min=0.0, help="Feature imitation (Ultralytics' neck-feature distillation); 0: off."),
    name: str = typer.Option("onnx-distilled-fp32", help="Variant name (onnx-<what>-fp32)."),
    max_map_drop: float = typer.Option(2.0, min=0.0, help="Largest mAP50-95 drop (points) against onnx-fp32."),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted training in OUT."),
    json_out: Path | None = typer.Option(None, "--json", help="Write the outcome and training record as JSON ('-': stdout)."),
) -> None:
    """Train STUDENT on DATA with TEACHER's class logits and box distributions as extra targets (Ultralytics trainer),
    then add it to BUNDLE as a verified variant."""
    from cvdeploy.build.compress.pipeline import distill_to_variant

    outcome, record = distill_to_variant(bundle, teacher=teacher, student=student, data=data, out=out, width=width,
                                         epochs=epochs, imgsz=imgsz, batch=batch, workers=workers, seed=seed, lr0=lr0,
                                         cls_weight=logit_weight, dfl_weight=dfl_weight, temperature=temperature,
                                         feature_weight=feature_weight, name=name, max_map_drop=max_map_drop,
                                         resume=resume, progress=_epoch_line, on_step=_step)
    _finish(bundle, outcome, record, json_out)
