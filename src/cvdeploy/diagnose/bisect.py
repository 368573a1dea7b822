"""Layer bisection: the first node where a converted model (FP16, INT8) or another engine departs from its reference.

A variant that fails golden parity says *that* it is wrong, not *where*. Here every intermediate tensor of both models
is marked as a graph output (on temporary copies), both are run on the same inputs and tensors are matched by name,
Polygraphy style; the nodes whose outputs are beyond tolerance are then run alone on the reference's values of their
inputs, and the reference graph is walked in topological order to the first node whose own error crosses the
tolerance. The answer names the node, its op, the error on its inputs and on its outputs, the inf/NaN it produces, and
the fallback that would fix it: keep it in float32 (FP16 block list), keep it out of INT8 quantization, or use the
other engine.

    first_divergence(reference_onnx, candidate_onnx, inputs)     two ONNX files (fp32 against fp16, int8 or an edit)
    first_divergence(onnx, onnx, inputs, candidate_engine="openvino")   one file, two engines
    bisect_variant(bundle, "onnx-fp16")                           a bundle variant against onnx-fp32 on the golden inputs
    inject_fp16_overflow(fp32_in, fp32_out)                       a seeded fault: fp32 unchanged, fp16 overflows

The error of a tensor is its relative RMS error ||candidate - reference|| / ||reference|| (the inverse square root of
the signal-to-quantization-noise ratio the INT8 repair ranks tensors by); a value that is inf or NaN in the candidate
where the reference is finite makes it infinite. See docs/layer-bisection.md for the tolerance semantics.
"""

from __future__ import annotations

import heapq
import math
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from cvdeploy.errors import BundleError, CvdeployError, InputError, MissingDependencyError, ModelFormatError

if TYPE_CHECKING:
    from cvdeploy.bundle.bundle import Bundle

__all__ = [
    "CRITERIA",
    "FP16_MAX",
    "KINDS",
    "Divergence",
    "InjectedFault",
    "NodeError",
    "TensorError",
    "bisect_variant",
    "first_divergence",
    "inject_fp16_overflow",
]

FP16_MAX = 65504.0  # the largest finite float16: a value beyond it becomes inf
KINDS = ("fp16", "int8", "engine", "graph")  # what differs between reference and candidate; decides the suggested fix
CRITERIA = ("alone", "total")
Criterion = Literal["alone", "total"]
Inputs = np.ndarray | Mapping[str, np.ndarray] | Sequence[np.ndarray | Mapping[str, np.ndarray]]

_FLOAT_TYPES = {1: "float32", 10: "float16", 11: "float64", 16: "bfloat16"}  # onnx.TensorProto elem types
_NP_ELEM = {1: np.float32, 10: np.float16, 11: np.float64}
_QDQ = ("QuantizeLinear", "DequantizeLinear")
_PRECISIONS = ("fp32", "fp16", "bf16", "int8")  # a variant's precision: what OpenVINO is pinned to
_FAULT = "/cvdeploy_fault"


def _onnx() -> Any:
    try:
        import onnx
    except ImportError as e:
        raise MissingDependencyError("onnx", "build", "layer bisection") from e
    return onnx


def _num(x: float) -> float | str:
    """A float for JSON: rounded, and inf/NaN as strings (strict JSON has neither)."""
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return float(f"{x:.6g}")


def _fmt(x: float) -> str:
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
                        f"reference's inputs it is off by {_fmt(n.alone)} (relative RMS, tolerance {self.tolerance:g}); in "
                        f"the whole model its inputs carry {_fmt(n.error_in)} and its outputs {_fmt(n.error_out)}")
            else:
                line = (f"{self.candidate} departs from {self.reference} first at {n.name} ({n.op_type}): error "
                        f"{_fmt(n.error_in)} on its inputs, {_fmt(n.error_out)} on its outputs (relative RMS, tolerance "
                        f"{self.tolerance:g})")
            bad = max(n.nonfinite, n.alone_nonfinite)
            if bad:
                line += f"; {bad} of its output values are inf or NaN"
                if self.kind == "fp16":
                    line += (f" (float16 overflow: the reference reaches {_fmt(n.ref_max)})" if n.ref_max > FP16_MAX
                             else " (float16 overflow inside the node)")
            if n.quantized_in is not None and n.quantized_in > n.error_in:
                line += f"; its inputs carry {_fmt(n.quantized_in)} once quantized"
            return line
        line = f"no node of {self.candidate} departs from {self.reference} by more than {self.tolerance:g}"
        measured = [m for m in self.profile if m.alone is not None]
        if self.criterion == "alone" and measured:
            worst = max(measured, key=lambda m: m.alone or 0.0)
            line += f" on its own (relative RMS; the most is {_fmt(worst.alone or 0.0)} at {worst.name} ({worst.op_type}))"
        else:
            worst = max(self.profile, key=lambda m: m.error_out)
            line += f" (relative RMS; the largest error is {_fmt(worst.error_out)} at {worst.name} ({worst.op_type}))"
        if self.nonfinite:
            line += f"; yet {self.nonfinite[0]} produces inf or NaN"
        elif self.output_error > self.tolerance:
            line += f"; the error accumulates to {_fmt(self.output_error)} at the outputs: no single node is the cause"
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
            alone = "-" if n.alone is None else _fmt(n.alone)
            lines.append(f"{mark} {n.index:>4}  {n.name:<{width}}  {n.op_type:<10} {_fmt(n.error_in):>9} "
                         f"{_fmt(n.error_out):>9} {alone:>9} {_fmt(n.max_abs):>9} {n.nonfinite:>7}")
        return "\n".join(lines)


# -- graphs ----------------------------------------------------------------------------------------


