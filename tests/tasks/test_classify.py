"""Classify: the same tensor as Ultralytics' classify preprocessing (resize the shorter side with Pillow, crop the
centre), and on the same ONNX the same probabilities, top-1 and top-5 as `ultralytics.YOLO(onnx).predict`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from cvdeploy import Bundle, Predictor

pytestmark = pytest.mark.slow
IMGSZ = 192  # the scenes are 160-384 px: some images are enlarged, most reduced


@pytest.fixture(scope="module")
def cls_bundle(build_task_bundle: Callable[..., Path]) -> Path:
    return build_task_bundle("yolo11n-cls.yaml", imgsz=IMGSZ)


def test_build_records_center_crop_preprocessing(cls_bundle: Path) -> None:
    m = Bundle.load(cls_bundle).manifest
    assert m.task == "classify" and m.preprocess.resize == "center_crop" and m.preprocess.interpolation == "pil_bilinear"
    assert m.preprocess.imgsz == (IMGSZ, IMGSZ)
    parity = m.variants["onnx-fp32"].parity
    assert parity is not None and parity.passed and parity.outputs["output0"].max_abs_scores <= 1e-5


def test_preprocessing_is_ultralytics_tensor_for_tensor(cls_bundle: Path, task_images: list[Path]) -> None:
    from ultralytics.models.yolo.classify import ClassificationPredictor

    onnx = Bundle.load(cls_bundle).variant_path()
    theirs = ClassificationPredictor(overrides={"model": str(onnx), "imgsz": IMGSZ, "verbose": False, "task": "classify"})
    theirs.setup_model(str(onnx))
    theirs.setup_source(str(task_images[0]))
    ours = Predictor(cls_bundle)
    for path in task_images[:12]:
        img = ours.decode(path)
        tensor = ours.prepare([img]).tensor
        expected = theirs.preprocess([img]).numpy()
        assert tensor.shape == expected.shape == (1, 3, IMGSZ, IMGSZ)
        np.testing.assert_array_equal(tensor, expected)
    # Different shapes in one batch: each image is cropped on its own.
    imgs = [ours.decode(p) for p in task_images[:3]]
    np.testing.assert_array_equal(ours.prepare(imgs).tensor, theirs.preprocess(imgs).numpy())


def test_probabilities_match_ultralytics_on_the_same_onnx(cls_bundle: Path, task_images: list[Path]) -> None:
    from ultralytics import YOLO

    onnx = Bundle.load(cls_bundle).variant_path()
    theirs = YOLO(str(onnx), task="classify")
    worst, top1s = 0.0, set()
    for source in (cls_bundle, onnx):  # the bundle, and a plain .onnx (classify preprocessing from the task alone)
        ours = Predictor(source)
        for path in task_images:
            r = ours.predict(path)
            u = theirs.predict(str(path), imgsz=IMGSZ, verbose=False)[0].probs
            worst = max(worst, float(np.abs(r.probs.data - u.data.numpy()).max()))
            assert r.probs.top1 == u.top1 and r.probs.top5 == list(u.top5)
            assert abs(float(r.probs.top1conf) - float(u.top1conf)) <= 1e-4
            np.testing.assert_allclose(r.probs.top5conf, u.top5conf.numpy(), atol=1e-4)
            top1s.add(r.probs.top1)
    print(f"\nclassify parity: {len(task_images)} images x 2 (bundle, .onnx), worst |dprob| {worst:.2e}, top-1 classes {sorted(top1s)}")
    assert worst <= 1e-4
    assert len(top1s) >= 2  # the probabilities move with the image: the comparison is not vacuous


def test_classify_result_reads_like_ultralytics(cls_bundle: Path, task_images: list[Path]) -> None:
    r = Predictor(cls_bundle).predict(task_images[0])
    assert r.boxes is None and r.masks is None and r.keypoints is None and r.obb is None
    assert r.probs.data.shape == (6,) and abs(float(r.probs.data.sum()) - 1) < 1e-5
    d = r.to_dict()
    assert [c["class_id"] for c in d["classes"]] == r.probs.top5 and len(d["probs"]) == 6
    assert d["classes"][0]["confidence"] == pytest.approx(float(r.probs.top1conf), abs=1e-5)
    assert [s["class"] for s in r.summary()] == r.probs.top5
    assert r.verbose().startswith(r.names[r.probs.top1])


def test_variants_of_a_classify_bundle(cls_bundle: Path, tmp_path: Path) -> None:
    import shutil

    from cvdeploy.build.variants import add_variants
    from cvdeploy.errors import InputError

    copy = tmp_path / "cls.cvd"
    shutil.copytree(cls_bundle, copy)
    (tmp_path / "data.yaml").write_text("path: .\ntrain: images\nval: images\nnames: [a]\n")
    # Since issue 14 a classify bundle reads --data as a classify dataset (val/<class>/*.jpg); this one has no images.
    with pytest.raises(InputError, match="val images not found"):
        add_variants(copy, ["onnx-int8"], data=tmp_path / "data.yaml")
    outcomes = {o.name: o for o in add_variants(copy, ["onnx-fp16"])}
    assert outcomes["onnx-fp16"].written, outcomes["onnx-fp16"].reason
    assert outcomes["onnx-fp16"].variant.metrics["box_agreement"] == 1.0  # classify: the same top-1 on every golden input
