"""The ONNX Runtime engine: provider choice, options, reporting, and input checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cvdeploy.bundle import Bundle
from cvdeploy.errors import EngineError, InputError
from cvdeploy.runtime import Engine, OrtEngine, OrtOptions, resolve_providers
from cvdeploy.runtime import onnxruntime as ort_engine


def test_default_providers_prefer_accelerators(monkeypatch: pytest.MonkeyPatch) -> None:
    # A GPU cannot run here: pretend one is present to check the order TensorRT > CUDA > CPU.
    monkeypatch.setattr(ort_engine, "available_providers",
                        lambda: ["CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"])
    assert resolve_providers() == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert resolve_providers("cuda") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert resolve_providers(["cpu"]) == ["CPUExecutionProvider"]


def test_on_this_machine_cpu_is_chosen_and_unknown_providers_refused() -> None:
    assert resolve_providers()[-1] == "CPUExecutionProvider"
    with pytest.raises(InputError, match="not available here"):
        resolve_providers("NoSuchExecutionProvider")


def test_options_are_validated() -> None:
    with pytest.raises(InputError, match="graph_optimization"):
        OrtOptions(graph_optimization="max")
    with pytest.raises(InputError, match="execution_mode"):
        OrtOptions(execution_mode="turbo")
    with pytest.raises(InputError, match="thread"):
        OrtOptions(intra_op_threads=-1)


def test_engine_reports_inputs_outputs_provider_and_applies_options(demo_bundle: Path) -> None:
    path = Bundle.load(demo_bundle).variant_path()
    engine = OrtEngine(path, OrtOptions(intra_op_threads=1, inter_op_threads=1, graph_optimization="basic",
                                        execution_mode="parallel"))
    assert isinstance(engine, Engine)
    assert [i.to_dict() for i in engine.inputs] == [{"name": "images", "shape": [None, 3, None, None], "dtype": "float32"}]
    assert engine.outputs[0].name == "output0" and engine.outputs[0].dynamic
    assert engine.provider == "CPUExecutionProvider"
    so = engine.session.get_session_options()
    assert (so.intra_op_num_threads, so.inter_op_num_threads) == (1, 1)
    assert engine.metadata["task"] == "detect"
    out = engine.run({"images": np.zeros((1, 3, 64, 96), np.float32)})
    assert out["output0"].shape[:2] == (1, 10)
    # the same model from bytes (how encrypted bundles will load it)
    same = OrtEngine(path.read_bytes()).run({"images": np.zeros((1, 3, 64, 96), np.float32)})
    np.testing.assert_allclose(same["output0"], out["output0"], atol=1e-4)


def test_engine_input_checks_and_load_errors(demo_bundle: Path, tmp_path: Path) -> None:
    engine = OrtEngine(Bundle.load(demo_bundle).variant_path())
    with pytest.raises(InputError, match="model inputs are"):
        engine.run({"x": np.zeros((1, 3, 64, 64), np.float32)})
    with pytest.raises(InputError, match="expected shape"):
        engine.run({"images": np.zeros((1, 3, 64), np.float32)})
    with pytest.raises(InputError, match="not found"):
        OrtEngine(tmp_path / "none.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x01garbage")
    with pytest.raises(EngineError, match="could not load"):
        OrtEngine(bad)