@dataclass
class _Graph:
    """An ONNX model read for bisection: its nodes in topological order and the element type of every tensor."""

    path: Path
    model: Any
    order: list[Any]  # NodeProto, topologically sorted
    types: dict[str, int]  # tensor name -> onnx elem type, where known
    shapes: dict[str, tuple[int | None, ...]]  # tensor name -> shape (None: a dimension not fixed), where known
    producer: dict[str, Any]
    consumers: dict[str, list[Any]]
    inputs: dict[str, tuple[tuple[int | None, ...], int]]  # graph input -> (shape, elem type)
    outputs: list[str]

    def float_tensors(self) -> list[str]:
        """Float tensors produced by nodes, in topological order."""
        return [o for n in self.order for o in n.output if o and self.types.get(o) in _FLOAT_TYPES]

    def has(self, op_types: Sequence[str]) -> bool:
        return any(n.op_type in op_types for n in self.order)

    def holds_float16(self) -> bool:
        return any(t == 10 for t in self.types.values()) or any(i.data_type == 10 for i in self.model.graph.initializer)


def _load(path: str | os.PathLike[str]) -> _Graph:
    onnx = _onnx()
    p = Path(path)
    if not p.is_file():
        raise InputError(f"model file not found: {p}")
    try:
        model = onnx.load(str(p))
    except Exception as e:  # protobuf's DecodeError, a missing external-data file, ...
        raise ModelFormatError(f"cannot read {p} as an ONNX model: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    if not model.graph.node:
        raise ModelFormatError(f"{p} holds no ONNX graph (no nodes): is it an ONNX model?")
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # a graph shape inference cannot follow: keep the types the file declares
        inferred = model
    g = inferred.graph
    initializers = {i.name for i in g.initializer}
    types: dict[str, int] = {i.name: i.data_type for i in g.initializer}
    shapes: dict[str, tuple[int | None, ...]] = {}
    for vi in [*g.input, *g.value_info, *g.output]:
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
            if vi.type.tensor_type.HasField("shape"):
                shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None
                                        for d in vi.type.tensor_type.shape.dim)
    producer = {o: n for n in g.node for o in n.output if o}
    consumers: dict[str, list[Any]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    inputs = {}
    for vi in g.input:
        if vi.name in initializers:
            continue
        shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim)
        inputs[vi.name] = (shape, vi.type.tensor_type.elem_type)
    return _Graph(p, model, _toposort(list(g.node), set(inputs) | initializers), types, shapes, producer, consumers, inputs,
                  [o.name for o in g.output])


def _node_id(node: Any) -> str:
    """A node's name, or its first output's where the graph leaves nodes unnamed."""
    return str(node.name or node.output[0])


def _toposort(nodes: list[Any], available: set[str]) -> list[Any]:
    """Kahn's order, ties broken by position in the file (ONNX requires sorted graphs; converters do not always comply)."""
    producer = {o: k for k, n in enumerate(nodes) for o in n.output if o}
    waiting = [0] * len(nodes)
    after: dict[int, list[int]] = {}
    for k, n in enumerate(nodes):
        deps = {producer[i] for i in n.input if i in producer and i not in available}
        waiting[k] = len(deps)
        for d in deps:
            after.setdefault(d, []).append(k)
    ready = [k for k, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        k = heapq.heappop(ready)
        order.append(nodes[k])
        for j in after.get(k, ()):
            waiting[j] -= 1
            if waiting[j] == 0:
                heapq.heappush(ready, j)
    if len(order) != len(nodes):
        raise ModelFormatError("the ONNX graph has a cycle: it cannot be put in topological order")
    return order


def _stands_for(cand: _Graph, tensor: str) -> tuple[str, str] | None:
    """The tensor a candidate-only tensor stands for, with how: a Cast of X, or X quantized (Q -> DQ) -> (X, kind)."""
    node = cand.producer.get(tensor)
    if node is None:
        return None
    if node.op_type == "Cast":
        return node.input[0], "cast"
    if node.op_type == "DequantizeLinear":
        q = cand.producer.get(node.input[0])
        if q is not None and q.op_type == "QuantizeLinear":
            return q.input[0], "quantized"
    return None


def _match(ref: _Graph, cand: _Graph) -> tuple[dict[str, str], dict[str, str]]:
    """Reference float tensor -> the candidate tensor to compare it with; and reference tensor -> its quantized view.

    The same name comes first. A reference tensor the candidate renamed is found through a Cast or a
    QuantizeLinear -> DequantizeLinear pair standing for it (the FP16 converter's casts, QDQ graphs).
    """
    ref_float = set(ref.float_tensors())
    match = {t: t for t in ref_float if cand.types.get(t) in _FLOAT_TYPES}
    quantized: dict[str, str] = {}
    for t in cand.float_tensors():
        seen: set[str] = set()
        src, via = t, None
        while src not in ref_float and src not in seen:  # follow Cast and Q->DQ chains back to a reference tensor
            seen.add(src)
            step = _stands_for(cand, src)
            if step is None:
                break
            src, how = step
            via = "quantized" if how == "quantized" or via == "quantized" else "cast"
        if src in ref_float and src != t:
            if via == "quantized":
                quantized.setdefault(src, t)
            match.setdefault(src, t)
    return match, quantized


# -- running ----------------------------------------------------------------------------------------


def _marked_copy(graph: _Graph, names: Sequence[str], dst: Path) -> list[str]:
    """Write a copy of the model with `names` added as graph outputs (element type only: shapes are left free); return
    its outputs in order."""
    onnx = _onnx()
    model = onnx.ModelProto()
    model.CopyFrom(graph.model)
    present = [o.name for o in model.graph.output]
    for name in names:
        if name not in present:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, graph.types[name], None))
            present.append(name)
    onnx.save(model, str(dst))
    return present


