"""The Ultralytics-style results API (`Result.boxes`, `summary`, `plot`, ...) and `Predictor.__call__` / predict options,
checked against Ultralytics' own `Results` and `Boxes` classes and against `YOLO(onnx).predict` on the same file."""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from cvdeploy import Bundle, Predictor
from cvdeploy.errors import InputError, MissingDependencyError
from cvdeploy.vision import Detections, Result
from cvdeploy.vision.detections import Boxes

NAMES = {0: "circle", 1: "square", 2: "triangle", 3: "star", 4: "hexagon", 5: "cross"}


@pytest.fixture(scope="module")
def predictor(demo_bundle: Path) -> Predictor:
    return Predictor(demo_bundle)


@pytest.fixture(scope="module")
def images(shapes_data: Path) -> list[Path]:
    return sorted((shapes_data / "images" / "val").glob("*.jpg"))


@pytest.fixture(scope="module")
def onnx_file(demo_bundle: Path) -> Path:
    return Bundle.load(demo_bundle).variant_path()


def _ultralytics_results(r: Result):
    """Ultralytics' own Results object holding exactly our boxes: the reference for every derived figure."""
    import torch
    from ultralytics.engine.results import Results

    return Results(r.orig_img, path=r.source or "image0.jpg", names=r.names, boxes=torch.from_numpy(r.boxes.data.copy()))


# ---------------------------------------------------------------- __call__ and predict


def test_call_returns_a_list_and_predict_keeps_one_result(predictor: Predictor, images: list[Path]) -> None:
    one = predictor(images[0])
    assert isinstance(one, list) and len(one) == 1 and isinstance(one[0], Result)
    two = predictor(images[:2])
    assert [r.source for r in two] == [str(p) for p in images[:2]]
    single = predictor.predict(images[0])
    assert isinstance(single, Result)
    assert np.array_equal(single.detections.xyxy, one[0].detections.xyxy)
    assert predictor.predict([images[0]])[0].source == str(images[0])
    # The README line: r = predictor(img)[0]
    r = predictor(cv2.imread(str(images[0])))[0]
    assert r.boxes.xyxy.shape == (len(r.detections), 4) and r.plot().shape == r.orig_img.shape


def test_indexing_a_single_result_fails_loudly(predictor: Predictor, images: list[Path]) -> None:
    result = predictor.predict(images[0])
    with pytest.raises(TypeError, match=r"predictor\(image\)\[0\].*predict\(\[image\]\)\[0\]"):
        result[0]
    with pytest.raises(TypeError, match="not a list"):
        for _ in result:
            pass


def test_stream_yields_lazily_and_equals_the_list(demo_bundle: Path, images: list[Path]) -> None:
    p = Predictor(demo_bundle, max_batch=2)
    expected = p.predict(images[:5], conf=0.1)
    read: list[Path] = []

    def sources():
        for path in images[:5]:
            read.append(path)
            yield path

    gen = p(sources(), stream=True, conf=0.1)
    assert inspect.isgenerator(gen) and read == []  # nothing read before the first result is asked for
    first = next(gen)
    assert len(read) == 2  # one batch of max_batch images
    got = [first, *gen]
    assert [r.source for r in got] == [str(x) for x in images[:5]]
    for a, b in zip(got, expected, strict=True):
        assert np.array_equal(a.detections.xyxy, b.detections.xyxy)
    assert len(list(p.predict(images[0], stream=True))) == 1


def test_options_are_checked_before_any_image_is_read(predictor: Predictor, images: list[Path]) -> None:
    with pytest.raises(InputError, match=r"unknown prediction option\(s\): augment.*supported: conf, iou, classes"):
        predictor.predict(["no/such/image.jpg"], augment=True)
    with pytest.raises(InputError, match="device is chosen when the Predictor is made"):
        predictor(images[0], device=0)
    with pytest.raises(InputError, match="conf must be between 0 and 1"):
        predictor(["no/such/image.jpg"], stream=True, conf=3)  # at the call, not when the generator first runs
    with pytest.raises(InputError, match="save must be True or False"):
        predictor(images[0], save="out/")


def test_threshold_options_match_ultralytics(predictor: Predictor, images: list[Path], onnx_file: Path) -> None:
    from ultralytics import YOLO

    theirs = YOLO(str(onnx_file), task="detect")
    checked = 0
    for path in images[:6]:
        for options in ({"conf": 0.05, "agnostic_nms": True}, {"conf": 0.05, "iou": 0.3, "max_det": 3, "classes": [0, 1, 3]}):
            ours = predictor(path, **options)[0].boxes
            ref = theirs.predict(str(path), imgsz=256, verbose=False, **options)[0].boxes
            assert len(ours) == len(ref), (path.name, options)
            assert np.abs(ours.xyxy - ref.xyxy.numpy()).max(initial=0) < 0.05
            assert np.array_equal(ours.cls, ref.cls.numpy())
            checked += len(ours)
    assert checked > 20
    plain, agnostic = predictor(images[0], conf=0.05)[0], predictor(images[0], conf=0.05, agnostic_nms=True)[0]
    assert len(agnostic.boxes) < len(plain.boxes)  # the option does something on this image


