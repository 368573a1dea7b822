"""Models as users have them from `yolo export`: an OpenVINO export directory (or its .xml) and an ONNX exported with
nms=True open as plain models, their settings read from their own metadata, and predict as Ultralytics does on the
very same file."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from cvdeploy import Predictor
from cvdeploy.errors import BundleError, InputError, ModelFormatError
from cvdeploy.runtime.exports import ExportMetadata

# Tests marked slow share two Ultralytics exports (~25 s), then run Ultralytics and cvdeploy on 60 images each.

NAMES = {0: "circle", 1: "square", 2: "triangle", 3: "star", 4: "hexagon", 5: "cross"}


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory, demo_pt: Path) -> dict[str, Path]:
    """Made by Ultralytics from the packaged demo model (copied: exports are written beside the .pt)."""
    from ultralytics import YOLO

    out = tmp_path_factory.mktemp("exports")
    ov_pt, nms_pt = out / "shapes.pt", out / "shapes_nms.pt"
    shutil.copy(demo_pt, ov_pt)
    shutil.copy(demo_pt, nms_pt)
    return {"openvino": Path(YOLO(str(ov_pt)).export(format="openvino")),
            "nms": Path(YOLO(str(nms_pt)).export(format="onnx", nms=True))}


@pytest.fixture(scope="module")
def images(shapes_data: Path) -> list[Path]:
    found = sorted((shapes_data / "images" / "val").glob("*.jpg"))
    sizes = {cv2.imread(str(p)).shape[:2] for p in found}
    assert len(found) >= 40 and len(sizes) >= 10  # varied sizes, portrait and landscape
    return found


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), 2)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def _assert_parity(ours: Predictor, theirs: object, images: list[Path], conf: float) -> int:
    """Every image: the same number of boxes, each matched to a distinct same-class Ultralytics box with IoU >= 0.99 and
    confidences within 1e-3. Returns the number of boxes compared."""
    total = 0
    for path in images:
        r = ours(path, conf=conf)[0].boxes
        u = theirs.predict(str(path), imgsz=256, conf=conf, iou=0.7, verbose=False)[0].boxes  # type: ignore[attr-defined]
        u_xyxy, u_conf, u_cls = u.xyxy.numpy(), u.conf.numpy(), u.cls.numpy().astype(int)
        assert len(r) == len(u_xyxy), f"{path.name}: {len(r)} boxes, ultralytics {len(u_xyxy)}"
        total += len(r)
        if not len(r):
            continue
        iou = _iou(r.xyxy, u_xyxy)
        iou[r.cls.astype(int)[:, None] != u_cls[None, :]] = -1
        best = iou.argmax(1)
        assert len(set(best.tolist())) == len(r), f"{path.name}: two boxes matched the same Ultralytics box"
        assert (iou[np.arange(len(r)), best] >= 0.99).all(), f"{path.name}: IoU {iou.max(1)}"
        assert np.abs(r.conf - u_conf[best]).max() <= 1e-3, f"{path.name}: conf {r.conf} vs {u_conf[best]}"
    return total


# ---------------------------------------------------------------- OpenVINO export directory and .xml


@pytest.mark.slow
def test_openvino_export_opens_with_its_metadata(exports: dict[str, Path]) -> None:
    ov_dir = exports["openvino"]
    assert ov_dir.is_dir() and ov_dir.name.endswith("_openvino_model")
    p = Predictor(ov_dir)
    m = p.bundle.manifest
    assert p.names == NAMES and m.task == "detect" and m.preprocess.imgsz == (256, 256) and m.preprocess.stride == 32
    assert p.variant == "openvino-fp32" and p.engine.precision == "f32"  # pinned: not the CPU plugin's bf16 default
    assert not m.postprocess.end2end and p.max_batch == 1 and p.spec.rect is False  # a fixed 1x3x256x256 graph
    assert p.engine.outputs[0].name == "output0"  # Ultralytics leaves the output unnamed
    xml = Predictor(next(ov_dir.glob("*.xml")))
    assert xml.names == NAMES and xml.bundle.manifest.variants == m.variants


@pytest.mark.slow
def test_openvino_export_matches_ultralytics_on_the_same_files(exports: dict[str, Path], images: list[Path],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import openvino
    from ultralytics import YOLO

    # Ultralytics leaves OpenVINO's CPU plugin at its default precision, bf16 on CPUs that have it (this one may); the
    # Predictor pins f32. The reference is Ultralytics computing in f32, as it does on every CPU without bf16.
    compile_model = openvino.Core.compile_model

    def f32(self, model, device_name=None, config=None, **kw):
        return compile_model(self, model, device_name, {**(config or {}), "INFERENCE_PRECISION_HINT": "f32"}, **kw)

    monkeypatch.setattr(openvino.Core, "compile_model", f32)
    ov_dir = exports["openvino"]
    theirs = YOLO(str(ov_dir), task="detect")
    total = 0
    for conf in (0.25, 0.05):
        total += _assert_parity(Predictor(ov_dir), theirs, images, conf)
    assert total >= 300  # not vacuous
    xml = next(ov_dir.glob("*.xml"))
    a, b = Predictor(xml)(images[:5]), Predictor(ov_dir)(images[:5])
    assert all(np.array_equal(x.boxes.data, y.boxes.data) for x, y in zip(a, b, strict=True))


# ---------------------------------------------------------------- ONNX exported with nms=True


@pytest.mark.slow
def test_nms_onnx_is_end_to_end(exports: dict[str, Path]) -> None:
    p = Predictor(exports["nms"])
    assert p.bundle.manifest.postprocess.end2end and p.names == NAMES
    assert p.engine.outputs[0].shape == (1, 300, 6)


@pytest.mark.slow
def test_nms_onnx_matches_ultralytics_on_the_same_file(exports: dict[str, Path], images: list[Path]) -> None:
    from ultralytics import YOLO

    total = _assert_parity(Predictor(exports["nms"]), YOLO(str(exports["nms"]), task="detect"), images, 0.25)
    assert total >= 150


# ---------------------------------------------------------------- what is refused, and why


@pytest.mark.slow
def test_a_fixed_size_export_refuses_another_imgsz(exports: dict[str, Path], images: list[Path]) -> None:
    p = Predictor(exports["openvino"])
    assert len(p(images[0], imgsz=256)) == 1
    with pytest.raises(InputError, match=r"imgsz 320 refused: this model's input is fixed at 256x256.*dynamic=True"):
        p(images[0], imgsz=320)


@pytest.mark.slow
def test_incomplete_openvino_exports_are_refused_with_the_reason(exports: dict[str, Path], tmp_path: Path) -> None:
    ov_dir = exports["openvino"]
    xml = next(ov_dir.glob("*.xml"))

    lonely = tmp_path / "lonely"
    lonely.mkdir()
    shutil.copy(xml, lonely)
    shutil.copy(xml.with_suffix(".bin"), lonely)
    for target in (lonely, lonely / xml.name):
        with pytest.raises(ModelFormatError, match=r"no metadata.yaml beside it.*yolo export format=openvino"):
            Predictor(target)

    no_bin = tmp_path / "no_bin"
    no_bin.mkdir()
    shutil.copy(xml, no_bin)
    shutil.copy(ov_dir / "metadata.yaml", no_bin)
    with pytest.raises(ModelFormatError, match=r"weights file .*\.bin is missing"):
        Predictor(no_bin)

    two = tmp_path / "two"
    shutil.copytree(ov_dir, two)
    shutil.copy(xml, two / "other.xml")
    with pytest.raises(ModelFormatError, match=r"should hold one OpenVINO .xml model, it holds 2"):
        Predictor(two)

    nameless = tmp_path / "nameless"
    shutil.copytree(ov_dir, nameless)
    meta = (nameless / "metadata.yaml").read_text()
    (nameless / "metadata.yaml").write_text(meta.split("names:")[0])
    with pytest.raises(ModelFormatError, match="no usable Ultralytics metadata"):
        Predictor(nameless)

    with pytest.raises(BundleError, match="not a bundle"):
        Predictor(tmp_path)  # a directory of directories: neither a bundle nor an export


# ---------------------------------------------------------------- the metadata, in both of Ultralytics' forms

# As Ultralytics 8.4 writes them: ONNX metadata_props hold Python literals as strings, metadata.yaml holds the values.
ONNX_PROPS = {"task": "detect", "stride": "32", "batch": "1", "imgsz": "[256, 320]", "end2end": "False",
              "names": "{0: 'circle', 1: 'square'}", "version": "8.4.190", "date": "2026-11-30T03:56:52+00:00",
              "args": "{'batch': 1, 'quantize': 16, 'nms': True, 'dynamic': False}"}
YAML_VALUES = {"task": "detect", "stride": 32, "batch": 1, "imgsz": [256, 320], "end2end": False,
               "names": {0: "circle", 1: "square"}, "version": "8.4.190", "date": "2026-11-30T03:56:52+00:00",
               "args": {"batch": 1, "quantize": 16, "nms": True, "dynamic": False}}


def test_metadata_reads_the_same_from_onnx_strings_and_yaml_values() -> None:
    a, b = ExportMetadata.parse(ONNX_PROPS, "m.onnx"), ExportMetadata.parse(YAML_VALUES, "metadata.yaml")
    assert a == b
    assert a.names == {0: "circle", 1: "square"} and a.imgsz == (256, 320) and a.stride == 32 and a.task == "detect"
    assert a.end2end and a.half and not a.dynamic and a.version == "8.4.190"
    plain = ExportMetadata.parse({**YAML_VALUES, "imgsz": 640, "args": {"nms": None}, "end2end": "True"}, "x")
    assert plain.imgsz == (640, 640) and plain.end2end and not plain.half  # an NMS-free head (end2end) without nms=True


@pytest.mark.parametrize("bad", [{"names": None}, {"imgsz": "[0, 256]"}, {"imgsz": [1, 2, 3]}, {"stride": "wide"}])
def test_unusable_metadata_is_refused(bad: dict[str, object]) -> None:
    meta = {k: v for k, v in {**YAML_VALUES, **bad}.items() if v is not None}
    with pytest.raises(ModelFormatError, match=r"metadata\.yaml"):
        ExportMetadata.parse(meta, "metadata.yaml")