class _Runner:
    """A model opened with one engine, fed and read by the names it was written with.

    OpenVINO may report a port under another name it merged into it (an input under the name of the FP16 converter's
    input Cast): where the engine's names differ from those written, ports are matched by position (both keep the
    model's order).
    """

    def __init__(self, path: Path, engine: str, precision: str, providers: tuple[str, ...] | None,
                 inputs: Sequence[str], outputs: Sequence[str]) -> None:
        from cvdeploy.errors import EngineError
        from cvdeploy.runtime import open_engine
        from cvdeploy.runtime.onnxruntime import OrtOptions

        options = OrtOptions(providers=providers) if engine == "onnxruntime" else None
        self.engine = open_engine(path, engine, options, precision=precision)
        ins, outs = [i.name for i in self.engine.inputs], [o.name for o in self.engine.outputs]
        if len(ins) != len(inputs) or len(outs) != len(outputs):
            self.engine.close()
            raise EngineError(f"{engine} reports {len(ins)} inputs and {len(outs)} outputs for {path.name}, not "
                              f"{len(inputs)} and {len(outputs)}")
        self._in = dict(zip(inputs, ins, strict=True)) if set(ins) != set(inputs) else {n: n for n in inputs}
        self._out = dict(zip(outs, outputs, strict=True)) if set(outs) != set(outputs) else {n: n for n in outputs}

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        got = self.engine.run({self._in[n]: a for n, a in feeds.items()})
        return {self._out[k]: v for k, v in got.items()}

    def close(self) -> None:
        self.engine.close()


def _cases(inputs: Inputs, graphs: Sequence[_Graph]) -> list[dict[str, np.ndarray]]:
    """Normalize `inputs` to a list of feeds (one per case) and check each against every graph's inputs."""
    if isinstance(inputs, np.ndarray | Mapping):
        raw: list[Any] = [inputs]
    else:
        raw = list(inputs)
    if not raw:
        raise InputError("layer bisection needs at least one input (e.g. the bundle's golden inputs)")
    names = list(graphs[0].inputs)
    cases = []
    for k, case in enumerate(raw):
        if isinstance(case, np.ndarray):
            if len(names) != 1:
                raise InputError(f"the model has {len(names)} inputs ({', '.join(names)}): give each case as a dict")
            case = {names[0]: case}
        elif not isinstance(case, Mapping):
            raise InputError(f"input case {k}: expected an array or a dict of arrays, got {type(case).__name__}")
        feeds = {str(n): np.asarray(a) for n, a in case.items()}
        for g in graphs:
            if set(feeds) != set(g.inputs):
                raise InputError(f"input case {k}: {g.path.name} takes inputs {sorted(g.inputs)}, got {sorted(feeds)}")
            for n, a in feeds.items():
                shape, _ = g.inputs[n]
                if a.ndim != len(shape) or any(d is not None and d != s for d, s in zip(shape, a.shape, strict=True)):
                    want = ", ".join("?" if d is None else str(d) for d in shape)
                    raise InputError(f"input case {k}: {n!r} has shape {list(a.shape)}; {g.path.name} takes [{want}]")
                if not np.issubdtype(a.dtype, np.number):
                    raise InputError(f"input case {k}: {n!r} holds {a.dtype}, not numbers")
        cases.append(feeds)
    return cases


def _typed(feeds: dict[str, np.ndarray], graph: _Graph) -> dict[str, np.ndarray]:
    """Each model gets the inputs in its own declared type (an FP16 graph without kept I/O types takes float16)."""
    out = {}
    for n, a in feeds.items():
        dtype = _NP_ELEM.get(graph.inputs[n][1])
        out[n] = np.ascontiguousarray(a.astype(dtype, copy=False) if dtype is not None else a)
    return out


def _chunks(names: list[str], size: int | None) -> Iterator[list[str]]:
    if not size or size >= len(names):
        yield names
        return
    for k in range(0, len(names), size):
        yield names[k: k + size]


# -- the bisection ------------------------------------------------------------------------------------


def _kind(ref: _Graph, cand: _Graph, reference_engine: str, candidate_engine: str, candidate_precision: str) -> str:
    if cand.has(_QDQ) and not ref.has(_QDQ):
        return "int8"
    if cand.holds_float16() and not ref.holds_float16():
        return "fp16"
    if candidate_engine != reference_engine or candidate_precision != "fp32":
        return "engine"
    return "graph"


def _default_tolerance(kind: str, candidate_precision: str) -> float:
    from cvdeploy.evaluate.parity import SCORE_TOLERANCE

    if kind in ("fp16", "int8"):
        return SCORE_TOLERANCE[kind]
    return SCORE_TOLERANCE.get(candidate_precision, SCORE_TOLERANCE["fp32"])


def _label(path: Path, engine: str, precision: str) -> str:
    if engine == "openvino":
        from cvdeploy.runtime.openvino import VARIANT_PRECISION

        return f"{path.name} on openvino ({VARIANT_PRECISION.get(precision, precision)})"
    return f"{path.name} on {engine}"


