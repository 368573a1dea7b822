"""litert-fp32 and litert-int8 (int8 but for the head's decoding): exported from the demo model, verified, run by the Predictor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cvdeploy.bundle import Bundle
from cvdeploy.errors import CvdeployError, EngineError, InputError
from cvdeploy.evaluate.parity import SCORE_TOLERANCE
from cvdeploy.predict import Predictor
from cvdeploy.runtime.litert import LiteRtEngine, read_metadata

pytestmark = pytest.mark.slow


def test_fp32_is_verified_and_recorded(litert_bundle: tuple[Path, list]) -> None:
    path, outcomes = litert_bundle
    assert {o.name: o.written for o in outcomes} == {"onnx-fp32": True, "litert-fp32": True}
    v = Bundle.load(path).manifest.variants["litert-fp32"]
    assert (v.engine, v.format, v.file, v.precision) == ("litert", "tflite", "variants/litert-fp32.tflite", "fp32")
    assert v.parity is not None and v.parity.passed and v.parity.worst < 1e-4  # fp32: the source's outputs, to float noise
    assert v.metrics["box_agreement"] == 1.0 and v.metrics["map50_95_drop_points"] <= 1.0 and v.metrics["latency_ms_b1"] > 0


def test_boxes_come_back_in_input_pixels(litert_bundle: tuple[Path, list]) -> None:
    bundle = Bundle.load(litert_bundle[0])
    f = bundle.variant_path("litert-fp32")
    meta = read_metadata(f)
    assert meta["task"] == "detect" and list(meta["imgsz"]) == list(bundle.manifest.preprocess.imgsz)
    x = next(g for g in bundle.golden() if g.input.shape[0] == 2)
    engine = LiteRtEngine(f)
    from_bytes = LiteRtEngine(f.read_bytes())
    try:
        out = engine.run({"images": x.input})["output0"]
        assert out.shape == x.outputs["output0"].shape  # a batch of 2 through a batch-1 graph, image by image
        assert np.abs(out[:, :4] - x.outputs["output0"][:, :4]).max() < 0.05  # pixels, not [0, 1]
        assert np.array_equal(out, from_bytes.run({"images": x.input})["output0"])
        with pytest.raises(InputError, match="expected shape"):
            engine.run({"images": x.input[:, :, :192]})
    finally:
        engine.close()
        from_bytes.close()


def test_a_file_that_is_not_a_model_is_an_engine_error(tmp_path: Path) -> None:
    bad = tmp_path / "model.tflite"
    bad.write_bytes(b"not a flatbuffer" * 8)
    with pytest.raises(EngineError, match="LiteRT could not load"):
        LiteRtEngine(bad)
    with pytest.raises(InputError, match="not found"):
        LiteRtEngine(tmp_path / "missing.tflite")


def test_int8_is_verified_within_two_points_with_only_the_heads_decoding_in_float(litert_int8_bundle: tuple[Path, list]) -> None:
    """int8 weights and activations in every op but the head's decoding (as in onnx-int8); the default budget holds."""
    import re

    from ai_edge_litert.interpreter import Interpreter

    from cvdeploy.build.edge import LITERT_FLOAT_SCOPES, MAX_MAP_DROP

    path, outcomes = litert_int8_bundle
    assert {o.name: (o.written, o.reason) for o in outcomes} == {"onnx-fp32": (True, "reference"), "litert-int8": (True, "verified")}
    bundle = Bundle.load(path)
    v = bundle.manifest.variants["litert-int8"]
    assert v.precision == "int8" and v.parity is not None and v.parity.worst <= SCORE_TOLERANCE["int8"]
    assert v.metrics["box_agreement"] >= 0.8 and v.metrics["map50_95_drop_points"] <= MAX_MAP_DROP["int8"] == 2.0
    assert v.quantization is not None and v.quantization["recipe"] == "static_wi8_ai8, head decoding float"
    assert v.quantization["calib_images"] > 0
    it = Interpreter(model_path=str(bundle.variant_path("litert-int8")))
    it.allocate_tensors()
    io = {it.get_input_details()[0]["index"], it.get_output_details()[0]["index"]}
    details = it.get_tensor_details()
    floats = [d for d in details if d["dtype"] == np.float32 and d["index"] not in io]
    # Every other float tensor is the head's decoding (or the dequantized inputs to it); the backbone and neck are int8.
    outside = [d["name"] for d in floats if not re.search(LITERT_FLOAT_SCOPES, d["name"] + ";") and not d["name"].endswith("_dequant")]
    assert outside == [] and 0 < len(floats) < 60
    assert not any(d["dtype"] == np.float32 for d in details if "C3k2" in d["name"] or "SPPF" in d["name"])
    assert sum(d["dtype"] == np.int8 for d in details) > 300
    assert v.size_bytes < 0.4 * bundle.manifest.variants["onnx-fp32"].size_bytes


def test_int8_recipe_that_keeps_nothing_float_is_refused(litert_bundle: tuple[Path, list], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A scope regex that matches no op (litert-torch renaming its ops) would quantize the decoding silently: refused."""
    import cvdeploy.build.edge as edge

    fp32 = Bundle.load(litert_bundle[0]).variant_path("litert-fp32")
    calib = [np.full((1, 3, 256, 256), 0.5, np.float32), np.linspace(0, 1, 3 * 256 * 256, dtype=np.float32).reshape(1, 3, 256, 256)]
    monkeypatch.setattr(edge, "LITERT_FLOAT_SCOPES", r"Detect_23;\d+$")  # a "$" never matches: scopes end with ";"
    with pytest.raises(CvdeployError, match="head's decoding was not kept in float"):
        edge.quantize_litert_int8(fp32, tmp_path / "int8.tflite", calib)
    with pytest.raises(InputError, match="calibration images"):
        edge.quantize_litert_int8(fp32, tmp_path / "int8.tflite", [])


def test_the_predictor_runs_it_and_agrees_with_onnx_fp32(litert_bundle: tuple[Path, list], shapes_data: Path) -> None:
    images = sorted((shapes_data / "images" / "val").iterdir())[:6]
    with Predictor(litert_bundle[0], "litert-fp32") as lite, Predictor(litert_bundle[0], "onnx-fp32") as onnx:
        assert lite.engine.provider.startswith("LiteRT") and not lite.spec.rect
        for path, r in zip(images, lite.predict(images), strict=True):
            prepared = lite.prepare([lite.decode(path)])
            ref = onnx.finish(prepared, onnx.infer_all(prepared.tensor))[0]
            assert r.detections is not None and ref.detections is not None and len(r.detections) == len(ref.detections)
            assert np.abs(r.detections.xyxy - ref.detections.xyxy).max(initial=0) < 0.05
            assert np.abs(r.detections.confidence - ref.detections.confidence).max(initial=0) < 1e-3
