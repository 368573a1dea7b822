"""Layer bisection's result: the error of a tensor and of a node, the divergence found, and how it reads (text, JSON).

The error of a tensor is its relative RMS error ||candidate - reference|| / ||reference||, infinite where the candidate
holds inf or NaN and the reference does not (see `cvdeploy.diagnose.bisect` and docs/layer-bisection.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["FP16_MAX", "KINDS", "Divergence", "NodeError", "TensorError", "fmt_error", "tensor_error"]

FP16_MAX = 65504.0  # the largest finite float16: a value beyond it becomes inf
KINDS = ("fp16", "int8", "engine", "graph")  # what differs between reference and candidate; decides the suggested fix


def _num(x: float) -> float | str:
    """A float for JSON: rounded, and inf/NaN as strings (strict JSON has neither)."""
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return float(f"{x:.6g}")


def fmt_error(x: float) -> str:
    """A figure for a person: 3 significant digits, inf and nan by name."""
    return "inf" if math.isinf(x) else "nan" if math.isnan(x) else f"{x:.3g}"


# -- the result ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorError:
    """How far one candidate tensor is from the reference's, on one input case.

    `error` is the relative RMS error ||c - r|| / ||r|| (the absolute RMS error where the reference is all zeros), and
    inf when the candidate holds inf or NaN where the reference does not. `max_rel` is max|c - r| / max|r|: the worst
    element against the tensor's range. `ref_max` is the reference's largest finite magnitude (beyond 65504 a float16
    tensor cannot hold it).
    """

    error: float
    max_abs: float
    max_rel: float
    ref_max: float
    nonfinite: int  # elements inf or NaN in the candidate where the reference is finite (or a different inf/NaN)
    size: int

    def to_dict(self) -> dict[str, Any]:
        return {"error": _num(self.error), "max_abs": _num(self.max_abs), "max_rel": _num(self.max_rel),
                "ref_max": _num(self.ref_max), "nonfinite": self.nonfinite}


def tensor_error(reference: np.ndarray, candidate: np.ndarray) -> TensorError:
    """Compare one tensor (same shape) in float64; non-finite candidate values count as infinite error."""
    r = np.asarray(reference, dtype=np.float64)
    c = np.asarray(candidate, dtype=np.float64)
    fr, fc = np.isfinite(r), np.isfinite(c)
    same_special = (np.isnan(r) & np.isnan(c)) | (np.isinf(r) & (r == c))
    bad = int(np.count_nonzero((fr & ~fc) | (~fr & ~same_special)))
    both = fr & fc
    rv, cv = r[both], c[both]
    d = np.abs(cv - rv)
    ref_max = float(np.abs(rv).max(initial=0.0))
    if bad:
        return TensorError(math.inf, math.inf, math.inf, ref_max, bad, r.size)
    max_abs = float(d.max(initial=0.0))
    # plain reductions, not np.linalg.norm: its BLAS dot spins threads that fight the engine's for the cores
    norm_r, norm_d = math.sqrt(float(np.square(rv).sum())), math.sqrt(float(np.square(d).sum()))
    error = norm_d / norm_r if norm_r > 0 else norm_d / math.sqrt(max(d.size, 1))
    max_rel = max_abs / ref_max if ref_max > 0 else max_abs
    return TensorError(error, max_abs, max_rel, ref_max, 0, r.size)


@dataclass(frozen=True)
class NodeError:
    """One reference node in the profile.

    `error_in` and `error_out` are accumulated: the largest error among its compared inputs (graph inputs count as
    exact; weights are not counted, their rounding is the node's own) and among its outputs, in the whole candidate
    run, on the input case where its outputs fare worst (`case`). `alone` is the node's own error: its candidate
    counterpart run by itself on the reference's values of its inputs, worst case; None where it was not measured (the
    node's accumulated error is within tolerance; `criterion="total"`; or it could not be cut out alone).
    """

    name: str
    op_type: str
    index: int  # position in the reference graph's topological order
    outputs: tuple[str, ...]  # its outputs that were compared
    error_in: float
    error_out: float
    max_abs: float  # largest absolute difference on its outputs
    ref_max: float  # largest finite magnitude of its outputs in the reference
    nonfinite: int  # inf/NaN values on its outputs where the reference is finite
    case: int  # index of the input case these figures are from
    quantized_in: float | None = None  # INT8: largest error of its inputs as quantized (QuantizeLinear/DequantizeLinear)
    alone: float | None = None
    alone_nonfinite: int = 0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"node": self.name, "op": self.op_type, "index": self.index, "error_in": _num(self.error_in),
                               "error_out": _num(self.error_out), "max_abs": _num(self.max_abs),
                               "ref_max": _num(self.ref_max), "nonfinite": self.nonfinite, "case": self.case}
        if self.alone is not None:
            out["alone"] = _num(self.alone)
            out["alone_nonfinite"] = self.alone_nonfinite
        if self.quantized_in is not None:
            out["quantized_in"] = _num(self.quantized_in)
        return out


@dataclass
class Divergence:
    """Where (and whether) the candidate departs from the reference, and what would fix it.

    `node` is the first diverging node, None when none crosses the tolerance. `profile` holds every compared node in
    the reference's topological order. `keep_float` lists the nodes the fix would keep in float (the FP16 block list,
    or the nodes to exclude from INT8 quantization); empty when the fix is not a float fallback.
    """

    reference: str  # e.g. "onnx-fp32.onnx on onnxruntime"
    candidate: str
    kind: str  # one of KINDS
    tolerance: float
    criterion: str
    node: NodeError | None
    fix: str
    profile: list[NodeError]
    outputs: dict[str, TensorError]  # the model outputs, worst case
    nonfinite: list[str] = field(default_factory=list)  # nodes whose outputs hold inf/NaN, in topological order
    keep_float: list[str] = field(default_factory=list)
    not_isolated: list[str] = field(default_factory=list)  # nodes beyond tolerance that could not be run alone
    compared: int = 0  # tensors compared
    unmatched: int = 0  # float tensors of the reference with no counterpart in the candidate
    cases: int = 1

    @property
    def found(self) -> bool:
        return self.node is not None

    @property
    def severity(self) -> str:
        """For a doctor finding: a diverging node is serious; inf/NaN or outputs beyond tolerance without one, a warning."""
        if self.found:
            return "serious"
        if self.nonfinite or self.output_error > self.tolerance:
            return "warning"
        return "ok"

    @property
    def output_error(self) -> float:
        """The largest accumulated error on the model's outputs."""
        return max((t.error for t in self.outputs.values()), default=0.0)

    def message(self) -> str:
        """One line for a user: where the candidate departs, by how much, and whether it overflows."""
        n = self.node
        if n is not None:
            if self.criterion == "alone" and n.alone is not None:
                line = (f"{self.candidate} departs from {self.reference} first at {n.name} ({n.op_type}): run alone on the "
                        f"reference's inputs it is off by {fmt_error(n.alone)} (relative RMS, tolerance {self.tolerance:g}); in "
                        f"the whole model its inputs carry {fmt_error(n.error_in)} and its outputs {fmt_error(n.error_out)}")
            else:
                line = (f"{self.candidate} departs from {self.reference} first at {n.name} ({n.op_type}): error "
                        f"{fmt_error(n.error_in)} on its inputs, {fmt_error(n.error_out)} on its outputs (relative RMS, tolerance "
                        f"{self.tolerance:g})")
            bad = max(n.nonfinite, n.alone_nonfinite)
            if bad:
                line += f"; {bad} of its output values are inf or NaN"
                if self.kind == "fp16":
                    line += (f" (float16 overflow: the reference reaches {fmt_error(n.ref_max)})" if n.ref_max > FP16_MAX
                             else " (float16 overflow inside the node)")
            if n.quantized_in is not None and n.quantized_in > n.error_in:
                line += f"; its inputs carry {fmt_error(n.quantized_in)} once quantized"
            return line
        line = f"no node of {self.candidate} departs from {self.reference} by more than {self.tolerance:g}"
        measured = [m for m in self.profile if m.alone is not None]
        if self.criterion == "alone" and measured:
            worst = max(measured, key=lambda m: m.alone or 0.0)
            line += f" on its own (relative RMS; the most is {fmt_error(worst.alone or 0.0)} at {worst.name} ({worst.op_type}))"
        else:
            worst = max(self.profile, key=lambda m: m.error_out)
            line += f" (relative RMS; the largest error is {fmt_error(worst.error_out)} at {worst.name} ({worst.op_type}))"
        if self.nonfinite:
            line += f"; yet {self.nonfinite[0]} produces inf or NaN"
        elif self.output_error > self.tolerance:
            line += f"; the error accumulates to {fmt_error(self.output_error)} at the outputs: no single node is the cause"
        return line

    def to_dict(self, *, profile: bool = True) -> dict[str, Any]:
        """JSON-ready (inf and NaN as strings); `profile=False` leaves out the per-node profile."""
        out: dict[str, Any] = {
            "found": self.found, "reference": self.reference, "candidate": self.candidate, "kind": self.kind,
            "tolerance": self.tolerance, "criterion": self.criterion, "error": "relative RMS",
            "node": None if self.node is None else self.node.to_dict(), "message": self.message(), "fix": self.fix,
            "keep_float": list(self.keep_float), "nonfinite": list(self.nonfinite), "not_isolated": list(self.not_isolated),
            "outputs": {k: v.to_dict() for k, v in self.outputs.items()}, "output_error": _num(self.output_error),
            "compared": self.compared, "unmatched": self.unmatched, "cases": self.cases,
        }
        if profile:
            out["profile"] = [n.to_dict() for n in self.profile]
        return out

    def to_text(self, around: int = 3) -> str:
        """The verdict, the fix and a table of the profile around the diverging node (or of the largest errors)."""
        if self.node is not None:
            i = next(k for k, n in enumerate(self.profile) if n.name == self.node.name)
            rows = self.profile[max(0, i - around): i + around + 1]
        else:
            top = sorted(self.profile, key=lambda n: (n.alone if n.alone is not None else -1.0, n.error_out), reverse=True)
            rows = sorted(top[: 2 * around + 1], key=lambda n: n.index)
        width = max((len(n.name) for n in rows), default=4)
        lines = [self.message(), f"fix: {self.fix or '-'}", "",
                 f"  {'#':>4}  {'node':<{width}}  {'op':<10} {'in':>9} {'out':>9} {'alone':>9} {'max|d|':>9} {'inf/nan':>7}"]
        for n in rows:
            mark = "*" if self.node is not None and n.name == self.node.name else " "
            alone = "-" if n.alone is None else fmt_error(n.alone)
            lines.append(f"{mark} {n.index:>4}  {n.name:<{width}}  {n.op_type:<10} {fmt_error(n.error_in):>9} "
                         f"{fmt_error(n.error_out):>9} {alone:>9} {fmt_error(n.max_abs):>9} {n.nonfinite:>7}")
        return "\n".join(lines)
