"""Image decoding: any supported source to a BGR uint8 array, with limits."""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

import cv2
import numpy as np
from PIL import ExifTags, Image, ImageOps

from cvdeploy.errors import CvdeployError, ImageDecodeError, InputError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "SUPPORTED_FORMATS",
    "DecodeLimits",
    "ImageSource",
    "image_format",
    "load_image",
]

ImageSource: TypeAlias = str | os.PathLike[str] | bytes | bytearray | memoryview | np.ndarray | Image.Image

DEFAULT_MAX_PIXELS = 50_000_000  # guard against decompression bombs
# Multi-page TIFFs and animated GIFs decode to their first page or frame, as cv2.imdecode (and Ultralytics) read them.
SUPPORTED_FORMATS = frozenset({"JPEG", "PNG", "BMP", "WEBP", "TIFF", "GIF"})
# File name endings taken as images when a directory is expanded (the formats above).
IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")

_ORIENTATION_TAG = int(ExifTags.Base.Orientation)


def _listing(names: frozenset[str]) -> str:
    return ", ".join(sorted(names))


def image_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The image files under a directory (recursively, by suffix), sorted; [] when there are none."""
    return sorted(f for f in Path(folder).rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())


def collect_images(inputs: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Files as given, directories expanded (recursively, sorted) to their image files; one-line errors otherwise."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = image_files(p)
            if not found:
                raise InputError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {p}")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise InputError(f"image not found: {p}")
    return files


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class DecodeLimits:
    """What an image may be before any pixel is decoded: size, format, byte count."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    formats: frozenset[str] = SUPPORTED_FORMATS
    max_bytes: int | None = None  # None = unlimited

    def __post_init__(self) -> None:
        if not _is_int(self.max_pixels) or self.max_pixels < 1:
            raise InputError(f"max_pixels must be an integer >= 1, got {self.max_pixels!r}")
        if self.max_bytes is not None and (not _is_int(self.max_bytes) or self.max_bytes < 1):
            raise InputError(f"max_bytes must be None (unlimited) or an integer >= 1, got {self.max_bytes!r}")
        # A bare string would iterate as letters ("PNG" -> {"P", "N", "G"}): refuse it.
        if isinstance(self.formats, (str, bytes)) or not all(isinstance(f, str) for f in self.formats):
            raise InputError(f"formats must be a set of format names such as {{'JPEG', 'PNG'}}, got {self.formats!r}")
        formats = frozenset(f.upper() for f in self.formats)
        if not formats:
            raise InputError(f"formats must name at least one of {_listing(SUPPORTED_FORMATS)}")
        unknown = formats - SUPPORTED_FORMATS
        if unknown:
            raise InputError(
                f"unsupported image format(s) in limits: {_listing(unknown)} (supported: {_listing(SUPPORTED_FORMATS)})"
            )
        # Frozen dataclass: normalising the names needs object.__setattr__.
        object.__setattr__(self, "formats", formats)


# Magic numbers, named as Pillow names its plugins (the keys of `Image.OPEN`). Formats we do
# not decode are listed too, so a refusal can say what the data was instead of "unknown".
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "TIFF"),  # BigTIFF
    (b"MM\x00+", "TIFF"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG2000"),
    (b"\xff\x4f\xff\x51", "JPEG2000"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"8BPS", "PSD"),
    (b"qoif", "QOI"),
    (b"DDS ", "DDS"),
    (b"icns", "ICNS"),
    (b"BM", "BMP"),
)
_HEIF_BRANDS = {
    b"heic": "HEIF",
    b"heix": "HEIF",
    b"mif1": "HEIF",
    b"avif": "AVIF",
    b"avis": "AVIF",
}


def image_format(data: bytes | bytearray | memoryview) -> str | None:
    """Name the image format of `data` from its first bytes (Pillow's names), or None."""
    if isinstance(data, (bytes, bytearray)):
        head = bytes(data[:32])
    else:
        view = memoryview(data)
        flat = view.ndim == 1 and view.itemsize == 1
        head = bytes(view[:32]) if flat else view.tobytes()[:32]
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[4:8] == b"ftyp":
        return _HEIF_BRANDS.get(head[8:12])
    for magic, name in _SIGNATURES:
        if head.startswith(magic):
            return name
    # Netpbm: "P1".."P7" then whitespace; the whitespace keeps plain text starting with "P" out.
    if len(head) >= 3 and head[:1] == b"P" and head[1:2] in b"1234567" and head[2:3].isspace():
        return "PPM"
    return None


