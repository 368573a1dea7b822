"""Output parity: a model's outputs against the source model's on the bundle's golden inputs.

Used when a bundle is built (the ONNX export against torch), when a variant is added (against the
stored source outputs) and by `cvdeploy verify` (re-export integrity on another machine).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cvdeploy.bundle.manifest import OutputParity, ParityReport
from cvdeploy.errors import BundleError
from cvdeploy.runtime.onnxruntime import OrtOptions
from cvdeploy.vision.letterbox import LetterboxParams
from cvdeploy.vision.postprocess import DetectOptions, decode_detect

# Raw class-score error allowed on the golden inputs. INT8 is mainly judged by mAP on the
# controlled set; its raw bound only catches a broken quantization.
# bfloat16 keeps 8 bits of mantissa (fp16: 11): about 0.4 % relative error per rounding, compounded over the layers.
SCORE_TOLERANCE = {"fp32": 1e-3, "fp16": 1e-2, "bf16": 5e-2, "int8": 0.25}
MIN_BOX_AGREEMENT = {"fp32": 1.0, "fp16": 0.98, "bf16": 0.95, "int8": 0.8}


def compare_outputs(
    got: dict[str, np.ndarray], ref: dict[str, np.ndarray], *, task: str, nc: int
) -> dict[str, OutputParity]:
    """Per-output differences; for detect, class scores and boxes are also reported apart."""
    out = {}
    for name, r in ref.items():
        if name not in got:
            raise BundleError(f"parity: the variant has no output {name!r} (it has {', '.join(got)})")
        g = got[name].astype(np.float64)
        r64 = r.astype(np.float64)
        if g.shape != r64.shape:
            raise BundleError(f"parity: output {name!r} has shape {g.shape}, the source gives {r64.shape}")
        diff = np.abs(g - r64)
        rel = diff / np.maximum(np.abs(r64), 1e-6)
        report = OutputParity(max_abs=float(diff.max(initial=0)), mean_abs=float(diff.mean()) if diff.size else 0.0,
                              max_rel=float(rel.max(initial=0)))
        if task == "detect" and g.ndim == 3 and g.shape[1] == 4 + nc:
            report.max_abs_boxes = float(diff[:, :4].max(initial=0))
            report.max_abs_scores = float(diff[:, 4:].max(initial=0))
        out[name] = report
    return out


def box_agreement(ref: np.ndarray, got: np.ndarray, conf: float = 0.25, iou_match: float = 0.5) -> float:
    """Share of boxes (after NMS, in input pixels) found by both outputs with the same class and IoU >= iou_match."""
    matched, total = box_matches(ref, got, conf, iou_match)
    return 1.0 if total == 0 else matched / total


def box_matches(ref: np.ndarray, got: np.ndarray, conf: float = 0.25, iou_match: float = 0.5) -> tuple[int, int]:
    """(boxes found by both, boxes found by the one that found more)."""
    big = 10**6  # an identity mapping (gain 1, no offset, no clipping): compare in network-input pixels
    params = LetterboxParams(orig_shape=(big, big), input_shape=(big, big), new_unpad=(big, big), top=0, left=0)
    options = DetectOptions(conf=conf)
    a, b = decode_detect(ref, params, options), decode_detect(got, params, options)
    if len(a) == 0 and len(b) == 0:
        return 0, 0
    used = np.zeros(len(b), bool)
    matched = 0
    for box, cls in zip(a.xyxy, a.class_id, strict=True):
        if len(b) == 0:
            break
        x1 = np.maximum(box[0], b.xyxy[:, 0])
        y1 = np.maximum(box[1], b.xyxy[:, 1])
        x2 = np.minimum(box[2], b.xyxy[:, 2])
        y2 = np.minimum(box[3], b.xyxy[:, 3])
        inter = (x2 - x1).clip(0) * (y2 - y1).clip(0)
        union = (box[2] - box[0]) * (box[3] - box[1]) + (b.xyxy[:, 2] - b.xyxy[:, 0]) * (b.xyxy[:, 3] - b.xyxy[:, 1]) - inter
        iou = np.where(union > 0, inter / np.maximum(union, 1e-9), 0)
        iou[(b.class_id != cls) | used] = 0
        k = int(iou.argmax())
        if iou[k] >= iou_match:
            used[k] = True
            matched += 1
    return matched, max(len(a), len(b))


def golden_check(bundle: Any, model: Path | bytes | tuple[bytes, bytes], precision: str, providers: tuple[str, ...] | None = ("CPUExecutionProvider",),
                 engine_kind: str = "onnxruntime") -> tuple[ParityReport, float, str | None]:
    """Parity of `model` against the source outputs stored in the bundle; returns (report, agreement, problem).

    `providers=None` runs on the best execution provider present (what `cvdeploy verify` checks).
    """
    from cvdeploy.runtime import open_engine

    engine = open_engine(model, engine_kind, OrtOptions(providers=providers) if engine_kind == "onnxruntime" else None,
                         precision=precision)
    per_output: dict[str, list[OutputParity]] = {}
    matched, total = 0, 0
    problem = None
    nc = len(bundle.names)
    for g in bundle.golden():
        got = engine.run({engine.inputs[0].name: g.input})
        for name, arr in got.items():
            if not np.isfinite(arr).all():
                problem = f"output {name!r} has inf or NaN on golden case {g.case.file} (overflow)"
        for k, v in compare_outputs(got, g.outputs, task=bundle.manifest.task, nc=nc).items():
            per_output.setdefault(k, []).append(v)
        first = next(iter(g.outputs))
        for ref_img, got_img in zip(g.outputs[first], got[first], strict=True):
            m, t = box_matches(ref_img, got_img)
            matched, total = matched + m, total + t
    provider, engine_precision = engine.provider, engine.precision
    engine.close()
    if not per_output:
        raise BundleError(f"bundle {bundle.name!r} has no golden cases to verify a variant against")
    merged = {k: OutputParity(
        max_abs=max(v.max_abs for v in vs), mean_abs=float(np.mean([v.mean_abs for v in vs])), max_rel=max(v.max_rel for v in vs),
        max_abs_scores=max((v.max_abs_scores for v in vs if v.max_abs_scores is not None), default=None),
        max_abs_boxes=max((v.max_abs_boxes for v in vs if v.max_abs_boxes is not None), default=None),
    ) for k, vs in per_output.items()}
    worst = max(p.worst for p in merged.values())
    tol = SCORE_TOLERANCE[precision]
    agreement = 1.0 if total == 0 else matched / total  # over every golden box: one box of four is not 25 %
    if problem is None and not np.isfinite(worst):
        problem = "outputs are not finite"
    if problem is None and worst > tol:
        problem = f"class scores differ from the source by up to {worst:.3g} (tolerance {tol:g})"
    if problem is None and agreement < MIN_BOX_AGREEMENT[precision]:
        problem = (f"only {matched} of {total} of the source's boxes on the golden inputs are found ({agreement:.0%}; at least "
                   f"{MIN_BOX_AGREEMENT[precision]:.0%} needed)")
    src = bundle.manifest.variants.get("onnx-fp32")
    reference = src.parity.reference if src is not None and src.parity is not None else "the source model's golden outputs"
    report = ParityReport(reference=reference, tolerance_scores=tol, passed=problem is None, outputs=merged,
                          provider=provider, engine_precision=engine_precision)
    return report, agreement, problem
