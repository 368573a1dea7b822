"""Canary and shadow releases against a real server at concurrency 8: a deliberately worse candidate (a real bundle whose
class scores are scaled down) is rolled back automatically, an equal one promoted, shadow mode answers with the incumbent
only, and no request fails across promotion and rollback (every response is counted)."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from tests.serve.conftest import Running, start_server, stop_server
from tests.serve.test_drift_monitor import scenes

MODEL = "yolo11n-shapes"
PREDICT = f"/v1/models/{MODEL}/predict"
CANARY = f"/admin/models/{MODEL}/canary"
WINDOW, MIN, EVERY = 60, 30, 10


def scaled_scores(src: Path, out: Path, factor: float) -> Path:
    """A copy of bundle `src` whose ONNX variant multiplies every class score by `factor` (boxes untouched), re-hashed
    through the bundle API so that it loads like any bundle: a model that finds fewer objects, less confidently."""
    import onnx
    from onnx import helper, numpy_helper

    from cvdeploy.bundle.bundle import Bundle, sha256_file

    shutil.copytree(src, out)
    b = Bundle.load(out, check_hashes=False)
    path = b.variant_path("onnx-fp32")
    model = onnx.load(path)
    (output,) = model.graph.output
    channels = output.type.tensor_type.shape.dim[1].dim_value  # 4 box coordinates, then one score per class
    for node in model.graph.node:
        node.output[:] = [f"{output.name}_raw" if o == output.name else o for o in node.output]
    scale = np.ones((1, channels, 1), np.float32)
    scale[0, 4:, 0] = factor
    model.graph.initializer.append(numpy_helper.from_array(scale, "score_scale"))
    model.graph.node.append(helper.make_node("Mul", [f"{output.name}_raw", "score_scale"], [output.name]))
    onnx.save(model, path)
    b.manifest.variants["onnx-fp32"].sha256 = sha256_file(path)
    b.save_manifest()
    Bundle.load(out)  # every hash holds again
    return out


def failing_engine(src: Path, out: Path) -> Path:
    """A copy of bundle `src` whose ONNX graph reshapes its output through rows of the square input's size and back:
    the identity at the model's own (square) size, where the warm-up runs, and an engine error at any other input
    size (the minimal-padding rectangles of non-square images)."""
    import onnx
    from onnx import helper, numpy_helper

    from cvdeploy.bundle.bundle import Bundle, sha256_file

    shutil.copytree(src, out)
    b = Bundle.load(out, check_hashes=False)
    path = b.variant_path("onnx-fp32")
    model = onnx.load(path)
    (output,) = model.graph.output
    channels = output.type.tensor_type.shape.dim[1].dim_value
    h, w = b.manifest.preprocess.imgsz
    anchors = sum((h // s) * (w // s) for s in (8, 16, 32))
    raw = f"{output.name}_raw"
    for node in model.graph.node:
        node.output[:] = [raw if o == output.name else o for o in node.output]
    model.graph.initializer.append(numpy_helper.from_array(np.array([-1, channels * anchors], np.int64), "square_rows"))
    model.graph.node.extend([helper.make_node("Reshape", [raw, "square_rows"], ["square"]),
                             helper.make_node("Shape", [raw], ["raw_shape"]),
                             helper.make_node("Reshape", ["square", "raw_shape"], [output.name])])
    onnx.save(model, path)
    b.manifest.variants["onnx-fp32"].sha256 = sha256_file(path)
    b.save_manifest()
    return out


def blast(url: str, blobs: list[bytes], *, headers: dict | None = None, concurrency: int = 8, stop=None,
          path: str = PREDICT) -> list[tuple[int, str]]:
    """POST every blob, `concurrency` at a time (until `stop()` says so, checked between requests); (status, version
    that answered) of every response."""

    async def run() -> list[tuple[int, str]]:
        sem, out, done = asyncio.Semaphore(concurrency), [], [False]
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            async def one(b: bytes) -> None:
                async with sem:
                    if stop is not None and (done[0] or (len(out) % 8 == 0 and stop())):
                        done[0] = True
                        return
                    r = await client.post(path, content=b, headers=headers)
                    out.append((r.status_code, r.json().get("model_version", r.text) if r.status_code == 200 else r.text))
            await asyncio.gather(*(one(b) for b in blobs))
        return out

    return asyncio.run(run())


def status(r: Running) -> dict:
    got = httpx.get(r.url + CANARY, timeout=30)
    assert got.status_code == 200, got.text
    return got.json()


def start(r: Running, bundle: Path, **kw) -> dict:
    got = httpx.post(r.url + CANARY, json={"bundle": str(bundle), **kw}, timeout=120)
    assert got.status_code == 200, got.text
    return got.json()


@pytest.fixture(scope="module")
def candidates(demo_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("candidates")
    good = root / "good.cvd"
    shutil.copytree(demo_bundle, good)
    return {"worse": scaled_scores(demo_bundle, root / "worse.cvd", 0.4), "good": good}


@pytest.fixture(scope="module")
def server(demo_bundle: Path) -> Iterator[Running]:
    r = start_server([str(demo_bundle)], max_batch=4, canary_window=WINDOW, canary_min_requests=MIN, canary_every=EVERY,
                     canary_max_latency_ratio=3.0)  # this machine's noise: latency is not what these candidates differ by
    yield r
    stop_server(r)


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    return scenes(77, 60)


def test_a_worse_candidate_is_rolled_back_within_the_window_with_no_failed_request(server: Running, candidates, images) -> None:
    before = status_or_none(server)
    assert before is None
    s = start(server, candidates["worse"], share=0.5)
    assert (s["status"], s["mode"], s["candidate"]["version"], s["incumbent"]["version"]) == ("running", "canary", "2", "1")
    answers = blast(server.url, images * 6, stop=lambda: status(server)["status"] != "running")
    assert [a for a in answers if a[0] != 200] == []  # every accepted request answered, across the rollback
    after = status(server)
    assert (after["status"], after["decided_by"]) == ("rolled_back", "auto"), after["judgement"]
    assert after["candidate"]["requests"] <= WINDOW  # decided before the candidate's window was full
    assert any(w in after["reason"] for w in ("confidence", "boxes_per_image")), after["reason"]
    by = Counter(v for _, v in answers)
    assert by["2"] >= MIN and by["1"] >= MIN  # both answered while the release ran
    assert {v for _, v in blast(server.url, images[:16])} == {"1"}  # the candidate is gone
    text = httpx.get(server.url + "/metrics", timeout=30).text
    assert 'cvdeploy_canary_decisions_total{by="auto",decision="rollback",model="yolo11n-shapes"} 1.0' in text
    assert 'cvdeploy_model_ready{model="yolo11n-shapes",version="2"} 0.0' in text


def status_or_none(r: Running) -> dict | None:
    got = httpx.get(r.url + CANARY, timeout=30)
    return got.json() if got.status_code == 200 else None


def test_a_candidate_whose_engine_fails_costs_no_client_its_answer_and_is_rolled_back(
        server: Running, demo_bundle: Path, images, tmp_path: Path) -> None:
    start(server, failing_engine(demo_bundle, tmp_path / "failing.cvd"), share=0.5)
    answers = blast(server.url, images * 4, stop=lambda: status(server)["status"] != "running")
    assert [a for a in answers if a[0] != 200] == []  # the incumbent answered what the candidate failed
    after = status(server)
    assert (after["status"], after["decided_by"]) == ("rolled_back", "auto") and "error rate" in after["reason"], after["reason"]
    assert after["candidate"]["failures"] >= MIN // 2 and after["incumbent"]["failures"] == 0


def test_shadow_mode_answers_only_with_the_incumbent_and_rolls_a_worse_candidate_back(server: Running, candidates, images) -> None:
    s = start(server, candidates["worse"], share=1.0, mode="shadow")
    assert s["mode"] == "shadow"
    answers = blast(server.url, images * 4, headers={"X-Cvdeploy-Cohort": "canary"},  # a shadow never answers, even asked
                    stop=lambda: status(server)["status"] != "running")
    assert {a[0] for a in answers} == {200} and {v for _, v in answers} == {"1"}
    after = status(server)
    assert (after["status"], after["decided_by"]) == ("rolled_back", "auto"), after["judgement"]
    assert after["shadow"]["copied"] >= MIN and after["candidate"]["requests"] >= MIN


def test_the_cohort_header_routes_and_an_equal_candidate_is_promoted_without_a_failed_request(server: Running, candidates, images) -> None:
    start(server, candidates["good"], share=0.0)
    assert {v for _, v in blast(server.url, images[:8], headers={"X-Cvdeploy-Cohort": "canary"})} == {"2"}
    assert {v for _, v in blast(server.url, images[:8], headers={"X-Cvdeploy-Cohort": "stable"})} == {"1"}
    assert {s for s, _ in blast(server.url, images[:2], headers={"X-Cvdeploy-Cohort": "blue"})} == {400}
    assert httpx.post(server.url + CANARY, json={"bundle": str(candidates["good"])}, timeout=30).status_code == 400  # one at a time
    # An equal candidate on half the traffic: judged every 10 of its requests, promoted once its window is full.
    httpx.post(server.url + CANARY + "/rollback", json={"reason": "restart at a share of 0.5"}, timeout=30).raise_for_status()
    start(server, candidates["good"], share=0.5)
    answers = blast(server.url, images * 8, stop=lambda: status(server)["status"] != "running")
    assert [a for a in answers if a[0] != 200] == []
    after = status(server)
    assert (after["status"], after["decided_by"]) == ("promoted", "auto"), after["judgement"]
    assert after["candidate"]["requests"] >= WINDOW
    assert {v for _, v in blast(server.url, images[:16])} == {"2"}  # the candidate serves now
    ready = httpx.get(server.url + "/v2/health/ready", timeout=30).json()
    assert ready["models"][MODEL]["versions"] == ["2"]


def test_a_manual_promotion_in_the_middle_of_a_burst_loses_no_request(server: Running, candidates, images) -> None:
    start(server, candidates["good"], share=0.5)  # incumbent 2 (promoted above), candidate 3

    async def run() -> tuple[list[int], dict]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            sem = asyncio.Semaphore(8)

            async def one(b: bytes) -> int:
                async with sem:
                    return (await client.post(PREDICT, content=b)).status_code

            burst = [asyncio.create_task(one(b)) for b in images * 2]
            await asyncio.sleep(0.3)  # requests in flight on both versions
            promoted = await client.post(server.url + CANARY + "/promote", json={"reason": "manual"})
            return list(await asyncio.gather(*burst)), promoted.json()

    codes, promoted = asyncio.run(run())
    assert codes == [200] * len(codes)
    assert (promoted["status"], promoted["decided_by"], promoted["reason"]) == ("promoted", "admin", "manual")
    assert {v for _, v in blast(server.url, images[:8])} == {"3"}
    assert httpx.post(server.url + CANARY + "/promote", timeout=30).status_code == 404  # nothing running


@pytest.mark.parametrize(("body", "why"), [
    ({"bundle": "/nonexistent.cvd"}, "not a bundle"),
    ({"bundle": 3}, "expected JSON"),
    ({"bundle": "x", "mode": "blue"}, "mode"),
    ({"bundle": "x", "share": 2}, "share"),
    ({"bundle": "x", "share": "half"}, "share"),
    ({"bundle": "x", "extra": 1}, "expected JSON"),
    ({"bundle": "a\u0000b"}, "not a bundle"),
    ({"bundle": "x" * 5000}, "not a bundle"),
    ({"bundle": "x", "version": "../2"}, "version must be"),
])
def test_bad_release_requests_are_refused_with_4xx(server: Running, body: dict, why: str) -> None:
    got = httpx.post(server.url + CANARY, json=body, timeout=30)
    assert got.status_code == 400 and why in got.json()["error"], got.text
    assert httpx.post(server.url + CANARY, content=b"{", timeout=30).status_code == 400
    assert httpx.post("/".join([server.url, "admin/models/nope/canary"]), json={"bundle": "x"}, timeout=30).status_code in (400, 404)
    assert httpx.post(server.url + CANARY + "/rollback", json={"reason": 5}, timeout=30).status_code == 400


def test_release_routes_need_the_lifecycle_permission() -> None:
    from cvdeploy.security.auth import ROLES, route_permission

    for method, path in (("POST", CANARY), ("POST", CANARY + "/promote"), ("POST", CANARY + "/rollback")):
        assert route_permission(method, path) == "model.lifecycle"
    for path in (CANARY, "/admin/canary", "/admin/drift"):
        assert route_permission("GET", path) == "metrics"
    assert "model.lifecycle" not in ROLES["predictor"] and "metrics" not in ROLES["viewer"]


def test_serving_a_registry_alias_follows_its_promotions_and_rollbacks_without_losing_a_request(
        tmp_path: Path, demo_bundle: Path, candidates, images) -> None:
    pytest.importorskip("cvdeploy.registry")

    from cvdeploy.registry import Registry
    from cvdeploy.serve.app import build_repository
    from cvdeploy.serve.settings import ServeSettings

    reg = Registry(tmp_path / "registry.db")
    reg.register(demo_bundle, model="shapes")
    reg.register(candidates["worse"], model="shapes")
    reg.promote("shapes", "production", 1)
    repo = build_repository([], None, ServeSettings(max_batch=4, registry_poll_s=0.1), registry=str(tmp_path / "registry.db"),
                            follow=["shapes@production"])
    r = start_server([], repo=repo)
    answers: list[tuple[int, str]] = []
    stop = threading.Event()

    def load() -> None:  # concurrency 8, all the while the alias moves
        while not stop.is_set():
            answers.extend(blast(r.url, images[:16], path="/v1/models/shapes/predict"))

    def served_after(version: str) -> bool:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if answers and answers[-1][1] == version and repo.versions("shapes") == [version]:
                return True
            time.sleep(0.05)
        return False

    thread = threading.Thread(target=load)
    thread.start()
    try:
        assert served_after("1")
        reg.promote("shapes", "production", 2)
        assert served_after("2")
        reg.rollback("shapes", "production")
        assert served_after("1")
    finally:
        stop.set()
        thread.join(60)
        stop_server(r)
    assert len(answers) >= 48 and [a for a in answers if a[0] != 200] == []
    assert {v for _, v in answers} == {"1", "2"}


def test_speed_is_compared_at_equal_batch_sizes() -> None:
    """A side with more traffic runs fuller batches and reads faster per image: an equal candidate on a small share must
    not read slower, and a slower one must."""
    from cvdeploy.serve.canary import Arm, speed_ratio
    from cvdeploy.serve.monitor import Sample

    incumbent, equal, slower = Arm(200), Arm(200), Arm(200)
    for i in range(60):  # most incumbent requests in batches of 8 (1 ms an image), some alone (3 ms)
        incumbent.ok(0.02, Sample(), 8 if i % 4 else 1, 0.001 if i % 4 else 0.003)
    for _ in range(20):  # the candidate's few requests run alone
        equal.ok(0.01, Sample(), 1, 0.003)
        slower.ok(0.01, Sample(), 1, 0.006)
    assert speed_ratio(incumbent, equal) == pytest.approx(1.0)
    assert speed_ratio(incumbent, slower) == pytest.approx(2.0)
    assert speed_ratio(Arm(10), equal) is None  # no batch size in common: not judged on speed


@pytest.mark.parametrize(("args", "message"), [
    (["--model", "shapes"], "error: --model takes NAME@ALIAS (e.g. shapes@production), got 'shapes'"),
    (["{bundle}", "--canary", "{bundle}", "--workers", "2", "--port", "1"], "error: --workers > 1 with --canary: each worker"),
])
def test_the_cli_refuses_bad_release_options_in_one_line(demo_bundle: Path, args: list[str], message: str) -> None:
    import subprocess
    import sys

    argv = [a.format(bundle=demo_bundle) for a in args]
    p = subprocess.run([sys.executable, "-m", "cvdeploy", "serve", *argv], capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and p.stderr.strip().startswith(message), p.stderr
