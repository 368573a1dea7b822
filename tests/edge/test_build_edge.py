"""Refusals of `add_edge_variants` that happen before any export (fast), and the .param helpers."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cvdeploy.build.edge import EDGE_VARIANTS, add_edge_variants
from cvdeploy.bundle import Bundle
from cvdeploy.errors import InputError, ModelFormatError
from cvdeploy.evaluate.fixed_size import fixed_size_cases
from cvdeploy.runtime.ncnn import param_layers, set_input_shape

PARAM = "7767517\n3 3\nInput in0 0 1 in0\nConvolution conv_0 1 1 in0 1 0=16 1=3\nSigmoid sig 1 1 1 out0\n"


def test_unknown_variant_and_int8_without_data_are_refused(demo_bundle: Path, demo_pt: Path) -> None:
    with pytest.raises(InputError, match="unknown edge variant"):
        add_edge_variants(demo_bundle, ["ncnn-int4"], source=demo_pt)
    with pytest.raises(InputError, match="litert-int8 needs --data"):
        add_edge_variants(demo_bundle, ["litert-int8"], source=demo_pt)


def test_a_model_that_is_not_the_bundles_source_is_refused(demo_bundle: Path, demo_pt: Path, tmp_path: Path) -> None:
    other = tmp_path / demo_pt.name
    other.write_bytes(demo_pt.read_bytes() + b"\0")  # one byte more: another model as far as the bundle can tell
    before = sorted(p.name for p in (demo_bundle / "variants").iterdir())
    with pytest.raises(InputError, match="not this bundle's source model"):
        add_edge_variants(demo_bundle, ["ncnn-fp32"], source=other)
    assert sorted(p.name for p in (demo_bundle / "variants").iterdir()) == before


def test_fixed_size_cases_pad_the_rectangles_and_keep_the_square_ones(demo_bundle: Path, tmp_path: Path) -> None:
    bundle = Bundle.load(shutil.copytree(demo_bundle, tmp_path / "b.cvd"))
    hw = tuple(bundle.manifest.preprocess.imgsz)
    cases = fixed_size_cases(bundle, hw)  # type: ignore[arg-type]
    goldens = list(bundle.golden())
    assert len(cases) == len(goldens)
    pad = bundle.manifest.preprocess.pad_value / bundle.manifest.preprocess.scale
    for (x, ref, kind), g in zip(cases, goldens, strict=True):
        assert x.shape[2:] == hw and x.shape[:2] == g.input.shape[:2]
        assert set(ref) == set(g.outputs)
        if g.input.shape[2:] == hw:
            assert kind == "source" and (x == g.input).all()
        else:
            assert kind == "onnx-fp32"
            h, w = g.input.shape[2:]
            top, left = (hw[0] - h) // 2, (hw[1] - w) // 2
            assert (x[:, :, top : top + h, left : left + w] == g.input).all()
            assert top + left > 0 and float(x[0, 0, 0, 0]) == pytest.approx(pad)  # a rectangle: the corner is padding


def test_set_input_shape_writes_the_size_into_the_input_layer() -> None:
    text = set_input_shape(PARAM, 3, 224, 320)
    inp = next(p for kind, _, _, _, p in param_layers(text) if kind == "Input")
    assert inp == {"0": "320", "1": "224", "2": "3"}
    again = set_input_shape(text, 3, 256, 256)  # rewriting replaces, never appends a second size
    assert next(p for kind, _, _, _, p in param_layers(again) if kind == "Input") == {"0": "256", "1": "256", "2": "3"}
    with pytest.raises(ModelFormatError, match="magic"):
        param_layers("not a param\n")


def test_every_edge_variant_has_an_engine_and_a_precision() -> None:
    assert set(EDGE_VARIANTS.values()) <= {"fp32", "fp16", "int8"}
    assert {n.split("-")[0] for n in EDGE_VARIANTS} == {"ncnn", "litert"}
