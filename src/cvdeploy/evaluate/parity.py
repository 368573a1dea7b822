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
from cvdeploy.vision.postprocess import DetectOptions, select_candidates
from cvdeploy.vision.tasks import BOX_TASKS, TaskHead, candidates

# Raw class-score error allowed on the golden inputs. INT8 is mainly judged by mAP on the
# controlled set; its raw bound only catches a broken quantization.
# bfloat16 keeps 8 bits of mantissa (fp16: 11): about 0.4 % relative error per rounding, compounded over the layers.
SCORE_TOLERANCE = {"fp32": 1e-3, "fp16": 1e-2, "bf16": 5e-2, "int8": 0.25}
MIN_BOX_AGREEMENT = {"fp32": 1.0, "fp16": 0.98, "bf16": 0.95, "int8": 0.8}


def compare_outputs(
    got: dict[str, np.ndarray], ref: dict[str, np.ndarray], *, task: str, nc: int, end2end: bool = False
) -> dict[str, OutputParity]:
    """Per-output differences. Box tasks report class scores, boxes and the task's extra channels (mask coefficients,
    keypoints, angle) apart; classify's probabilities are its scores; a segment model's prototypes are also measured
    against their own range. End-to-end outputs (rows of a top-k, `end2end`) are compared row to matching row, since
    two near-equal scores may swap places between engines."""
    out = {}
    for name, r in ref.items():
        if name not in got:
            raise BundleError(f"parity: the variant has no output {name!r} (it has {', '.join(got)})")
        g = got[name].astype(np.float64)
        r64 = r.astype(np.float64)
        if g.shape != r64.shape:
            raise BundleError(f"parity: output {name!r} has shape {g.shape}, the source gives {r64.shape}")
        if end2end and g.ndim == 3 and g.shape[2] >= 6:
            out[name] = _compare_rows(g, r64)
            continue
        diff = np.abs(g - r64)
        rel = diff / np.maximum(np.abs(r64), 1e-6)
        report = OutputParity(max_abs=float(diff.max(initial=0)), mean_abs=float(diff.mean()) if diff.size else 0.0,
                              max_rel=float(rel.max(initial=0)))
        if task in BOX_TASKS and g.ndim == 3 and g.shape[1] >= 4 + nc:
            report.max_abs_boxes = float(diff[:, :4].max(initial=0))
            report.max_abs_scores = float(diff[:, 4 : 4 + nc].max(initial=0))
            if g.shape[1] > 4 + nc:
                report.max_abs_extra = float(diff[:, 4 + nc :].max(initial=0))
        elif task == "classify" and g.ndim == 2 and g.shape[1] == nc:
            report.max_abs_scores = report.max_abs
        elif g.ndim == 4:  # prototypes: unbounded values, judged against their own range
            report.max_abs_scaled = report.max_abs / max(float(np.abs(r64).max(initial=0)), 1e-6)
        out[name] = report
    return out


ROW_WINDOW = 0.25  # end-to-end rows: a reference row's match is sought among rows whose score is this close to its own


def match_rows(ref: np.ndarray, got: np.ndarray, window: float = ROW_WINDOW) -> tuple[list[tuple[int, int]], list[int]]:
    """Pair one image's end-to-end rows (x1, y1, x2, y2, conf, class, ...; best first): each reference row with the
    unused row of its class, score within `window`, whose box is nearest. Returns (pairs, reference rows left over)."""
    used = np.zeros(len(got), bool)
    pairs, left = [], []
    for i, row in enumerate(ref):
        cand = np.flatnonzero(~used & (np.abs(got[:, 4] - row[4]) <= window) & (got[:, 5] == row[5]))
        if not cand.size:
            left.append(i)
            continue
        j = int(cand[np.argmin(np.abs(got[cand, :4] - row[:4]).max(1))])
        used[j] = True
        pairs.append((i, j))
    return pairs, left