def first_divergence(
    reference: str | os.PathLike[str],
    candidate: str | os.PathLike[str],
    inputs: Inputs,
    *,
    tolerance: float | None = None,
    criterion: Criterion = "alone",
    reference_engine: str = "onnxruntime",
    candidate_engine: str = "onnxruntime",
    candidate_precision: str = "fp32",
    providers: tuple[str, ...] | None = ("CPUExecutionProvider",),
    chunk: int | None = None,
) -> Divergence:
    """The first node (in the reference's topological order) where `candidate` departs from `reference` on `inputs`.

    `reference` and `candidate` are ONNX files; the candidate is a conversion of the reference (FP16, QDQ INT8), an
    edit of it, or the same file run by another engine (`candidate_engine="openvino"`, at `candidate_precision`: the
    variant precision OpenVINO is pinned to). `inputs`: one array (a single-input model), a dict of arrays, or a list
    of either (e.g. a bundle's golden inputs); a node's figures are from the case where it fares worst.

    Error: relative RMS error per tensor, infinite where the candidate holds inf/NaN and the reference does not.
    Step 1 marks every float tensor of both models as an output, runs both and measures each tensor's accumulated
    error. Step 2 (`criterion="alone"`, the default) runs each node whose outputs are beyond `tolerance` alone (its
    candidate counterpart: the node with its casts or QuantizeLinear/DequantizeLinear pairs) on the reference's values
    of its inputs: the first, in topological order, whose own error passes `tolerance` diverges (a node that cannot be
    cut out alone is judged as by "total"). Its inputs are then
    exact by construction, and what it adds is what keeping it in float would take away; a node that only amplifies
    the error it is given (a Conv after a lossy layer) is not blamed. `criterion="total"` stops at step 1: the first
    node whose outputs' error passes `tolerance` while all its inputs were within it (accumulated error grows with
    depth: on YOLO11n a clean FP16 conversion reaches 1.1e-2 at the attention MatMul by accumulation alone).
    `tolerance=None`: the project's golden-parity tolerance for the candidate's precision
    (`evaluate.parity.SCORE_TOLERANCE`: 1e-2 for FP16, 0.25 for INT8, 1e-3 for fp32 on another engine).

    Marking a tensor as a graph output pins it: an engine can no longer fuse it away (ONNX Runtime's Conv+activation or
    QDQ -> integer-kernel fusions, OpenVINO's CPU fusions) and must materialize it in its declared type (an FP16 graph
    on a CPU, which ONNX Runtime otherwise computes largely in float32, then rounds every tensor to float16 as a GPU
    would). Both models are therefore marked the same way (the same tensors) and compared like for like; the figures
    can differ a little from an unmarked run, and an INT8 graph runs as simulated quantization. `chunk` bounds the
    tensors marked per run (memory: all of them are held at once otherwise); each chunk opens both models again.
    """
    from cvdeploy.runtime import ENGINES

    for e in (reference_engine, candidate_engine):
        if e not in ENGINES:
            raise InputError(f"unknown engine {e!r}; known: {', '.join(ENGINES)}")
    if criterion not in CRITERIA:
        raise InputError(f"criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
    if tolerance is not None and not (tolerance > 0 and math.isfinite(tolerance)):
        raise InputError(f"tolerance must be a positive number, got {tolerance}")
    if chunk is not None and chunk < 1:
        raise InputError(f"chunk must be at least 1 tensor, got {chunk}")
    if candidate_precision not in _PRECISIONS:
        raise InputError(f"candidate_precision must be one of {', '.join(_PRECISIONS)}, got {candidate_precision!r}")
    ref, cand = _load(reference), _load(candidate)
    match, quantized = _match(ref, cand)
    if not match:
        raise InputError(f"{ref.path.name} and {cand.path.name} share no tensor names: layer bisection matches tensors by "
                         "name, so the candidate must be the reference converted, quantized or run by another engine")
    kind = _kind(ref, cand, reference_engine, candidate_engine, candidate_precision)
    tol = tolerance if tolerance is not None else _default_tolerance(kind, candidate_precision)
    cases = _cases(inputs, [ref, cand])
    setup = _Setup(ref, cand, match, cases, reference_engine, candidate_engine, candidate_precision, providers, chunk)

    with tempfile.TemporaryDirectory(prefix="cvdeploy-bisect-") as tmp:
        errors, qerrors = _accumulated(setup, quantized, Path(tmp))
        profile = _profile(ref, errors, qerrors, len(cases))
        not_isolated: list[str] = []
        if criterion == "alone":
            profile, not_isolated = _alone(setup, profile, tol, Path(tmp))
    first = next((n for n in profile if _crosses(n, tol, criterion, not_isolated)), None)
    keep, fix = _fix(first, kind, setup, errors)
    return Divergence(
        reference=_label(ref.path, reference_engine, "fp32"), candidate=_label(cand.path, candidate_engine, candidate_precision),
        kind=kind, tolerance=tol, criterion=criterion, node=first, fix=fix, profile=profile,
        outputs={o: max(errors[o], key=lambda t: t.error) for o in ref.outputs if o in errors},
        nonfinite=[n.name for n in profile if n.nonfinite], keep_float=keep, not_isolated=not_isolated,
        compared=len(errors), unmatched=len([t for t in ref.float_tensors() if t not in errors]), cases=len(cases),
    )


@dataclass
class _Setup:
    """What both steps share: the two graphs, the tensor matching, the input cases and how each side is run."""

    ref: _Graph
    cand: _Graph
    match: dict[str, str]
    cases: list[dict[str, np.ndarray]]
    reference_engine: str
    candidate_engine: str
    candidate_precision: str
    providers: tuple[str, ...] | None
    chunk: int | None


def _accumulated(s: _Setup, quantized: dict[str, str], tmp: Path) -> tuple[dict[str, list[TensorError]],
                                                                            dict[str, list[TensorError]]]:
    """Step 1: every matched float tensor marked on both sides; its error on each case (and its quantized view's)."""
    ref, cand, match = s.ref, s.cand, s.match
    ordered = [t for t in ref.float_tensors() if t in match]
    errors: dict[str, list[TensorError]] = {}
    qerrors: dict[str, list[TensorError]] = {}
    for k, names in enumerate(_chunks(ordered, s.chunk)):
        ref_names = list(names)  # the model's outputs are among them (in one chunk: each tensor is compared once)
        views = {match[t]: t for t in ref_names}
        qviews = {quantized[t]: t for t in ref_names if t in quantized and quantized[t] not in views}
        rp, cp = tmp / f"reference-{k}.onnx", tmp / f"candidate-{k}.onnx"
        r_outputs = _marked_copy(ref, ref_names, rp)
        c_outputs = _marked_copy(cand, [*views, *qviews], cp)
        r_run = _Runner(rp, s.reference_engine, "fp32", s.providers, list(ref.inputs), r_outputs)
        try:
            c_run = _Runner(cp, s.candidate_engine, s.candidate_precision, s.providers, list(cand.inputs), c_outputs)
        except BaseException:
            r_run.close()
            raise
        try:
            for feeds in s.cases:
                r_out = r_run.run(_typed(feeds, ref))
                c_out = c_run.run(_typed(feeds, cand))
                for store, view in ((errors, views), (qerrors, qviews)):
                    for cname, rname in view.items():
                        if rname not in r_out or cname not in c_out or r_out[rname].shape != c_out[cname].shape:
                            continue  # not produced under that name, or reshaped: not comparable
                        store.setdefault(rname, []).append(tensor_error(r_out[rname], c_out[cname]))
        finally:
            r_run.close()
            c_run.close()
    # a tensor missed on some case would misalign the per-case lists: keep only those compared on every case
    errors = {t: v for t, v in errors.items() if len(v) == len(s.cases)}
    qerrors = {t: v for t, v in qerrors.items() if len(v) == len(s.cases)}
    if not errors:
        raise InputError(f"no tensor of {ref.path.name} could be compared with {cand.path.name} (the names match, the "
                         "shapes or the engine's outputs do not)")
    return errors, qerrors


def _profile(ref: _Graph, errors: dict[str, list[TensorError]], qerrors: dict[str, list[TensorError]],
             ncases: int) -> list[NodeError]:
    """One NodeError per reference node with a compared output, in topological order, from its worst case."""
    out = []
    for index, node in enumerate(ref.order):
        outs = [o for o in node.output if o in errors]
        if not outs:
            continue
        ins = [i for i in node.input if i in errors]
        e_in = [max((errors[i][c].error for i in ins), default=0.0) for c in range(ncases)]  # graph inputs: exact
        e_out = [max(errors[o][c].error for o in outs) for c in range(ncases)]
        # the worst case for its outputs; among ties (inf everywhere), the one where it was given the most error
        worst = max(range(ncases), key=lambda c: (e_out[c], e_in[c]))
        q = [qerrors[i][worst].error for i in node.input if i in qerrors]
        out.append(NodeError(
            _node_id(node), node.op_type, index, tuple(outs), e_in[worst], e_out[worst],
            max(errors[o][worst].max_abs for o in outs), max(e.ref_max for o in outs for e in errors[o]),
            max(sum(errors[o][c].nonfinite for o in outs) for c in range(ncases)), worst, max(q) if q else None))
    return out


def _crosses(n: NodeError, tol: float, criterion: str, not_isolated: Sequence[str]) -> bool:
    total = n.error_out > tol and n.error_in <= tol
    if criterion == "total":
        return total
    if n.alone is not None:
        return n.alone > tol
    return n.name in not_isolated and total  # could not be run alone: judged as by "total"


# -- step 2: nodes run alone --------------------------------------------------------------------------------

_MAX_PIECE = 64  # candidate nodes standing for one reference node (its casts, Q/DQ pairs, weight DQs): more is not local


@dataclass
class _Piece:
    """One reference node's candidate counterpart: the candidate nodes between the tensors it reads and writes."""

    node: str
    nodes: list[Any]  # candidate NodeProtos, in the candidate's order
    feeds: dict[str, str]  # candidate tensor read from outside -> the reference tensor whose values it is fed
    outputs: dict[str, str]  # candidate tensor written -> the reference tensor it is compared with
    initializers: set[str]


def _piece(s: _Setup, node: Any, outputs: Sequence[str]) -> _Piece | None:
    """None where the counterpart is not a small self-contained piece (a renamed input, a subgraph, an unknown type)."""
    onnx = _onnx()
    cand = s.cand
    ref_init = {i.name for i in s.ref.model.graph.initializer}
    stop = {s.match.get(i, i): i for i in node.input if i and i not in ref_init}
    outs = {s.match[o]: o for o in outputs}
    init = {t.name for t in cand.model.graph.initializer}
    picked: dict[int, Any] = {}
    feeds: set[str] = set()
    used_init: set[str] = set()
    seen: set[str] = set()
    todo = list(outs)
    while todo:
        t = todo.pop()
        if t in seen:
            continue
        seen.add(t)
        if t in stop:
            feeds.add(t)
            continue
        if t in init:
            used_init.add(t)
            continue
        p = cand.producer.get(t)
        if p is None or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in p.attribute):
            return None
        picked[id(p)] = p
        if len(picked) > _MAX_PIECE:
            return None
        todo.extend(x for x in p.input if x)
    if any(cand.types.get(t) is None for t in [*feeds, *outs]) or any(s.ref.types.get(stop[t]) is None for t in feeds):
        return None
    position = {id(n): k for k, n in enumerate(cand.order)}
    nodes = sorted(picked.values(), key=lambda n: position[id(n)])
    return _Piece(_node_id(node), nodes, {t: stop[t] for t in sorted(feeds)}, outs, used_init)


