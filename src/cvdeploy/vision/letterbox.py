"""Letterbox resizing (detect, segment, pose, obb), center cropping (classify) and tensor packing, exactly as
Ultralytics does them at inference."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from cvdeploy.errors import InputError

RESIZE_MODES = ("letterbox", "center_crop")


@dataclass(frozen=True)
class LetterboxSpec:
    """How an image becomes a network input; stored in the bundle's manifest."""

    imgsz: tuple[int, int]  # (height, width) the model was built for
    stride: int = 32
    pad_value: int = 114
    rect: bool = True  # minimal padding (to a multiple of stride) when the model takes dynamic shapes
    scaleup: bool = True
    channel_order: str = "RGB"  # what the network expects; images arrive as BGR
    scale: float = 255.0  # divide pixel values by this
    mode: str = "letterbox"  # or "center_crop": classify models (resize the shorter side, crop the centre)

    def __post_init__(self) -> None:
        if len(self.imgsz) != 2 or min(self.imgsz) < 1:
            raise InputError(f"imgsz must be two positive integers (height, width), got {self.imgsz}")
        if self.stride < 1:
            raise InputError(f"stride must be positive, got {self.stride}")
        if self.channel_order not in ("RGB", "BGR"):
            raise InputError(f"channel_order must be RGB or BGR, got {self.channel_order!r}")
        if self.mode not in RESIZE_MODES:
            raise InputError(f"resize mode must be one of {', '.join(RESIZE_MODES)}, got {self.mode!r}")


@dataclass(frozen=True)
class LetterboxParams:
    """Where the original image lies in the network input: what postprocessing needs to map boxes back.

    A center crop is described the same way: the resized image placed at (top, left) <= 0 in the network input.
    """

    orig_shape: tuple[int, int]  # (h, w) of the decoded image
    input_shape: tuple[int, int]  # (h, w) of the network input
    new_unpad: tuple[int, int]  # (w, h) of the resized image before padding
    top: int
    left: int

    @property
    def gain_xy(self) -> tuple[float, float]:
        return self.new_unpad[0] / self.orig_shape[1], self.new_unpad[1] / self.orig_shape[0]


def letterbox_params(shape: tuple[int, int], spec: LetterboxSpec, *, auto: bool) -> tuple[LetterboxParams, int, int]:
    """Ultralytics' LetterBox.get_params (center=True): returns the params and the bottom/right padding."""
    h0, w0 = shape
    th, tw = spec.imgsz
    r = min(th / h0, tw / w0)
    if not spec.scaleup:
        r = min(r, 1.0)
    new_unpad = max(round(w0 * r), 1), max(round(h0 * r), 1)
    dw, dh = tw - new_unpad[0], th - new_unpad[1]
    if auto:
        dw, dh = dw % spec.stride, dh % spec.stride
    dw, dh = dw / 2, dh / 2
    top, bottom = round(dh - 0.1), round(dh + 0.1)
    left, right = round(dw - 0.1), round(dw + 0.1)
    input_shape = (new_unpad[1] + top + bottom, new_unpad[0] + left + right)
    return LetterboxParams((h0, w0), input_shape, new_unpad, top, left), bottom, right


def letterbox(image: np.ndarray, spec: LetterboxSpec, *, auto: bool | None = None) -> tuple[np.ndarray, LetterboxParams]:
    """Resize keeping the aspect ratio and pad with `pad_value`; `auto` defaults to `spec.rect`."""
    params, bottom, right = letterbox_params(image.shape[:2], spec, auto=spec.rect if auto is None else auto)
    if (image.shape[1], image.shape[0]) != params.new_unpad:
        image = cv2.resize(image, params.new_unpad, interpolation=cv2.INTER_LINEAR)
    if params.top or bottom or params.left or right:
        image = cv2.copyMakeBorder(
            image, params.top, bottom, params.left, right, cv2.BORDER_CONSTANT, value=(spec.pad_value,) * 3
        )
    return image, params


def to_tensor(images: list[np.ndarray], spec: LetterboxSpec) -> np.ndarray:
    """Stack letterboxed BGR uint8 images into one float32 NCHW tensor in the network's channel order."""
    batch = np.stack(images) if len(images) > 1 else images[0][None]
    if spec.channel_order == "RGB":
        batch = batch[..., ::-1]
    out = np.empty((batch.shape[0], 3, batch.shape[1], batch.shape[2]), dtype=np.float32)
    np.copyto(out, batch.transpose(0, 3, 1, 2))  # one pass: reorder, flip and convert
    out /= spec.scale  # division, not multiplication by 1/255: bit-identical to Ultralytics
    return out


def center_crop_params(shape: tuple[int, int], spec: LetterboxSpec) -> LetterboxParams:
    """Ultralytics' classify transforms (torchvision `Resize` then `CenterCrop`): a square imgsz resizes the shorter
    side to it (the longer one truncated), any other resizes to it exactly; then the centre is cropped."""
    h0, w0 = shape
    th, tw = spec.imgsz
    if th == tw:
        short, long = (w0, h0) if w0 <= h0 else (h0, w0)
        new_short, new_long = th, int(th * long / short)
        new_w, new_h = (new_short, new_long) if w0 <= h0 else (new_long, new_short)
    else:
        new_w, new_h = tw, th
    top, left = round((new_h - th) / 2.0), round((new_w - tw) / 2.0)
    return LetterboxParams((h0, w0), (th, tw), (new_w, new_h), -top, -left)


def center_crop(image: np.ndarray, spec: LetterboxSpec) -> tuple[np.ndarray, LetterboxParams]:
    """Resize with Pillow's antialiased bilinear filter (what torchvision's `Resize` runs on the PIL image Ultralytics
    hands it; the pixels are BGR, which resizing does not mind) and crop the centre at `spec.imgsz`."""
    from PIL import Image

    params = center_crop_params(image.shape[:2], spec)
    if (image.shape[1], image.shape[0]) != params.new_unpad:
        image = np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize(params.new_unpad, Image.Resampling.BILINEAR))
    th, tw = spec.imgsz
    top, left = -params.top, -params.left
    return np.ascontiguousarray(image[top : top + th, left : left + tw]), params


def preprocess(images: list[np.ndarray], spec: LetterboxSpec) -> tuple[np.ndarray, list[LetterboxParams]]:
    """Letterbox a batch the way Ultralytics does: minimal padding only when every image has the same shape (center
    crop every image for a classify spec)."""
    if spec.mode == "center_crop":
        cropped, params = zip(*(center_crop(im, spec) for im in images), strict=True)
        return to_tensor(list(cropped), spec), list(params)
    auto = spec.rect and len({im.shape for im in images}) == 1
    boxed, params = zip(*(letterbox(im, spec, auto=auto) for im in images), strict=True)
    return to_tensor(list(boxed), spec), list(params)