def load_image(source: ImageSource, *, limits: DecodeLimits = DecodeLimits()) -> np.ndarray:
    """Return an HxWx3 BGR uint8 C-contiguous array.

    Encoded data (a path or bytes) is decoded by `cv2.imdecode(..., IMREAD_COLOR)`, the call
    Ultralytics trains with, so pixels match training exactly; its format and size are checked
    from the header before any pixel is decoded. An array is taken as BGR (OpenCV's order)
    and is returned as is, without a copy, when it already is HxWx3 uint8 and C-contiguous.

    Raises InputError for a bad source (missing file, wrong array shape or dtype) and its
    subclass ImageDecodeError for data that is not a sane, allowed image or breaks a limit.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode_bytes(_byte_view(source), limits)
    if isinstance(source, np.ndarray):
        return _from_array(source, limits)
    if isinstance(source, Image.Image):
        _check_pixels(source.width, source.height, limits)
        # A PIL image may still be lazy (opened, not loaded): converting it decodes the file.
        with _decoder_errors("could not decode the PIL image"):
            return _pil_to_bgr(source, error=InputError)
    if isinstance(source, (str, os.PathLike)):
        return _load_path(source, limits)
    raise InputError(
        f"cannot load an image from a {type(source).__module__}.{type(source).__qualname__}: "
        "pass a path, encoded bytes, a numpy BGR array or a PIL image"
    )


def _load_path(source: str | os.PathLike[str], limits: DecodeLimits) -> np.ndarray:
    path = os.fsdecode(os.fspath(source))
    if os.path.isdir(path):
        raise InputError(f"image path is a directory, not a file: {path}")
    try:
        with open(path, "rb") as f:
            # Read one byte past the limit: enough to refuse, without loading a huge file.
            data = f.read() if limits.max_bytes is None else f.read(limits.max_bytes + 1)
    except FileNotFoundError:
        raise InputError(f"image not found: {path}") from None
    except OSError as exc:
        raise InputError(f"cannot read image {path}: {exc.strerror or exc}") from exc
    try:
        return _decode_bytes(memoryview(data), limits)
    except ImageDecodeError as exc:
        raise ImageDecodeError(f"{path}: {exc}") from exc


def _byte_view(source: bytes | bytearray | memoryview) -> memoryview:
    view = memoryview(source)
    if not view.c_contiguous:
        view = memoryview(view.tobytes())
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def _decode_bytes(data: memoryview, limits: DecodeLimits) -> np.ndarray:
    if data.nbytes == 0:
        raise ImageDecodeError("empty image data")
    if limits.max_bytes is not None and data.nbytes > limits.max_bytes:
        raise ImageDecodeError(f"image data of {data.nbytes} bytes exceeds the limit of {limits.max_bytes} bytes")
    fmt = image_format(data)
    if fmt is None:
        raise ImageDecodeError(
            f"not a supported image (unrecognised data starting with {bytes(data[:8])!r}; "
            f"expected one of {_listing(limits.formats)})"
        )
    if fmt not in limits.formats:
        raise ImageDecodeError(f"image format {fmt} is not allowed (allowed: {_listing(limits.formats)})")
    header = _open_header(data, fmt)
    width, height = header.size
    _check_pixels(width, height, limits)

    with _decoder_errors(f"could not decode {fmt} image"):
        # Exactly Ultralytics' read path; it also applies EXIF orientation, expands gray to
        # 3 channels, drops alpha and scales 16-bit samples down (v >> 8).
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        # OpenCV refuses some variants Pillow reads (32-bit integer TIFF, some compressions);
        # truncated data fails here as well, since Pillow refuses truncated files by default.
        try:
            image = _pil_to_bgr(header, error=ImageDecodeError)
        except CvdeployError:
            raise
        except Exception as exc:  # any parser failure means "corrupt" here
            raise ImageDecodeError(f"could not decode {fmt} image: data is corrupt or truncated ({_reason(exc)})") from exc
    # The header said how big the image is; a decoder that disagrees is not to be trusted.
    _check_pixels(image.shape[1], image.shape[0], limits)
    return np.ascontiguousarray(image)


def _open_header(data: memoryview, fmt: str) -> Image.Image:
    """Parse only the header with Pillow's plugin for `fmt`; pixels stay undecoded.

    The plugin is called directly rather than through `Image.open`, which runs Pillow's own
    decompression-bomb check (a process-wide limit, warning or raising before ours) and
    would need the process-wide warnings filters changed to silence it, which is not
    thread-safe. This is the same registry lookup `Image.open` does.
    """
    if fmt not in Image.OPEN:
        Image.init()
    if fmt not in Image.OPEN:  # Pillow built without this plugin
        raise ImageDecodeError(f"not a supported image ({fmt} support is missing from Pillow)")
    factory, accept = Image.OPEN[fmt]
    prefix = bytes(data[:16])
    recognised = accept is None or accept(prefix)
    if not recognised or isinstance(recognised, str):
        raise ImageDecodeError(f"not a supported image ({fmt} header not recognised)")
    try:
        image = factory(io.BytesIO(data), "")
        width, height = image.size
    except Exception as exc:  # plugins raise many types on bad headers
        reason = _reason(exc)
        raise ImageDecodeError(f"not a supported image (invalid {fmt} header: {reason})") from exc
    if width < 1 or height < 1:
        raise ImageDecodeError(f"not a supported image ({fmt} header declares {width}x{height})")
    return image


def _from_array(array: np.ndarray, limits: DecodeLimits) -> np.ndarray:
    if array.ndim not in (2, 3) or array.size == 0 or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise InputError(f"expected an HxW or HxWxC image array (C = 1, 3 or 4), got shape {array.shape}")
    is_16bit = array.dtype.kind == "u" and array.dtype.itemsize == 2
    if array.dtype != np.uint8 and not is_16bit:
        raise InputError(
            f"image arrays must be uint8 BGR (uint16 is scaled down), got {array.dtype}: "
            "convert it first, e.g. np.clip(a * 255, 0, 255).astype(np.uint8) for 0..1 floats"
        )
    _check_pixels(array.shape[1], array.shape[0], limits)
    if is_16bit:
        # Same rule as cv2.imdecode on a 16-bit file: keep the high byte (truncate, not round).
        array = (array >> 8).astype(np.uint8)
    if array.ndim == 3 and array.shape[2] == 3:
        return np.ascontiguousarray(array)  # no copy when already contiguous
    if array.ndim == 3 and array.shape[2] == 4:
        return np.ascontiguousarray(array[:, :, :3])
    gray = array if array.ndim == 2 else array[:, :, 0]
    return cv2.cvtColor(np.ascontiguousarray(gray), cv2.COLOR_GRAY2BGR)


def _pil_to_bgr(image: Image.Image, *, error: type[InputError]) -> np.ndarray:
    # Load before reading the orientation: Pillow's TIFF reader applies it itself on load and
    # drops the tag. Only transpose when needed: exif_transpose copies the image even for 1.
    image.load()
    if image.getexif().get(_ORIENTATION_TAG, 1) not in (1, None):
        image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode == "RGB":
        return cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2BGR)
    if mode == "L":
        return cv2.cvtColor(np.asarray(image), cv2.COLOR_GRAY2BGR)
    if mode == "I" or mode.startswith("I;16"):
        samples = np.asarray(image)
        if mode == "I":
            # Pillow stores 16-bit data as "I" too; read it as 16-bit like OpenCV would.
            samples = np.clip(samples, 0, 0xFFFF)
        gray = (samples >> 8).astype(np.uint8)
        return cv2.cvtColor(np.ascontiguousarray(gray), cv2.COLOR_GRAY2BGR)
    if mode == "F":
        raise error("floating-point images (PIL mode F) have no agreed 0..255 scale: convert to 8-bit before loading")
    if mode in ("1", "LA", "La"):
        return cv2.cvtColor(np.asarray(image.convert("L")), cv2.COLOR_GRAY2BGR)
    if mode in ("P", "PA"):
        # Through RGBA so a transparent palette entry keeps its colour, as OpenCV does.
        rgba = np.asarray(image.convert("RGBA"))
        return cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGR)
    try:
        rgb = image.convert("RGB")  # RGBA, RGBa, RGBX, CMYK, YCbCr, ...
    except ValueError as exc:
        raise error(f"cannot convert a PIL image of mode {mode} to RGB: {exc}") from exc
    return cv2.cvtColor(np.asarray(rgb), cv2.COLOR_RGB2BGR)


def _check_pixels(width: int, height: int, limits: DecodeLimits) -> None:
    pixels = width * height
    if pixels > limits.max_pixels:
        raise ImageDecodeError(f"image of {width}x{height} = {pixels} pixels exceeds the limit of {limits.max_pixels} pixels")


@contextmanager
def _decoder_errors(what: str) -> Iterator[None]:
    """Turn whatever a decoder raises into ImageDecodeError, keeping the original reason.

    Untrusted bytes reach C parsers and Pillow plugins that raise many types (OSError,
    SyntaxError, struct.error, IndexError, cv2.error, MemoryError, ...); a caller must only
    ever see a CvdeployError.
    """
    try:
        yield
    except CvdeployError:
        raise
    except Exception as exc:  # deliberately broad, see above
        raise ImageDecodeError(f"{what}: {_reason(exc)}") from exc


def _reason(exc: BaseException) -> str:
    # cv2.error messages span lines and carry source paths; keep one short line.
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, cv2.error):
        text = text.split(" error: ", 1)[-1]
    return text if len(text) <= 200 else text[:197] + "..."
