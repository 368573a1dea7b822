"""From a source .pt to a verified bundle variant: prune + fine-tune, or distill; what `cvdeploy compress` runs.

Each pipeline writes its run under OUT (the pruned start, Ultralytics' run with last.pt/best.pt, progress.jsonl,
record.json), so that `resume=True` continues an interrupted fine-tuning where its last epoch ended, and adds the
result to the bundle through `common.add_compressed_variant` (the same checks as every variant).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from cvdeploy.errors import InputError


def prune_name(macs_ratio: float) -> str:
    """onnx-pruned50-fp32 for a model pruned to 50 % of its MACs (the share removed, in percent)."""
    return f"onnx-pruned{round(100 * (1 - macs_ratio))}-fp32"


def prune_to_variant(
    bundle: str | os.PathLike[str],
    *,
    model: str | os.PathLike[str],
    data: str | os.PathLike[str],
    out: str | os.PathLike[str],
    macs_ratio: float | None = 0.5,
    params_ratio: float | None = None,
    importance: str = "magnitude",
    round_to: int | None = None,
    epochs: int = 4,
    imgsz: int | None = None,
    batch: int = 16,
    workers: int = 2,
    seed: int = 0,
    lr0: float = 0.001,
    name: str | None = None,
    max_map_drop: float = 2.0,
    distill_weight: float = 0.0,
    resume: bool = False,
    progress: Any = None,
    on_step: Any = None,
) -> tuple[Any, dict[str, Any]]:
    """Prune `model` to the target, fine-tune it on `data`, add it to `bundle`; return (Outcome, training record).

    `round_to` keeps every pruned layer's channel count a multiple of it: what ONNX Runtime's blocked convolution
    kernels compute in (16 floats with AVX-512, 8 with AVX2), so that fewer MACs become less time (measured in
    docs/compression.md: 1.13x unrounded against 1.33-1.42x with 16, at ~58 % of the MACs, on an AVX-512 CPU).

    `distill_weight > 0` fine-tunes with the unpruned `model` as teacher (its logit and DFL targets, `distill.py`):
    the pruned network is taught the outputs it used to give, not only the labels.
    """
    from cvdeploy.build.compress.common import add_compressed_variant, load_torch_model, save_checkpoint
    from cvdeploy.build.compress.prune import prune, taylor_batch
    from cvdeploy.build.compress.trainer import train
    from cvdeploy.bundle.bundle import Bundle

    step = on_step or (lambda _v, _s: None)
    size = imgsz or Bundle.load(bundle).manifest.preprocess.imgsz[0]
    run = Path(out).resolve()
    record_file = run / "prune.json"
    t0 = time.perf_counter()
    if resume:
        if not record_file.is_file():
            raise InputError(f"nothing to resume in {run}: no prune.json (run without --resume first)")
        pruned = json.loads(record_file.read_text())
    else:
        step("prune", f"{importance} importance to {macs_ratio or params_ratio:.0%} of the "
                      f"{'MACs' if macs_ratio is not None else 'parameters'}")
        tb = taylor_batch(str(data), size) if importance == "taylor" else None
        result = prune(load_torch_model(model), imgsz=size, macs_ratio=macs_ratio, params_ratio=params_ratio,
                       importance=importance, taylor_batch=tb, round_to=round_to)
        save_checkpoint(result.model, run / "pruned.pt", imgsz=size)
        pruned = {**result.record(), "source": str(model), "prune_time_s": round(time.perf_counter() - t0, 1)}
        run.mkdir(parents=True, exist_ok=True)
        record_file.write_text(json.dumps(pruned, indent=2))
    variant = name or prune_name(pruned["macs_ratio"])
    step(variant, f"fine-tune {epochs} epoch(s)")
    start = load_torch_model(run / "pruned.pt") if not resume else None
    callbacks = {}
    if distill_weight > 0:
        from cvdeploy.build.compress.distill import distill_callbacks, load_teacher

        callbacks = distill_callbacks(load_teacher(model), cls_weight=distill_weight, dfl_weight=distill_weight,
                                      temperature=1.0)
    tr = train(data, project=run, name="finetune", module=start, epochs=epochs, imgsz=size, seed=seed, batch=batch,
               workers=workers, lr0=lr0, resume=resume, progress=progress, callbacks=callbacks)
    record = {"method": "prune + fine-tune" + (" with distillation from the source" if distill_weight > 0 else ""),
              **pruned, **tr.record, "distill_weight": distill_weight, "history": tr.history}
    outcome = add_compressed_variant(bundle, variant, tr.best, training=record, data=data, max_map_drop=max_map_drop,
                                     on_step=on_step)
    return outcome, record


def distill_to_variant(
    bundle: str | os.PathLike[str],
    *,
    teacher: str | os.PathLike[str],
    student: str | os.PathLike[str],
    data: str | os.PathLike[str],
    out: str | os.PathLike[str],
    width: float | None = None,
    epochs: int = 4,
    imgsz: int | None = None,
    batch: int = 16,
    workers: int = 2,
    seed: int = 0,
    lr0: float = 0.001,
    cls_weight: float = 1.0,
    dfl_weight: float = 1.0,
    temperature: float = 1.0,
    feature_weight: float = 0.0,
    name: str = "onnx-distilled-fp32",
    max_map_drop: float = 2.0,
    resume: bool = False,
    progress: Any = None,
    on_step: Any = None,
) -> tuple[Any, dict[str, Any]]:
    """Distill `teacher` into `student` on `data`, add the student to `bundle`; return (Outcome, training record)."""
    from cvdeploy.build.compress.common import add_compressed_variant, precision_of
    from cvdeploy.build.compress.distill import distill
    from cvdeploy.bundle.bundle import Bundle

    precision_of(name)  # a bad name fails before the training, not after
    step = on_step or (lambda _v, _s: None)
    size = imgsz or Bundle.load(bundle).manifest.preprocess.imgsz[0]
    step(name, f"distill {epochs} epoch(s)")
    tr = distill(data, teacher=teacher, student=student, project=Path(out).resolve(), name="distill", epochs=epochs,
                 imgsz=size, seed=seed, batch=batch, workers=workers, lr0=lr0, width=width, cls_weight=cls_weight,
                 dfl_weight=dfl_weight, temperature=temperature, feature_weight=feature_weight, resume=resume,
                 progress=progress)
    record = {**tr.record, "history": tr.history}
    outcome = add_compressed_variant(bundle, name, tr.best, training=record, data=data, max_map_drop=max_map_drop,
                                     on_step=on_step)
    return outcome, record
