"""The preprocessing audit's images: each decoded as the bundle expects (`Sample`), its encoded bytes kept so that a
wrong decode (EXIF ignored) can be reproduced, and read a window at a time."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
from PIL import Image

from cvdeploy.diagnose.profile_stats import ORIENTATION_TAG
from cvdeploy.errors import InputError
from cvdeploy.vision.image import ImageSource

if TYPE_CHECKING:
    from cvdeploy.predict import Predictor

__all__ = ["Sample", "check_images", "load_samples", "windows"]

_WINDOW = 32  # images decoded at once: bounds memory on a large set of field photos


@dataclass(frozen=True, eq=False)
class Sample:
    """One audited image: decoded as the bundle expects (BGR, EXIF orientation applied), with its encoded file if known."""

    image: np.ndarray  # HxWx3 BGR uint8
    data: bytes | None = None  # the encoded file: needed to decode it the wrong way (EXIF ignored)
    name: str | None = None
    orientation: int = 1  # the file's EXIF orientation tag (1: upright, nothing to apply)

    def unoriented(self) -> np.ndarray:
        """The image decoded without applying its EXIF orientation (the sensor's raw pixel order)."""
        if self.data is None or self.orientation == 1:
            return self.image
        img = cv2.imdecode(np.frombuffer(self.data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
        if img is None:  # a file OpenCV cannot read: Pillow, without exif_transpose
            with Image.open(io.BytesIO(self.data)) as im:
                img = cv2.cvtColor(np.asarray(im.convert("RGB")), cv2.COLOR_RGB2BGR)
        return np.ascontiguousarray(img)


def _orientation(data: bytes) -> int:
    try:
        with Image.open(io.BytesIO(data)) as im:
            value = im.getexif().get(ORIENTATION_TAG, 1)
    except Exception:  # any header Pillow cannot parse simply has no orientation for us
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def check_images(images: Sequence[ImageSource]) -> None:
    """InputError unless `images` is a non-empty list of images (a lone path or array is a mistake)."""
    if isinstance(images, str | os.PathLike | bytes | np.ndarray):
        raise InputError("images must be a list of images (paths, bytes or arrays), not a single one")
    if not images:
        raise InputError("no images to audit: give the images the field predictions were made on")


def _load(predictor: Predictor, src: ImageSource, i: int) -> Sample:
    data: bytes | None = None
    name: str | None = None
    if isinstance(src, str | os.PathLike):
        name = str(src)
        path = Path(src)
        if not path.is_file():
            raise InputError(f"image {i} not found: {path}")
        data = path.read_bytes()
    elif isinstance(src, bytes | bytearray | memoryview):
        data = bytes(src)
    image = predictor.decode(data if data is not None else src)
    return Sample(image, data, name, _orientation(data) if data is not None else 1)


def windows(predictor: Predictor, images: Sequence[ImageSource]) -> Iterator[tuple[int, list[Sample]]]:
    """(offset, decoded samples) a window at a time: a field set of large photos is never all in memory."""
    for start in range(0, len(images), _WINDOW):
        yield start, [_load(predictor, images[i], i) for i in range(start, min(start + _WINDOW, len(images)))]


def load_samples(predictor: Predictor, images: Sequence[ImageSource]) -> list[Sample]:
    """Decode `images` (paths, encoded bytes, BGR arrays or PIL images) with the Predictor's decoder.

    Files and bytes keep their encoded form, so the EXIF mistake can be reproduced; arrays and PIL images cannot
    (they are already decoded) and leave that candidate out.
    """
    check_images(images)
    return [s for _, window in windows(predictor, images) for s in window]
