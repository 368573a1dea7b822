"""`cvdeploy compress qat`: quantization-aware fine-tuning into a verified onnx-qat-int8 variant."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from cvdeploy.cli.app import err_console, fail
from cvdeploy.cli.compress import compress_app


@compress_app.command("qat")
def qat(
    bundle: Path = typer.Argument(..., help="The bundle (built from MODEL) to add the QAT variant to."),
    model: Path = typer.Option(..., "--model", help="The bundle's source Ultralytics .pt (detect): the weights to fine-tune."),
    data: Path = typer.Option(..., "--data", help="data.yaml: train split to fine-tune and calibrate on, val split for mAP."),
    out: Path = typer.Option(..., "-o", "--out", help="Run directory: PTQ reference, checkpoints (resume), exports."),
    recipe: str = typer.Option("u8s8-w7", help="INT8 recipe, as for onnx-int8: u8s8-w7, u8s8-w8 or s8s8-asym."),
    per_tensor: bool = typer.Option(False, "--per-tensor", help="Per-tensor weight scales (default per channel)."),
    calib_images: int = typer.Option(64, min=1, help="Calibration images (train split), as for onnx-int8."),
    calib_method: str = typer.Option("minmax", help="PTQ calibration (minmax, percentile or entropy): QAT starts from "
                                     "the PTQ graph's scales and is compared with it."),
    train_images: int = typer.Option(192, min=1, help="Training images (evenly spaced over the train split)."),
    epochs: int = typer.Option(4, min=1, help="Fine-tuning epochs (resuming with more epochs continues the run)."),
    batch: int = typer.Option(8, min=1, help="Batch size."),
    lr: float = typer.Option(5e-5, help="SGD learning rate (momentum 0.9)."),
    distill: float = typer.Option(1.0, min=0.0, help="Weight of distillation to the float model: its class probabilities "
                                  "and box distributions (0: none)."),
    labels: float = typer.Option(0.0, min=0.0, help="Weight of the detection loss on the labels (0: distillation only)."),
    range_lr: float = typer.Option(3e-2, min=0.0, help="Adam learning rate of the activation ranges, exported as range "
                                   "overrides (0: ranges not trained, min/max re-calibrated after training)."),
    seed: int = typer.Option(0, help="Seed of the data order and flips."),
    val_images: int = typer.Option(50, min=0, help="Val images for the per-epoch mAP of the fake-quantized model (0: none)."),
    name: str = typer.Option("onnx-qat-int8", help="Variant name (onnx-<what>-int8)."),
    max_map_drop: float = typer.Option(1.0, min=0.0, help="Largest mAP50-95 drop (points) against onnx-fp32."),
    resume: bool = typer.Option(True, help="Continue from the last epoch checkpointed in OUT by the same settings."),
    openvino: bool = typer.Option(False, "--openvino", help="Also add the QAT graph as OpenVINO IR (openvino-<what>-int8), "
                                  "verified the same way (needs the openvino extra)."),
    json_out: Path | None = typer.Option(None, "--json", help="Write the training record as JSON to this file ('-': stdout)."),
) -> None:
    """Fine-tune MODEL under the INT8 quantization of RECIPE (the PTQ graph is the starting point), quantize it with the
    same recipe and add it to BUNDLE as a verified variant; prints QAT's mAP next to PTQ's.

    Progress (epochs, loss, mAP) goes to stderr; the variant table and the comparison to stdout."""
    from cvdeploy.build.compress.qat import QatConfig, qat_to_variant
    from cvdeploy.bundle.bundle import Bundle
    from cvdeploy.cli.info import variants_table
    from cvdeploy.cli.output import result_console, write_json

    config = QatConfig(recipe=recipe, per_channel=not per_tensor, calib_images=calib_images, calib_method=calib_method,
                       train_images=train_images, epochs=epochs, batch=batch, lr=lr, distill=distill, labels=labels, seed=seed,
                       range_lr=range_lr,
                       val_images=val_images)

    def progress(event: str, d: dict[str, Any]) -> None:
        if event == "epoch":
            m = "" if d.get("map50_95") is None else f" · mAP50-95 (fake-quant, val subset) {d['map50_95']:.4f}"
            err_console.print(f"epoch {d['epoch']}/{d['epochs']} · loss {d['loss']:.3f} (box {d['box']:.3f} cls {d['cls']:.3f} "
                              f"dfl {d['dfl']:.3f}){m} · {d['seconds']:.0f} s", highlight=False)
        elif event == "step" and (d["step"] % 10 == 0 or d["step"] == d["steps"]):
            err_console.print(f"  epoch {d['epoch']} step {d['step']}/{d['steps']} · loss {d['loss']:.3f}", highlight=False)
        elif event == "resume":
            err_console.print(f"resuming after epoch {d['epoch']} ({d['checkpoint']})", highlight=False)
        elif event == "ptq":
            err_console.print(f"PTQ reference ({recipe}{', per-tensor' if per_tensor else ''}): mAP50-95 "
                              f"{d.get('map50_95', float('nan')):.4f}", highlight=False)

    def on_step(variant: str, step: str) -> None:
        err_console.print(f"{variant}: {step}", highlight=False, soft_wrap=True)

    outcome, record = qat_to_variant(bundle, model=model, data=data, out=out, config=config, name=name,
                                     max_map_drop=max_map_drop, resume=resume, openvino=openvino, progress=progress,
                                     on_step=on_step)
    if json_out is not None:
        write_json(json_out, record)
    out_console = result_console(json_out)  # the human result moves to stderr when stdout holds the JSON (`--json -`)
    if outcome.written:
        out_console.print(variants_table(Bundle.load(bundle).manifest))
    ptq = record.get("ptq_reference", {})
    if "map50_95_drop_points" in ptq and record.get("map50_95_drop_points") is not None:
        out_console.print(f"mAP50-95 drop against onnx-fp32 at recipe {recipe}{' per-tensor' if per_tensor else ''}: "
                      f"PTQ {ptq['map50_95_drop_points']:.2f} points, QAT {record['map50_95_drop_points']:.2f} points "
                      f"({record['epochs']} epoch(s) on {record['train_images']} images, {record['train_seconds']:.0f} s)",
                      highlight=False, soft_wrap=True)
    if not outcome.written:
        raise fail(f"{name} not written: {outcome.reason}")
    if "openvino" in record and not record["openvino"]["written"]:
        raise fail(f"{record['openvino']['name']} not written: {record['openvino']['reason']}")
    if json_out is None:
        err_console.print(f"training record: {json.dumps({k: record[k] for k in ('epochs', 'seed', 'train_seconds')})}",
                          highlight=False)
