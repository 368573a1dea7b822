"""Layer bisection: a seeded FP16 overflow is named exactly, a clean FP16 conversion is not blamed, an INT8 culprit is
named and the suggested exclusion takes its error away, two engines agree on fp32, and bad input is refused in one line."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from cvdeploy.build.quantize import convert_fp16, head_float_nodes, int8_recipe, quantize_int8
from cvdeploy.bundle.bundle import Bundle
from cvdeploy.diagnose.bisect import (
    FP16_MAX,
    InjectedFault,
    bisect_variant,
    first_divergence,
    inject_fp16_overflow,
)
from cvdeploy.errors import InputError, ModelFormatError
from cvdeploy.evaluate.parity import SCORE_TOLERANCE
from cvdeploy.runtime import open_engine


@pytest.fixture(scope="module")
def golden(demo_bundle: Path) -> list[np.ndarray]:
    """The bundle's golden inputs: three single images of different sizes and a batch of two."""
    return [g.input for g in Bundle.load(demo_bundle).golden()]


@pytest.fixture(scope="module")
def fp32(demo_bundle: Path) -> Path:
    return demo_bundle / "variants" / "onnx-fp32.onnx"


@pytest.fixture(scope="module")
def fp16(tmp_path_factory: pytest.TempPathFactory, fp32: Path) -> Path:
    out = tmp_path_factory.mktemp("fp16") / "clean-fp16.onnx"
    convert_fp16(fp32, out)
    return out


@pytest.fixture(scope="module")
def injected(tmp_path_factory: pytest.TempPathFactory, fp32: Path) -> tuple[InjectedFault, Path, Path]:
    root = tmp_path_factory.mktemp("injected")
    fault = inject_fp16_overflow(fp32, root / "injected-fp32.onnx")
    convert_fp16(root / "injected-fp32.onnx", root / "injected-fp16.onnx")
    return fault, root / "injected-fp32.onnx", root / "injected-fp16.onnx"


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    engine = open_engine(path)
    try:
        return engine.run({engine.inputs[0].name: x})["output0"]
    finally:
        engine.close()


def test_the_seeded_fault_leaves_fp32_alone_and_overflows_in_fp16(injected, fp32: Path, golden) -> None:
    fault, inj32, inj16 = injected
    assert fault.scale * 1 > FP16_MAX and fault.tensor.startswith("/model.")  # a tensor inside the network
    # the project's converter does not keep the injected Mul in float: its inputs were made float16
    half = onnx.shape_inference.infer_shapes(onnx.load(inj16))
    types = {v.name: v.type.tensor_type.elem_type for v in half.graph.value_info}
    types |= {i.name: i.data_type for i in half.graph.initializer}
    mul = next(n for n in half.graph.node if n.name == fault.node)
    assert mul.op_type == "Mul" and [types[i] for i in mul.input] == [TensorProto.FLOAT16, TensorProto.FLOAT16]
    for x in golden:
        original, copy = _run(fp32, x), _run(inj32, x)
        scale = np.abs(original).max()
        assert np.abs(copy - original).max() <= 1e-4 * scale  # fp32 carries x * 1e5 / 1e5 (boxes are in pixels)
        assert not np.isfinite(_run(inj16, x)).all()  # a real overflow, even in an unmarked CPU run


def test_first_divergence_names_the_injected_mul(injected, golden) -> None:
    fault, inj32, inj16 = injected
    d = first_divergence(inj32, inj16, golden)
    assert d.kind == "fp16" and d.tolerance == SCORE_TOLERANCE["fp16"] and d.cases == len(golden)
    assert d.found and d.node is not None
    assert (d.node.name, d.node.op_type) == (fault.node, "Mul")
    assert d.node.error_in <= d.tolerance  # what it was given was fine ...
    assert math.isinf(d.node.error_out) and math.isinf(d.node.alone) and d.node.nonfinite > 0  # ... what it gave is not
    assert d.node.ref_max > FP16_MAX and d.nonfinite[0] == fault.node
    # the fix keeps the whole out-of-range stretch in float32, up to the Mul that brings the values back
    assert d.keep_float[0] == fault.node and d.keep_float[-1] == fault.restore and fault.tensor not in d.keep_float
    assert f"keep {fault.node}" in d.fix and "float32" in d.fix and "block list" in d.fix
    assert d.severity == "serious" and "overflow" in d.message() and "\n" not in d.message()
    doc = json.loads(json.dumps(d.to_dict(), allow_nan=False))  # strict JSON: inf travels as a string
    assert doc["node"]["node"] == fault.node and doc["node"]["error_out"] == "inf" and len(doc["profile"]) == len(d.profile)
    assert fault.node in d.to_text()

    total = first_divergence(inj32, inj16, golden[:1], criterion="total", chunk=120)  # accumulated, and in chunks
    assert total.node is not None and total.node.name == fault.node and total.node.alone is None
    assert total.compared == d.compared  # every tensor still compared, three marked runs instead of one


