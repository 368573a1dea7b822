"""The QAT INT8 graph: the fine-tuned model's FP32 export quantized by the PTQ call, and the check that both run alike.

The fine-tuned model is exported by `common.export_onnx` (the bundle build's settings), so its FP32 graph has the FP32
variant's opset and node names; `quantize_like_ptq` then applies `cvdeploy.build.quantize.quantize_int8` with the PTQ
recipe, calibration images and float nodes, plus the torch model's activation ranges as overrides. QAT and PTQ graphs
therefore quantize the same tensors with the same types: only the weights and the ranges differ. `graph_scales` and
`scale_mismatches` check that the graph's scales are the torch model's; `node_types` shows what ONNX Runtime runs.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def quantize_like_ptq(fp32: str | os.PathLike[str], out: str | os.PathLike[str], calib: Sequence[np.ndarray], recipe: Any,
                      *, quantize_head: bool, ranges: dict[str, tuple[float, float]] | None = None) -> Path:
    """The PTQ quantizer on the fine-tuned FP32 graph: same recipe, same calibration images, same float nodes; `ranges`
    (QAT's learned activation ranges) replace the calibrated ones of those tensors."""
    import onnx

    from cvdeploy.build.quantize import head_float_nodes, quantize_int8

    floats = [] if quantize_head else head_float_nodes(onnx.load(str(fp32), load_external_data=False))
    quantize_int8(fp32, out, calib, recipe, float_nodes=floats, ranges=ranges)
    return Path(out)


def node_types(model_path: str | os.PathLike[str]) -> dict[str, int]:
    """Operator counts of the graph ONNX Runtime actually runs (all optimizations): QLinearConv means INT8 kernels."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="cvdeploy-qat-opt-") as tmp:
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        so.log_severity_level = 3
        ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
        counts: dict[str, int] = {}
        for n in onnx.load(so.optimized_model_filepath).graph.node:
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return dict(sorted(counts.items()))


def graph_scales(model_path: str | os.PathLike[str]) -> dict[str, tuple[float, int]]:
    """(scale, zero point) of every activation tensor a QDQ graph file quantizes, by tensor name."""
    import onnx

    from cvdeploy.build.compress.qat_fakequant import qdq_scales

    return qdq_scales(onnx.load(str(model_path), load_external_data=False))


def scale_mismatches(graph: dict[str, tuple[float, int]], fake_quant: Any, *, rel: float = 1e-5) -> list[str]:
    """Tensors whose scale or zero point in the graph is not the torch quantizer's (empty: the graph runs what the
    fake-quantized model computes)."""
    out = []
    for m in fake_quant.modules():
        if m.tensor is None or not np.isfinite(float(m.lo)):
            continue
        scale, zp = m.scale_zero_point()
        for tensor in (m.tensor, *m.aliases):
            if tensor not in graph:
                out.append(f"{tensor}: not quantized in the graph")
                continue
            g_scale, g_zp = graph[tensor]
            if abs(g_scale - scale) > rel * max(abs(scale), 1e-12) or g_zp != zp:
                out.append(f"{tensor}: graph {g_scale:.6g}/{g_zp}, torch {scale:.6g}/{zp}")
    return out
