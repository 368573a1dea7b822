"""Tests for image decoding: formats, the OpenCV parity contract, normalisation and limits."""

from __future__ import annotations

import io
import struct
import tracemalloc
import warnings
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from cvdeploy.errors import ImageDecodeError, InputError
from cvdeploy.vision.image import (
    DEFAULT_MAX_PIXELS,
    SUPPORTED_FORMATS,
    DecodeLimits,
    image_format,
    load_image,
)

ORIENTATION = 0x0112


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def cv_decode(data: bytes, flags: int = cv2.IMREAD_COLOR) -> np.ndarray:
    """The read path Ultralytics trains with: the reference for every decoded file."""
    return cv2.imdecode(np.frombuffer(data, np.uint8), flags)


def noise_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def assert_bgr(image: np.ndarray, height: int, width: int) -> None:
    assert image.shape == (height, width, 3)
    assert image.dtype == np.uint8
    assert image.flags.c_contiguous


# --- formats and the OpenCV parity contract -------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "params", "lossless"),
    [
        ("JPEG", {"quality": 90}, False),
        ("PNG", {}, True),
        ("BMP", {}, True),
        ("WEBP", {"lossless": True}, True),
        ("TIFF", {}, True),
    ],
)
def test_every_supported_format_round_trips(tmp_path: Path, fmt: str, params: dict[str, object], lossless: bool) -> None:
    rgb = noise_rgb(24, 32)
    data = encode(Image.fromarray(rgb), fmt, **params)
    path = tmp_path / f"image.{fmt.lower()}"
    path.write_bytes(data)

    from_bytes = load_image(data)
    from_path = load_image(path)

    assert_bgr(from_bytes, 24, 32)
    assert np.array_equal(from_bytes, cv_decode(data))
    assert np.array_equal(from_path, from_bytes)
    assert np.array_equal(load_image(str(path)), from_bytes)
    if lossless:
        assert np.array_equal(from_bytes, rgb[:, :, ::-1])
    assert image_format(data) == fmt


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_decode_is_byte_identical_to_cv2_imdecode_and_imread(tmp_path: Path, fmt: str) -> None:
    data = encode(Image.fromarray(noise_rgb(61, 83, seed=1)), fmt)
    path = tmp_path / f"x.{fmt.lower()}"
    path.write_bytes(data)

    expected = cv_decode(data)
    assert np.array_equal(load_image(data), expected)
    assert np.array_equal(load_image(path), cv2.imread(str(path), cv2.IMREAD_COLOR))


def test_bytearray_and_memoryview_sources_decode_like_bytes() -> None:
    data = encode(Image.fromarray(noise_rgb(8, 8)), "PNG")
    expected = load_image(data)
    assert np.array_equal(load_image(bytearray(data)), expected)
    assert np.array_equal(load_image(memoryview(data)), expected)
    # A memoryview over a numpy buffer of another item size is still just encoded bytes.
    padded = np.frombuffer(data + b"\0" * (-len(data) % 4), np.uint32)
    assert np.array_equal(load_image(memoryview(padded).cast("B")[: len(data)]), expected)


# --- EXIF orientation ------------------------------------------------------------------------


def oriented_image() -> Image.Image:
    """40 wide x 20 high, black, with a red 8x8 block in the stored top-left corner."""
    rgb = np.zeros((20, 40, 3), np.uint8)
    rgb[:8, :8] = (255, 0, 0)
    return Image.fromarray(rgb)


def assert_rotated_clockwise(image: np.ndarray) -> None:
    # Orientation 6 means "rotate 90 degrees clockwise to display": 20x40 stored becomes
    # 40 rows x 20 columns, and the stored top-left corner lands at the top-right.
    assert_bgr(image, 40, 20)
    blue, green, red = image[2:6, 14:18].reshape(-1, 3).mean(axis=0)
    assert red > 200 and blue < 60 and green < 60
    assert image[2:6, 2:6].max() < 60  # the top-left is now black
    assert image[34:38, 14:18].max() < 60  # and so is the bottom-right