def test_imgsz_on_a_dynamic_model_matches_ultralytics(predictor: Predictor, images: list[Path], onnx_file: Path) -> None:
    from ultralytics import YOLO

    path = images[3]
    same = predictor(path, imgsz=256)[0]
    assert np.array_equal(same.boxes.data, predictor(path)[0].boxes.data)
    big = predictor(path, imgsz=320, conf=0.1)[0]
    ref = YOLO(str(onnx_file), task="detect").predict(str(path), imgsz=320, conf=0.1, verbose=False)[0].boxes
    assert len(big.boxes) == len(ref) > 0
    assert np.abs(big.boxes.xyxy - ref.xyxy.numpy()).max() < 0.05
    assert np.abs(big.boxes.conf - ref.conf.numpy()).max() < 1e-3
    assert not np.array_equal(big.boxes.conf, predictor(path, conf=0.1)[0].boxes.conf)
    assert len(predictor(path, imgsz=(256, 320))[0].boxes) > 0
    with pytest.raises(InputError, match="multiple of the stride"):
        predictor(path, imgsz=300)
    with pytest.raises(InputError, match="imgsz must be an integer or"):
        predictor(path, imgsz="big")


def test_half_is_refused_without_an_fp16_variant(predictor: Predictor, images: list[Path]) -> None:
    with pytest.raises(InputError, match=r"half=True: .yolo11n-shapes. has no fp16 variant.*--variants onnx-fp32,onnx-fp16"):
        predictor(images[0], half=True)
    assert len(predictor(images[0], half=False)) == 1


