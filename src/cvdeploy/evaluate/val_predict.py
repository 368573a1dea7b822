"""A Predictor's detections as Ultralytics' validator makes them: multi-label NMS, then cvdeploy's own task decoding.

Ultralytics' `val` keeps, for every anchor, each class whose score passes `conf` (`multi_label=True`), while `predict`
keeps the best class only; at conf 0.001 the extra rows count (on the shapes demo models: +0.03 box mAP50-95, +0.015
mask mAP50-95). To be comparable with `yolo val`, the evaluator selects its candidates the validator's way; everything
else (decoding, letterbox, engine, masks, keypoints, rotated boxes, scaling back to the image) is the Predictor's,
stage by stage, so what is scored is what the bundle computes.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from cvdeploy.vision.detections import Detections
from cvdeploy.vision.letterbox import LetterboxParams
from cvdeploy.vision.postprocess import MAX_NMS, Candidates, DetectOptions, suppress
from cvdeploy.vision.tasks import TaskHead, candidates, finish_candidates, split_outputs


def multi_label_candidates(output: np.ndarray, head: TaskHead, options: DetectOptions) -> Candidates:
    """Ultralytics' `non_max_suppression(..., multi_label=True)` on one image's head output (4 + nc + extra, anchors):
    one row per (anchor, class) scoring above `conf`, the 30,000 most confident, class-aware NMS, `max_det`."""
    nc = head.nc
    n_extra = output.shape[0] - 4 - nc
    scores = output[4 : 4 + nc]
    anchors = np.flatnonzero(scores.max(0) > options.conf)
    if anchors.size == 0:
        return Candidates.empty(n_extra)
    # torch.where on (anchors, classes): anchor-major order, as the validator enumerates them.
    a_idx, cls = np.nonzero(options.conf < scores[:, anchors].T)
    cols = anchors[a_idx]
    conf = scores[cls, cols]
    if options.classes is not None:
        sel = np.isin(cls, options.classes)
        cols, cls, conf = cols[sel], cls[sel], conf[sel]
    top = np.argsort(-conf, kind="stable")[:MAX_NMS]
    cols, cls, conf = cols[top], cls[top], conf[top]
    return suppress(output[:4, cols].T, conf, cls, output[4 + nc :, cols].T, options, rotated=head.task == "obb")


def val_detections(predictor: object, image: Path, options: DetectOptions, *, rect: bool = True
                   ) -> tuple[Detections, LetterboxParams]:
    """One image through the Predictor's stages (decode, letterbox, engine), the validator's NMS, the task's decoder;
    and where the image lies in the network input (segment masks are scored there, as Ultralytics scores them).
    `rect=False` pads every image to the square input size (Ultralytics' `val(rect=False)`), else the Predictor's own
    letterbox (minimal padding for a model of dynamic size, as a lone request is served)."""
    p = predictor
    spec = p.spec if rect else replace(p.spec, rect=False)  # type: ignore[attr-defined]
    prepared = p.prepare([p.decode(image)], spec=spec)  # type: ignore[attr-defined]
    outputs = p.infer_all(prepared.tensor)  # type: ignore[attr-defined]
    head: TaskHead = p.head  # type: ignore[attr-defined]
    preds, protos = split_outputs(outputs, head.task)
    # NMS-free rows (end-to-end heads): the validator takes them as they come, above conf.
    cand = candidates(head, preds[0], options) if head.end2end else multi_label_candidates(preds[0], head, options)
    params = prepared.params[0]
    return finish_candidates(head, cand, params, options, None if protos is None else protos[0]), params