def _assemble(s: _Setup, pieces: Sequence[_Piece], dst: Path) -> tuple[dict[str, tuple[str, int]], dict[str, tuple[int, str]]]:
    """Write every piece, renamed apart, into one model (one session, one run per case instead of one per node).

    Returns its inputs (name -> (reference tensor, element type)) and outputs (name -> (piece index, reference tensor)).
    """
    onnx = _onnx()
    from onnx import helper

    cand = s.cand
    inputs: dict[tuple[str, int], str] = {}
    outputs: dict[str, tuple[int, str]] = {}
    nodes, used_init = [], set()
    for k, piece in enumerate(pieces):
        inner = {o for n in piece.nodes for o in n.output if o}
        rename = {t: f"p{k}/{t}" for t in inner}
        for t, r in piece.feeds.items():
            rename[t] = inputs.setdefault((r, cand.types[t]), f"in{len(inputs)}")
        for n in piece.nodes:
            copy = onnx.NodeProto()
            copy.CopyFrom(n)
            copy.name = f"p{k}/{n.name}"
            copy.input[:] = [rename.get(i, i) for i in n.input]
            copy.output[:] = [rename.get(o, o) for o in n.output]
            nodes.append(copy)
        for t, r in piece.outputs.items():
            outputs[rename[t]] = (k, r)
        used_init |= piece.initializers
    # fixed dimensions are kept: a shape tensor of unknown length gives OpenVINO's CPU plugin a Reshape of dynamic rank,
    # which it refuses
    shape = {r: s.ref.shapes.get(r) for r, _ in inputs}
    graph = helper.make_graph(
        nodes, "cvdeploy-bisect-pieces",
        [helper.make_tensor_value_info(name, elem, None if shape[r] is None else list(shape[r]))
         for (r, elem), name in inputs.items()],
        [helper.make_tensor_value_info(f"p{k}/{t}", cand.types[t], None) for k, piece in enumerate(pieces) for t in piece.outputs],
        [t for t in cand.model.graph.initializer if t.name in used_init])
    model = helper.make_model(graph, opset_imports=list(cand.model.opset_import), ir_version=cand.model.ir_version)
    onnx.save(model, str(dst))
    return {name: key for key, name in inputs.items()}, outputs


