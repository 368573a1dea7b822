"""Layer bisection's runs: both models on the same inputs with every matched tensor marked as an output (step 1: the
accumulated error of each tensor and node), then each suspect node's piece alone on the reference's values of its
inputs (step 2: the node's own error)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from cvdeploy.diagnose.bisect_graph import NP_ELEM, Graph, Piece, assemble_pieces, cut_piece, marked_copy, node_id
from cvdeploy.diagnose.bisect_report import NodeError, TensorError, tensor_error
from cvdeploy.errors import CvdeployError, InputError

__all__ = ["Inputs", "Runner", "Setup", "accumulated_errors", "input_cases", "node_profile", "run_alone", "typed_feeds"]

Inputs = np.ndarray | Mapping[str, np.ndarray] | Sequence[np.ndarray | Mapping[str, np.ndarray]]


class Runner:
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


def input_cases(inputs: Inputs, graphs: Sequence[Graph]) -> list[dict[str, np.ndarray]]:
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


def typed_feeds(feeds: dict[str, np.ndarray], graph: Graph) -> dict[str, np.ndarray]:
    """Each model gets the inputs in its own declared type (an FP16 graph without kept I/O types takes float16)."""
    out = {}
    for n, a in feeds.items():
        dtype = NP_ELEM.get(graph.inputs[n][1])
        out[n] = np.ascontiguousarray(a.astype(dtype, copy=False) if dtype is not None else a)
    return out


def _chunks(names: list[str], size: int | None) -> Iterator[list[str]]:
    if not size or size >= len(names):
        yield names
        return
    for k in range(0, len(names), size):
        yield names[k: k + size]


# -- step 1: every tensor marked --------------------------------------------------------------------


@dataclass
class Setup:
    """What both steps share: the two graphs, the tensor matching, the input cases and how each side is run."""

    ref: Graph
    cand: Graph
    match: dict[str, str]
    cases: list[dict[str, np.ndarray]]
    reference_engine: str
    candidate_engine: str
    candidate_precision: str
    providers: tuple[str, ...] | None
    chunk: int | None


def accumulated_errors(s: Setup, quantized: dict[str, str], tmp: Path) -> tuple[dict[str, list[TensorError]],
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
        r_outputs = marked_copy(ref, ref_names, rp)
        c_outputs = marked_copy(cand, [*views, *qviews], cp)
        r_run = Runner(rp, s.reference_engine, "fp32", s.providers, list(ref.inputs), r_outputs)
        try:
            c_run = Runner(cp, s.candidate_engine, s.candidate_precision, s.providers, list(cand.inputs), c_outputs)
        except BaseException:
            r_run.close()
            raise
        try:
            for feeds in s.cases:
                r_out = r_run.run(typed_feeds(feeds, ref))
                c_out = c_run.run(typed_feeds(feeds, cand))
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


def node_profile(ref: Graph, errors: dict[str, list[TensorError]], qerrors: dict[str, list[TensorError]],
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
            node_id(node), node.op_type, index, tuple(outs), e_in[worst], e_out[worst],
            max(errors[o][worst].max_abs for o in outs), max(e.ref_max for o in outs for e in errors[o]),
            max(sum(errors[o][c].nonfinite for o in outs) for c in range(ncases)), worst, max(q) if q else None))
    return out


# -- step 2: nodes run alone -----------------------------------------------------------------------


def run_alone(s: Setup, profile: list[NodeError], tol: float, tmp: Path) -> tuple[list[NodeError], list[str]]:
    """Step 2: every node whose outputs are beyond tolerance, run alone (its candidate piece) on the reference's values
    of its inputs, `chunk` nodes at a time (all at once by default)."""
    by_name = {node_id(n): n for n in s.ref.order}
    screened = [n for n in profile if n.error_out > tol]
    pieces, not_isolated = [], []
    for n in screened:
        piece = cut_piece(s.ref, s.cand, s.match, by_name[n.name], n.outputs)
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


def _run_split(s: Setup, pieces: Sequence[Piece], tmp: Path, tag: str, measured: dict[str, tuple[float, int]],
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


def _run_pieces(s: Setup, pieces: Sequence[Piece], tmp: Path, tag: str, measured: dict[str, tuple[float, int]]) -> None:
    """Run the pieces on every case, fed the reference's values; record (worst error, inf/NaN count) per node."""
    inputs, outputs = assemble_pieces(s.ref, s.cand, pieces, tmp / f"pieces-{tag}.onnx")
    needed = list(dict.fromkeys(r for r, _ in [*inputs.values(), *((r, 0) for _, r in outputs.values())]
                                if r not in s.ref.inputs))
    ref_outputs = marked_copy(s.ref, needed, tmp / f"values-{tag}.onnx")
    r_run = Runner(tmp / f"values-{tag}.onnx", s.reference_engine, "fp32", s.providers, list(s.ref.inputs), ref_outputs)
    try:
        p_run = Runner(tmp / f"pieces-{tag}.onnx", s.candidate_engine, s.candidate_precision, s.providers,
                        list(inputs), list(outputs))
    except BaseException:
        r_run.close()
        raise
    found: dict[str, tuple[float, int]] = {}
    try:
        for feeds in s.cases:
            typed = typed_feeds(feeds, s.ref)
            values = {**typed, **r_run.run(typed)}
            with np.errstate(over="ignore", invalid="ignore"):  # a reference value beyond float16 becomes inf: the point
                lone = {name: values[r].astype(NP_ELEM[elem]) if elem in NP_ELEM else values[r]
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
