"""Letterbox and tensor packing: bit-identical to Ultralytics' LetterBox and BasePredictor.preprocess."""

from __future__ import annotations

import os

os.environ.setdefault("YOLO_OFFLINE", "1")  # before any ultralytics import: no hub, font or asset download

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from ultralytics.data.augment import LetterBox
from ultralytics.engine.predictor import BasePredictor

from cvdeploy.errors import InputError
from cvdeploy.vision.letterbox import LetterboxSpec, letterbox, letterbox_params, preprocess, to_tensor

IMGSZ = [(256, 256), (640, 640), (320, 480)]


def _shapes() -> list[tuple[int, int]]:
    fixed = [
        (1, 700),
        (700, 1),
        (1, 1),
        (2, 900),
        (900, 2),
        (900, 900),
        (256, 256),
        (640, 640),
        (320, 480),
        (480, 320),
        (300, 517),
        (517, 300),
        (33, 33),
        (31, 64),
    ]
    rng = np.random.default_rng(20240611)
    rand = [(int(h), int(w)) for h, w in rng.integers(1, 901, size=(40 - len(fixed), 2))]
    return fixed + rand


SHAPES = _shapes()


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed * 1_000_003 + h * 1009 + w).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _ultralytics_preprocess(images: list[np.ndarray], imgsz: tuple[int, int], *, dynamic: bool = True) -> torch.Tensor:
    """Run the real BasePredictor.preprocess (and its pre_transform) on a CPU predictor without a model file."""
    predictor = BasePredictor.__new__(BasePredictor)
    predictor.imgsz = imgsz
    predictor.device = torch.device("cpu")
    predictor.args = SimpleNamespace(rect=True)
    predictor.model = SimpleNamespace(fp16=False, stride=32, format="pt" if dynamic else "onnx", dynamic=False)
    return predictor.preprocess(images)


def test_shapes_cover_thin_square_and_wide_images() -> None:
    assert len(SHAPES) == 40 and len(set(SHAPES)) > 35
    assert (1, 700) in SHAPES and (700, 1) in SHAPES
    assert any(h == w for h, w in SHAPES) and any(h > w for h, w in SHAPES) and any(h < w for h, w in SHAPES)


@pytest.mark.parametrize("auto", [True, False])
@pytest.mark.parametrize("imgsz", IMGSZ, ids=lambda s: f"{s[0]}x{s[1]}")
def test_letterbox_is_bit_identical_to_ultralytics(imgsz: tuple[int, int], auto: bool) -> None:
    spec = LetterboxSpec(imgsz=imgsz, stride=32)
    ref = LetterBox(imgsz, auto=auto, stride=32)
    for h, w in SHAPES:
        img = _image(h, w)
        before = img.copy()
        ours, params = letterbox(img, spec, auto=auto)
        theirs = ref(image=img.copy())
        assert ours.dtype == np.uint8
        assert np.array_equal(ours, theirs), f"{(h, w)} -> {ours.shape} vs {theirs.shape}"
        assert np.array_equal(img, before), "letterbox must not modify its input"

        p = ref.get_params({"img": img})
        assert (params.top, params.left) == (p["top"], p["left"]), (h, w)
        assert params.new_unpad == tuple(p["new_unpad"]), (h, w)
        assert params.orig_shape == (h, w)
        assert params.input_shape == theirs.shape[:2]
        if not auto:
            assert params.input_shape == imgsz
        else:  # minimal padding: each side a multiple of the stride, never larger than imgsz
            assert all(s % 32 == 0 and s <= t for s, t in zip(params.input_shape, imgsz, strict=True)), (h, w)


def test_letterbox_params_match_without_an_image() -> None:
    """The params alone (what postprocessing keeps) agree with what letterbox() did."""
    spec = LetterboxSpec(imgsz=(640, 640))
    for h, w in SHAPES[:12]:
        for auto in (True, False):
            params, bottom, right = letterbox_params((h, w), spec, auto=auto)
            out, same = letterbox(_image(h, w), spec, auto=auto)
            assert params == same
            assert out.shape[:2] == (params.new_unpad[1] + params.top + bottom, params.new_unpad[0] + params.left + right)


def test_letterbox_auto_defaults_to_spec_rect() -> None:
    img = _image(300, 517)
    rect, _ = letterbox(img, LetterboxSpec(imgsz=(256, 256), rect=True))
    square, _ = letterbox(img, LetterboxSpec(imgsz=(256, 256), rect=False))
    assert rect.shape == (160, 256, 3)
    assert square.shape == (256, 256, 3)
    assert np.array_equal(square, LetterBox((256, 256), auto=False)(image=img))


