"""The QAT INT8 graph: the fine-tuned model's FP32 export quantized by the PTQ call, and the check that both run alike.

The fine-tuned model is exported by `common.export_onnx` (the bundle build's settings), so its FP32 graph has the FP32
variant's opset and node names; `quantize_like_ptq` then applies `cvdeploy.build.quantize.quantize_int8` with the PTQ
recipe, calibration images and float nodes. QAT and PTQ graphs therefore quantize the same tensors with the same types:
only the weights (and the ranges they produce) differ. `node_types` shows what ONNX Runtime actually runs.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def quantize_like_ptq(fp32: str | os.PathLike[str], out: str | os.PathLike[str], calib: Sequence[np.ndarray], recipe: Any,
                      *, quantize_head: bool) -> Path:
    """The PTQ quantizer on the fine-tuned FP32 graph: same recipe, same calibration images, same float nodes."""
    import onnx

    from cvdeploy.build.quantize import head_float_nodes, quantize_int8

    floats = [] if quantize_head else head_float_nodes(onnx.load(str(fp32), load_external_data=False))
    quantize_int8(fp32, out, calib, recipe, float_nodes=floats)
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
