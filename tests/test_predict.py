"""The Predictor: one image, a batch, async, option overrides, timings and clear errors."""

from __future__ import annotations

import asyncio
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from cvdeploy import Predictor
from cvdeploy.errors import ImageDecodeError, InputError


@pytest.fixture(scope="module")
def predictor(demo_bundle: Path) -> Predictor:
    return Predictor(demo_bundle)


@pytest.fixture(scope="module")
def val_images(shapes_data: Path) -> list[Path]:
    return sorted((shapes_data / "images" / "val").glob("*.jpg"))


def _same(a, b) -> None:
    assert len(a.detections) == len(b.detections)
    np.testing.assert_allclose(a.detections.xyxy, b.detections.xyxy, atol=0.05)
    np.testing.assert_allclose(a.detections.confidence, b.detections.confidence, atol=1e-4)
    np.testing.assert_array_equal(a.detections.class_id, b.detections.class_id)


def test_one_image_from_every_kind_of_source(predictor: Predictor, val_images: list[Path]) -> None:
    path = val_images[0]
    by_path = predictor.predict(path)
    assert by_path.task == "detect" and by_path.source == str(path)
    assert len(by_path.detections) > 0
    h, w = cv2.imread(str(path)).shape[:2]
    assert by_path.orig_shape == (h, w)
    assert (by_path.detections.xyxy[:, [0, 2]] <= w).all() and (by_path.detections.xyxy[:, [1, 3]] <= h).all()
    _same(by_path, predictor.predict(path.read_bytes()))
    _same(by_path, predictor.predict(cv2.imread(str(path))))
    _same(by_path, predictor.predict(Image.open(path)))
    _same(by_path, predictor.predict(str(path)))


def test_detections_match_the_labels_of_the_shapes_set(predictor: Predictor, shapes_data: Path, val_images: list[Path]) -> None:
    """The demo model finds the drawn shapes: most labelled boxes have a same-class detection with IoU > 0.5."""
    hits = total = 0
    for path in val_images[:15]:
        r = predictor.predict(path)
        h, w = r.orig_shape
        for line in (shapes_data / "labels" / "val" / f"{path.stem}.txt").read_text().split("\n"):
            if not line.strip():
                continue
            c, cx, cy, bw, bh = map(float, line.split())
            box = np.array([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h])
            d = r.detections[r.detections.class_id == int(c)]
            total += 1
            if len(d):
                lt = np.maximum(d.xyxy[:, :2], box[:2])
                rb = np.minimum(d.xyxy[:, 2:], box[2:])
                inter = np.prod(np.clip(rb - lt, 0, None), 1)
                iou = inter / (d.area + (box[2] - box[0]) * (box[3] - box[1]) - inter)
                hits += bool((iou > 0.5).any())
    assert total > 30 and hits / total > 0.8


def test_a_list_is_batched_and_matches_one_by_one(predictor: Predictor, val_images: list[Path]) -> None:
    same_shape = [cv2.imread(str(val_images[0]))] * 3
    batch = predictor.predict(same_shape)
    assert isinstance(batch, list) and len(batch) == 3
    for r in batch:
        _same(r, predictor.predict(same_shape[0]))
    mixed = predictor.predict(val_images[:5])  # different shapes: square letterbox, still the same objects
    assert [r.source for r in mixed] == [str(p) for p in val_images[:5]]
    for r, p in zip(mixed, val_images[:5], strict=True):
        single = predictor.predict(p)
        assert abs(len(r.detections) - len(single.detections)) <= 1


