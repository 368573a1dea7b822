"""Task decoders: a batch of raw outputs to one `Decoded` per image, for every YOLO task, as Ultralytics' predictors do.

    detect     output0 (B, 4 + nc, anchors)                  boxes
    segment    output0 (B, 4 + nc + nm, anchors), output1 (B, nm, H/4, W/4) prototypes    boxes + masks
    pose       output0 (B, 4 + nc + K * D, anchors)          boxes + keypoints (x, y[, visibility])
    obb        output0 (B, 4 + nc + 1, anchors)              rotated boxes xywhr (the angle last)
    classify   output0 (B, nc) probabilities                 class probabilities
    end-to-end (YOLO26, NMS-free): output0 (B, max_det, 6 + extra) rows of x1, y1, x2, y2 (obb: x, y, w, h), conf,
               class, extra; no NMS, the rows already best first.

Each decoder follows its Ultralytics predictor's `construct_result`: segment masks at the input's size (or the image's
with `retina_masks`), detections whose mask is empty dropped; keypoints scaled and clipped to the image; oriented boxes
scaled without clipping.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from cvdeploy.errors import InputError
from cvdeploy.vision.detections import Detections
from cvdeploy.vision.letterbox import LetterboxParams
from cvdeploy.vision.postprocess import Candidates, DetectOptions, scale_boxes, select_candidates, select_end2end

TASKS = ("detect", "segment", "pose", "obb", "classify")
BOX_TASKS = ("detect", "segment", "pose", "obb")


@dataclass(frozen=True)
class TaskHead:
    """What decoding a model's outputs needs besides the thresholds: its task, class count and head layout."""

    task: str
    nc: int
    end2end: bool = False
    kpt_shape: tuple[int, int] | None = None  # pose: (keypoints, values per keypoint)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise InputError(f"unknown task {self.task!r}; cvdeploy decodes {', '.join(TASKS)}")
        if self.nc < 1:
            raise InputError(f"a {self.task} model needs at least one class, got {self.nc}")


@dataclass
class Decoded:
    """One image's decoded prediction: detections (box tasks) or class probabilities (classify)."""

    detections: Detections | None = None
    probs: np.ndarray | None = None  # (nc,) float32


def split_outputs(outputs: Mapping[str, np.ndarray] | Sequence[np.ndarray] | np.ndarray, task: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(predictions, prototypes or None) from a model's outputs: the 4-D one is a segment head's prototypes."""
    arrays = [outputs] if isinstance(outputs, np.ndarray) else list(outputs.values() if isinstance(outputs, Mapping) else outputs)
    if not arrays:
        raise InputError("the model returned no outputs")
    protos = [a for a in arrays if a.ndim == 4]
    preds = [a for a in arrays if a.ndim != 4]
    if task == "segment":
        if len(protos) != 1 or len(preds) != 1:
            raise InputError(f"a segment model gives two outputs (detections and mask prototypes), got shapes "
                             f"{[list(a.shape) for a in arrays]}: pass every output (Predictor.infer_all), not only the first")
        return preds[0], protos[0]
    return arrays[0], None


def decode_batch(head: TaskHead, outputs: Mapping[str, np.ndarray] | Sequence[np.ndarray] | np.ndarray,
                 params: Sequence[LetterboxParams], options: DetectOptions) -> list[Decoded]:
    """Every image of a batch decoded: `outputs` are the engine's (by name, in the graph's order, or the one array)."""
    preds, protos = split_outputs(outputs, head.task)
    n = len(params)
    if preds.shape[0] != n or (protos is not None and protos.shape[0] != n):
        raise InputError(f"{head.task} output: expected a batch of {n}, got shape(s) "
                         f"{[list(preds.shape)] + ([list(protos.shape)] if protos is not None else [])}")
    if head.task == "classify":
        if preds.ndim != 2 or preds.shape[1] != head.nc:
            raise InputError(f"classify output: expected shape (batch, {head.nc}), got {preds.shape}")
        return [Decoded(probs=np.asarray(p, np.float32)) for p in preds]
    if preds.ndim != 3:
        raise InputError(f"{head.task} output: expected a 3-D tensor, got shape {preds.shape}")
    out = []
    for i, p in enumerate(params):
        cand = candidates(head, preds[i], options)
        out.append(Decoded(detections=finish_candidates(head, cand, p, options, None if protos is None else protos[i])))
    return out


def candidates(head: TaskHead, output: np.ndarray, options: DetectOptions) -> Candidates:
    """One image's rows after NMS (or the end-to-end filter), in network-input pixels."""
    if head.end2end:
        return select_end2end(output, options)
    return select_candidates(output, options, nc=head.nc, rotated=head.task == "obb")


def finish_candidates(head: TaskHead, c: Candidates, params: LetterboxParams, options: DetectOptions,
                      protos: np.ndarray | None = None) -> Detections:
    """Candidates in input pixels -> Detections in original-image pixels, with the task's extras in `data`."""
    if head.task == "obb":
        from cvdeploy.vision.obb import corners_to_xyxy, scale_rboxes, xywhr2xyxyxyxy

        if c.extra.shape[1] < 1:
            raise InputError("obb output: no angle channel")
        xywhr = scale_rboxes(np.concatenate([c.boxes, c.extra[:, -1:]], 1), params)
        return Detections(corners_to_xyxy(xywhr2xyxyxyxy(xywhr)), c.confidence, c.class_id, {"xywhr": xywhr})
    if head.task == "pose":
        from cvdeploy.vision.keypoints import check_kpt_shape, scale_keypoints

        k, d = check_kpt_shape(head.kpt_shape, c.extra.shape[1])
        kpts = scale_keypoints(c.extra.reshape(len(c), k, d), params)
        return Detections(scale_boxes(c.boxes, params), c.confidence, c.class_id, {"keypoints": kpts})
    if head.task == "segment":
        return _segment(c, params, options, protos)
    return Detections(scale_boxes(c.boxes, params), c.confidence, c.class_id)


def _segment(c: Candidates, params: LetterboxParams, options: DetectOptions, protos: np.ndarray | None) -> Detections:
    from cvdeploy.vision.masks import process_mask, process_mask_native

    if protos is None or protos.ndim != 3:
        raise InputError("segment: the mask prototypes (the model's second output) are missing")
    if c.extra.shape[1] != protos.shape[0]:
        raise InputError(f"segment: {c.extra.shape[1]} mask coefficients per detection for {protos.shape[0]} prototypes")
    boxes = scale_boxes(c.boxes, params)
    if not len(c):
        shape = params.orig_shape if options.retina_masks else params.input_shape
        return Detections(boxes, c.confidence, c.class_id, {"masks": np.zeros((0, *shape), np.uint8)})
    if options.retina_masks:
        masks = process_mask_native(protos, c.extra, boxes, params.orig_shape)
    else:
        masks = process_mask(protos, c.extra, c.boxes, params.input_shape)
    keep = masks.any((1, 2))  # Ultralytics keeps only the predictions whose mask has a pixel
    if not keep.all():
        boxes, masks = boxes[keep], masks[keep]
        return Detections(boxes, c.confidence[keep], c.class_id[keep], {"masks": masks})
    return Detections(boxes, c.confidence, c.class_id, {"masks": masks})
