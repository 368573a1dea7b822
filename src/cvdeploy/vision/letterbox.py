"""Letterbox resizing and tensor packing, exactly as Ultralytics does it at inference."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from cvdeploy.errors import InputError


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

    def __post_init__(self) -> None:
        if len(self.imgsz) != 2 or min(self.imgsz) < 1:
            raise InputError(f"imgsz must be two positive integers (height, width), got {self.imgsz}")
        if self.stride < 1:
            raise InputError(f"stride must be positive, got {self.stride}")
        if self.channel_order not in ("RGB", "BGR"):
            raise InputError(f"channel_order must be RGB or BGR, got {self.channel_order!r}")


@dataclass(frozen=True)
class LetterboxParams:
    """Where the original image lies in the network input: what postprocessing needs to map boxes back."""

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


def preprocess(images: list[np.ndarray], spec: LetterboxSpec) -> tuple[np.ndarray, list[LetterboxParams]]:
    """Letterbox a batch the way Ultralytics does: minimal padding only when every image has the same shape."""
    auto = spec.rect and len({im.shape for im in images}) == 1
    boxed, params = zip(*(letterbox(im, spec, auto=auto) for im in images), strict=True)
    return to_tensor(list(boxed), spec), list(params)
