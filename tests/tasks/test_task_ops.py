"""The task decoders' building blocks against Ultralytics' own (torch) functions: mask resampling, cropping and
polygons, RLE, probabilistic IoU and rotated NMS, keypoint scaling, candidate selection with extra channels, and the
classify crop against torchvision's transforms."""

from __future__ import annotations

import os

os.environ.setdefault("YOLO_OFFLINE", "1")

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ultralytics.utils import ops
from ultralytics.utils.metrics import batch_probiou as ul_probiou
from ultralytics.utils.nms import TorchNMS, non_max_suppression

from cvdeploy.vision.keypoints import scale_keypoints
from cvdeploy.vision.letterbox import LetterboxSpec, letterbox_params, preprocess
from cvdeploy.vision.masks import (
    crop_mask,
    masks2segments,
    masks_on_image,
    process_mask,
    process_mask_native,
    resize_bilinear,
    rle_decode,
    rle_encode,
    scale_coords,
)
from cvdeploy.vision.obb import _BLOCK, batch_probiou, nms_rotated, regularize_rboxes, scale_rboxes, xywhr2xyxyxyxy
from cvdeploy.vision.postprocess import DetectOptions, select_candidates, select_end2end


@pytest.mark.parametrize(("src", "dst"), [((16, 24), (64, 96)), ((64, 40), (256, 160)), ((60, 90), (37, 51)), ((8, 8), (8, 8))])
def test_resize_bilinear_is_torch_interpolate(src: tuple[int, int], dst: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, *src)).astype(np.float32)  # more channels than one cv2.resize call takes
    ours = resize_bilinear(x, dst)
    theirs = F.interpolate(torch.from_numpy(x)[None], dst, mode="bilinear")[0].numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4)  # OpenCV and torch round the weights of odd ratios apart


