"""Layer bisection's graphs: an ONNX model read in topological order, its tensors matched with another model's,
copies with tensors marked as outputs, and one node's candidate counterpart cut out (a piece) to run alone."""

from __future__ import annotations

import heapq
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cvdeploy.errors import InputError, MissingDependencyError, ModelFormatError

__all__ = [
    "FLOAT_TYPES",
    "NP_ELEM",
    "QDQ",
    "Graph",
    "Piece",
    "assemble_pieces",
    "cut_piece",
    "load_graph",
    "marked_copy",
    "match_tensors",
    "node_id",
    "onnx_module",
    "toposort",
]

FLOAT_TYPES = {1: "float32", 10: "float16", 11: "float64", 16: "bfloat16"}  # onnx.TensorProto elem types
NP_ELEM = {1: np.float32, 10: np.float16, 11: np.float64}
QDQ = ("QuantizeLinear", "DequantizeLinear")


def onnx_module() -> Any:
    """The onnx package, or MissingDependencyError naming the extra that brings it."""
    try:
        import onnx
    except ImportError as e:
        raise MissingDependencyError("onnx", "build", "layer bisection") from e
    return onnx


# -- graphs ----------------------------------------------------------------------------------------


@dataclass
class Graph:
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
        return [o for n in self.order for o in n.output if o and self.types.get(o) in FLOAT_TYPES]

    def has(self, op_types: Sequence[str]) -> bool:
        return any(n.op_type in op_types for n in self.order)

    def holds_float16(self) -> bool:
        return any(t == 10 for t in self.types.values()) or any(i.data_type == 10 for i in self.model.graph.initializer)


def load_graph(path: str | os.PathLike[str]) -> Graph:
    onnx = onnx_module()
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
    return Graph(p, model, toposort(list(g.node), set(inputs) | initializers), types, shapes, producer, consumers, inputs,
                  [o.name for o in g.output])


def node_id(node: Any) -> str:
    """A node's name, or its first output's where the graph leaves nodes unnamed."""
    return str(node.name or node.output[0])


def toposort(nodes: list[Any], available: set[str]) -> list[Any]:
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


def _stands_for(cand: Graph, tensor: str) -> tuple[str, str] | None:
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


def match_tensors(ref: Graph, cand: Graph) -> tuple[dict[str, str], dict[str, str]]:
    """Reference float tensor -> the candidate tensor to compare it with; and reference tensor -> its quantized view.

    The same name comes first. A reference tensor the candidate renamed is found through a Cast or a
    QuantizeLinear -> DequantizeLinear pair standing for it (the FP16 converter's casts, QDQ graphs).
    """
    ref_float = set(ref.float_tensors())
    match = {t: t for t in ref_float if cand.types.get(t) in FLOAT_TYPES}
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


def marked_copy(graph: Graph, names: Sequence[str], dst: Path) -> list[str]:
    """Write a copy of the model with `names` added as graph outputs (element type only: shapes are left free); return
    its outputs in order."""
    onnx = onnx_module()
    model = onnx.ModelProto()
    model.CopyFrom(graph.model)
    present = [o.name for o in model.graph.output]
    for name in names:
        if name not in present:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, graph.types[name], None))
            present.append(name)
    onnx.save(model, str(dst))
    return present


# -- pieces: one node's counterpart, cut out to run alone ------------------------------------------

_MAX_PIECE = 64  # candidate nodes standing for one reference node (its casts, Q/DQ pairs, weight DQs): more is not local


@dataclass
class Piece:
    """One reference node's candidate counterpart: the candidate nodes between the tensors it reads and writes."""

    node: str
    nodes: list[Any]  # candidate NodeProtos, in the candidate's order
    feeds: dict[str, str]  # candidate tensor read from outside -> the reference tensor whose values it is fed
    outputs: dict[str, str]  # candidate tensor written -> the reference tensor it is compared with
    initializers: set[str]


def cut_piece(ref: Graph, cand: Graph, match: Mapping[str, str], node: Any, outputs: Sequence[str]) -> Piece | None:
    """None where the counterpart is not a small self-contained piece (a renamed input, a subgraph, an unknown type)."""
    onnx = onnx_module()
    ref_init = {i.name for i in ref.model.graph.initializer}
    stop = {match.get(i, i): i for i in node.input if i and i not in ref_init}
    outs = {match[o]: o for o in outputs}
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
    if any(cand.types.get(t) is None for t in [*feeds, *outs]) or any(ref.types.get(stop[t]) is None for t in feeds):
        return None
    position = {id(n): k for k, n in enumerate(cand.order)}
    nodes = sorted(picked.values(), key=lambda n: position[id(n)])
    return Piece(node_id(node), nodes, {t: stop[t] for t in sorted(feeds)}, outs, used_init)


def assemble_pieces(ref: Graph, cand: Graph, pieces: Sequence[Piece], dst: Path) -> tuple[dict[str, tuple[str, int]], dict[str, tuple[int, str]]]:
    """Write every piece, renamed apart, into one model (one session, one run per case instead of one per node).

    Returns its inputs (name -> (reference tensor, element type)) and outputs (name -> (piece index, reference tensor)).
    """
    onnx = onnx_module()
    from onnx import helper

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
    shape = {r: ref.shapes.get(r) for r, _ in inputs}
    graph = helper.make_graph(
        nodes, "cvdeploy-bisect-pieces",
        [helper.make_tensor_value_info(name, elem, None if shape[r] is None else list(shape[r]))
         for (r, elem), name in inputs.items()],
        [helper.make_tensor_value_info(f"p{k}/{t}", cand.types[t], None) for k, piece in enumerate(pieces) for t in piece.outputs],
        [t for t in cand.model.graph.initializer if t.name in used_init])
    model = helper.make_model(graph, opset_imports=list(cand.model.opset_import), ir_version=cand.model.ir_version)
    onnx.save(model, str(dst))
    return {name: key for key, name in inputs.items()}, outputs
