"""`bench tune`: the default is always a candidate, the winner is stored, and the Predictor applies it."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from cvdeploy.bench.tune import candidates, hint_from, tune
from cvdeploy.bundle.bundle import Bundle
from cvdeploy.errors import InputError
from cvdeploy.predict import Predictor
from cvdeploy.runtime.onnxruntime import OrtOptions


def test_search_space_starts_with_the_default_and_has_no_duplicates() -> None:
    space = candidates(cores=4)
    assert space[0] == OrtOptions() and len(space) == len(set(space))
    assert {o.intra_op_threads for o in space} == {0, 1, 2, 4}
    assert {o.graph_optimization for o in space} == {"basic", "extended", "all"}
    assert {o.execution_mode for o in space} == {"sequential", "parallel"}


def test_tune_stores_a_winner_no_slower_than_the_default_and_the_predictor_applies_it(demo_bundle: Path, tmp_path: Path) -> None:
    b = tmp_path / "b.cvd"
    shutil.copytree(demo_bundle, b)
    tensor = np.random.default_rng(0).random((1, 3, 256, 256), dtype=np.float32)
    space = [OrtOptions(intra_op_threads=1), OrtOptions(intra_op_threads=1, graph_optimization="basic")]
    result = tune(Bundle.load(b).variant_path(), tensor, rounds=2, per_round=2, warmup=1, space=space)
    assert len(result.trials) == 3 and result.default.options == OrtOptions()  # the default is always measured
    assert result.best.median_ms <= result.default.median_ms and result.speedup >= 1.0
    assert all(t.samples == 4 for t in result.trials)

    bundle = Bundle.load(b)
    bundle.manifest.runtime = [hint_from(result, "onnx-fp32", batch=1, concurrency=1, cpu="test cpu")]
    bundle.save_manifest()
    reloaded = Bundle.load(b)  # the manifest is still valid and the hashes still hold
    assert reloaded.runtime_hint("onnx-fp32").cpu == "test cpu"
    with Predictor(b) as p:
        assert p.engine.options == result.best.options
    with Predictor(b, engine_options=OrtOptions(intra_op_threads=2)) as p:  # an explicit choice wins over the hint
        assert p.engine.options.intra_op_threads == 2
    with pytest.raises(InputError):
        tune(Bundle.load(b).variant_path(), tensor, rounds=0)
