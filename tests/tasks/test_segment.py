"""Segment: on the same ONNX, cvdeploy's boxes, masks and polygons match `ultralytics.YOLO(onnx).predict`, at the
network input's size (Ultralytics' default) and at the image's (`retina_masks=True`); the build records both outputs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from cvdeploy import Bundle, Predictor
from cvdeploy.vision.masks import rle_decode

pytestmark = pytest.mark.slow
CONF = 0.25


@pytest.fixture(scope="module")
def seg_bundle(build_task_bundle: Callable[..., Path]) -> Path:
    return build_task_bundle("yolo11n-seg.yaml")


def test_build_checks_both_outputs_and_records_the_task(seg_bundle: Path) -> None:
    b = Bundle.load(seg_bundle)
    m = b.manifest
    assert m.task == "segment" and m.task_info is not None and m.task_info.mask_channels == 32
    assert [o.name for o in m.outputs] == ["output0", "output1"]
    parity = m.variants["onnx-fp32"].parity
    assert parity is not None and parity.passed and set(parity.outputs) == {"output0", "output1"}
    assert parity.outputs["output0"].max_abs_scores <= 1e-3 and parity.outputs["output0"].max_abs_extra is not None
    assert parity.outputs["output1"].max_abs_scaled is not None and parity.outputs["output1"].max_abs_scaled <= 1e-3
    case = next(b.golden())
    assert set(case.outputs) == {"output0", "output1"} and case.outputs["output1"].ndim == 4


@pytest.mark.parametrize("retina", [False, True], ids=["input-size", "retina"])
def test_masks_match_ultralytics_on_the_same_onnx(seg_bundle: Path, task_images: list[Path], match_boxes: Callable,
                                                  retina: bool) -> None:
    from ultralytics import YOLO

    ours = Predictor(seg_bundle, conf=CONF)
    theirs = YOLO(str(Bundle.load(seg_bundle).variant_path()), task="segment")
    total, worst_iou, worst_conf, polygons_equal = 0, 1.0, 0.0, 0
    for path in task_images:
        r = ours.predict(path, retina_masks=retina)
        u = theirs.predict(str(path), imgsz=256, conf=CONF, retina_masks=retina, verbose=False)[0]
        n = 0 if u.boxes is None else len(u.boxes)
        assert len(r.boxes) == n, f"{path.name}: {len(r.boxes)} detections, ultralytics {n}"
        if not n:
            assert r.masks is not None and len(r.masks) == 0
            continue
        total += n
        best = match_boxes(r.boxes.xyxy, r.boxes.cls, u.boxes.xyxy.numpy(), u.boxes.cls.numpy())
        worst_conf = max(worst_conf, float(np.abs(r.boxes.conf - u.boxes.conf.numpy()[best]).max()))
        ours_m = r.masks.data.astype(bool)
        theirs_m = u.masks.data.numpy()[best].astype(bool)
        assert ours_m.shape == theirs_m.shape, f"{path.name}: masks {ours_m.shape}, ultralytics {theirs_m.shape}"
        if retina:
            assert ours_m.shape[1:] == r.orig_shape
        iou = (ours_m & theirs_m).sum((1, 2)) / np.maximum((ours_m | theirs_m).sum((1, 2)), 1)
        worst_iou = min(worst_iou, float(iou.min()))
        for i, j in enumerate(best):
            if (ours_m[i] == theirs_m[i]).all():
                np.testing.assert_allclose(r.masks.xy[i], u.masks.xy[j], atol=1e-3)
                np.testing.assert_allclose(r.masks.xyn[i], u.masks.xyn[j], atol=1e-6)
                polygons_equal += 1
    print(f"\nsegment parity ({'retina' if retina else 'input-size'} masks): {total} masks on {len(task_images)} images, "
          f"worst mask IoU {worst_iou:.4f}, worst |dconf| {worst_conf:.2e}, identical polygons {polygons_equal}/{total}")
    assert total >= 100  # not vacuous
    assert worst_conf <= 1e-3
    assert worst_iou >= 0.98
    assert polygons_equal >= 0.9 * total


def test_to_dict_gives_rle_and_polygons_on_the_image(seg_bundle: Path, task_images: list[Path]) -> None:
    p = Predictor(seg_bundle, conf=CONF)
    r = next(r for r in (p.predict(path) for path in task_images) if len(r.detections) >= 2)
    d = r.to_dict()
    h, w = r.orig_shape
    on_image = r.masks.on_image
    assert on_image.shape == (len(r.detections), h, w)
    for row, mask, poly in zip(d["detections"], on_image, r.masks.xy, strict=True):
        assert row["mask"]["size"] == [h, w] and isinstance(row["mask"]["counts"], str)
        np.testing.assert_array_equal(rle_decode(row["mask"]), mask)
        assert np.allclose(row["polygon"], poly, atol=0.006) and len(row["polygon"]) >= 3
        xs, ys = np.array(row["polygon"]).T
        box = row["box"]
        assert box["x1"] - 1 <= xs.min() and xs.max() <= box["x2"] + 1 and box["y1"] - 1 <= ys.min() and ys.max() <= box["y2"] + 1
    # The masks on the image are Ultralytics' `scale_masks` of the input-size masks (what its COCO export encodes), > 0.5.
    import torch
    from ultralytics.utils.ops import scale_masks

    theirs = scale_masks(torch.from_numpy(r.masks.data[None].astype(np.float32)), r.orig_shape)[0].numpy() > 0.5
    assert (on_image.astype(bool) != theirs).sum() <= 1e-4 * on_image.size  # a pixel resampled to exactly 0.5 may tip
    s = r.summary()
    assert "segments" in s[0] and len(s[0]["segments"]["x"]) == len(r.masks.xy[0])


def test_finish_needs_both_outputs(seg_bundle: Path, task_images: list[Path]) -> None:
    from cvdeploy.errors import InputError

    p = Predictor(seg_bundle)
    prepared = p.prepare([p.decode(task_images[0])])
    with pytest.raises(InputError, match="two outputs"):
        p.finish(prepared, p.infer(prepared.tensor))
    (r,) = p.finish(prepared, p.infer_all(prepared.tensor))
    assert r.task == "segment" and r.masks is not None


def test_plot_draws_the_masks(seg_bundle: Path, task_images: list[Path]) -> None:
    p = Predictor(seg_bundle, conf=CONF)
    r = next(r for r in (p.predict(path) for path in task_images) if len(r.detections))
    with_masks, without = r.plot(boxes=False), r.plot(boxes=False, masks=False)
    assert (without == r.orig_img).all()
    changed = (with_masks != r.orig_img).any(2)
    assert changed[r.masks.on_image.any(0).astype(bool)].mean() > 0.9 and not changed[~r.masks.on_image.any(0).astype(bool)].any()


def test_fp16_variant_of_a_segment_bundle(seg_bundle: Path, tmp_path: Path, task_images: list[Path]) -> None:
    import shutil

    from cvdeploy.build.variants import add_variants

    copy = tmp_path / "seg.cvd"
    shutil.copytree(seg_bundle, copy)
    outcomes = {o.name: o for o in add_variants(copy, ["onnx-fp16"])}
    fp16 = outcomes["onnx-fp16"]
    assert fp16.written, fp16.reason
    assert set(fp16.variant.parity.outputs) == {"output0", "output1"} and fp16.variant.metrics["box_agreement"] >= 0.98
    a, b = Predictor(copy, "onnx-fp32", conf=CONF), Predictor(copy, "onnx-fp16", conf=CONF)
    ra, rb = a.predict(task_images[0]), b.predict(task_images[0])
    assert len(ra.detections) == len(rb.detections) > 0
    inter = (ra.masks.data & rb.masks.data).sum()
    assert inter / (ra.masks.data | rb.masks.data).sum() >= 0.95
