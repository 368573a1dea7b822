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

The module finds the divergence and names its fix; the rest lives beside it: `bisect_graph` (reading, matching and
cutting ONNX graphs), `bisect_run` (the two runs), `bisect_report` (the result types), `bisect_fault` (the seeded fault).
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from cvdeploy.diagnose.bisect_fault import InjectedFault, inject_fp16_overflow
from cvdeploy.diagnose.bisect_graph import QDQ, Graph, load_graph, match_tensors, node_id
from cvdeploy.diagnose.bisect_report import (
    FP16_MAX,
    KINDS,
    Divergence,
    NodeError,
    TensorError,
    fmt_error,
)
from cvdeploy.diagnose.bisect_report import tensor_error as tensor_error  # public before the split: still importable here
from cvdeploy.diagnose.bisect_run import Inputs, Setup, accumulated_errors, input_cases, node_profile, run_alone
from cvdeploy.errors import BundleError, InputError

if TYPE_CHECKING:
    from cvdeploy.bundle.bundle import Bundle

__all__ = [  # the result types and the seeded fault are re-exported from their modules
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

CRITERIA = ("alone", "total")
Criterion = Literal["alone", "total"]
_PRECISIONS = ("fp32", "fp16", "bf16", "int8")  # a variant's precision: what OpenVINO is pinned to


# -- the bisection ------------------------------------------------------------------------------------


def _kind(ref: Graph, cand: Graph, reference_engine: str, candidate_engine: str, candidate_precision: str) -> str:
    if cand.has(QDQ) and not ref.has(QDQ):
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
    ref, cand = load_graph(reference), load_graph(candidate)
    match, quantized = match_tensors(ref, cand)
    if not match:
        raise InputError(f"{ref.path.name} and {cand.path.name} share no tensor names: layer bisection matches tensors by "
                         "name, so the candidate must be the reference converted, quantized or run by another engine")
    kind = _kind(ref, cand, reference_engine, candidate_engine, candidate_precision)
    tol = tolerance if tolerance is not None else _default_tolerance(kind, candidate_precision)
    cases = input_cases(inputs, [ref, cand])
    setup = Setup(ref, cand, match, cases, reference_engine, candidate_engine, candidate_precision, providers, chunk)

    with tempfile.TemporaryDirectory(prefix="cvdeploy-bisect-") as tmp:
        errors, qerrors = accumulated_errors(setup, quantized, Path(tmp))
        profile = node_profile(ref, errors, qerrors, len(cases))
        not_isolated: list[str] = []
        if criterion == "alone":
            profile, not_isolated = run_alone(setup, profile, tol, Path(tmp))
    first = next((n for n in profile if _crosses(n, tol, criterion, not_isolated)), None)
    keep, fix = _fix(first, kind, setup, errors)
    return Divergence(
        reference=_label(ref.path, reference_engine, "fp32"), candidate=_label(cand.path, candidate_engine, candidate_precision),
        kind=kind, tolerance=tol, criterion=criterion, node=first, fix=fix, profile=profile,
        outputs={o: max(errors[o], key=lambda t: t.error) for o in ref.outputs if o in errors},
        nonfinite=[n.name for n in profile if n.nonfinite], keep_float=keep, not_isolated=not_isolated,
        compared=len(errors), unmatched=len([t for t in ref.float_tensors() if t not in errors]), cases=len(cases),
    )


def _crosses(n: NodeError, tol: float, criterion: str, not_isolated: Sequence[str]) -> bool:
    total = n.error_out > tol and n.error_in <= tol
    if criterion == "total":
        return total
    if n.alone is not None:
        return n.alone > tol
    return n.name in not_isolated and total  # could not be run alone: judged as by "total"


def _overflow_region(ref: Graph, node_name: str, errors: dict[str, list[TensorError]]) -> list[str]:
    """The node and every node that carries its out-of-float16-range values on, until they are back in range."""
    start = next(n for n in ref.order if node_id(n) == node_name)

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
    return [node_id(n) for n in sorted(region.values(), key=lambda n: position[id(n)])]


def _quantized_feeders(s: Setup, name: str) -> list[str]:
    """The reference nodes whose outputs reach node `name` of the candidate through a QuantizeLinear -> DequantizeLinear pair."""
    node = next((n for n in s.cand.order if node_id(n) == name), None)
    out: list[str] = []
    for i in [] if node is None else node.input:
        dq = s.cand.producer.get(i)
        q = s.cand.producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if q is not None and q.op_type == "QuantizeLinear" and q.input[0] in s.ref.producer:
            feeder = node_id(s.ref.producer[q.input[0]])
            if feeder not in out:
                out.append(feeder)
    return out


def _fix(node: NodeError | None, kind: str, s: Setup, errors: dict[str, list[TensorError]]) -> tuple[list[str], str]:
    """The fallback that would fix the divergence, as (nodes to keep in float, the advice in words)."""
    if node is None:
        return [], ""
    name, op = node.name, node.op_type
    if kind == "fp16":
        if node.ref_max > FP16_MAX:
            region = _overflow_region(s.ref, name, errors)
            rest = [n for n in region if n != name]
            carried = f" and the {len(rest)} node(s) its values pass through ({', '.join(rest)})" if rest else ""
            return region, (f"keep {name}{carried} in float32: the reference reaches {fmt_error(node.ref_max)} there, beyond "
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
