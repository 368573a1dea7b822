"""Annotated images: boxes (upright or rotated), masks, keypoints with their skeleton, labels and top classes, drawn
with OpenCV (no font download)."""

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
         boxes: bool = True, masks: bool = True, kpt_line: bool = True, probs: bool = True,
         skeleton: tuple[tuple[int, int], ...] | None = None) -> np.ndarray:
    """Return a copy of the BGR `image` with the result drawn on it: masks (`masks`, half-transparent), boxes (`boxes`;
    obb: rotated), each labelled (`labels`) with its class name and, with `conf`, its confidence; keypoints and, with
    `kpt_line`, the skeleton (`skeleton`: 1-based pairs; default COCO's for 17 keypoints, as Ultralytics); the top
    classes for classify (`probs`). `line_width` None scales with the image (Ultralytics' options)."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        got = f"{image.shape} {image.dtype}" if isinstance(image, np.ndarray) else type(image).__name__
        raise InputError(f"draw: expected an HxWx3 BGR uint8 image, got {got}")
    out = image.copy()
    h, w = out.shape[:2]
    lw = line_width or max(1, round((h + w) / 2 * 0.003))
    font_scale = max(0.35, lw / 3)
    dets = result.detections
    if dets is not None and masks and (m := result.masks) is not None and len(m):
        _draw_masks(out, m.on_image, dets.class_id)
    if dets is not None and boxes:
        obb = result.obb
        for i, (box, score, cls) in enumerate(dets):
            color = class_color(cls)
            x1, y1, x2, y2 = (round(float(v)) for v in box)
            if obb is not None:
                cv2.polylines(out, [np.round(obb.xyxyxyxy[i]).astype(np.int32)], True, color, lw, cv2.LINE_AA)
            else:
                cv2.rectangle(out, (x1, y1), (x2, y2), color, lw, cv2.LINE_AA)
            if labels:
                _label(out, f"{result.names.get(cls, str(cls))} {score:.2f}" if conf else result.names.get(cls, str(cls)),
                       x1, y1, color, font_scale, lw)
    if dets is not None and (k := result.keypoints) is not None:
        for person in k.data:
            _draw_keypoints(out, person, lw, kpt_line, skeleton)
    if result.classes is not None and probs:
        for i, (cls, p) in enumerate(zip(result.classes.class_id, result.classes.confidence, strict=True)):
            text = f"{result.names.get(int(cls), str(cls))} {float(p):.2f}"
            cv2.putText(out, text, (8, 24 + i * 22), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 2, cv2.LINE_AA)
    return out


def _label(out: np.ndarray, text: str, x1: int, y1: int, color: tuple[int, int, int], font_scale: float, lw: int) -> None:
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, max(1, lw - 1))
    above = y1 - th - base - 2 >= 0
    ty = y1 - base - 1 if above else y1 + th + 1
    cv2.rectangle(out, (x1, ty - th - 1), (x1 + tw + 2, ty + base), color, -1)
    cv2.putText(out, text, (x1 + 1, ty), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (255, 255, 255), max(1, lw - 1), cv2.LINE_AA)


def _draw_masks(out: np.ndarray, masks: np.ndarray, class_id: np.ndarray, alpha: float = 0.5) -> None:
    """Each mask blended in its class colour, in place (the last detection on top, as Ultralytics)."""
    for m, cls in zip(masks, class_id, strict=True):
        sel = m.astype(bool)
        if sel.any():
            out[sel] = (out[sel] * (1 - alpha) + np.array(class_color(int(cls)), np.float32) * alpha).astype(np.uint8)


def _draw_keypoints(out: np.ndarray, kpts: np.ndarray, lw: int, kpt_line: bool,
                    skeleton: tuple[tuple[int, int], ...] | None, conf_thres: float = 0.25) -> None:
    """One object's keypoints (K, 2 or 3) as dots, joined by the skeleton; points under `conf_thres` (or at (0, 0)
    without a visibility column) are skipped, as Ultralytics' `Annotator.kpts` does."""
    from cvdeploy.vision.keypoints import COCO_SKELETON, KPT_COLORS, LIMB_COLORS

    n, ndim = kpts.shape
    human = n == 17 and skeleton is None
    limbs = COCO_SKELETON if human else (skeleton or ())

    def visible(i: int) -> bool:
        return bool(kpts[i, 2] >= conf_thres) if ndim == 3 else bool(kpts[i, :2].any())

    for i, k in enumerate(kpts):
        if visible(i):
            color = KPT_COLORS[i][::-1] if human else _PALETTE[i % len(_PALETTE)]
            cv2.circle(out, (int(k[0]), int(k[1])), lw + 1, tuple(int(c) for c in color), -1, cv2.LINE_AA)
    if not kpt_line:
        return
    for j, (a, b) in enumerate(limbs):
        if not (0 < a <= n and 0 < b <= n) or not (visible(a - 1) and visible(b - 1)):
            continue
        p1, p2 = (int(kpts[a - 1, 0]), int(kpts[a - 1, 1])), (int(kpts[b - 1, 0]), int(kpts[b - 1, 1]))
        color = LIMB_COLORS[j][::-1] if human else _PALETTE[j % len(_PALETTE)]
        cv2.line(out, p1, p2, tuple(int(c) for c in color), max(1, int(np.ceil(lw / 2))), cv2.LINE_AA)
