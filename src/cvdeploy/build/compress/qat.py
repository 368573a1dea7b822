"""Quantization-aware training into a verified `onnx-qat-int8` variant: what `cvdeploy compress qat` runs.

    qat_to_variant(bundle, model=SOURCE.pt, data=DATA.yaml, out=RUN_DIR, config=QatConfig(...)) -> (Outcome, record)

1. The PTQ graph of the same recipe is made first (`RUN_DIR/ptq-int8.onnx`): the starting point and the yardstick.
   Its QDQ layout decides which tensors the torch model fake-quantizes, its calibration images set the ranges, and its
   mAP on DATA is recorded next to QAT's.
2. The source is fine-tuned under that quantization (`qat_train.finetune`), with a checkpoint per epoch in RUN_DIR.
3. The trained weights are exported like the bundle's FP32 and quantized by the PTQ call (`qat_export`) with the
   trained activation ranges as overrides: the two graphs quantize the same tensors with the same types, and every
   scale of the QAT graph is checked against the torch model's. ONNX Runtime's optimized graphs are compared by op type.
4. `common.add_compressed_variant` verifies and records the variant like any other: parity against its own torch model
   (the fake-quantized one it was trained as), the mAP budget against the bundle's onnx-fp32, latency interleaved.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cvdeploy.build.compress.qat_train import QatConfig, finetune
from cvdeploy.errors import BundleError, InputError

DEFAULT_NAME = "onnx-qat-int8"
Progress = Callable[[str, dict[str, Any]], None]

__all__ = ["DEFAULT_NAME", "QatConfig", "graph_map", "ptq_reference", "qat_to_variant"]


def graph_map(bundle: Any, graph: Path, data: str | os.PathLike[str]) -> dict[str, float]:
    """mAP of an ONNX graph through the bundle's Predictor (a variant entry that exists only for this measurement)."""
    from cvdeploy.build.variants import map_of
    from cvdeploy.bundle.bundle import Bundle, sha256_file
    from cvdeploy.bundle.manifest import Variant

    root = bundle.root
    tmp = root / "variants" / f".qat-measure-{os.getpid()}.onnx"
    shutil.copyfile(graph, tmp)
    try:
        v = Variant(file=f"variants/{tmp.name}", precision="int8", sha256=sha256_file(tmp), size_bytes=tmp.stat().st_size)
        view = Bundle(bundle.manifest.model_copy(update={"variants": {**bundle.manifest.variants, "measure": v}}), root)
        return map_of(view, "measure", data)
    finally:
        tmp.unlink(missing_ok=True)


def ptq_reference(bundle: Any, data: str | os.PathLike[str], config: QatConfig, out: Path, *,
                  measure: bool = True) -> tuple[Path, list[Any], dict[str, Any]]:
    """The PTQ graph of `config`'s recipe (the QAT starting point), its calibration tensors and its figures."""
    from cvdeploy.build.compress.qat_export import node_types, quantize_like_ptq
    from cvdeploy.build.variants import calibration_tensors

    calib = calibration_tensors(bundle, data, config.calib_images)
    ptq = quantize_like_ptq(bundle.variant_path("onnx-fp32"), out / "ptq-int8.onnx", calib, config.int8_recipe(),
                            quantize_head=config.quantize_head)
    figures: dict[str, Any] = {"recipe": config.int8_recipe().to_dict(), "calib_images": len(calib),
                               "node_types": node_types(ptq)}
    if measure:
        figures.update(graph_map(bundle, ptq, data))
    return ptq, calib, figures


