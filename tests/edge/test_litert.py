"""litert-fp32 and litert-int8 (full-integer): exported from the demo model, verified, run by the Predictor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cvdeploy.bundle import Bundle
from cvdeploy.errors import EngineError, InputError
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


def test_int8_is_full_integer_and_its_drop_is_judged_against_two_points(litert_int8_bundle: tuple[Path, list]) -> None:
    """int8 weights and activations in every op, float only at the graph's input and output; the mAP drop is recorded
    and the default budget (2.0 points for full-integer INT8) decides from it."""
    from ai_edge_litert.interpreter import Interpreter

    from cvdeploy.build.edge import MAX_MAP_DROP

    bundle = Bundle.load(litert_int8_bundle[0])
    v = bundle.manifest.variants["litert-int8"]
    assert v.precision == "int8" and v.parity is not None and v.parity.worst <= SCORE_TOLERANCE["int8"]
    assert v.quantization is not None and v.quantization["recipe"] == "static_wi8_ai8" and v.quantization["calib_images"] > 0
    assert MAX_MAP_DROP["int8"] == 2.0 and isinstance(v.metrics["map50_95_drop_points"], float)
    it = Interpreter(model_path=str(bundle.variant_path("litert-int8")))
    it.allocate_tensors()
    floats = {d["index"] for d in it.get_tensor_details() if d["dtype"] == np.float32}
    assert floats == {it.get_input_details()[0]["index"], it.get_output_details()[0]["index"]}
    assert sum(d["dtype"] == np.int8 for d in it.get_tensor_details()) > 100
    assert v.size_bytes < 0.4 * bundle.manifest.variants["onnx-fp32"].size_bytes


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
