"""A seeded fault for layer bisection: a float32 ONNX model whose FP16 conversion overflows at a known node."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cvdeploy.diagnose.bisect_graph import Graph, load_graph, onnx_module, toposort
from cvdeploy.errors import InputError, ModelFormatError

__all__ = ["InjectedFault", "inject_fp16_overflow"]

_FAULT = "/cvdeploy_fault"


@dataclass(frozen=True)
class InjectedFault:
    """What `inject_fp16_overflow` inserted: `node` is the Mul where a float16 copy overflows."""

    node: str  # the Mul by `scale`: the first node an FP16 conversion gets wrong
    restore: str  # the Mul by 1/scale
    nodes: tuple[str, ...]  # every node inserted, in graph order
    tensor: str  # the tensor scaled (its consumers now read the restored copy)
    scale: float


def _default_target(graph: Graph) -> Any:
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
    onnx = onnx_module()
    from onnx import TensorProto, helper, numpy_helper

    if not (math.isfinite(scale) and scale > 1):
        raise InputError(f"scale must be a finite number above 1, got {scale}")
    graph = load_graph(onnx_in)
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
    g.node.extend(toposort(nodes, {i.name for i in g.input} | {i.name for i in g.initializer}))
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        raise ModelFormatError(f"the injected copy of {graph.path.name} is not a valid ONNX graph: {str(e).splitlines()[0]}") from e
    Path(onnx_out).parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(onnx_out))
    return InjectedFault(node=up, restore=down, nodes=tuple(n.name for n in inserted), tensor=tensor, scale=scale)