def _fp16_keeping(src: Path, dst: Path, keep: list[str]) -> None:
    """convert_fp16 with `keep` in float32, the tensors between those nodes too (what the fix asks of a converter:
    onnxruntime's node_block_list alone casts every blocked node's output back to float16)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.shape_inference.infer_shapes(onnx.load(src))
    readers: dict[str, set[str]] = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, set()).add(n.name)
    inside = {o for n in model.graph.node if n.name in keep for o in n.output if readers.get(o, {""}) <= set(keep)}
    kept = [v for v in model.graph.value_info if v.name not in inside]  # no float16 value_info: no cast between them
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)
    half = convert_float_to_float16(model, keep_io_types=True, op_block_list=["Resize", "Range"], node_block_list=keep,
                                    disable_shape_infer=True)
    onnx.save(half, str(dst))


def test_the_suggested_fp16_fix_removes_the_overflow(injected, golden, tmp_path: Path) -> None:
    fault, inj32, inj16 = injected
    d = first_divergence(inj32, inj16, golden[:1])
    _fp16_keeping(inj32, tmp_path / "fixed-fp16.onnx", d.keep_float)
    fixed = first_divergence(inj32, tmp_path / "fixed-fp16.onnx", golden)
    assert not fixed.found and not fixed.nonfinite and fixed.output_error < SCORE_TOLERANCE["fp16"]
    assert all(np.isfinite(_run(tmp_path / "fixed-fp16.onnx", x)).all() for x in golden)
    _fp16_keeping(inj32, tmp_path / "half-fixed.onnx", [fault.node])  # the node alone is not enough: its values
    assert first_divergence(inj32, tmp_path / "half-fixed.onnx", golden[:1]).found  # are cast back to float16


def test_a_clean_fp16_conversion_is_not_blamed_but_a_tiny_tolerance_names_a_node(fp32: Path, fp16: Path, golden) -> None:
    tol = SCORE_TOLERANCE["fp16"]
    d = first_divergence(fp32, fp16, golden, tolerance=tol)
    assert d.kind == "fp16" and not d.found and d.severity == "ok" and d.fix == "" and d.keep_float == []
    assert d.compared >= 300 and d.unmatched == 0 and not d.nonfinite
    assert max(n.error_out for n in d.profile) > 0  # float16 did change every layer a little
    assert all(n.alone is None or n.alone <= tol for n in d.profile)
    assert "no node" in d.message()

    tiny = first_divergence(fp32, fp16, golden[:1], tolerance=1e-6)
    assert tiny.found and tiny.node is not None and tiny.node.alone is not None and tiny.node.alone > 1e-6
    assert tiny.node.name == tiny.profile[0].name  # the very first layer already rounds to float16
    assert tiny.keep_float == [tiny.node.name] and "block list" in tiny.fix


@pytest.mark.slow  # quantizes the model twice
def test_an_int8_culprit_is_named_and_excluding_it_takes_its_error_away(fp32: Path, golden, tmp_path: Path) -> None:
    calibration = [x[:1] for x in golden]
    head = head_float_nodes(onnx.load(fp32))
    recipe = int8_recipe("u8s8-w7")
    quantize_int8(fp32, tmp_path / "int8.onnx", calibration, recipe, float_nodes=head)
    tol = 0.05
    d = first_divergence(fp32, tmp_path / "int8.onnx", golden, tolerance=tol)
    assert d.kind == "int8" and d.compared >= 300  # QDQ graphs keep the float tensors' names
    assert any(n.quantized_in is not None for n in d.profile)  # DequantizeLinear outputs mapped back to their tensors
    assert d.found and d.node is not None and d.node.alone is not None and d.node.alone > tol
    assert d.keep_float[0] == d.node.name and "INT8" in d.fix
    quantize_int8(fp32, tmp_path / "int8-fixed.onnx", calibration, recipe, float_nodes=head + d.keep_float)
    fixed = first_divergence(fp32, tmp_path / "int8-fixed.onnx", golden, tolerance=tol)
    again = next(n for n in fixed.profile if n.name == d.node.name)
    assert again.alone is None or again.alone <= 1e-6  # in float now, on exact inputs it is exact
    assert fixed.node is None or fixed.node.name != d.node.name


def test_openvino_and_onnxruntime_agree_on_fp32(fp32: Path, golden) -> None:
    pytest.importorskip("openvino")
    d = first_divergence(fp32, fp32, golden, candidate_engine="openvino", tolerance=1e-3)
    assert d.kind == "engine" and d.candidate.endswith("on openvino (f32)")
    assert d.compared >= 300 and d.unmatched == 0  # OpenVINO kept every marked tensor's name
    assert not d.found and d.output_error < 1e-3 and max(n.error_out for n in d.profile) > 0


@pytest.mark.slow  # builds a variant into a copy of the bundle
def test_a_bundle_variant_is_bisected_on_its_golden_inputs(demo_bundle: Path, tmp_path: Path) -> None:
    from cvdeploy.build.variants import add_variants

    copy = tmp_path / "demo.cvd"
    shutil.copytree(demo_bundle, copy)
    outcome = {o.name: o for o in add_variants(copy, ["onnx-fp16"])}
    assert outcome["onnx-fp16"].written, outcome["onnx-fp16"].reason
    d = bisect_variant(copy, "onnx-fp16")
    assert d.candidate == "onnx-fp16.onnx on onnxruntime" and d.reference == "onnx-fp32.onnx on onnxruntime"
    assert d.tolerance == SCORE_TOLERANCE["fp16"] and d.cases == len(Bundle.load(copy).manifest.golden)
    assert not d.found and d.severity == "ok"
    against = bisect_variant(copy, "onnx-fp16", reference=demo_bundle / "variants" / "onnx-fp32.onnx")  # --reference
    assert against.reference == "onnx-fp32.onnx on onnxruntime" and not against.found
    assert [n.error_out for n in against.profile] == [n.error_out for n in d.profile]
    with pytest.raises(InputError, match="has no variant 'onnx-int8'"):
        bisect_variant(copy, "onnx-int8")
    with pytest.raises(InputError, match="neither a variant"):
        bisect_variant(copy, "onnx-fp16", reference="onnx-fp64")


def _tiny(path: Path, name: str) -> Path:
    graph = helper.make_graph([helper.make_node("Relu", [f"{name}_in"], [f"{name}_out"], name=f"{name}_relu")], name,
                              [helper.make_tensor_value_info(f"{name}_in", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [1, 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_bad_input_is_refused_in_one_line(fp32: Path, golden, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07this is not a protobuf \xff\xfe" * 20)
    errors = []
    with pytest.raises(ModelFormatError, match=r"cannot read .*garbage\.onnx as an ONNX model") as e:
        first_divergence(fp32, garbage, golden)
    errors.append(e.value)
    with pytest.raises(InputError, match="model file not found") as e:
        first_divergence(fp32, tmp_path / "missing.onnx", golden)
    errors.append(e.value)
    with pytest.raises(InputError, match=r"'images' has shape \[1, 4, 64, 64\]; onnx-fp32.onnx takes \[\?, 3, \?, \?\]") as e:
        first_divergence(fp32, fp32, np.zeros((1, 4, 64, 64), np.float32))
    errors.append(e.value)
    with pytest.raises(InputError, match="has shape") as e:
        first_divergence(fp32, fp32, [golden[0], np.zeros((3, 64, 64), np.float32)])
    errors.append(e.value)
    with pytest.raises(InputError, match="share no tensor names") as e:
        first_divergence(_tiny(tmp_path / "a.onnx", "a"), _tiny(tmp_path / "b.onnx", "b"), np.ones((1, 4), np.float32))
    errors.append(e.value)
    for kwargs in ({"tolerance": 0.0}, {"criterion": "median"}, {"candidate_engine": "tensorflow"},
                   {"candidate_precision": "fp8"}, {"chunk": 0}):
        with pytest.raises(InputError) as e:
            first_divergence(fp32, fp32, golden, **kwargs)
        errors.append(e.value)
    with pytest.raises(InputError, match="no node named") as e:
        inject_fp16_overflow(fp32, tmp_path / "x.onnx", node="/model.99/nothing")
    errors.append(e.value)
    with pytest.raises(InputError, match="scale") as e:
        inject_fp16_overflow(fp32, tmp_path / "x.onnx", scale=0.5)
    errors.append(e.value)
    assert all(str(err) and "\n" not in str(err) for err in errors)


def test_the_fault_goes_where_it_is_asked(fp32: Path, tmp_path: Path) -> None:
    fault = inject_fp16_overflow(fp32, tmp_path / "f.onnx", node="/model.2/cv2/act/Mul", scale=1e6)
    model = onnx.load(tmp_path / "f.onnx")
    onnx.checker.check_model(model)
    assert fault.tensor == "/model.2/cv2/act/Mul_output_0" and fault.scale == 1e6
    readers = [n for n in model.graph.node if fault.tensor in n.input]
    assert {n.name for n in readers} == {fault.node, f"{fault.node.rsplit('/', 1)[0]}/shape"}  # only the fault reads it now
    with pytest.raises(InputError, match="already holds an injected fault"):
        inject_fp16_overflow(tmp_path / "f.onnx", tmp_path / "g.onnx")