def _alone(s: _Setup, profile: list[NodeError], tol: float, tmp: Path) -> tuple[list[NodeError], list[str]]:
    """Step 2: every node whose outputs are beyond tolerance, run alone (its candidate piece) on the reference's values
    of its inputs, `chunk` nodes at a time (all at once by default)."""
    from dataclasses import replace

    by_name = {_node_id(n): n for n in s.ref.order}
    screened = [n for n in profile if n.error_out > tol]
    pieces, not_isolated = [], []
    for n in screened:
        piece = _piece(s, by_name[n.name], n.outputs)
        if piece is None:
            not_isolated.append(n.name)
        else:
            pieces.append(piece)
    measured: dict[str, tuple[float, int]] = {}
    size = s.chunk or len(pieces) or 1
    for k in range(0, len(pieces), size):
        _run_split(s, pieces[k: k + size], tmp, f"{k}", measured, not_isolated)
    for p in pieces:
        if p.node not in measured and p.node not in not_isolated:
            not_isolated.append(p.node)
    order = {n.name: k for k, n in enumerate(profile)}
    not_isolated.sort(key=order.__getitem__)
    out = [replace(n, alone=measured[n.name][0], alone_nonfinite=measured[n.name][1]) if n.name in measured else n
           for n in profile]
    return out, not_isolated


def _run_split(s: _Setup, pieces: Sequence[_Piece], tmp: Path, tag: str, measured: dict[str, tuple[float, int]],
               not_isolated: list[str]) -> None:
    """Run the pieces together; where the engine refuses one (and with it the whole model), halve until it is found."""
    try:
        _run_pieces(s, pieces, tmp, tag, measured)
    except CvdeployError:
        if len(pieces) == 1:
            not_isolated.append(pieces[0].node)
            return
        half = len(pieces) // 2
        _run_split(s, pieces[:half], tmp, f"{tag}a", measured, not_isolated)
        _run_split(s, pieces[half:], tmp, f"{tag}b", measured, not_isolated)


def _run_pieces(s: _Setup, pieces: Sequence[_Piece], tmp: Path, tag: str, measured: dict[str, tuple[float, int]]) -> None:
    """Run the pieces on every case, fed the reference's values; record (worst error, inf/NaN count) per node."""
    inputs, outputs = _assemble(s, pieces, tmp / f"pieces-{tag}.onnx")
    needed = list(dict.fromkeys(r for r, _ in [*inputs.values(), *((r, 0) for _, r in outputs.values())]
                                if r not in s.ref.inputs))
    ref_outputs = _marked_copy(s.ref, needed, tmp / f"values-{tag}.onnx")
    r_run = _Runner(tmp / f"values-{tag}.onnx", s.reference_engine, "fp32", s.providers, list(s.ref.inputs), ref_outputs)
    try:
        p_run = _Runner(tmp / f"pieces-{tag}.onnx", s.candidate_engine, s.candidate_precision, s.providers,
                        list(inputs), list(outputs))
    except BaseException:
        r_run.close()
        raise
    found: dict[str, tuple[float, int]] = {}
    try:
        for feeds in s.cases:
            typed = _typed(feeds, s.ref)
            values = {**typed, **r_run.run(typed)}
            with np.errstate(over="ignore", invalid="ignore"):  # a reference value beyond float16 becomes inf: the point
                lone = {name: values[r].astype(_NP_ELEM[elem]) if elem in _NP_ELEM else values[r]
                        for name, (r, elem) in inputs.items()}
            got = p_run.run(lone)
            for name, (k, r) in outputs.items():
                if name in got and got[name].shape == values[r].shape:
                    e = tensor_error(values[r], got[name])
                    worst, bad = found.get(pieces[k].node, (0.0, 0))
                    found[pieces[k].node] = (max(worst, e.error), max(bad, e.nonfinite))
    finally:
        r_run.close()
        p_run.close()
    measured.update(found)