def _proto_case(seed: int, n: int, input_shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    h, w = input_shape
    protos = rng.normal(size=(32, h // 4, w // 4)).astype(np.float32)
    coeffs = rng.normal(size=(n, 32)).astype(np.float32)
    xy = rng.uniform(-10, [w, h], size=(n, 2))
    wh = rng.uniform(4, [w / 2, h / 2], size=(n, 2))
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    return protos, coeffs, boxes


@pytest.mark.parametrize(("seed", "n", "shape"), [(6, 1, (256, 256)), (1, 37, (256, 160)), (2, 140, (192, 320))])
def test_process_mask_is_ultralytics(seed: int, n: int, shape: tuple[int, int]) -> None:
    protos, coeffs, boxes = _proto_case(seed, n, shape)
    ours = process_mask(protos, coeffs, boxes, shape)
    theirs = ops.process_mask(torch.from_numpy(protos), torch.from_numpy(coeffs), torch.from_numpy(boxes), shape, upsample=True).numpy()
    assert ours.dtype == np.uint8 and ours.shape == theirs.shape == (n, *shape)
    assert ours.sum() > 0 and (ours != theirs).sum() <= max(2, 1e-5 * ours.size)  # only logits within rounding of 0
    assert not ours[:, :, : int(max(0, boxes[:, 0].min()))].any()  # cropped left of every box


@pytest.mark.parametrize(("input_shape", "orig"), [((256, 256), (256, 256)), ((256, 160), (355, 207)), ((160, 256), (300, 517)),
                                                   ((224, 256), (173, 205)), ((256, 192), (293, 196))])
def test_process_mask_native_is_ultralytics(input_shape: tuple[int, int], orig: tuple[int, int]) -> None:
    protos, coeffs, _ = _proto_case(3, 23, input_shape)
    rng = np.random.default_rng(4)
    xy = rng.uniform(0, [orig[1], orig[0]], size=(23, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 150, size=(23, 2))], 1).astype(np.float32)
    ours = process_mask_native(protos, coeffs, boxes, orig)
    theirs = ops.process_mask_native(torch.from_numpy(protos), torch.from_numpy(coeffs), torch.from_numpy(boxes), orig).numpy()
    assert ours.shape == theirs.shape == (23, *orig)
    assert ours.sum() > 0 and (ours != theirs).sum() <= max(2, 1e-5 * ours.size)


def test_masks_on_image_is_ultralytics_scale_masks() -> None:
    protos, coeffs, boxes = _proto_case(5, 9, (256, 160))
    masks = process_mask(protos, coeffs, boxes, (256, 160))
    theirs = ops.scale_masks(torch.from_numpy(masks[None].astype(np.float32)), (355, 207))[0].numpy() > 0.5
    ours = masks_on_image(masks, (355, 207)).astype(bool)
    assert ours.sum() > 1000 and (ours != theirs).sum() <= 1e-4 * ours.size  # pixels resampled to exactly 0.5 may tip
    assert masks_on_image(masks, (256, 160)) is masks  # already the image's size


def test_crop_mask_keeps_the_half_open_box() -> None:
    m = np.ones((1, 10, 10), np.uint8)
    crop_mask(m, np.array([[2.0, 3.0, 5.0, 7.5]], np.float32))
    assert m[0].nonzero()[0].min() == 3 and m[0].nonzero()[0].max() == 7
    assert m[0].nonzero()[1].min() == 2 and m[0].nonzero()[1].max() == 4


def test_polygons_are_ultralytics_including_merged_contours() -> None:
    masks = np.zeros((4, 120, 90), np.uint8)
    masks[0, 10:40, 10:30] = 1
    masks[1, 5:20, 5:20] = masks[1, 50:70, 40:80] = masks[1, 90:110, 10:25] = 1  # three pieces: joined into one outline
    masks[2, 30:31, 30:60] = 1
    for strategy in ("all", "largest"):
        ours = masks2segments(masks, strategy)
        theirs = ops.masks2segments(masks, strategy)
        assert len(ours) == 4 and ours[3].shape == (0, 2)
        for a, b in zip(ours, theirs, strict=True):
            np.testing.assert_array_equal(a, b)
    xy = scale_coords((120, 90), ours[1], (300, 200))
    np.testing.assert_allclose(xy, ops.scale_coords((120, 90), torch.from_numpy(ours[1].copy()), (300, 200)).numpy(), atol=1e-4)
    np.testing.assert_allclose(scale_coords((120, 90), ours[1], (300, 200), normalize=True), xy / [200, 300], atol=1e-6)


def test_rle_is_coco() -> None:
    from faster_coco_eval.core import mask as coco_mask

    rng = np.random.default_rng(0)
    for h, w in ((1, 1), (7, 5), (64, 48), (300, 517)):
        for density in (0.0, 0.05, 0.5, 1.0):
            m = (rng.random((h, w)) < density).astype(np.uint8)
            ours = rle_encode(m)
            theirs = coco_mask.encode(np.asfortranarray(m))
            counts = theirs["counts"].decode() if isinstance(theirs["counts"], bytes) else theirs["counts"]
            assert ours == {"size": [h, w], "counts": counts}
            np.testing.assert_array_equal(rle_decode(ours), m)
            plain = rle_encode(m, compressed=False)
            assert sum(plain["counts"]) == h * w
            np.testing.assert_array_equal(rle_decode(plain), m)


def _rboxes(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.uniform(0, 400, (max(1, n // 6), 2))
    xy = centers[rng.integers(0, len(centers), n)] + rng.normal(0, 6, (n, 2))
    wh = rng.uniform(5, 80, (n, 2))
    angle = rng.uniform(-np.pi / 4, 3 * np.pi / 4, (n, 1))
    scores = ((rng.permutation(n) + 1) / (n + 1)).astype(np.float32)
    return np.concatenate([xy, wh, angle], 1).astype(np.float32), scores


def test_probiou_is_ultralytics() -> None:
    a, _ = _rboxes(60, 0)
    b, _ = _rboxes(45, 1)
    np.testing.assert_allclose(batch_probiou(a, b), ul_probiou(torch.from_numpy(a), torch.from_numpy(b)).numpy(), atol=1e-5)


@pytest.mark.parametrize(("n", "thr"), [(0, 0.5), (1, 0.5), (50, 0.3), (300, 0.7), (_BLOCK + 700, 0.5)])
def test_rotated_nms_is_ultralytics_fast_nms(n: int, thr: float) -> None:
    boxes, scores = _rboxes(n, n)
    ours = nms_rotated(boxes, scores, thr)
    theirs = TorchNMS.fast_nms(torch.from_numpy(boxes), torch.from_numpy(scores), thr, iou_func=ul_probiou).numpy()
    assert ours.tolist() == theirs.tolist()
    if n >= 300:
        assert 0 < len(ours) < n  # clusters are suppressed: not a trivial comparison
    assert nms_rotated(boxes, scores, thr, max_keep=3).tolist() == theirs[:3].tolist()


def test_rotated_box_geometry_is_ultralytics() -> None:
    boxes, _ = _rboxes(40, 7)
    np.testing.assert_allclose(xywhr2xyxyxyxy(boxes), ops.xywhr2xyxyxyxy(torch.from_numpy(boxes)).numpy(), atol=1e-4)
    np.testing.assert_allclose(regularize_rboxes(boxes), ops.regularize_rboxes(torch.from_numpy(boxes)).numpy(), atol=1e-6)
    params, _, _ = letterbox_params((300, 517), LetterboxSpec(imgsz=(256, 256)), auto=True)
    theirs = boxes.copy()
    theirs[:, :4] = ops.scale_boxes(params.input_shape, torch.from_numpy(boxes[:, :4].copy()), (300, 517), xywh=True).numpy()
    np.testing.assert_allclose(scale_rboxes(boxes, params), theirs, atol=1e-4)


def test_keypoints_scale_and_clip_as_ultralytics() -> None:
    rng = np.random.default_rng(3)
    params, _, _ = letterbox_params((355, 207), LetterboxSpec(imgsz=(256, 256)), auto=True)
    kpts = np.concatenate([rng.uniform(-20, 280, (5, 17, 2)), rng.random((5, 17, 1))], 2).astype(np.float32)
    theirs = ops.scale_coords(params.input_shape, torch.from_numpy(kpts.copy()), (355, 207)).numpy()
    np.testing.assert_allclose(scale_keypoints(kpts, params), theirs, atol=1e-4)
    assert (scale_keypoints(kpts, params)[..., 2] == kpts[..., 2]).all()


@pytest.mark.parametrize("rotated", [False, True])
def test_candidates_carry_extra_channels_as_ultralytics_nms(rotated: bool) -> None:
    rng = np.random.default_rng(11)
    nc, extra, anchors = 3, 1 if rotated else 5, 2000
    xy = rng.uniform(0, 256, (2, anchors))
    wh = rng.uniform(4, 60, (2, anchors))
    scores = rng.random((nc, anchors)) ** 3
    tail = rng.uniform(-np.pi / 4, 3 * np.pi / 4, (1, anchors)) if rotated else rng.normal(size=(extra, anchors))
    out = np.concatenate([xy, wh, scores, tail]).astype(np.float32)
    options = DetectOptions(conf=0.25, iou=0.45, max_det=100)
    c = select_candidates(out, options, nc=nc, rotated=rotated)
    (theirs,) = non_max_suppression(torch.from_numpy(out[None]), 0.25, 0.45, max_det=100, nc=nc, rotated=rotated)
    theirs = theirs.numpy()
    assert 10 < len(c) == len(theirs)
    np.testing.assert_allclose(c.boxes, theirs[:, :4], atol=1e-4)
    np.testing.assert_allclose(c.confidence, theirs[:, 4])
    assert (c.class_id == theirs[:, 5]).all()
    np.testing.assert_allclose(c.extra, theirs[:, 6:], atol=1e-6)


def test_end2end_rows_as_ultralytics() -> None:
    rng = np.random.default_rng(5)
    rows = np.concatenate([rng.uniform(0, 200, (300, 4)), np.sort(rng.random((300, 1)), 0)[::-1], rng.integers(0, 4, (300, 1)),
                           rng.normal(size=(300, 7))], 1).astype(np.float32)
    for classes in (None, (1, 3)):
        c = select_end2end(rows, DetectOptions(conf=0.3, max_det=50, classes=classes))
        (theirs,) = non_max_suppression(torch.from_numpy(rows[None]), 0.3, 0.7, classes=list(classes) if classes else None,
                                        max_det=50, end2end=True)
        np.testing.assert_array_equal(np.concatenate([c.boxes, c.confidence[:, None], c.class_id[:, None], c.extra], 1), theirs.numpy())


@pytest.mark.parametrize("imgsz", [(96, 96), (128, 96)])
def test_center_crop_is_torchvision_classify_transforms(imgsz: tuple[int, int]) -> None:
    from PIL import Image
    from ultralytics.data.augment import classify_transforms

    rng = np.random.default_rng(2)
    spec = LetterboxSpec(imgsz=imgsz, mode="center_crop", rect=False)
    transform = classify_transforms(list(imgsz))
    for h, w in ((96, 96), (50, 70), (301, 97), (97, 301), (128, 96), (1, 40)):
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        tensor, (params,) = preprocess([img], spec)
        expected = transform(Image.fromarray(np.ascontiguousarray(img[..., ::-1]))).numpy()[None]
        assert tensor.shape == expected.shape and params.input_shape == imgsz
        np.testing.assert_allclose(tensor, expected, atol=1e-6)  # ToTensor multiplies by 1/255, cvdeploy divides
