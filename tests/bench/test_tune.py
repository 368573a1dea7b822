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


FAST = OrtOptions(intra_op_threads=1)
LUCKY = OrtOptions(intra_op_threads=1, graph_optimization="basic")


def scripted(search: dict, confirm: dict, rounds: int, per_round: int):
    """A timer that plays `search` ms per candidate during the search and `confirm` ms afterwards (injected timings)."""
    calls: dict = {}

    def timer(options, measure) -> float:
        n = calls[options] = calls.get(options, 0) + 1
        return (search if n <= rounds * per_round else confirm)[options]

    return timer


def test_a_winner_is_confirmed_in_fresh_rounds_and_its_ratio_is_stored(demo_bundle: Path, tmp_path: Path) -> None:
    b = tmp_path / "b.cvd"
    shutil.copytree(demo_bundle, b)
    tensor = np.random.default_rng(0).random((1, 3, 256, 256), dtype=np.float32)
    path = Bundle.load(b).variant_path()
    # FAST is really faster: it wins, and the stored ratio is the confirmation's, not the search's.
    timer = scripted({OrtOptions(): 10.0, FAST: 5.0, LUCKY: 9.0}, {OrtOptions(): 11.0, FAST: 5.5, LUCKY: 9.0}, 2, 2)
    result = tune(path, tensor, rounds=2, per_round=2, warmup=1, space=[FAST, LUCKY], timer=timer)
    assert len(result.trials) == 3 and result.default.options == OrtOptions()  # the default is always measured
    assert all(t.samples == 4 for t in result.trials)
    assert result.best.options == result.chosen.options == FAST and result.speedup == 2.0
    hint = hint_from(result, "onnx-fp32", batch=1, concurrency=1, cpu="test cpu")
    assert (hint.tuned_ms, hint.default_ms) == (5.5, 11.0)
    # LUCKY only looked fast in the search (the minimum of noisy medians): fresh rounds find it slower, the default stays.
    timer = scripted({OrtOptions(): 10.0, FAST: 9.5, LUCKY: 6.0}, {OrtOptions(): 10.0, FAST: 9.5, LUCKY: 10.4}, 2, 2)
    lucky = tune(path, tensor, rounds=2, per_round=2, warmup=1, space=[FAST, LUCKY], timer=timer)
    assert lucky.best.options == LUCKY and lucky.chosen.options == OrtOptions() and lucky.speedup == 1.0
    assert hint_from(lucky, "onnx-fp32", batch=1, concurrency=1, cpu="x").intra_op_threads == 0

    bundle = Bundle.load(b)
    bundle.manifest.runtime = [hint_from(result, "onnx-fp32", batch=1, concurrency=1, cpu="test cpu")]
    bundle.save_manifest()
    reloaded = Bundle.load(b)  # the manifest is still valid and the hashes still hold
    assert reloaded.runtime_hint("onnx-fp32").cpu == "test cpu"
    with Predictor(b) as p:
        assert p.engine.options == FAST
    with Predictor(b, engine_options=OrtOptions(intra_op_threads=2)) as p:  # an explicit choice wins over the hint
        assert p.engine.options.intra_op_threads == 2
    with pytest.raises(InputError):
        tune(Bundle.load(b).variant_path(), tensor, rounds=0)
