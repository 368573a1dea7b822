"""Golden parity for engines that take one fixed input size (NCNN and LiteRT exports): the golden inputs at that size
against the source's stored outputs, the other cases padded to it against onnx-fp32 on the same padded input.

Used by the build (`build.edge`) and by `cvdeploy verify` on any machine: the inference side, so nothing here needs the
build extra.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cvdeploy.bundle.bundle import Bundle
from cvdeploy.bundle.manifest import OutputParity, ParityReport
from cvdeploy.errors import BundleError
from cvdeploy.evaluate.parity import MIN_BOX_AGREEMENT, SCORE_TOLERANCE, box_matches, compare_outputs


def _pad_to(x: np.ndarray, hw: tuple[int, int], pad: float) -> np.ndarray | None:
    """`x` (NCHW) centred in a canvas of size `hw` filled with the letterbox's pad value; None if it does not fit."""
    h, w = x.shape[2:]
    if h > hw[0] or w > hw[1]:
        return None
    out = np.full((*x.shape[:2], *hw), pad, dtype=x.dtype)
    top, left = (hw[0] - h) // 2, (hw[1] - w) // 2
    out[:, :, top : top + h, left : left + w] = x
    return out


def fixed_size_cases(bundle: Bundle, hw: tuple[int, int]) -> list[tuple[np.ndarray, dict[str, np.ndarray], str]]:
    """Golden inputs at `hw` with their references: the source's stored outputs where the case is at that size; onnx-fp32's
    outputs on the padded input elsewhere. Returns (input, outputs, what the reference is)."""
    from cvdeploy.runtime import open_engine

    pre = bundle.manifest.preprocess
    pad = pre.pad_value / pre.scale
    cases, ref = [], None
    try:
        for g in bundle.golden():
            if tuple(g.input.shape[2:]) == hw:
                cases.append((g.input, g.outputs, "source"))
                continue
            padded = _pad_to(g.input, hw, pad)
            if padded is None:
                continue
            if ref is None:
                ref = open_engine(bundle.variant_path("onnx-fp32"), "onnxruntime", precision="fp32")
            cases.append((padded, ref.run({ref.inputs[0].name: padded}), "onnx-fp32"))
    finally:
        if ref is not None:
            ref.close()
    return cases


def edge_golden_check(bundle: Bundle, model: Any, kind: str, precision: str) -> tuple[ParityReport, float, str | None]:
    """`evaluate.parity.golden_check` for a fixed-size engine: parity (raw outputs) and box agreement on
    `fixed_size_cases`; returns (report, agreement, problem)."""
    from cvdeploy.runtime import open_engine

    engine = open_engine(model, kind, precision=precision)
    try:
        shape = engine.inputs[0].shape
        hw = (int(shape[2]), int(shape[3]))
        cases = fixed_size_cases(bundle, hw)
        if not cases:
            raise BundleError(f"bundle {bundle.name!r} has no golden case that fits {hw[0]}x{hw[1]}, this variant's input size")
        per_output: dict[str, list[OutputParity]] = {}
        matched = total = 0
        problem = None
        nc = len(bundle.names)
        for x, ref, _ in cases:
            got = engine.run({engine.inputs[0].name: x})
            for name, arr in got.items():
                if not np.isfinite(arr).all():
                    problem = f"output {name!r} has inf or NaN on a golden input (overflow)"
            for k, v in compare_outputs(got, ref, task=bundle.manifest.task, nc=nc).items():
                per_output.setdefault(k, []).append(v)
            first = next(iter(ref))
            for r, g in zip(ref[first], got[first], strict=True):
                m, t = box_matches(r, g)
                matched, total = matched + m, total + t
        provider, engine_precision = engine.provider, engine.precision
    finally:
        engine.close()
    merged = {k: OutputParity(
        max_abs=max(v.max_abs for v in vs), mean_abs=float(np.mean([v.mean_abs for v in vs])), max_rel=max(v.max_rel for v in vs),
        max_abs_scores=max((v.max_abs_scores for v in vs if v.max_abs_scores is not None), default=None),
        max_abs_boxes=max((v.max_abs_boxes for v in vs if v.max_abs_boxes is not None), default=None),
    ) for k, vs in per_output.items()}
    worst = max(p.worst for p in merged.values())
    tol = SCORE_TOLERANCE[precision]
    agreement = 1.0 if total == 0 else matched / total
    if problem is None and not np.isfinite(worst):
        problem = "outputs are not finite"
    if problem is None and worst > tol:
        problem = f"class scores differ from the reference by up to {worst:.3g} (tolerance {tol:g})"
    if problem is None and agreement < MIN_BOX_AGREEMENT[precision]:
        problem = (f"only {matched} of {total} of the reference's boxes on the golden inputs are found ({agreement:.0%}; at least "
                   f"{MIN_BOX_AGREEMENT[precision]:.0%} needed)")
    n_src = sum(1 for _, _, r in cases if r == "source")
    reference = (f"source model's golden outputs on {n_src} input(s) at {hw[0]}x{hw[1]}; onnx-fp32 on {len(cases) - n_src} "
                 f"golden input(s) padded to {hw[0]}x{hw[1]}")
    report = ParityReport(reference=reference, tolerance_scores=tol, passed=problem is None, outputs=merged,
                          provider=provider, engine_precision=engine_precision)
    return report, agreement, problem