def _compare_rows(got: np.ndarray, ref: np.ndarray, window: float = ROW_WINDOW) -> OutputParity:
    """End-to-end outputs (batch, rows, 6 + extra), row by matched row. Only the reference rows scored more than
    `window` above the top-k cut-off (the lower of the two last rows' scores) are compared: a row nearer the cut-off
    may fairly fall out of one engine's top k and into the other's. Such a row without a match counts as a score
    difference of its own score."""
    box = score = extra = 0.0
    diffs, rels = [], []
    for r, g in zip(ref, got, strict=True):
        if not len(r):
            continue
        firm = r[r[:, 4] > min(r[-1, 4], g[-1, 4]) + window]
        pairs, left = match_rows(firm, g, window)
        if pairs:
            i, j = (np.array(v) for v in zip(*pairs, strict=True))
            d = np.abs(g[j] - firm[i])
            box, score = max(box, float(d[:, :4].max())), max(score, float(d[:, 4].max()))
            if d.shape[1] > 6:
                extra = max(extra, float(d[:, 6:].max()))
            diffs.append(d)
            rels.append(d / np.maximum(np.abs(firm[i]), 1e-6))
        for i in left:
            score = max(score, float(firm[i, 4]))
    d = np.concatenate(diffs) if diffs else np.zeros((0, ref.shape[2]))
    rel = np.concatenate(rels) if rels else d
    return OutputParity(max_abs=max(box, score, extra), mean_abs=float(d.mean()) if d.size else 0.0,
                        max_rel=float(rel.max(initial=0)), max_abs_scores=score, max_abs_boxes=box,
                        max_abs_extra=extra if ref.shape[2] > 6 else None)


def box_agreement(ref: np.ndarray, got: np.ndarray, conf: float = 0.25, iou_match: float = 0.5) -> float:
    """Share of boxes (after NMS, in input pixels) found by both outputs with the same class and IoU >= iou_match."""
    matched, total = box_matches(ref, got, conf, iou_match)
    return 1.0 if total == 0 else matched / total


def _input_boxes(output: np.ndarray, head: TaskHead | None, options: DetectOptions) -> tuple[np.ndarray, np.ndarray]:
    """One image's kept boxes (xyxy, network-input pixels; obb: the boxes enclosing the rotated ones) and classes."""
    if head is None:
        c = select_candidates(output, options)
        return c.boxes, c.class_id
    c = candidates(head, output, options)
    if head.task == "obb" and len(c):
        from cvdeploy.vision.obb import corners_to_xyxy, xywhr2xyxyxyxy

        return corners_to_xyxy(xywhr2xyxyxyxy(np.concatenate([c.boxes, c.extra[:, -1:]], 1))), c.class_id
    return c.boxes, c.class_id


def box_matches(ref: np.ndarray, got: np.ndarray, conf: float = 0.25, iou_match: float = 0.5, *,
                head: TaskHead | None = None) -> tuple[int, int]:
    """(boxes found by both, boxes found by the one that found more), for one image's detection output (a plain
    detect output without `head`). Classify: (1 if both give the same top class, 1)."""
    if head is not None and head.task == "classify":
        return int(np.argmax(ref) == np.argmax(got)), 1
    options = DetectOptions(conf=conf)
    (a_xyxy, a_cls), (b_xyxy, b_cls) = _input_boxes(ref, head, options), _input_boxes(got, head, options)
    if len(a_xyxy) == 0 and len(b_xyxy) == 0:
        return 0, 0
    used = np.zeros(len(b_xyxy), bool)
    matched = 0
    for box, cls in zip(a_xyxy, a_cls, strict=True):
        if len(b_xyxy) == 0:
            break
        x1 = np.maximum(box[0], b_xyxy[:, 0])
        y1 = np.maximum(box[1], b_xyxy[:, 1])
        x2 = np.minimum(box[2], b_xyxy[:, 2])
        y2 = np.minimum(box[3], b_xyxy[:, 3])
        inter = (x2 - x1).clip(0) * (y2 - y1).clip(0)
        union = (box[2] - box[0]) * (box[3] - box[1]) + (b_xyxy[:, 2] - b_xyxy[:, 0]) * (b_xyxy[:, 3] - b_xyxy[:, 1]) - inter
        iou = np.where(union > 0, inter / np.maximum(union, 1e-9), 0)
        # A box with no area (an inverted or flat box, as untrained heads give) has no IoU: the same corners within a
        # pixel count as the same box.
        iou = np.maximum(iou, np.abs(b_xyxy - box).max(1) <= 1.0)
        iou[(b_cls != cls) | used] = 0
        k = int(iou.argmax())
        if iou[k] >= iou_match:
            used[k] = True
            matched += 1
    return matched, max(len(a_xyxy), len(b_xyxy))


