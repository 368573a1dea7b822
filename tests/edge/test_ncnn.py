"""ncnn-fp32 and ncnn-fp16: exported from the demo model, verified, recorded, run by the Predictor."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from cvdeploy.bundle import Bundle
from cvdeploy.errors import BundleError, EngineError, InputError
from cvdeploy.evaluate.parity import MIN_BOX_AGREEMENT, SCORE_TOLERANCE
from cvdeploy.predict import Predictor
from cvdeploy.runtime import open_engine
from cvdeploy.runtime.ncnn import NcnnEngine, NcnnOptions

pytestmark = pytest.mark.slow


def test_both_variants_are_verified_and_recorded(ncnn_bundle: tuple[Path, list]) -> None:
    path, outcomes = ncnn_bundle
    assert {o.name: o.written for o in outcomes} == {"onnx-fp32": True, "ncnn-fp32": True, "ncnn-fp16": True}
    m = Bundle.load(path).manifest  # every file, the companions included, against its sha256
    for name, precision in (("ncnn-fp32", "fp32"), ("ncnn-fp16", "fp16")):
        v = m.variants[name]
        assert (v.engine, v.format, v.precision, v.file) == ("ncnn", "ncnn", precision, f"variants/{name}/model.ncnn.param")
        assert set(v.companions) == {f"variants/{name}/model.ncnn.bin", f"variants/{name}/metadata.yaml"}
        assert v.parity is not None and v.parity.passed and v.parity.worst <= SCORE_TOLERANCE[precision]
        assert v.metrics["box_agreement"] >= MIN_BOX_AGREEMENT[precision]
        assert v.metrics["map50_95_drop_points"] <= 1.0
        assert v.metrics["latency_ms_b1"] > 0 and v.metrics["speedup_vs_fp32"] > 0
        assert "padded" in v.parity.reference  # the rectangular golden cases were run too, padded to the fixed size
    # fp32 is fp32 on every CPU: the raw outputs of the source agree far inside the fp16 tolerance
    assert m.variants["ncnn-fp32"].parity.worst < 1e-4  # type: ignore[union-attr]
    assert m.variants["ncnn-fp16"].size_bytes < 0.6 * m.variants["ncnn-fp32"].size_bytes  # fp16 weights


def test_a_changed_weights_file_is_refused(ncnn_bundle: tuple[Path, list], tmp_path: Path) -> None:
    copy = shutil.copytree(ncnn_bundle[0], tmp_path / "b.cvd")
    weights = copy / "variants" / "ncnn-fp16" / "model.ncnn.bin"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"ncnn-fp16.*model\.ncnn\.bin"):
        Bundle.load(copy)


def test_precision_is_pinned_from_the_variant_name(ncnn_bundle: tuple[Path, list]) -> None:
    bundle = Bundle.load(ncnn_bundle[0])
    fp32 = open_engine(bundle.variant_path("ncnn-fp32"), "ncnn", NcnnOptions(precision="f16"), precision="fp32")
    fp16 = open_engine(bundle.variant_path("ncnn-fp16"), "ncnn", precision="fp16")
    try:
        assert not any(fp32.settings[k] for k in ("use_fp16_storage", "use_fp16_packed", "use_fp16_arithmetic", "use_bf16_storage"))
        assert fp32.precision == "f32"
        assert fp16.settings["use_fp16_storage"] and fp16.settings["use_fp16_arithmetic"]
        import ncnn

        assert fp16.precision == ("f16" if ncnn.cpu_support_arm_asimdhp() else "f32")
        assert fp32.inputs[0].shape == (None, 3, *bundle.manifest.preprocess.imgsz)
        assert [o.name for o in fp32.outputs] == [o.name for o in bundle.manifest.outputs]
    finally:
        fp32.close()
        fp16.close()


def test_bytes_and_files_give_the_same_outputs(ncnn_bundle: tuple[Path, list]) -> None:
    bundle = Bundle.load(ncnn_bundle[0])
    param = bundle.variant_path("ncnn-fp32")
    x = next(g.input for g in bundle.golden() if g.input.shape[0] == 2)  # a batch of 2: run image by image
    from_file = NcnnEngine(param)
    from_bytes = NcnnEngine((param.read_bytes(), param.with_suffix(".bin").read_bytes()))
    try:
        a, b = from_file.run({"images": x})["output0"], from_bytes.run({"images": x})["output0"]
        assert a.shape[0] == 2 and np.array_equal(a, b)
        with pytest.raises(InputError, match="expected shape"):  # a rectangle the fixed-size graph cannot take
            from_file.run({"images": x[:, :, :, :192]})
    finally:
        from_file.close()
        from_bytes.close()


def test_missing_and_broken_files_are_errors_not_crashes(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        NcnnEngine(tmp_path / "model.ncnn.param")
    (tmp_path / "model.ncnn.param").write_text("garbage\n")
    (tmp_path / "model.ncnn.bin").write_bytes(b"\0" * 64)
    with pytest.raises(EngineError, match="NCNN could not load"):
        NcnnEngine(tmp_path)


def test_the_predictor_runs_it_and_agrees_with_onnx_fp32(ncnn_bundle: tuple[Path, list], shapes_data: Path) -> None:
    images = sorted((shapes_data / "images" / "val").iterdir())[:6]
    with Predictor(ncnn_bundle[0], "ncnn-fp32") as ncnn_p, Predictor(ncnn_bundle[0], "onnx-fp32", imgsz=None) as onnx_p:
        assert ncnn_p.engine.provider.startswith("NCNN")
        assert not ncnn_p.spec.rect  # a fixed-size graph: square letterbox
        ncnn_results = ncnn_p.predict(images)
        # onnx-fp32 on the same square inputs: the same tensor through both engines
        for path, r in zip(images, ncnn_results, strict=True):
            prepared = ncnn_p.prepare([ncnn_p.decode(path)])
            ref = onnx_p.finish(prepared, onnx_p.infer_all(prepared.tensor))[0]
            assert r.detections is not None and ref.detections is not None
            assert len(r.detections) == len(ref.detections)
            assert np.abs(r.detections.xyxy - ref.detections.xyxy).max(initial=0) < 0.05
            assert np.abs(r.detections.confidence - ref.detections.confidence).max(initial=0) < 1e-3
        assert sum(len(r.detections) for r in ncnn_results) > 0  # type: ignore[arg-type, misc]


def test_a_variant_that_fails_its_check_leaves_nothing(ncnn_bundle: tuple[Path, list], demo_pt: Path, tmp_path: Path) -> None:
    """Golden outputs the source no longer matches (as if the bundle had been built from another model): refused."""
    from cvdeploy.build.edge import add_edge_variants
    from cvdeploy.bundle.bundle import read_golden, sha256_file, write_golden

    copy = shutil.copytree(ncnn_bundle[0], tmp_path / "b.cvd")
    bundle = Bundle.load(copy)
    for case in bundle.manifest.golden:
        x, outs = read_golden(copy / case.file)
        outs = {k: v + np.float32(0.5) * (np.arange(v.shape[1]) >= 4)[None, :, None] for k, v in outs.items()}  # scores + 0.5
        write_golden(copy / case.file, x, outs)
        case.sha256 = sha256_file(copy / case.file)
    bundle.save_manifest()
    outcomes = add_edge_variants(copy, ["ncnn-fp16"], source=demo_pt)
    refused = outcomes[-1]
    assert refused.name == "ncnn-fp16" and not refused.written
    assert refused.reason.startswith("class scores differ from the reference")
    after = Bundle.load(copy)
    assert "ncnn-fp16" not in after.manifest.variants and "ncnn-fp32" in after.manifest.variants
    assert not (copy / "variants" / "ncnn-fp16").exists()