def test_letterbox_pads_with_pad_value_and_keeps_same_size_images() -> None:
    img = _image(100, 200)
    out, params = letterbox(img, LetterboxSpec(imgsz=(200, 200), pad_value=7), auto=False)
    assert params.new_unpad == (200, 100) and (params.top, params.left) == (50, 0)
    assert (out[:50] == 7).all() and (out[150:] == 7).all()
    same, p = letterbox(_image(256, 256), LetterboxSpec(imgsz=(256, 256)), auto=False)
    assert np.array_equal(same, _image(256, 256)) and (p.top, p.left) == (0, 0)


def test_letterbox_without_scaleup_keeps_small_images_small() -> None:
    img = _image(100, 50)
    out, params = letterbox(img, LetterboxSpec(imgsz=(640, 640), scaleup=False), auto=False)
    assert params.new_unpad == (50, 100)
    assert np.array_equal(out, LetterBox((640, 640), auto=False, scaleup=False)(image=img))


@pytest.mark.parametrize("imgsz", [(640, 640), (320, 480)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("shape", [(480, 640), (1, 700), (517, 300)])
def test_preprocess_one_image_equals_ultralytics(imgsz: tuple[int, int], shape: tuple[int, int]) -> None:
    img = _image(*shape)
    ours, params = preprocess([img], LetterboxSpec(imgsz=imgsz))
    theirs = _ultralytics_preprocess([img], imgsz).numpy()
    assert ours.dtype == np.float32 and theirs.dtype == np.float32
    assert ours.shape == theirs.shape and ours.flags.c_contiguous
    assert np.array_equal(ours, theirs)
    assert len(params) == 1 and params[0].input_shape == ours.shape[2:]


def test_preprocess_same_shape_batch_uses_minimal_padding_like_ultralytics() -> None:
    images = [_image(300, 517, seed=s) for s in range(3)]
    ours, params = preprocess(images, LetterboxSpec(imgsz=(640, 640)))
    theirs = _ultralytics_preprocess(images, (640, 640)).numpy()
    assert ours.shape == (3, 3, 384, 640)  # auto=True: padded to a multiple of 32 only
    assert np.array_equal(ours, theirs)
    assert all(p.input_shape == (384, 640) for p in params)


def test_preprocess_mixed_shape_batch_uses_square_letterbox_like_ultralytics() -> None:
    images = [_image(300, 517, 1), _image(640, 200, 2), _image(1, 700, 3)]
    spec = LetterboxSpec(imgsz=(640, 640))
    ours, params = preprocess(images, spec)
    theirs = _ultralytics_preprocess(images, (640, 640)).numpy()
    assert ours.shape == (3, 3, 640, 640)
    assert np.array_equal(ours, theirs)
    for img, p in zip(images, params, strict=True):
        assert p.input_shape == (640, 640)
        assert p == letterbox_params(img.shape[:2], spec, auto=False)[0]  # auto=False was chosen


def test_preprocess_rect_false_matches_a_static_shape_export() -> None:
    img = _image(300, 517)
    ours, _ = preprocess([img], LetterboxSpec(imgsz=(640, 640), rect=False))
    theirs = _ultralytics_preprocess([img], (640, 640), dynamic=False).numpy()
    assert ours.shape == (1, 3, 640, 640)
    assert np.array_equal(ours, theirs)


def test_to_tensor_channel_order_and_scale() -> None:
    boxed = [letterbox(_image(200, 300, s), LetterboxSpec(imgsz=(256, 256)), auto=False)[0] for s in range(2)]
    rgb = to_tensor(boxed, LetterboxSpec(imgsz=(256, 256)))
    bgr = to_tensor(boxed, LetterboxSpec(imgsz=(256, 256), channel_order="BGR"))
    assert rgb.shape == bgr.shape == (2, 3, 256, 256) and rgb.dtype == bgr.dtype == np.float32
    assert np.array_equal(rgb, bgr[:, ::-1])
    assert np.array_equal(bgr[1, 0], boxed[1][..., 0].astype(np.float32) / np.float32(255))
    assert rgb.min() >= 0.0 and rgb.max() <= 1.0
    raw = to_tensor(boxed, LetterboxSpec(imgsz=(256, 256), channel_order="BGR", scale=1.0))
    assert np.array_equal(raw[0].transpose(1, 2, 0), boxed[0].astype(np.float32))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"imgsz": (0, 10)},
        {"imgsz": (10, -1)},
        {"imgsz": (640,)},
        {"imgsz": (640, 640), "stride": 0},
        {"imgsz": (640, 640), "channel_order": "RGBA"},
    ],
)
def test_letterbox_spec_rejects_bad_values(kwargs: dict) -> None:
    with pytest.raises(InputError):
        LetterboxSpec(**kwargs)


def test_letterbox_spec_error_says_what_is_wrong() -> None:
    with pytest.raises(InputError, match="imgsz"):
        LetterboxSpec(imgsz=(0, 10))
    with pytest.raises(InputError, match="stride"):
        LetterboxSpec(imgsz=(640, 640), stride=0)
    with pytest.raises(InputError, match="RGBA"):
        LetterboxSpec(imgsz=(640, 640), channel_order="RGBA")