@pytest.mark.parametrize(
    ("fmt", "params"),
    [("JPEG", {"quality": 95}), ("PNG", {}), ("WEBP", {"lossless": True}), ("TIFF", {})],
)
def test_exif_orientation_6_is_applied(fmt: str, params: dict[str, object]) -> None:
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    data = encode(oriented_image(), fmt, exif=exif.tobytes(), **params)
    # The stored pixels are landscape; the header asks the decoder to rotate them.
    with Image.open(io.BytesIO(data)) as stored:
        assert stored.getexif()[ORIENTATION] == 6

    decoded = load_image(data)

    assert_rotated_clockwise(decoded)
    assert np.array_equal(decoded, cv_decode(data))


def test_exif_orientation_is_applied_to_pil_images() -> None:
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    data = encode(oriented_image(), "PNG", exif=exif.tobytes())
    with Image.open(io.BytesIO(data)) as lazy:
        assert_rotated_clockwise(load_image(lazy))


def test_pillow_fallback_decodes_what_opencv_cannot_and_applies_orientation() -> None:
    # OpenCV cannot read 32-bit integer TIFF samples; Pillow can. Values in 16-bit range
    # are scaled like OpenCV scales 16-bit data (keep the high byte).
    samples = np.full((20, 40), 0xABCD, np.int32)
    samples[:8, :8] = 0xFFFF
    data = encode(Image.fromarray(samples), "TIFF", tiffinfo={ORIENTATION: 6})
    assert cv_decode(data) is None

    decoded = load_image(data)

    assert_bgr(decoded, 40, 20)
    assert (decoded[:8, 12:] == 0xFF).all()
    assert (decoded[8:, :] == 0xAB).all()


def test_float_tiff_is_refused() -> None:
    data = encode(Image.fromarray(np.full((4, 4), 0.5, np.float32)), "TIFF")
    with pytest.raises(ImageDecodeError, match="floating-point"):
        load_image(data)


# --- channel and depth normalisation -------------------------------------------------------


def test_grayscale_png_becomes_three_equal_channels() -> None:
    gray = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    decoded = load_image(encode(Image.fromarray(gray), "PNG"))
    assert_bgr(decoded, 6, 8)
    for channel in range(3):
        assert np.array_equal(decoded[:, :, channel], gray)


def test_rgba_png_drops_alpha_and_keeps_colour_under_transparency() -> None:
    rgba = np.zeros((5, 7, 4), np.uint8)
    rgba[...] = (10, 20, 30, 0)  # fully transparent: the colour must survive, not premultiply
    rgba[0, 0] = (200, 100, 50, 255)
    decoded = load_image(encode(Image.fromarray(rgba), "PNG"))
    assert_bgr(decoded, 5, 7)
    assert tuple(decoded[0, 0]) == (50, 100, 200)
    assert tuple(decoded[3, 3]) == (30, 20, 10)


def test_palette_png_is_expanded() -> None:
    palette = Image.new("P", (6, 4), 3)
    palette.putpalette([0, 0, 0, 1, 2, 3, 4, 5, 6, 200, 100, 50] * 64)
    palette.putpixel((0, 0), 1)
    decoded = load_image(encode(palette, "PNG"))
    assert_bgr(decoded, 4, 6)
    assert tuple(decoded[2, 2]) == (50, 100, 200)
    assert tuple(decoded[0, 0]) == (3, 2, 1)


@pytest.mark.parametrize("ext", [".png", ".tiff"])
def test_16bit_files_keep_the_high_byte(ext: str) -> None:
    gray = np.full((4, 5), 0xABCD, np.uint16)
    gray[0, 0], gray[0, 1] = 0x01FF, 0xFF80  # truncation, not rounding: 1 and 255
    data = cv2.imencode(ext, gray)[1].tobytes()

    decoded = load_image(data)

    assert_bgr(decoded, 4, 5)
    assert (decoded[1:] == 0xAB).all()
    assert tuple(decoded[0, 0]) == (1, 1, 1)
    assert tuple(decoded[0, 1]) == (255, 255, 255)
    assert np.array_equal(decoded, cv_decode(data))


@pytest.mark.parametrize("ext", [".png", ".tiff"])
def test_16bit_colour_files_keep_the_high_byte(ext: str) -> None:
    bgr = np.empty((3, 3, 3), np.uint16)
    bgr[...] = (0xABCD, 0x1234, 0xFF7F)
    decoded = load_image(cv2.imencode(ext, bgr)[1].tobytes())
    assert tuple(decoded[1, 1]) == (0xAB, 0x12, 0xFF)


# --- limits and refusals ---------------------------------------------------------------------


