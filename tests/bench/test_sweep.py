"""bench sweep: the Pareto front, the recommendation within budget and floor, and a real (small) sweep."""

from __future__ import annotations

from pathlib import Path

import pytest

from cvdeploy.bench.sweep import Point, SweepResult, pareto_front, parse_budget, sweep, write_outputs
from cvdeploy.errors import InputError


def P(label: str, m: float, ms: float) -> Point:
    return Point(label, 320, "onnx-fp32", m, ms, "-")


def test_pareto_front_keeps_only_unbeaten_points() -> None:
    pts = [P("a", 0.50, 10), P("b", 0.60, 20), P("c", 0.55, 25), P("d", 0.70, 40), P("e", 0.45, 12)]
    assert [p.model for p in pareto_front(pts)] == ["a", "b", "d"]


def test_recommendation_respects_budget_and_floor() -> None:
    pts = [P("a", 0.50, 10), P("b", 0.60, 20), P("d", 0.70, 40)]
    assert SweepResult(pts, [], 30, None).recommendation.model == "b"
    assert SweepResult(pts, [], 50, None).recommendation.model == "d"
    r = SweepResult(pts, [], 30, 0.65)
    assert r.recommendation is None and "below the floor" in r.explanation() and "b@320" in r.explanation()
    r = SweepResult(pts, [], 5, None)
    assert r.recommendation is None and "closest is a@320" in r.explanation()


def test_parse_budget() -> None:
    assert parse_budget("30ms") == parse_budget("30 ms") == parse_budget("0.03s") == parse_budget("30") == 30.0
    for bad in ("fast", "-3ms", "0"):
        with pytest.raises(InputError):
            parse_budget(bad)


@pytest.mark.slow
def test_a_real_sweep_writes_the_page_and_plot(demo_pt: Path, tmp_path: Path) -> None:
    from cvdeploy.demo.shapes import generate_shapes

    data = generate_shapes(tmp_path / "data", n_train=8, n_val=16, seed=11)
    steps: list[str] = []
    result = sweep([demo_pt], data, [192, 256], ["onnx-fp32"], tmp_path / "sw", budget_ms=1e6, on_step=steps.append)
    assert sorted(p.imgsz for p in result.points) == [192, 256]
    assert all(p.latency_ms > 0 and 0 <= p.map50_95 <= 1 for p in result.points)
    assert result.recommendation == max(result.points, key=lambda p: p.map50_95)  # an unlimited budget takes the most accurate
    page, png = write_outputs(result, tmp_path / "sw")
    assert "recommended:" in page.read_text() and png is not None and png.stat().st_size > 1000
    assert any("export" in s for s in steps)
    again = sweep([demo_pt], data, [256], ["onnx-fp32"], tmp_path / "sw", budget_ms=1e6, on_step=(steps2 := []).append)
    assert again.points and not any("export" in s for s in steps2)  # the bundle of the first sweep is reused
    with pytest.raises(InputError, match="multiples of 32"):
        sweep([demo_pt], data, [100], ["onnx-fp32"], tmp_path / "x", budget_ms=10)