def qat_to_variant(
    bundle: str | os.PathLike[str],
    *,
    model: str | os.PathLike[str],
    data: str | os.PathLike[str],
    out: str | os.PathLike[str],
    config: QatConfig = QatConfig(),
    name: str = DEFAULT_NAME,
    max_map_drop: float = 1.0,
    resume: bool = True,
    openvino: bool = False,
    progress: Progress | None = None,
    on_step: Callable[[str, str], None] | None = None,
    timer: Any = None,
) -> tuple[Any, dict[str, Any]]:
    """Fine-tune `model` (the bundle's source .pt) with QAT on `data` and add the result to `bundle` as `name`.

    Returns the variant's `Outcome` and the training record (also stored with the variant). `resume` continues from the
    last epoch checkpointed in `out` by a run of the same configuration. With `openvino`, the same QDQ graph is also
    added as OpenVINO IR (`openvino-<what>-int8`, verified the same way); its outcome is in the record's `openvino`.
    """
    import onnx

    from cvdeploy.build.compress.common import add_compressed_variant, export_onnx, precision_of, save_checkpoint
    from cvdeploy.build.compress.qat_export import graph_scales, node_types, quantize_like_ptq, scale_mismatches
    from cvdeploy.build.compress.qat_fakequant import quant_plan
    from cvdeploy.bundle.bundle import Bundle

    if precision_of(name) != "int8":
        raise InputError(f"a QAT variant is INT8: name it onnx-<what>-int8, not {name!r}")
    if not Path(model).is_file():
        raise InputError(f"source model not found: {model}")
    if not Path(data).is_file():
        raise InputError(f"--data: {data} not found")
    b = Bundle.load(bundle)
    if b.root is None:
        raise InputError(f"{bundle} is a plain .onnx file; variants are added to a bundle directory")
    if "onnx-fp32" not in b.manifest.variants:
        raise BundleError(f"bundle {b.name!r} has no onnx-fp32 variant to quantize like")
    step = on_step or (lambda _v, _s: None)
    say = progress or (lambda _e, _d: None)
    run_dir = Path(out).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    step(name, f"PTQ reference ({config.recipe}{'' if config.per_channel else ', per-tensor weights'})")
    ptq, calib, ptq_figures = ptq_reference(b, data, config, run_dir)
    say("ptq", {k: v for k, v in ptq_figures.items() if k in ("map50_95", "map50")})
    plan = quant_plan(onnx.load(str(ptq), load_external_data=False))
    if not plan.weights:
        raise BundleError("the PTQ graph quantizes no convolution: nothing for QAT to train for")

    step(name, f"fine-tune {config.epochs} epoch(s) under fake quantization")
    run = finetune(b, model, data, config, plan, calib, run_dir, scales=graph_scales(ptq), resume=resume, progress=say)

    step(name, "export and quantize like PTQ")
    record = run.record(config, data, config.train_images)
    imgsz = b.manifest.preprocess.imgsz[0]
    pt = save_checkpoint(run.float_model(model), run_dir / "qat-fp32.pt", imgsz=imgsz, extra={"cvdeploy_qat": record})
    fp32 = export_onnx(pt, run_dir / "qat-fp32.onnx", imgsz)
    # Every activation range the torch model holds (trained, or re-calibrated) goes to the graph as an override.
    ranges = run.fake_quant.ranges()
    qat = quantize_like_ptq(fp32, run_dir / "qat-int8.onnx", calib, config.int8_recipe(), quantize_head=config.quantize_head,
                            ranges=ranges)
    if mismatches := scale_mismatches(graph_scales(qat), run.fake_quant):
        raise BundleError(f"the QAT graph does not quantize like the model it trained ({len(mismatches)} tensors): "
                          + "; ".join(mismatches[:5]))
    qat_types, ptq_types = node_types(qat), ptq_figures["node_types"]
    record.update({
        "source": str(model), "imgsz": imgsz, "wall_time_s": round(time.perf_counter() - t0, 1),
        "same_node_types_as_ptq": qat_types == ptq_types, "node_types": qat_types,
        "ranges": {"tensors": len(ranges), "trained": config.range_lr > 0},
        "ptq_reference": {k: v for k, v in ptq_figures.items() if k != "node_types"},
    })
    if qat_types != ptq_types:  # same recipe, same graph: anything else means the comparison is not like for like
        raise BundleError(f"the QAT graph does not run the same kernels as PTQ's (QAT {qat_types}, PTQ {ptq_types})")

    # Parity is held against the fake-quantized torch model (ranges calibrated like the graph's): what QAT trained.
    outcome = add_compressed_variant(b.root, name, run.model, training=record, data=data, onnx=qat,
                                     max_map_drop=max_map_drop, on_step=on_step, timer=timer)
    if outcome.variant is not None and "map50_95" in outcome.variant.metrics and "map50_95" in ptq_figures:
        base = Bundle.load(b.root).manifest.variants["onnx-fp32"].metrics["map50_95"]
        record["ptq_reference"]["map50_95_drop_points"] = round(100 * (base - ptq_figures["map50_95"]), 3)
        record["map50_95"] = outcome.variant.metrics["map50_95"]
        record["map50_95_drop_points"] = outcome.variant.metrics.get("map50_95_drop_points")
    if openvino and outcome.written:
        ov_name = "openvino-" + name.removeprefix("onnx-")
        ov = add_compressed_variant(b.root, ov_name, run.model, training=record, data=data, onnx=qat,
                                    max_map_drop=max_map_drop, on_step=on_step, timer=timer)
        record["openvino"] = {"name": ov_name, "written": ov.written, "reason": ov.reason,
                              "metrics": dict(ov.variant.metrics) if ov.variant is not None else {}}
    return outcome, record