def png_declaring(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose IHDR is patched to declare another size (CRC recomputed)."""
    data = bytearray(encode(Image.new("RGB", (1, 1)), "PNG"))
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13]))  # chunk type + 13 data bytes
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


def test_pixel_limit_refuses_a_huge_header_before_decoding() -> None:
    data = png_declaring(100_000, 100_000)
    tracemalloc.start()
    try:
        # Pillow's own bomb warning or error must not fire first: make warnings errors.
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(ImageDecodeError) as caught:
                load_image(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(caught.value) == (f"image of 100000x100000 = 10000000000 pixels exceeds the limit of {DEFAULT_MAX_PIXELS} pixels")
    assert peak < 1_000_000


def test_pixel_limit_is_inclusive_and_configurable() -> None:
    data = encode(Image.new("RGB", (64, 32)), "PNG")
    assert_bgr(load_image(data, limits=DecodeLimits(max_pixels=2048)), 32, 64)
    with pytest.raises(ImageDecodeError, match="64x32 = 2048 pixels exceeds the limit of 2047"):
        load_image(data, limits=DecodeLimits(max_pixels=2047))


def test_pixel_limit_applies_to_arrays_and_pil_images() -> None:
    limits = DecodeLimits(max_pixels=99)
    with pytest.raises(ImageDecodeError, match="10x10 = 100 pixels"):
        load_image(np.zeros((10, 10, 3), np.uint8), limits=limits)
    with pytest.raises(ImageDecodeError, match="10x10 = 100 pixels"):
        load_image(Image.new("RGB", (10, 10)), limits=limits)


def test_byte_limit(tmp_path: Path) -> None:
    data = encode(Image.fromarray(noise_rgb(16, 16)), "PNG")
    limits = DecodeLimits(max_bytes=len(data) - 1)
    with pytest.raises(ImageDecodeError, match=f"{len(data)} bytes exceeds the limit"):
        load_image(data, limits=limits)
    path = tmp_path / "big.png"
    path.write_bytes(data)
    with pytest.raises(ImageDecodeError, match="exceeds the limit") as caught:
        load_image(path, limits=limits)
    assert str(path) in str(caught.value)
    assert_bgr(load_image(data, limits=DecodeLimits(max_bytes=len(data))), 16, 16)


def test_format_allow_list() -> None:
    ico = encode(Image.new("RGB", (4, 4)), "ICO")
    with pytest.raises(ImageDecodeError) as caught:
        load_image(ico)
    message = str(caught.value)
    assert "ICO" in message and "BMP, GIF, JPEG, PNG, TIFF, WEBP" in message
    gif = encode(Image.new("RGB", (4, 4)), "GIF")
    with pytest.raises(ImageDecodeError, match=r"GIF is not allowed \(allowed: JPEG, PNG\)"):
        load_image(gif, limits=DecodeLimits(formats=frozenset({"png", "jpeg"})))

    jpeg = encode(Image.new("RGB", (4, 4)), "JPEG")
    with pytest.raises(ImageDecodeError, match=r"JPEG is not allowed \(allowed: PNG\)"):
        load_image(jpeg, limits=DecodeLimits(formats=frozenset({"png"})))


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "empty image data"),
        (b"hello, this is text and not an image", "not a supported image"),
        (b"\0" * 64, "not a supported image"),
        (b"\x89PNG\r\n\x1a\n", "not a supported image"),
        (b"BM" + b"\0" * 10, "not a supported image"),
    ],
)
def test_garbage_is_refused(data: bytes, match: str) -> None:
    with pytest.raises(ImageDecodeError, match=match):
        load_image(data)


def test_truncated_jpeg_header_is_refused() -> None:
    data = encode(Image.fromarray(noise_rgb(64, 64)), "JPEG")
    with pytest.raises(ImageDecodeError, match="not a supported image"):
        load_image(data[:100])


@pytest.mark.parametrize(
    ("fmt", "message"),
    [
        ("JPEG", "could not decode JPEG image: data is corrupt or truncated"),
        ("PNG", "could not decode PNG image: data is corrupt or truncated"),
        ("BMP", "could not decode BMP image: data is corrupt or truncated"),
        ("TIFF", "could not decode TIFF image: data is corrupt or truncated"),
        ("WEBP", r"not a supported image \(invalid WEBP header"),  # Pillow's WebP reader needs the whole RIFF up front
    ],
)
def test_truncated_body_is_refused(fmt: str, message: str) -> None:
    # Pinned: a body cut short is refused, never handed on as a half image. cv2.imdecode (the first decoder) returns
    # None on every one of these, and the Pillow fallback refuses truncated files (ImageFile.LOAD_TRUNCATED_IMAGES is
    # off), so the model never sees rows of gray or garbage where the rest of the picture should be.
    data = encode(Image.fromarray(noise_rgb(96, 96)), fmt)
    cut = data[: len(data) * 3 // 5]
    assert image_format(cut) == fmt  # still recognised by its signature: refused for being cut, not as unknown data
    with pytest.raises(ImageDecodeError, match=message):
        load_image(cut)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_corrupted_bytes_only_ever_raise_image_decode_error(fmt: str) -> None:
    data = encode(Image.fromarray(noise_rgb(32, 32)), fmt)
    rng = np.random.default_rng(7)
    for _ in range(25):
        corrupt = bytearray(data)
        for at in rng.integers(0, len(data), 4):
            corrupt[at] = int(rng.integers(0, 256))
        try:
            decoded = load_image(bytes(corrupt))
        except ImageDecodeError as exc:
            assert str(exc).startswith((f"could not decode {fmt} image", "not a supported image")), exc
            continue
        # What does decode is what OpenCV (the training read path) makes of the same bytes, pixel for pixel.
        assert_bgr(decoded, *decoded.shape[:2])
        assert np.array_equal(decoded, cv_decode(bytes(corrupt)))


def test_path_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jpg"
    with pytest.raises(InputError, match="image not found") as caught:
        load_image(missing)
    assert not isinstance(caught.value, ImageDecodeError)
    assert str(missing) in str(caught.value)

    with pytest.raises(InputError, match="directory"):
        load_image(tmp_path)

    text = tmp_path / "notes.png"
    text.write_text("not really a png")
    with pytest.raises(ImageDecodeError, match="not a supported image") as decode_error:
        load_image(str(text))
    assert str(text) in str(decode_error.value)


def test_unsupported_source_type() -> None:
    with pytest.raises(InputError, match="int"):
        load_image(42)  # type: ignore[arg-type]


# --- numpy arrays ----------------------------------------------------------------------------


def test_contiguous_bgr_array_is_returned_without_copy() -> None:
    bgr = noise_rgb(10, 12)
    out = load_image(bgr)
    assert out is bgr  # "returned as is" (load_image's docstring): the very array, not a copy nor a view


def test_non_contiguous_array_is_made_contiguous() -> None:
    bgr = noise_rgb(10, 12)
    view = bgr[:, ::-1]
    out = load_image(view)
    assert out.flags.c_contiguous and np.array_equal(out, view)


@pytest.mark.parametrize("shape", [(6, 7), (6, 7, 1)])
def test_gray_arrays_become_three_channels(shape: tuple[int, ...]) -> None:
    gray = np.arange(42, dtype=np.uint8).reshape(shape)
    out = load_image(gray)
    assert_bgr(out, 6, 7)
    assert np.array_equal(out, np.repeat(gray.reshape(6, 7, 1), 3, axis=2))


def test_four_channel_array_drops_alpha() -> None:
    bgra = np.random.default_rng(2).integers(0, 256, (5, 6, 4), dtype=np.uint8)
    out = load_image(bgra)
    assert_bgr(out, 5, 6)
    assert np.array_equal(out, bgra[:, :, :3])


def test_uint16_array_is_scaled_like_opencv_scales_a_16bit_file() -> None:
    bgr16 = np.random.default_rng(3).integers(0, 65536, (4, 6, 3), dtype=np.uint16)
    bgr16[0, 0] = (0xABCD, 0x01FF, 0xFF80)
    out = load_image(bgr16)
    assert tuple(out[0, 0]) == (0xAB, 0x01, 0xFF)
    assert np.array_equal(out, cv_decode(cv2.imencode(".png", bgr16)[1].tobytes()))


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32, np.bool_])
def test_other_dtypes_are_refused_with_advice(dtype: type) -> None:
    with pytest.raises(InputError, match="uint8 BGR"):
        load_image(np.zeros((4, 4, 3), dtype))


@pytest.mark.parametrize("shape", [(0, 4, 3), (4, 0), (4,), (2, 2, 2, 3), (4, 4, 2), (4, 4, 5)])
def test_bad_array_shapes_are_refused(shape: tuple[int, ...]) -> None:
    with pytest.raises(InputError, match=r"expected an HxW or HxWxC image array.*got shape"):
        load_image(np.zeros(shape, np.uint8))


# --- PIL images ------------------------------------------------------------------------------


def test_pil_rgb_rgba_l_and_p_images() -> None:
    rgb = noise_rgb(5, 6)
    assert np.array_equal(load_image(Image.fromarray(rgb)), rgb[:, :, ::-1])

    rgba = np.dstack([rgb, np.zeros((5, 6), np.uint8)])
    assert np.array_equal(load_image(Image.fromarray(rgba)), rgb[:, :, ::-1])

    gray = rgb[:, :, 0].copy()
    assert np.array_equal(load_image(Image.fromarray(gray)), np.dstack([gray] * 3))

    palette = Image.fromarray(rgb).quantize(colors=8)
    assert np.array_equal(load_image(palette), np.asarray(palette.convert("RGB"))[:, :, ::-1])


def test_pil_16bit_and_cmyk_images() -> None:
    image16 = Image.fromarray(np.full((3, 4), 0xABCD, np.uint16))
    assert image16.mode.startswith("I;16")
    assert (load_image(image16) == 0xAB).all()

    cmyk = Image.new("CMYK", (3, 2), (0, 255, 255, 0))  # pure red
    assert tuple(load_image(cmyk)[1, 1]) == (0, 0, 255)


def test_pil_float_image_is_refused() -> None:
    with pytest.raises(InputError, match="floating-point"):
        load_image(Image.fromarray(np.zeros((3, 3), np.float32)))


# --- image_format and DecodeLimits -----------------------------------------------------------


def test_image_format_sniffs_headers() -> None:
    for fmt in sorted(SUPPORTED_FORMATS):
        params: dict[str, object] = {"lossless": True} if fmt == "WEBP" else {}
        assert image_format(encode(Image.new("RGB", (2, 2)), fmt, **params)) == fmt
    assert image_format(b"") is None
    assert image_format(b"plain text") is None
    assert image_format(memoryview(b"\x89PNG\r\n\x1a\n....")) == "PNG"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_pixels": 0},
        {"max_pixels": 1.5},
        {"max_pixels": True},
        {"max_bytes": 0},
        {"formats": frozenset()},
        {"formats": "PNG"},
        {"formats": frozenset({"ICO"})},
    ],
)
def test_decode_limits_validation(kwargs: dict[str, object]) -> None:
    with pytest.raises(InputError):
        DecodeLimits(**kwargs)  # type: ignore[arg-type]


def test_decode_limits_normalises_format_names() -> None:
    assert DecodeLimits(formats=frozenset({"png", "Jpeg"})).formats == {"PNG", "JPEG"}


def _pages(mode: str, colours: list) -> list[Image.Image]:
    return [Image.new(mode, (30, 20), c) for c in colours]


def test_a_multi_page_tiff_decodes_its_first_page_as_opencv_does() -> None:
    for mode, colours in (("RGB", [(200, 10, 0), (0, 255, 0), (0, 0, 255)]), ("L", [60, 120, 180])):
        pages = _pages(mode, colours)
        buf = io.BytesIO()
        pages[0].save(buf, "TIFF", save_all=True, append_images=pages[1:])
        got = load_image(buf.getvalue())
        first = colours[0] if mode == "RGB" else (colours[0],) * 3
        assert_bgr(got, 20, 30)
        assert got[0, 0].tolist() == list(first[::-1])  # the first page, BGR; not stacked pages
        assert np.array_equal(got, cv2.imdecode(np.frombuffer(buf.getvalue(), np.uint8), cv2.IMREAD_COLOR))


def test_an_animated_gif_decodes_its_first_frame_as_opencv_does() -> None:
    frames = [im.convert("P") for im in _pages("RGB", [(255, 0, 0), (0, 255, 0), (0, 0, 255)])]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    got = load_image(buf.getvalue())
    assert_bgr(got, 20, 30)
    assert got[0, 0].tolist() == [0, 0, 255]  # red, the first frame, in BGR
    assert np.array_equal(got, cv2.imdecode(np.frombuffer(buf.getvalue(), np.uint8), cv2.IMREAD_COLOR))
    still = encode(Image.new("P", (5, 4), 3), "GIF")  # a palette GIF without animation
    assert_bgr(load_image(still), 4, 5)