def test_max_batch_chunks_the_engine_calls(demo_bundle: Path, val_images: list[Path], tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # Five different pictures, each pasted (undistorted) on a gray canvas of one shape: a same-shape chunk is
    # letterboxed exactly like a single image (minimal padding), so every batched result must equal predicting
    # that image alone. (Mixed shapes would be letterboxed square in a batch: see the test above.)
    paths = []
    for i, src in enumerate(val_images[:5]):
        image = cv2.imread(str(src))
        canvas = np.full((384, 480, 3), 114, np.uint8)
        canvas[: image.shape[0], : image.shape[1]] = image
        paths.append(tmp_path / f"{i}-{src.stem}.png")  # PNG: lossless, the pixels read back are the ones written
        cv2.imwrite(str(paths[-1]), canvas)
    p = Predictor(demo_bundle, max_batch=2)
    assert p.max_batch == 2
    batch_sizes: list[int] = []
    real_run = p.engine.run  # the real ONNX Runtime engine, counted on its way through

    def counting_run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        (tensor,) = feeds.values()
        batch_sizes.append(tensor.shape[0])
        return real_run(feeds)

    monkeypatch.setattr(p.engine, "run", counting_run)
    results = p.predict(paths)
    assert batch_sizes == [2, 2, 1]  # chunks of at most max_batch, in order, and nothing run twice
    assert [r.source for r in results] == [str(q) for q in paths]
    singles = [p.predict(q) for q in paths]
    assert batch_sizes[3:] == [1] * 5
    for r, alone in zip(results, singles, strict=True):
        assert r.orig_shape == alone.orig_shape == (384, 480)
        assert len(r.detections) > 0
        _same(r, alone)  # same boxes in the same order (sorted by confidence), same classes
    # No image's detections leaked into its neighbour's result: the five pictures differ, so do their results.
    assert len({tuple(np.round(r.detections.xyxy[0], 1)) for r in results}) == 5


def test_every_result_carries_stage_timings(predictor: Predictor, val_images: list[Path]) -> None:
    r = predictor.predict(val_images[1])
    t = r.timings.to_dict()
    assert set(t) == {"decode", "preprocess", "queue", "infer", "postprocess", "total"}
    assert t["queue"] == 0.0  # no batcher in front of a Predictor: nothing waits for a batch
    assert all(t[s] > 0 for s in ("decode", "preprocess", "infer", "postprocess", "total")), t
    assert t["total"] == pytest.approx(t["decode"] + t["preprocess"] + t["queue"] + t["infer"] + t["postprocess"], abs=0.01)


def test_async_predict(predictor: Predictor, val_images: list[Path]) -> None:
    async def many():
        return await asyncio.gather(*(predictor.apredict(p) for p in val_images[:4]))

    results = asyncio.run(many())
    for r, p in zip(results, val_images[:4], strict=True):
        _same(r, predictor.predict(p))


def test_overrides_conf_max_det_classes(predictor: Predictor, val_images: list[Path]) -> None:
    path = val_images[2]
    base = predictor.predict(path, conf=0.05)
    assert len(predictor.predict(path, conf=0.05, max_det=1).detections) == 1
    assert (predictor.predict(path, conf=0.6).detections.confidence > 0.6).all()
    present = int(base.detections.class_id[0])
    only = predictor.predict(path, conf=0.05, classes=[present])
    assert len(only.detections) > 0 and set(only.detections.class_id.tolist()) == {present}
    with pytest.raises(InputError, match="unknown prediction option"):
        predictor.predict(path, confidence=0.3)
    with pytest.raises(InputError, match="conf must be between 0 and 1"):
        predictor.predict(path, conf=2.0)


def test_constructor_defaults_and_validation(demo_bundle: Path) -> None:
    p = Predictor(demo_bundle, conf=0.4, iou=0.5, max_det=10, classes=[1])
    assert (p.options.conf, p.options.iou, p.options.max_det, p.options.classes) == (0.4, 0.5, 10, (1,))
    with pytest.raises(InputError, match="has no variant 'onnx-int8'"):
        Predictor(demo_bundle, "onnx-int8")
    with pytest.raises(InputError, match="max_batch"):
        Predictor(demo_bundle, max_batch=0)


def test_threads_override_the_engine_setting(demo_bundle: Path, val_images: list[Path]) -> None:
    one = Predictor(demo_bundle, threads=1)
    assert one.engine.options.intra_op_threads == 1
    assert one.predict(val_images[0]).to_dict()["detections"] == Predictor(demo_bundle).predict(val_images[0]).to_dict()["detections"]
    with pytest.raises(InputError, match="threads must be >= 0"):
        Predictor(demo_bundle, threads=-1)


def test_imgsz_override_on_a_dynamic_model(demo_bundle: Path) -> None:
    img = np.full((300, 500, 3), 114, np.uint8)
    p = Predictor(demo_bundle, imgsz=320)
    tensor, _ = p.preprocess([img])
    assert p.spec.imgsz == (320, 320) and tensor.shape == (1, 3, 192, 320)  # minimal-padding rectangle at 320
    assert p.predict(img).orig_shape == (300, 500)
    with pytest.raises(InputError, match="multiple of the stride"):
        Predictor(demo_bundle, imgsz=100)


def test_bad_images_raise_clear_errors(predictor: Predictor, tmp_path: Path) -> None:
    with pytest.raises(ImageDecodeError):
        predictor.predict(b"definitely not an image")
    with pytest.raises(InputError, match="not found"):
        predictor.predict(tmp_path / "missing.jpg")
    with pytest.raises(InputError, match="no images"):
        predictor.predict([])


def test_wrong_input_shape_to_the_engine_is_refused(predictor: Predictor) -> None:
    with pytest.raises(InputError, match="expected shape"):
        predictor.infer(np.zeros((1, 4, 64, 64), np.float32))
    with pytest.raises(InputError, match="expected dtype float32"):
        predictor.infer(np.zeros((1, 3, 64, 64), np.float64))


def test_threads_reach_every_engine_kind() -> None:
    """`Predictor(threads=N)` sets the thread count of whichever engine runs the variant (none silently ignores it)."""
    from cvdeploy.predict import _with_threads
    from cvdeploy.runtime.litert import LiteRtOptions
    from cvdeploy.runtime.ncnn import NcnnOptions
    from cvdeploy.runtime.onnxruntime import OrtOptions
    from cvdeploy.runtime.openvino import OvOptions

    assert _with_threads(None, "onnxruntime", 3) == OrtOptions(intra_op_threads=3)
    assert _with_threads(None, "openvino", 3).num_threads == 3 and isinstance(_with_threads(None, "openvino", 3), OvOptions)
    assert _with_threads(NcnnOptions(precision="f16"), "ncnn", 3) == NcnnOptions(num_threads=3, precision="f16")
    assert _with_threads(None, "litert", 3) == LiteRtOptions(num_threads=3)
