"""What the v2 protocol says about a model: its metadata and its Triton-style configuration, with the task facts a
client needs to read the raw outputs (task, class names, input size, layout of each output, keypoint shape, end-to-end
head, preprocessing) and the literal dictionary Ultralytics' Triton client reads.

Why here and not in the routes: the routes stay thin, and the metadata, the configuration and the Ultralytics literal
are three views of one set of facts, built in one place so that they cannot disagree.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from cvdeploy import __version__

if TYPE_CHECKING:
    from cvdeploy.serve.repository import LoadedModel

V2_TYPES = {"float32": "FP32", "float16": "FP16", "uint8": "UINT8", "int32": "INT32", "int64": "INT64"}
IMAGE_INPUT, RESULTS_OUTPUT = "image", "detections"  # the BYTES tensors of the images-in, JSON-out path


def dynamic_input(m: LoadedModel) -> bool:
    """Whether the graph takes any height and width (then a client may send minimal-padding rectangles)."""
    shape = m.predictor.engine.inputs[0].shape
    return not (isinstance(shape[2], int) and isinstance(shape[3], int))


def _dims(shape: Any) -> list[int]:
    return [-1 if d is None or not isinstance(d, int) else d for d in shape]


def output_layout(m: LoadedModel) -> dict[str, str]:
    """What each raw output holds, in words a client can decode by (Ultralytics' layouts)."""
    head = m.predictor.head
    nc, task = head.nc, head.task
    if task == "classify":
        return {"output0": f"(batch, {nc}): softmax probabilities by class id"}
    extra = {"detect": "", "segment": ", 32 mask coefficients", "pose": f", {head.kpt_shape and head.kpt_shape[0] * head.kpt_shape[1]} "
             "keypoint values (x, y[, visibility] per keypoint)", "obb": ", 1 angle (radians)"}[task]
    if head.end2end:
        box = "x, y, w, h (centre, input pixels)" if task == "obb" else "x1, y1, x2, y2 (input pixels)"
        out = {"output0": f"(batch, 300, rows): the top rows after the head's own selection, no NMS needed: {box}, conf, "
                          f"class id{extra}"}
    else:
        out = {"output0": f"(batch, channels, anchors): x, y, w, h (centre, input pixels), {nc} class scores{extra}; "
                          "NMS needed"}
    if task == "segment":
        out["output1"] = "(batch, 32, H/4, W/4): mask prototypes; a mask is coefficients x prototypes, sigmoid > 0.5"
    return out


def task_facts(m: LoadedModel) -> dict[str, Any]:
    """The facts a client needs beside the tensors, as plain JSON values (lists and dicts kept structured)."""
    p = m.predictor
    man = m.bundle.manifest
    pre = man.preprocess
    facts: dict[str, Any] = {
        "task": p.task, "names": {str(k): str(v) for k, v in p.names.items()}, "nc": p.head.nc,
        "imgsz": [int(v) for v in p.spec.imgsz], "stride": int(p.spec.stride), "end2end": bool(p.head.end2end),
        "input_dynamic": dynamic_input(m), "preprocess": pre.resize, "pad_value": int(pre.pad_value),
        "channel_order": pre.channel_order, "scale": float(pre.scale),
        "conf": p.options.conf, "iou": p.options.iou, "max_det": p.options.max_det,
        "outputs": output_layout(m),
    }
    info = man.task_info
    if p.head.kpt_shape is not None:
        facts["kpt_shape"] = list(p.head.kpt_shape)
        if info is not None and info.flip_idx is not None:
            facts["flip_idx"] = list(info.flip_idx)
    if p.task == "segment":
        facts["mask_channels"] = int(info.mask_channels) if info is not None and info.mask_channels else 32
    return facts


def v2_parameters(facts: dict[str, Any]) -> dict[str, bool | int | float | str]:
    """The facts as Open Inference Protocol parameters, whose values are booleans, numbers or strings: lists and
    dictionaries are JSON text (`json.loads(parameters["names"])`)."""
    return {k: v if isinstance(v, bool | int | float | str) else json.dumps(v, separators=(",", ":")) for k, v in facts.items()}


def ultralytics_metadata(m: LoadedModel) -> dict[str, Any]:
    """What Ultralytics' Triton client reads (with ast.literal_eval) and applies as its backend's attributes: plain
    literals only. `kpt_shape` (pose) and `end2end` (YOLO26) decide how it decodes. No `args.dynamic`: with it,
    Ultralytics would run at its own default size (640) instead of the model's `imgsz`; without it, it letterboxes
    square at `imgsz`, which the graph takes as well."""
    p = m.predictor
    h, w = p.spec.imgsz
    out: dict[str, Any] = {"description": f"cvdeploy {m.name} v{m.version}", "author": "cvdeploy", "version": __version__,
                           "task": p.task, "stride": int(p.spec.stride), "batch": 1, "imgsz": [int(h), int(w)],
                           "names": {int(k): str(v) for k, v in p.names.items()}, "channels": 3,
                           "end2end": bool(p.head.end2end), "args": {"nms": False}}
    if p.head.kpt_shape is not None:
        out["kpt_shape"] = [int(v) for v in p.head.kpt_shape]
    info = m.bundle.manifest.task_info
    if info is not None and info.kpt_names:
        out["kpt_names"] = {int(k): [str(n) for n in v] for k, v in info.kpt_names.items()}
    return out


def model_metadata(m: LoadedModel) -> dict[str, Any]:
    """v2 model metadata: every raw input and output as the engine declares it (-1: any size), the BYTES pair of the
    images path, and the task facts as `parameters`."""
    eng = m.predictor.engine
    platform = "onnxruntime_onnx" if "OpenVINO" not in eng.provider else "openvino"
    return {
        "name": m.name, "versions": [m.version], "platform": platform,
        "inputs": [{"name": i.name, "datatype": V2_TYPES.get(i.dtype, "FP32"), "shape": _dims(i.shape)} for i in eng.inputs]
        + [{"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": o.name, "datatype": V2_TYPES.get(o.dtype, "FP32"), "shape": _dims(o.shape)} for o in eng.outputs]
        + [{"name": RESULTS_OUTPUT, "datatype": "BYTES", "shape": [-1]}],
        "parameters": v2_parameters(task_facts(m)),
    }


def model_config(m: LoadedModel) -> dict[str, Any]:
    """Triton's model configuration: the raw tensors, batching, instances, and `parameters` of string values (Triton's
    ModelParameter): each task fact, and `metadata`, the literal Ultralytics' client reads."""
    eng = m.predictor.engine
    params = {k: {"string_value": v if isinstance(v, str) else json.dumps(v)} for k, v in v2_parameters(task_facts(m)).items()}
    params["metadata"] = {"string_value": repr(ultralytics_metadata(m))}
    return {
        "name": m.name, "platform": "onnxruntime_onnx", "backend": "cvdeploy", "max_batch_size": 0,
        "input": [{"name": i.name, "data_type": "TYPE_" + V2_TYPES.get(i.dtype, "FP32"), "dims": _dims(i.shape)} for i in eng.inputs],
        "output": [{"name": o.name, "data_type": "TYPE_" + V2_TYPES.get(o.dtype, "FP32"), "dims": _dims(o.shape)}
                   for o in eng.outputs],
        "dynamic_batching": {"max_queue_delay_microseconds": int(m.batcher.max_delay * 1e6),
                             "preferred_batch_size": [m.batcher.max_batch]},
        "instance_group": [{"count": m.batcher.instances, "kind": "KIND_CPU" if "CPU" in eng.provider.upper() else "KIND_GPU"}],
        "parameters": params,
    }
