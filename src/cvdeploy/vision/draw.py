"""Annotated images: boxes, labels and top classes drawn with OpenCV (no font download)."""

from __future__ import annotations

import cv2
import numpy as np

from cvdeploy.errors import InputError
from cvdeploy.vision.result import Result

# A fixed, high-contrast palette (BGR) so that a class keeps its colour across images and runs.
_PALETTE = np.array(
    [(56, 56, 255), (151, 157, 255), (31, 112, 255), (29, 178, 255), (49, 210, 207), (10, 249, 72), (23, 204, 146),
     (134, 219, 61), (52, 147, 26), (187, 212, 0), (168, 153, 44), (255, 194, 0), (147, 69, 52), (255, 115, 100),
     (236, 24, 0), (255, 56, 132), (133, 0, 82), (255, 56, 203), (200, 149, 255), (199, 55, 255)],
    dtype=np.uint8,
)


def class_color(class_id: int) -> tuple[int, int, int]:
    b, g, r = _PALETTE[class_id % len(_PALETTE)]
    return int(b), int(g), int(r)


def draw(image: np.ndarray, result: Result, *, line_width: int | None = None, labels: bool = True, conf: bool = True,
         boxes: bool = True) -> np.ndarray:
    """Return a copy of the BGR `image` with the result drawn on it: boxes (`boxes`), each labelled (`labels`) with its
    class name and, with `conf`, its confidence; `line_width` None scales with the image (Ultralytics' options)."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        got = f"{image.shape} {image.dtype}" if isinstance(image, np.ndarray) else type(image).__name__
        raise InputError(f"draw: expected an HxWx3 BGR uint8 image, got {got}")
    out = image.copy()
    h, w = out.shape[:2]
    lw = line_width or max(1, round((h + w) / 2 * 0.003))
    font_scale = max(0.35, lw / 3)
    if result.detections is not None and boxes:
        for box, score, cls in result.detections:
            color = class_color(cls)
            x1, y1, x2, y2 = (round(float(v)) for v in box)
            cv2.rectangle(out, (x1, y1), (x2, y2), color, lw, cv2.LINE_AA)
            if labels:
                name = result.names.get(cls, str(cls))
                text = f"{name} {score:.2f}" if conf else name
                (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, max(1, lw - 1))
                above = y1 - th - base - 2 >= 0
                ty = y1 - base - 1 if above else y1 + th + 1
                cv2.rectangle(out, (x1, ty - th - 1), (x1 + tw + 2, ty + base), color, -1)
                cv2.putText(out, text, (x1 + 1, ty), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (255, 255, 255), max(1, lw - 1), cv2.LINE_AA)
    if result.classes is not None:
        for i, (cls, p) in enumerate(zip(result.classes.class_id, result.classes.confidence, strict=True)):
            text = f"{result.names.get(int(cls), str(cls))} {float(p):.2f}"
            cv2.putText(out, text, (8, 24 + i * 22), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 2, cv2.LINE_AA)
    return out
