"""Instance masks from a YOLO segment head: prototypes and coefficients to binary masks, polygons and RLE, as Ultralytics.

    process_mask          masks at the network input's size (Ultralytics' default, `retina_masks=False`)
    process_mask_native   masks at the original image's size (`retina_masks=True`)
    masks2segments        one polygon per mask (OpenCV contours; several contours joined into one, Ultralytics' "all")
    scale_masks           masks of the letterboxed input back onto the original image (what RLE encodes)
    rle_encode            COCO run-length encoding (column-major; compressed string or counts)

Resizing is bilinear with half-pixel centres and no antialiasing (`cv2.INTER_LINEAR` on float32), which is what
torch's `F.interpolate(mode="bilinear", align_corners=False)` computes; only pixels whose logit is within float rounding
of 0 can binarize differently.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np

from cvdeploy.errors import InputError

_CHANNELS = 128  # cv2.resize takes at most CV_CN_MAX channels per call (128 in OpenCV 5, 512 in 4)
_PIXEL_BUDGET = 16_000_000  # float pixels upsampled at once (Ultralytics' budget in process_mask_native)


def resize_bilinear(masks: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(n, h, w) float32 -> (n, H, W) float32 at `size` (H, W): torch's bilinear, align_corners=False."""
    n = len(masks)
    H, W = size
    if masks.shape[1:] == (H, W):
        return masks.astype(np.float32, copy=False)
    out = np.empty((n, H, W), np.float32)
    for i in range(0, n, _CHANNELS):
        chunk = np.ascontiguousarray(masks[i : i + _CHANNELS].transpose(1, 2, 0), dtype=np.float32)
        r = cv2.resize(chunk, (W, H), interpolation=cv2.INTER_LINEAR)
        out[i : i + _CHANNELS] = (r[..., None] if r.ndim == 2 else r).transpose(2, 0, 1)
    return out


