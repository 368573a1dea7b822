"""Detections, Result and draw: what a caller reads, serialises and looks at."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cvdeploy.errors import InputError
from cvdeploy.vision.detections import Classifications, Detections
from cvdeploy.vision.draw import class_color, draw
from cvdeploy.vision.result import Result, Timings

NAMES = {0: "circle", 1: "star", 2: "square"}


def _dets() -> Detections:
    return Detections(
        xyxy=np.array([[10, 20, 110, 90], [200.123456, 50, 260, 140], [30, 150, 90, 190], [5, 5, 15, 15]]),
        confidence=np.array([0.9, 0.8, 0.7, 0.123456789]),
        class_id=np.array([0, 1, 0, 2]),
        data={"track": np.array([7, 8, 9, 10]), "keypoints": np.arange(4 * 5 * 2).reshape(4, 5, 2)},
    )


# ---------------------------------------------------------------- Detections


def test_detections_normalise_dtypes() -> None:
    d = _dets()
    assert d.xyxy.dtype == np.float32 and d.confidence.dtype == np.float32 and d.class_id.dtype == np.int64
    assert d.xyxy.shape == (4, 4) and len(d) == 4
    np.testing.assert_allclose(d.area, [100 * 70, (260 - 200.123456) * 90, 60 * 40, 100], rtol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"xyxy": np.zeros((3, 5))}, r"xyxy: expected shape \(n, 4\), got \(3, 5\)"),
        ({"xyxy": np.zeros(4)}, r"xyxy: expected shape \(n, 4\)"),
        ({"confidence": np.zeros(2)}, r"confidence: expected shape \(3,\), got \(2,\)"),
        ({"confidence": np.zeros((3, 1))}, r"confidence: expected shape \(3,\)"),
        ({"class_id": np.zeros(4)}, r"class_id: expected shape \(3,\), got \(4,\)"),
        ({"data": {"masks": np.zeros((2, 8, 8))}}, r"data\['masks'\]: expected 3 rows, got 2"),
    ],
)
def test_detections_validation_names_the_expected_shape(kwargs: dict, message: str) -> None:
    good = {"xyxy": np.zeros((3, 4)), "confidence": np.zeros(3), "class_id": np.zeros(3)}
    with pytest.raises(InputError, match=message):
        Detections(**{**good, **kwargs})


def test_detections_validation_error_is_a_value_error_for_callers() -> None:
    with pytest.raises(ValueError):
        Detections(np.zeros((2, 4)), np.zeros(3), np.zeros(2))


def test_boolean_mask_keeps_arrays_parallel() -> None:
    d = _dets()
    sub = d[d.confidence > 0.75]
    assert len(sub) == 2
    assert sub.class_id.tolist() == [0, 1]
    np.testing.assert_array_equal(sub.xyxy, d.xyxy[:2])
    assert sub.data["track"].tolist() == [7, 8]
    np.testing.assert_array_equal(sub.data["keypoints"], d.data["keypoints"][:2])
    by_class = d[d.class_id == 0]
    assert by_class.data["track"].tolist() == [7, 9]
    np.testing.assert_array_equal(by_class.xyxy, d.xyxy[[0, 2]])


@pytest.mark.parametrize("index", [2, np.int64(2), -2])
def test_int_index_gives_one_detection_not_a_row(index: int) -> None:
    one = _dets()[index]
    assert isinstance(one, Detections) and len(one) == 1
    assert one.xyxy.shape == (1, 4) and one.confidence.shape == (1,) and one.class_id.tolist() == [0]
    assert one.data["track"].tolist() == [9]
    assert one.data["keypoints"].shape == (1, 5, 2)


def test_slice_and_index_array_keep_order() -> None:
    d = _dets()
    assert d[1:3].data["track"].tolist() == [8, 9]
    picked = d[np.array([3, 0])]
    assert picked.class_id.tolist() == [2, 0] and picked.data["track"].tolist() == [10, 7]
    np.testing.assert_allclose(picked.confidence, [0.123456789, 0.9], rtol=1e-6)


def test_indexing_does_not_alias_with_a_mask_to_nothing() -> None:
    d = _dets()
    none = d[np.zeros(4, bool)]
    assert len(none) == 0 and none.xyxy.shape == (0, 4) and none.data["keypoints"].shape == (0, 5, 2)


def test_empty() -> None:
    e = Detections.empty()
    assert len(e) == 0 and list(e) == []
    assert e.xyxy.shape == (0, 4) and e.confidence.shape == (0,) and e.class_id.shape == (0,)
    assert e.xyxy.dtype == np.float32 and e.class_id.dtype == np.int64
    assert e.area.shape == (0,)
    assert Detections([], [], []).xyxy.shape == (0, 4)  # empty lists from a decoder are fine too


def test_iteration_yields_plain_python_numbers() -> None:
    d = _dets()
    items = list(d)
    assert len(items) == len(d) == 4
    box, conf, cls = items[1]
    assert isinstance(conf, float) and isinstance(cls, int) and not isinstance(cls, np.integer)
    assert box.shape == (4,) and cls == 1 and conf == pytest.approx(0.8, abs=1e-6)


def test_classifications_validate_shapes() -> None:
    c = Classifications(np.array([2, 0]), np.array([0.7, 0.2]))
    assert len(c) == 2 and c.class_id.dtype == np.int64 and c.confidence.dtype == np.float32
    with pytest.raises(InputError, match=r"\(k,\)"):
        Classifications(np.array([2, 0]), np.array([0.7]))


# ---------------------------------------------------------------- Result


def _result() -> Result:
    return Result(
        task="detect",
        names=NAMES,
        orig_shape=(240, 320),
        detections=_dets()[:3],
        timings=Timings(decode=1.2, preprocess=0.5, infer=10.25, postprocess=0.3333),
        source="img.jpg",
    )


def test_to_dict_is_json_ready() -> None:
    d = _result().to_dict()
    back = json.loads(json.dumps(d))
    assert back == d
    assert d["task"] == "detect" and d["source"] == "img.jpg"
    assert d["image"] == {"height": 240, "width": 320}
    assert [x["class_id"] for x in d["detections"]] == [0, 1, 0]
    assert [x["class_name"] for x in d["detections"]] == ["circle", "star", "circle"]
    assert d["detections"][0]["box"] == {"x1": 10.0, "y1": 20.0, "x2": 110.0, "y2": 90.0}
    assert d["detections"][1]["box"]["x1"] == 200.12
    assert [x["confidence"] for x in d["detections"]] == [0.9, 0.8, 0.7]
    assert "classes" not in d


def test_to_dict_timings_include_total() -> None:
    t = _result().to_dict()["timings_ms"]
    assert set(t) == {"decode", "preprocess", "queue", "infer", "postprocess", "total"}
    assert t["total"] == pytest.approx(1.2 + 0.5 + 10.25 + 0.3333, abs=1e-3)
    assert t["postprocess"] == 0.333


def test_to_dict_unknown_class_id_falls_back_to_its_number() -> None:
    r = Result("detect", {0: "circle"}, (10, 10), detections=Detections([[1, 1, 5, 5]], [0.5], [7]))
    d = r.to_dict()
    json.dumps(d)
    assert d["detections"][0]["class_name"] == "7" and d["detections"][0]["class_id"] == 7


def test_to_dict_for_classification() -> None:
    r = Result("classify", NAMES, (64, 64), classes=Classifications(np.array([2, 0]), np.array([0.875, 0.1])))
    d = json.loads(json.dumps(r.to_dict()))
    assert d["classes"] == [
        {"class_id": 2, "class_name": "square", "confidence": 0.875},
        {"class_id": 0, "class_name": "circle", "confidence": 0.1},
    ]
    assert "detections" not in d
    assert r.line() == "square 0.88"


def test_summary_counts_per_class() -> None:
    assert _result().line() == "2 circle, 1 star"
    r = Result("detect", NAMES, (10, 10), detections=Detections.empty())
    assert r.line() == "no detections"
    assert r.to_dict()["detections"] == []


# ---------------------------------------------------------------- draw


def test_draw_returns_an_annotated_copy() -> None:
    image = np.full((240, 320, 3), 40, np.uint8)
    before = image.copy()
    r = _result()
    out = draw(image, r)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert out is not image
    assert np.array_equal(image, before), "draw must not modify its input"
    assert not np.array_equal(out, image)
    # the first box's left edge, mid-height, is drawn in (about: anti-aliased) its class colour
    edge = out[55, 9:12].astype(int)
    assert (np.abs(edge - class_color(0)).max(1) < 40).any(), edge
    assert not np.array_equal(out[20:90, 10:110], image[20:90, 10:110])
    # far from every box and label, nothing changes
    assert np.array_equal(out[200:, 200:], image[200:, 200:])


def test_draw_without_labels_draws_only_rectangles() -> None:
    image = np.zeros((240, 320, 3), np.uint8)
    r = Result("detect", NAMES, (240, 320), detections=Detections([[100, 100, 200, 200]], [0.9], [1]))
    out = draw(image, r, labels=False, line_width=2)
    ys, xs = np.nonzero(out.any(2))
    assert ys.min() >= 98 and ys.max() <= 202 and xs.min() >= 98 and xs.max() <= 202
    assert tuple(out[150, 100]) == class_color(1)
    assert not out[110:190, 110:190].any()  # the inside stays untouched
    labelled = draw(image, r, line_width=2)
    assert labelled[:100].any()  # the label goes above the box


def test_draw_classification_and_empty_results() -> None:
    image = np.zeros((100, 200, 3), np.uint8)
    r = Result("classify", NAMES, (100, 200), classes=Classifications(np.array([1]), np.array([0.9])))
    out = draw(image, r)
    assert out.shape == image.shape and out[:40].any() and not image.any()
    nothing = draw(image, Result("detect", NAMES, (100, 200), detections=Detections.empty()))
    assert np.array_equal(nothing, image) and nothing is not image


def test_class_colors_are_stable_and_distinct() -> None:
    assert class_color(3) == class_color(3 + 20)
    assert len({class_color(i) for i in range(20)}) == 20
    assert all(isinstance(v, int) for v in class_color(5))
