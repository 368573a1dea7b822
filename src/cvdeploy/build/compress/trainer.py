"""The Ultralytics trainer run on a given torch module (a pruned model) or a YAML, with progress and resume.

Why a subclass: Ultralytics' `YOLO.train()` rebuilds the network from its YAML and copies the weights whose shapes
match, which silently turns a pruned model back into the full one. `ModuleTrainer.get_model` keeps the module of the
checkpoint it starts from (and, on resume, the module stored in `last.pt`), so the checkpoints hold the pruned shapes.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cvdeploy.errors import InputError

Progress = Callable[[dict[str, Any]], None]  # one dict per epoch: epoch, epochs, losses, mAP50-95


@dataclass
class TrainResult:
    """What a training run left: its best weights and the record that goes into the manifest."""

    best: Path
    last: Path
    record: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)


def _trainer_class() -> type:
    from ultralytics.models.yolo.detect import DetectionTrainer

    class ModuleTrainer(DetectionTrainer):  # type: ignore[misc,valid-type]
        def get_model(self, cfg: Any = None, weights: Any = None, verbose: bool = True) -> Any:
            if weights is None:
                return super().get_model(cfg=cfg, weights=None, verbose=verbose)
            net = weights.float()
            for p in net.parameters():
                p.requires_grad_(True)
            return net

    return ModuleTrainer


def run_dir(project: str | os.PathLike[str], name: str) -> Path:
    return Path(project).resolve() / name


def train(
    data: str | os.PathLike[str],
    *,
    project: str | os.PathLike[str],
    name: str,
    module: Any = None,
    cfg: str | None = None,
    epochs: int,
    imgsz: int,
    seed: int = 0,
    batch: int = 16,
    workers: int = 2,
    lr0: float = 0.001,
    resume: bool = False,
    overrides: Mapping[str, Any] | None = None,
    callbacks: Mapping[str, Callable[[Any], None]] | None = None,
    progress: Progress | None = None,
) -> TrainResult:
    """Train `module` (or a fresh model from the YAML `cfg`) on `data`; `resume` continues PROJECT/NAME/weights/last.pt.

    Each finished epoch calls `progress` and appends a line to PROJECT/NAME/progress.jsonl.
    """
    if epochs < 1:
        raise InputError(f"epochs must be >= 1, got {epochs}")
    if not Path(data).is_file():
        raise InputError(f"data file not found: {data}")
    out = run_dir(project, name)
    last = out / "weights" / "last.pt"
    if resume and not last.is_file():
        raise InputError(f"nothing to resume: {last} does not exist (run without --resume first)")
    args = dict(data=str(data), epochs=epochs, imgsz=imgsz, batch=batch, workers=workers, seed=seed, deterministic=True,
                nbs=batch, device="cpu", amp=False, plots=False, project=str(out.parent), name=out.name, exist_ok=True,
                optimizer="AdamW", lr0=lr0, warmup_epochs=0, close_mosaic=max(1, epochs // 2), val=True, verbose=False,
                cache="ram", **(overrides or {}))
    if module is not None:  # the trainer starts from a checkpoint file: the module's own shapes travel in it
        from cvdeploy.build.compress.common import save_checkpoint

        args["model"] = str(save_checkpoint(module, out / "start.pt", imgsz=imgsz))
        args["pretrained"] = True  # keeps the checkpoint's module (False would make the trainer drop it)
    elif cfg is not None:
        args["model"], args["pretrained"] = cfg, False
    elif not resume:
        raise InputError("train needs a module or a model YAML")
    if resume:
        args = {"resume": str(last)}
    trainer = _trainer_class()(overrides=args)
    history: list[dict[str, Any]] = []
    if not resume and (out / "progress.jsonl").exists():
        (out / "progress.jsonl").unlink()

    def on_epoch(tr: Any) -> None:
        if tr.epoch + 1 > tr.epochs or any(h["epoch"] == tr.epoch + 1 for h in history):
            return  # the final validation of best.pt fires the event once more
        row = {"epoch": tr.epoch + 1, "epochs": tr.epochs, **{k: round(float(v), 5) for k, v in (tr.tloss or {}).items()},
               "map50_95": round(float(tr.metrics.get("metrics/mAP50-95(B)", float("nan"))), 5),
               "map50": round(float(tr.metrics.get("metrics/mAP50(B)", float("nan"))), 5), "time": round(time.time(), 1)}
        history.append(row)
        with (out / "progress.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
        if progress is not None:
            progress(row)

    trainer.add_callback("on_fit_epoch_end", on_epoch)
    for event, fn in (callbacks or {}).items():
        trainer.add_callback(event, fn)
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(sys.stderr):  # Ultralytics draws its progress bars on stdout: the result's stream
            trainer.train()
    except AssertionError as e:  # Ultralytics' way of saying a finished run cannot be resumed
        if resume and "nothing to resume" in str(e):
            raise InputError(f"{last}: this training already finished; nothing to resume") from e
        raise
    wall = time.perf_counter() - t0
    best = out / "weights" / "best.pt"
    record = {"data": str(Path(data).resolve()), "epochs": epochs, "seed": seed, "imgsz": imgsz, "batch": batch,
              "optimizer": "AdamW", "lr0": lr0, "wall_time_s": round(wall, 1), "resumed": resume,
              "run_dir": str(out), "device": "cpu",
              "ultralytics_best_fitness": None if trainer.best_fitness is None else round(float(trainer.best_fitness), 5)}
    return TrainResult(best=best if best.is_file() else last, last=last, record=record, history=history)