def test_save_and_verbose(predictor: Predictor, images: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    array = cv2.imread(str(images[1]))
    results = predictor([images[0], array], save=True, project=tmp_path, name="exp", verbose=True)
    saved = tmp_path / "exp" / images[0].name
    assert saved.is_file() and (tmp_path / "exp" / "image1.jpg").is_file()
    assert cv2.imread(str(saved)).shape == results[0].orig_img.shape
    out = capsys.readouterr()
    assert out.out == ""  # stdout is for results
    assert f"image 1 {images[0]}: 256x256 " in out.err and "image 2: 256x256 " in out.err
    assert results[0].verbose() in out.err and "Speed: " in out.err and f"Results saved to {tmp_path / 'exp'}" in out.err
    predictor(images[0])
    assert capsys.readouterr().err == ""  # quiet by default


# ---------------------------------------------------------------- Result, the Ultralytics way


def test_boxes_equal_ultralytics_boxes(predictor: Predictor, images: list[Path]) -> None:
    r = predictor(images[2], conf=0.05)[0]
    boxes, ref = r.boxes, _ultralytics_results(r).boxes
    assert len(boxes) == len(ref) == len(r.detections) > 3
    assert boxes.data.shape == (len(boxes), 6) and boxes.data.dtype == np.float32
    for attr in ("data", "xyxy", "xywh", "xyxyn", "xywhn", "conf", "cls"):
        mine, theirs = getattr(boxes, attr), getattr(ref, attr).numpy()
        assert mine.shape == theirs.shape and mine.dtype == theirs.dtype, attr
        np.testing.assert_allclose(mine, theirs, rtol=1e-6, atol=1e-6, err_msg=attr)
    assert boxes.id is None and ref.id is None and boxes.is_track is False
    assert np.array_equal(boxes.xyxy, r.detections.xyxy) and np.array_equal(boxes.cls.astype(int), r.detections.class_id)
    assert boxes[1].xyxy.shape == (1, 4) and np.array_equal(boxes[-1].data, ref[-1].data.numpy())
    assert [b.data.tolist() for b in boxes] == [b.data.tolist() for b in ref]
    assert boxes.cpu().numpy() is boxes and r.cpu().numpy() is r
    assert np.array_equal(boxes[boxes.conf > 0.5].data, ref[ref.conf > 0.5].data.numpy())
    with pytest.raises(IndexError):
        boxes[len(boxes)]
    assert r.names == NAMES and r.orig_shape == r.orig_img.shape[:2]


def test_summary_json_and_verbose_equal_ultralytics(predictor: Predictor, images: list[Path]) -> None:
    r = predictor(images[2], conf=0.05)[0]
    ref = _ultralytics_results(r)
    assert r.summary() == ref.summary()
    assert r.summary(normalize=True, decimals=3) == ref.summary(normalize=True, decimals=3)
    assert set(r.summary()[0]) == {"name", "class", "confidence", "box"}
    assert json.loads(r.to_json()) == json.loads(ref.to_json())
    assert r.verbose() == ref.verbose()
    empty = predictor(np.full((120, 200, 3), 114, np.uint8))[0]
    assert len(empty.boxes) == 0
    ref_empty = _ultralytics_results(empty)
    assert empty.summary() == ref_empty.summary() == [] and empty.verbose() == ref_empty.verbose() == "(no detections), "
    assert json.loads(empty.to_json()) == []
    counts = np.bincount(r.detections.class_id, minlength=len(NAMES))
    assert r.line() == ", ".join(f"{n} {NAMES[i]}" for i, n in enumerate(counts) if n)  # the CLI's short line
    assert empty.line() == "no detections"


def test_speed_has_ultralytics_keys(predictor: Predictor, images: list[Path], onnx_file: Path) -> None:
    from ultralytics import YOLO

    r = predictor(images[0])[0]
    ref = YOLO(str(onnx_file), task="detect").predict(str(images[0]), imgsz=256, verbose=False)[0]
    assert set(r.speed) == set(ref.speed) == {"preprocess", "inference", "postprocess"}
    assert r.speed["inference"] == r.timings.infer and r.speed["preprocess"] == r.timings.preprocess
    assert all(isinstance(v, float) and v >= 0 for v in r.speed.values())


def test_plot(predictor: Predictor, images: list[Path]) -> None:
    r = predictor(images[2])[0]
    before = r.orig_img.copy()
    out = r.plot()
    assert out.shape == r.orig_img.shape and out.dtype == np.uint8 and out is not r.orig_img
    assert np.array_equal(r.orig_img, before), "plot must not draw on the result's image"
    assert not np.array_equal(out, r.orig_img)
    plain, no_conf, bare = r.plot(labels=False), r.plot(conf=False), r.plot(boxes=False)
    assert not np.array_equal(plain, out) and not np.array_equal(no_conf, out) and not np.array_equal(no_conf, plain)
    assert np.array_equal(bare, r.orig_img)
    assert not np.array_equal(r.plot(line_width=6, labels=False), plain)
    pil = r.plot(pil=True)
    assert pil.mode == "RGB" and np.array_equal(np.asarray(pil), out[..., ::-1])
    other = np.zeros_like(r.orig_img)
    assert r.plot(img=other).any() and not other.any()
    served = Result("detect", NAMES, (50, 60), detections=Detections([[5, 5, 20, 20]], [0.9], [1]))
    with pytest.raises(InputError, match=r"holds no image.*result.plot\(img=image\)"):
        served.plot()
    with pytest.raises(InputError, match="HxWx3 BGR uint8"):
        served.plot(img=np.zeros((50, 60), np.float32))


def test_save(predictor: Predictor, images: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    r = predictor(images[2])[0]
    target = tmp_path / "deep" / "er" / "out.png"
    assert r.save(target, line_width=3) == str(target)
    assert np.array_equal(cv2.imread(str(target)), r.plot(line_width=3))  # PNG: lossless
    monkeypatch.chdir(tmp_path)
    assert r.save() == f"results_{images[2].name}" and (tmp_path / f"results_{images[2].name}").is_file()
    assert r.save("noext") == "noext.jpg"
    with pytest.raises(InputError, match=r"cannot write an image as .\.xyz."):
        r.save("x.xyz")


def test_to_df(predictor: Predictor, images: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    r = predictor(images[2])[0]
    df = r.to_df()
    import pandas

    assert isinstance(df, pandas.DataFrame)
    assert list(df.columns) == ["name", "class", "confidence", "box"] and len(df) == len(r.boxes)
    assert df.to_dict("records") == r.summary()
    pl = r.to_df(backend="polars")
    assert pl.columns == ["name", "class", "confidence", "box"] and pl.to_dicts() == r.summary()
    empty = predictor(np.full((64, 64, 3), 114, np.uint8))[0].to_df()
    assert len(empty) == 0 and list(empty.columns) == ["name", "class", "confidence", "box"]
    with pytest.raises(InputError, match="backend"):
        r.to_df(backend="arrow")
    monkeypatch.setitem(sys.modules, "pandas", None)  # what an environment without them looks like to `import`
    assert r.to_df().columns == ["name", "class", "confidence", "box"]  # falls back to polars
    monkeypatch.setitem(sys.modules, "polars", None)
    with pytest.raises(MissingDependencyError, match=r"needs pandas or polars: install it with `pip install pandas`"):
        r.to_df()


def test_results_from_the_staged_pipeline_hold_no_image(predictor: Predictor, images: list[Path]) -> None:
    img = predictor.decode(images[0])
    prepared = predictor.prepare([img])
    (r,) = predictor.finish(prepared, predictor.infer_all(prepared.tensor))
    assert r.orig_img is None and r.plot(img=img).shape == img.shape
    assert predictor(images[0])[0].orig_img is not None


def test_boxes_validate_their_shape() -> None:
    with pytest.raises(InputError, match=r"expected shape \(n, 6\)"):
        Boxes(np.zeros((2, 4)), (10, 10))
    assert len(Boxes(np.zeros((0, 6)), (10, 10))) == 0
    assert Boxes(np.arange(6), (10, 10)).xyxy.shape == (1, 4)


def test_stream_method_runs_a_source_through_cvdeploy_sources(predictor: Predictor, images: list[Path], tmp_path: Path) -> None:
    for p in images[:3]:
        (tmp_path / p.name).write_bytes(p.read_bytes())
    got = list(predictor.stream(tmp_path, conf=0.3))
    assert [Path(r.source).name for r in got] == [p.name for p in images[:3]]
    for r, p in zip(got, images[:3], strict=True):
        assert np.array_equal(r.boxes.data, predictor(p, conf=0.3)[0].boxes.data)