def crop_mask(masks: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Zero every pixel outside its box, in place: column c is kept when x1 <= c < x2, row r when y1 <= r < y2."""
    if not len(masks):
        return masks
    _, h, w = masks.shape
    b = boxes.astype(np.float32)
    cols = np.arange(w, dtype=np.float32)[None, None, :]
    rows = np.arange(h, dtype=np.float32)[None, :, None]
    masks *= (cols >= b[:, 0, None, None]) & (cols < b[:, 2, None, None])
    masks *= (rows >= b[:, 1, None, None]) & (rows < b[:, 3, None, None])
    return masks


def _logits(protos: np.ndarray, coefficients: np.ndarray) -> np.ndarray:
    c, mh, mw = protos.shape
    if coefficients.ndim != 2 or coefficients.shape[1] != c:
        raise InputError(f"mask coefficients: expected shape (n, {c}), got {coefficients.shape}")
    return (coefficients.astype(np.float32) @ protos.astype(np.float32).reshape(c, -1)).reshape(-1, mh, mw)


def _chunk(n_pixels: int) -> int:
    return max(1, _PIXEL_BUDGET // max(n_pixels, 1))


def process_mask(protos: np.ndarray, coefficients: np.ndarray, boxes: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Binary uint8 masks (n, H, W) at the network input's size `shape`: prototypes (c, mh, mw) weighted by each
    detection's coefficients (n, c), upsampled, thresholded at 0, then cropped to its box (xyxy, input pixels).
    Ultralytics' `process_mask(..., upsample=True)`: upsample first, crop after."""
    H, W = shape
    if not len(coefficients):
        return np.zeros((0, H, W), np.uint8)
    logits = _logits(protos, coefficients)
    out = np.empty((len(logits), H, W), np.uint8)
    step = _chunk(H * W)
    for i in range(0, len(logits), step):
        np.greater(resize_bilinear(logits[i : i + step], shape), 0, out=out[i : i + step], casting="unsafe")
    return crop_mask(out, boxes)


def scale_masks(masks: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Float masks (n, h, w) of a letterboxed input back to the original image (H, W): the unpadded region cropped,
    then resized bilinearly. The letterbox is recomputed from the two shapes, as Ultralytics' `scale_masks` does."""
    h1, w1 = masks.shape[1:]
    h0, w0 = shape
    if (h1, w1) == (h0, w0):
        return masks.astype(np.float32, copy=False)
    gain = min(h1 / h0, w1 / w0)
    new_h, new_w = max(round(h0 * gain), 1), max(round(w0 * gain), 1)
    top, left = round((h1 - new_h) / 2 - 0.1), round((w1 - new_w) / 2 - 0.1)
    return resize_bilinear(masks[:, top : top + new_h, left : left + new_w].astype(np.float32, copy=False), shape)


def process_mask_native(protos: np.ndarray, coefficients: np.ndarray, boxes: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Binary uint8 masks (n, H, W) at the original image's size `shape` (Ultralytics' `retina_masks=True`): each
    mask's logits upsampled by the smallest factor (1, 2 or 4) that crops the letterbox padding on whole pixels, the
    padding cropped, resized to the image, thresholded at 0 and cropped to its box (xyxy, original pixels)."""
    _, mh, mw = protos.shape
    h, w = shape
    if not len(coefficients):
        return np.zeros((0, h, w), np.uint8)
    logits = _logits(protos, coefficients)
    gain = min(4 * mh / h, 4 * mw / w)
    pad = (4 * mh - max(round(h * gain), 1)) | (4 * mw - max(round(w * gain), 1))
    f = 4 // math.gcd(4, pad | pad // 2)
    out = np.empty((len(logits), h, w), np.uint8)
    step = _chunk(h * w + f * f * mh * mw)
    for i in range(0, len(logits), step):
        part = logits[i : i + step]
        if f > 1:
            part = resize_bilinear(part, (mh * f, mw * f))
        np.greater(scale_masks(part, shape), 0, out=out[i : i + step], casting="unsafe")
    return crop_mask(out, boxes)


def masks_on_image(masks: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Binary masks (n, h, w) of the network input (or already of the image) as binary uint8 masks of the original
    image (H, W): `scale_masks` then > 0.5."""
    if masks.shape[1:] == tuple(shape):
        return masks.astype(np.uint8, copy=False)
    if not len(masks):
        return np.zeros((0, *shape), np.uint8)
    out = np.empty((len(masks), *shape), np.uint8)
    step = _chunk(shape[0] * shape[1])
    for i in range(0, len(masks), step):
        np.greater(scale_masks(masks[i : i + step].astype(np.float32), shape), 0.5, out=out[i : i + step], casting="unsafe")
    return out


# -- polygons --------------------------------------------------------------------------------------


def _closest_pair(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    d = ((a[:, None, :].astype(np.float64) - b[None, :, :]) ** 2).sum(-1)
    i, j = np.unravel_index(int(np.argmin(d)), d.shape)
    return int(i), int(j)


def merge_segments(segments: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Join several contours into one outline through their closest points (Ultralytics' `merge_multi_segment`): each
    contour is entered at the point closest to the previous one and left at the point closest to the next, then the
    walk comes back through the middle contours' remaining points."""
    segs = [np.asarray(s).reshape(-1, 2) for s in segments]
    links: list[list[int]] = [[] for _ in segs]
    for i in range(1, len(segs)):
        a, b = _closest_pair(segs[i - 1], segs[i])
        links[i - 1].append(a)
        links[i].append(b)
    out: list[np.ndarray] = []
    last = len(segs) - 1
    for i, idx in enumerate(links):
        if len(idx) == 2 and idx[0] > idx[1]:
            idx = [len(segs[i]) - 1 - x for x in idx]
            segs[i] = segs[i][::-1, :]
        segs[i] = np.roll(segs[i], -idx[0], axis=0)
        segs[i] = np.concatenate([segs[i], segs[i][:1]])
        if i in (0, last):
            out.append(segs[i])
        else:
            out.append(segs[i][: idx[1] - idx[0] + 1])
    for i in range(last, -1, -1):
        if i not in (0, last):
            out.append(segs[i][abs(links[i][1] - links[i][0]) :])
    return out


def masks2segments(masks: np.ndarray, strategy: str = "all") -> list[np.ndarray]:
    """One (k, 2) float32 polygon per binary mask, in the mask's pixels ((0, 2) for an empty mask): the external
    contours (OpenCV, CHAIN_APPROX_SIMPLE), joined into one ("all", Ultralytics' default) or the longest ("largest")."""
    if strategy not in ("all", "largest"):
        raise InputError(f"masks2segments: strategy must be 'all' or 'largest', got {strategy!r}")
    segments = []
    for m in np.ascontiguousarray(masks.astype(np.uint8, copy=False)):
        contours = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)[0]
        if not contours:
            seg = np.zeros((0, 2))
        elif strategy == "largest":
            seg = np.asarray(contours[int(np.argmax([len(c) for c in contours]))]).reshape(-1, 2)
        elif len(contours) > 1:
            seg = np.concatenate(merge_segments([c.reshape(-1, 2) for c in contours]))
        else:
            seg = contours[0].reshape(-1, 2)
        segments.append(seg.astype(np.float32))
    return segments


def scale_coords(from_shape: tuple[int, int], coords: np.ndarray, to_shape: tuple[int, int], *, normalize: bool = False) -> np.ndarray:
    """Points (..., >= 2) of a letterboxed image of `from_shape` (h, w) back to an image of `to_shape`, clipped to it
    (and divided by its width and height with `normalize`); the letterbox is recomputed from the two shapes, as
    Ultralytics' `scale_coords` does. Returns a new array."""
    h0, w0 = to_shape
    h1, w1 = from_shape
    gain = min(h1 / h0, w1 / w0)
    new_h, new_w = max(round(h0 * gain), 1), max(round(w0 * gain), 1)
    pad_x, pad_y = round((w1 - new_w) / 2 - 0.1), round((h1 - new_h) / 2 - 0.1)
    out = np.array(coords, dtype=np.float32, copy=True)
    out[..., 0] = ((out[..., 0] - pad_x) / (new_w / w0)).clip(0, w0)
    out[..., 1] = ((out[..., 1] - pad_y) / (new_h / h0)).clip(0, h0)
    if normalize:
        out[..., 0] /= w0
        out[..., 1] /= h0
    return out


# -- run-length encoding ----------------------------------------------------------------------------


def rle_counts(mask: np.ndarray) -> list[int]:
    """COCO run lengths of a binary (H, W) mask, column-major, starting with a run of zeros (possibly 0 long)."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    if flat.size == 0:
        return []
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    return [0, *counts] if flat[0] else counts


def _rle_string(counts: Sequence[int]) -> str:
    """pycocotools' `rleToString`: counts after the second delta-coded, then written 5 bits a character."""
    out = []
    for i, c in enumerate(counts):
        x = int(c) - (int(counts[i - 2]) if i > 2 else 0)
        more = True
        while more:
            ch = x & 0x1F
            x >>= 5
            more = x != -1 if ch & 0x10 else x != 0
            if more:
                ch |= 0x20
            out.append(chr(ch + 48))
    return "".join(out)


def _rle_from_string(s: str) -> list[int]:
    counts: list[int] = []
    p = 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            ch = ord(s[p]) - 48
            x |= (ch & 0x1F) << (5 * k)
            more = bool(ch & 0x20)
            p += 1
            k += 1
            if not more and ch & 0x10:
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def rle_encode(mask: np.ndarray, *, compressed: bool = True) -> dict[str, object]:
    """A binary (H, W) mask as COCO RLE: {"size": [H, W], "counts": str} (compressed, what pycocotools' `encode`
    writes) or {"size": [H, W], "counts": [int, ...]} (uncompressed)."""
    if mask.ndim != 2:
        raise InputError(f"rle_encode: expected one (H, W) mask, got shape {mask.shape}")
    counts = rle_counts(mask)
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": _rle_string(counts) if compressed else counts}


def rle_decode(rle: dict[str, object]) -> np.ndarray:
    """The binary uint8 (H, W) mask of a COCO RLE (compressed or not)."""
    h, w = (int(v) for v in rle["size"])  # type: ignore[union-attr]
    counts = rle["counts"]
    runs = _rle_from_string(counts) if isinstance(counts, str) else [int(c) for c in counts]  # type: ignore[union-attr]
    if sum(runs) != h * w:
        raise InputError(f"RLE counts cover {sum(runs)} pixels, the size {h}x{w} has {h * w}")
    values = np.zeros(len(runs), np.uint8)
    values[1::2] = 1
    return np.repeat(values, runs).reshape((h, w), order="F")
