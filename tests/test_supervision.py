"""cvdeploy results in roboflow supervision: `result.to_supervision()` and supervision's own
`sv.Detections.from_ultralytics(result)`, compared with what supervision makes of Ultralytics' results."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import supervision as sv  # a test dependency: these tests run against supervision itself

from cvdeploy import Bundle, Predictor
from cvdeploy.errors import InputError, MissingDependencyError
from cvdeploy.vision import Classifications, Result


@pytest.fixture(scope="module")
def predictor(demo_bundle: Path) -> Predictor:
    return Predictor(demo_bundle)


@pytest.fixture(scope="module")
def images(shapes_data: Path) -> list[Path]:
    return sorted((shapes_data / "images" / "val").glob("*.jpg"))


def _same(a: sv.Detections, b: sv.Detections) -> None:
    assert len(a) == len(b)
    assert np.array_equal(a.xyxy, b.xyxy) and np.array_equal(a.confidence, b.confidence)
    assert np.array_equal(a.class_id, b.class_id) and a.class_id.dtype.kind == b.class_id.dtype.kind == "i"
    assert a.tracker_id is None and b.tracker_id is None and a.mask is None and b.mask is None
    assert a.data["class_name"].tolist() == b.data["class_name"].tolist()


def test_to_supervision_and_from_ultralytics_agree(predictor: Predictor, images: list[Path]) -> None:
    total = 0
    for path in images[:8]:
        r = predictor(path, conf=0.1)[0]
        ours, theirs = r.to_supervision(), sv.Detections.from_ultralytics(r)
        assert isinstance(ours, sv.Detections)
        _same(ours, theirs)
        assert len(ours) == len(r.detections)
        assert np.array_equal(ours.xyxy, r.detections.xyxy) and np.array_equal(ours.class_id, r.detections.class_id)
        assert ours.data["class_name"].tolist() == [r.names[int(c)] for c in r.detections.class_id]
        total += len(ours)
    assert total > 20


def test_from_ultralytics_matches_it_on_ultralytics_own_results(demo_bundle: Path, predictor: Predictor,
                                                                 images: list[Path]) -> None:
    """The same ONNX file through Ultralytics then supervision, and through cvdeploy then supervision."""
    from ultralytics import YOLO

    onnx = Bundle.load(demo_bundle).variant_path()
    theirs = YOLO(str(onnx), task="detect")
    for path in images[:5]:
        ours = sv.Detections.from_ultralytics(predictor(path)[0])
        ref = sv.Detections.from_ultralytics(theirs.predict(str(path), imgsz=256, verbose=False)[0])
        assert len(ours) == len(ref) > 0
        assert np.abs(ours.xyxy - ref.xyxy).max() < 0.05 and np.abs(ours.confidence - ref.confidence).max() < 1e-3
        assert ours.class_id.tolist() == ref.class_id.tolist()
        assert ours.data["class_name"].tolist() == ref.data["class_name"].tolist()


def test_an_empty_result(predictor: Predictor) -> None:
    r = predictor(np.full((90, 160, 3), 114, np.uint8))[0]
    assert len(r.detections) == 0
    for d in (r.to_supervision(), sv.Detections.from_ultralytics(r)):
        assert len(d) == 0 and d.xyxy.shape == (0, 4) and len(d.data["class_name"]) == 0
        assert d.is_empty()


def test_supervision_tools_take_the_detections(predictor: Predictor, images: list[Path]) -> None:
    r = predictor(images[2], conf=0.1)[0]
    d = r.to_supervision()
    strong = d[d.confidence > 0.5]
    assert 0 < len(strong) < len(d)
    assert strong.data["class_name"].tolist() == [r.names[int(c)] for c in strong.class_id]
    out = sv.BoxAnnotator().annotate(r.orig_img.copy(), d)
    out = sv.LabelAnnotator().annotate(out, d)
    assert out.shape == r.orig_img.shape and not np.array_equal(out, r.orig_img)


def test_a_classify_result_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    r = Result("classify", {0: "a", 1: "b"}, (10, 10), classes=Classifications(np.array([1]), np.array([0.9])))
    with pytest.raises(InputError, match="classify result has no detections"):
        r.to_supervision()
    assert r.boxes is None  # as Ultralytics has it for a classify result


def test_without_supervision(predictor: Predictor, monkeypatch: pytest.MonkeyPatch) -> None:
    r = predictor(np.full((32, 32, 3), 114, np.uint8))[0]
    monkeypatch.setitem(sys.modules, "supervision", None)  # what an environment without it looks like to `import`
    with pytest.raises(MissingDependencyError, match="pip install supervision"):
        r.to_supervision()