def bundle_head(bundle: Any) -> TaskHead:
    """The task head a bundle's outputs are decoded with (keypoint shape from its task info, 17 x 3 by default)."""
    m = bundle.manifest
    kpt = m.task_info.kpt_shape if m.task_info is not None and m.task_info.kpt_shape is not None else None
    return TaskHead(m.task, len(m.names), m.postprocess.end2end, tuple(kpt) if kpt else None)


def predictions_output(outputs: dict[str, np.ndarray]) -> str:
    """The name of the output that holds the predictions (not a segment model's 4-D prototypes)."""
    return next((k for k, v in outputs.items() if v.ndim != 4), next(iter(outputs)))


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
    head = bundle_head(bundle)
    for g in bundle.golden():
        got = engine.run({engine.inputs[0].name: g.input})
        for name, arr in got.items():
            if not np.isfinite(arr).all():
                problem = f"output {name!r} has inf or NaN on golden case {g.case.file} (overflow)"
        for k, v in compare_outputs(got, g.outputs, task=head.task, nc=nc, end2end=head.end2end).items():
            per_output.setdefault(k, []).append(v)
        first = predictions_output(g.outputs)
        for ref_img, got_img in zip(g.outputs[first], got[first], strict=True):
            m, t = box_matches(ref_img, got_img, head=head)
            matched, total = matched + m, total + t
    provider, engine_precision = engine.provider, engine.precision
    engine.close()
    if not per_output:
        raise BundleError(f"bundle {bundle.name!r} has no golden cases to verify a variant against")
    merged = {k: merge_parity(vs) for k, vs in per_output.items()}
    worst = max(p.worst for p in merged.values())
    tol = SCORE_TOLERANCE[precision]
    agreement = 1.0 if total == 0 else matched / total  # over every golden box: one box of four is not 25 %
    if problem is None and not np.isfinite(worst):
        problem = "outputs are not finite"
    if problem is None and worst > tol:
        name, p = max(merged.items(), key=lambda kv: kv[1].worst)
        what = "class scores" if p.max_abs_scores is not None else f"output {name!r} (relative to its range)"
        problem = f"{what} differ from the source by up to {worst:.3g} (tolerance {tol:g})"
    if problem is None and agreement < MIN_BOX_AGREEMENT[precision]:
        problem = (f"only {matched} of {total} of the source's boxes on the golden inputs are found ({agreement:.0%}; at least "
                   f"{MIN_BOX_AGREEMENT[precision]:.0%} needed)")
    src = bundle.manifest.variants.get("onnx-fp32")
    reference = src.parity.reference if src is not None and src.parity is not None else "the source model's golden outputs"
    report = ParityReport(reference=reference, tolerance_scores=tol, passed=problem is None, outputs=merged,
                          provider=provider, engine_precision=engine_precision)
    return report, agreement, problem


def merge_parity(reports: list[OutputParity]) -> OutputParity:
    """One output's parity over several golden cases: the worst of each figure, the mean of the means."""

    def worst(field: str) -> float | None:
        return max((getattr(v, field) for v in reports if getattr(v, field) is not None), default=None)

    return OutputParity(max_abs=max(v.max_abs for v in reports), mean_abs=float(np.mean([v.mean_abs for v in reports])),
                        max_rel=max(v.max_rel for v in reports), max_abs_scores=worst("max_abs_scores"),
                        max_abs_boxes=worst("max_abs_boxes"), max_abs_extra=worst("max_abs_extra"),
                        max_abs_scaled=worst("max_abs_scaled"))