def _overflow_region(ref: _Graph, node_name: str, errors: dict[str, list[TensorError]]) -> list[str]:
    """The node and every node that carries its out-of-float16-range values on, until they are back in range."""
    start = next(n for n in ref.order if _node_id(n) == node_name)

    def beyond(t: str) -> bool:
        return t in errors and max(e.ref_max for e in errors[t]) > FP16_MAX

    region = {id(start): start}
    todo = [t for t in start.output if beyond(t)]
    while todo:
        t = todo.pop()
        for consumer in ref.consumers.get(t, []):
            if id(consumer) not in region:
                region[id(consumer)] = consumer
                todo.extend(o for o in consumer.output if beyond(o))
    position = {id(n): k for k, n in enumerate(ref.order)}
    return [_node_id(n) for n in sorted(region.values(), key=lambda n: position[id(n)])]


def _quantized_feeders(s: _Setup, name: str) -> list[str]:
    """The reference nodes whose outputs reach node `name` of the candidate through a QuantizeLinear -> DequantizeLinear pair."""
    node = next((n for n in s.cand.order if _node_id(n) == name), None)
    out: list[str] = []
    for i in [] if node is None else node.input:
        dq = s.cand.producer.get(i)
        q = s.cand.producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if q is not None and q.op_type == "QuantizeLinear" and q.input[0] in s.ref.producer:
            feeder = _node_id(s.ref.producer[q.input[0]])
            if feeder not in out:
                out.append(feeder)
    return out


def _fix(node: NodeError | None, kind: str, s: _Setup, errors: dict[str, list[TensorError]]) -> tuple[list[str], str]:
    """The fallback that would fix the divergence, as (nodes to keep in float, the advice in words)."""
    if node is None:
        return [], ""
    name, op = node.name, node.op_type
    if kind == "fp16":
        if node.ref_max > FP16_MAX:
            region = _overflow_region(s.ref, name, errors)
            rest = [n for n in region if n != name]
            carried = f" and the {len(rest)} node(s) its values pass through ({', '.join(rest)})" if rest else ""
            return region, (f"keep {name}{carried} in float32: the reference reaches {_fmt(node.ref_max)} there, beyond "
                            f"float16's {FP16_MAX:g}; add {'them' if rest else 'it'} to the FP16 node block list, with the "
                            "tensors between them kept in float32 too (a cast to float16 between two blocked nodes would "
                            "overflow again)")
        return [name], f"keep {name} in float32: add it to the FP16 node block list"
    if kind == "int8":
        feeders = _quantized_feeders(s, name)
        if feeders:
            return [name, *feeders], (f"exclude {name} from INT8 quantization, with {', '.join(feeders)} that writes its "
                                      "input (the quantizer would otherwise still quantize that input for its producer): "
                                      "quantize_int8(float_nodes=[...]), ONNX Runtime's nodes_to_exclude")
        return [name], f"exclude {name} from INT8 quantization: quantize_int8(float_nodes=[...]), ONNX Runtime's nodes_to_exclude"
    if kind == "engine" and s.candidate_precision in ("bf16", "fp16"):
        return [], (f"run it on {s.candidate_engine} at f32: {name} ({op}) loses too much at {s.candidate_precision}; or "
                    f"serve it with {s.reference_engine}")
    if kind == "engine":
        return [], (f"serve this model with {s.reference_engine}: {s.candidate_engine} computes {name} ({op}) differently "
                    "(worth reporting to the engine's maintainers)")
    return [], f"the two graphs compute {name} ({op}) differently: compare its weights and attributes in both files"


# -- bundles ------------------------------------------------------------------------------------------


def bisect_variant(
    bundle: str | os.PathLike[str] | Bundle,
    variant: str,
    *,
    reference: str | os.PathLike[str] = "onnx-fp32",
    tolerance: float | None = None,
    criterion: Criterion = "alone",
    providers: tuple[str, ...] | None = ("CPUExecutionProvider",),
) -> Divergence:
    """`first_divergence` of a bundle variant against `reference`, on the bundle's golden inputs.

    `reference`: a variant of the bundle (default onnx-fp32), or the path of an ONNX model (the doctor's --reference),
    run by ONNX Runtime. An ONNX variant is compared as it is, with its engine. An OpenVINO fp32 or bf16 variant is an
    IR converted from onnx-fp32: that ONNX is run by OpenVINO at the variant's precision instead (OpenVINO reads both
    through the same front end). openvino-int8 (an NNCF-quantized IR) has no ONNX graph to bisect. `tolerance=None`:
    the variant's golden-parity tolerance.
    """
    from cvdeploy.bundle.bundle import Bundle
    from cvdeploy.evaluate.parity import SCORE_TOLERANCE

    b = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
    variants = b.manifest.variants

    def onnx_variant(name: str, role: str) -> Path:
        if name not in variants:
            raise InputError(f"bundle {b.name!r} has no variant {name!r}; it has {', '.join(variants)}")
        if variants[name].encryption is not None:
            raise InputError(f"variant {name!r} is encrypted: bisect the unprotected bundle it was made from")
        if variants[name].format != "onnx":
            raise InputError(f"the {role} must be an ONNX file; variant {name!r} is {variants[name].format}")
        return b.variant_path(name)

    if variant not in variants:
        raise InputError(f"bundle {b.name!r} has no variant {variant!r}; it has {', '.join(variants)}")
    cand_v = variants[variant]
    if str(reference) in variants:
        ref_path, ref_engine = onnx_variant(str(reference), "reference"), variants[str(reference)].engine
    elif Path(reference).suffix == ".onnx" or Path(reference).is_file():
        ref_path, ref_engine = Path(reference), "onnxruntime"
    else:
        raise InputError(f"reference {str(reference)!r} is neither a variant of bundle {b.name!r} ({', '.join(variants)}) "
                         "nor an ONNX file")
    if cand_v.format == "onnx":
        cand_path, engine = onnx_variant(variant, "candidate"), cand_v.engine
    elif cand_v.precision == "int8":
        raise InputError(f"{variant} is an NNCF-quantized OpenVINO IR: there is no ONNX graph of it to bisect; "
                         "compare onnx-int8 instead, or check it with `cvdeploy verify`")
    else:
        cand_path, engine = onnx_variant("onnx-fp32", f"ONNX source of {variant}"), "openvino"
    inputs = [g.input for g in b.golden()]
    if not inputs:
        raise BundleError(f"bundle {b.name!r} has no golden inputs to bisect on")
    tol = tolerance if tolerance is not None else SCORE_TOLERANCE[cand_v.precision]
    return first_divergence(ref_path, cand_path, inputs, tolerance=tol, criterion=criterion, reference_engine=ref_engine,
                            candidate_engine=engine, candidate_precision=cand_v.precision, providers=providers)


# -- seeded fault -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InjectedFault:
    """What `inject_fp16_overflow` inserted: `node` is the Mul where a float16 copy overflows."""

    node: str  # the Mul by `scale`: the first node an FP16 conversion gets wrong
    restore: str  # the Mul by 1/scale
    nodes: tuple[str, ...]  # every node inserted, in graph order
    tensor: str  # the tensor scaled (its consumers now read the restored copy)
    scale: float


def _default_target(graph: _Graph) -> Any:
    """A node in the middle of the backbone: the last node of the Ultralytics module a quarter of the way in, or the
    float-producing compute node a third of the way through the graph."""
    import re

    floats = [n for n in graph.order if n.op_type not in ("Constant", "Shape", "Cast")
              and any(graph.types.get(o) == 1 for o in n.output)]
    if not floats:
        raise ModelFormatError(f"{graph.path.name} has no float32 node to scale")
    modules = sorted({int(m.group(1)) for n in floats if (m := re.match(r"^/model\.(\d+)/", n.name))})
    if modules:
        mid = f"/model.{modules[len(modules) // 4]}/"
        return [n for n in floats if n.name.startswith(mid)][-1]
    return floats[len(floats) // 3]


def inject_fp16_overflow(
    onnx_in: str | os.PathLike[str],
    onnx_out: str | os.PathLike[str],
    node: str | None = None,
    scale: float = 1e5,
) -> InjectedFault:
    """Write a copy of a float32 ONNX model whose float32 outputs are unchanged but whose FP16 conversion overflows.

    The first float output of `node` (default: a node in the middle of the backbone) is multiplied by `scale` and
    divided by it again before its consumers read it: float32 carries that exactly (to ~1e-7 relative), float16 does
    not once |value| x scale passes 65504 (an FP16 converter also clamps a scale beyond 65504 to 65504, so with the
    default any value above 1 overflows). Two no-op Reshapes hold the scaled tensor between the Muls: ONNX Runtime on
    a CPU has no float16 Mul, computes both Muls in float32 and drops the casts between them, so without a node that
    really holds float16 there, the overflow would only happen on a GPU. The result is a seeded fault for the layer
    bisection (and the doctor's tests): the returned `InjectedFault.node` is what it must name.
    """
    onnx = _onnx()
    from onnx import TensorProto, helper, numpy_helper

    if not (math.isfinite(scale) and scale > 1):
        raise InputError(f"scale must be a finite number above 1, got {scale}")
    graph = _load(onnx_in)
    if node is None:
        target = _default_target(graph)
    else:
        target = next((n for n in graph.order if n.name == node), None)
        if target is None:
            raise InputError(f"{graph.path.name} has no node named {node!r}")
    tensor = next((o for o in target.output if graph.types.get(o) == TensorProto.FLOAT), None)
    if tensor is None:
        raise InputError(f"node {target.name!r} has no float32 output to scale")
    if tensor in graph.outputs:
        raise InputError(f"node {target.name!r} produces a model output; pick a node inside the graph")

    model = onnx.ModelProto()
    model.CopyFrom(graph.model)
    g = model.graph
    p = _FAULT
    up, down = f"{p}/scale_up", f"{p}/scale_down"
    names = {"up": f"{p}/scaled", "shape": f"{p}/shape_output", "hold0": f"{p}/held_0", "hold1": f"{p}/held_1",
             "restored": f"{p}/restored"}
    taken = {o for n in g.node for o in n.output} | {i.name for i in g.initializer} | {n.name for n in g.node}
    if taken & {*names.values(), up, down}:
        raise InputError(f"{graph.path.name} already holds an injected fault ({p}/...)")
    for n in g.node:
        for k, i in enumerate(n.input):
            if i == tensor:
                n.input[k] = names["restored"]
    g.initializer.extend([numpy_helper.from_array(np.array(scale, np.float32), f"{p}/scale"),
                          numpy_helper.from_array(np.array(1.0 / scale, np.float32), f"{p}/inverse_scale")])
    inserted = [
        helper.make_node("Mul", [tensor, f"{p}/scale"], [names["up"]], name=up),
        helper.make_node("Shape", [tensor], [names["shape"]], name=f"{p}/shape"),
        helper.make_node("Reshape", [names["up"], names["shape"]], [names["hold0"]], name=f"{p}/hold_0"),
        helper.make_node("Reshape", [names["hold0"], names["shape"]], [names["hold1"]], name=f"{p}/hold_1"),
        helper.make_node("Mul", [names["hold1"], f"{p}/inverse_scale"], [names["restored"]], name=down),
    ]
    at = next(k for k, n in enumerate(g.node) if tensor in n.output) + 1
    for k, n in enumerate(inserted):
        g.node.insert(at + k, n)
    nodes = list(g.node)
    del g.node[:]
    g.node.extend(_toposort(nodes, {i.name for i in g.input} | {i.name for i in g.initializer}))
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        raise ModelFormatError(f"the injected copy of {graph.path.name} is not a valid ONNX graph: {str(e).splitlines()[0]}") from e
    Path(onnx_out).parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(onnx_out))
    return InjectedFault(node=up, restore=down, nodes=tuple(n.name for n in inserted), tensor=tensor, scale=scale)
