"""The command line, run as a user runs it: real subprocesses, real files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "cvdeploy"]


def run(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300,
                          env={**__import__("os").environ, "COLUMNS": "200"})


def assert_one_line_error(p: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert p.returncode != 0
    err = p.stderr.strip()
    assert err.startswith("error:") and "\n" not in err, p.stderr
    assert "Traceback" not in p.stderr + p.stdout
    for n in needles:
        assert n in err, err


@pytest.fixture(scope="module")
def image(shapes_data: Path) -> Path:
    return sorted((shapes_data / "images" / "val").glob("*.jpg"))[0]


def test_version() -> None:
    from cvdeploy import __version__

    p = run("--version")
    assert p.returncode == 0 and p.stdout.strip() == f"cvdeploy {__version__}"


def test_predict_json(demo_bundle: Path, image: Path) -> None:
    p = run("predict", demo_bundle, image, "--json")
    assert p.returncode == 0, p.stderr
    (res,) = json.loads(p.stdout)
    assert res["source"] == str(image) and res["detections"]
    d = res["detections"][0]
    assert set(d) == {"box", "confidence", "class_id", "class_name"} and set(d["box"]) == {"x1", "y1", "x2", "y2"}
    assert set(res["timings_ms"]) == {"decode", "preprocess", "queue", "infer", "postprocess", "total"}


def test_predict_directory_saves_annotated_images(demo_bundle: Path, shapes_data: Path, tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    for f in sorted((shapes_data / "images" / "val").glob("*.jpg"))[:3]:
        shutil.copy(f, src / f.name)
    p = run("predict", demo_bundle, src, "--save", tmp_path / "out", "--conf", "0.3")
    assert p.returncode == 0, p.stderr
    assert sorted(f.name for f in (tmp_path / "out").iterdir()) == sorted(f.name for f in src.iterdir())
    assert "annotated images" in p.stdout and "yolo11n-shapes" in p.stdout


def test_saved_images_with_the_same_stem_do_not_overwrite_each_other(demo_bundle: Path, image: Path, tmp_path: Path) -> None:
    import cv2

    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(image, src / "a.jpg")
    cv2.imwrite(str(src / "a.png"), cv2.imread(str(image)))
    p = run("predict", demo_bundle, src, "--save", tmp_path / "out")
    assert p.returncode == 0, p.stderr
    assert sorted(f.name for f in (tmp_path / "out").iterdir()) == ["a-1.jpg", "a.jpg"]


def test_negative_seed_is_a_usage_error(tmp_path: Path) -> None:
    p = run("data", "shapes", tmp_path / "d", "--seed", "-1")
    assert p.returncode == 2 and "seed" in p.stderr.lower()


def test_predict_plain_onnx(demo_bundle: Path, image: Path) -> None:
    p = run("predict", demo_bundle / "variants" / "onnx-fp32.onnx", image, "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)[0]["detections"]


def test_bad_input_gives_one_line_and_nonzero_exit(demo_bundle: Path, image: Path, tmp_path: Path, demo_pt: Path) -> None:
    assert_one_line_error(run("predict", demo_bundle, tmp_path / "missing.jpg"), "not found", "missing.jpg")
    assert_one_line_error(run("predict", tmp_path / "nothing.cvd", image), "not found")
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(image.read_bytes()[:200])
    assert_one_line_error(run("predict", demo_bundle, corrupt), "corrupt")
    text = tmp_path / "notes.png"
    text.write_text("hello, I am text")
    assert_one_line_error(run("predict", demo_bundle, text), "not a supported image")
    assert_one_line_error(run("predict", demo_pt, image), "unknown model format", "cvdeploy build")
    assert_one_line_error(run("predict", demo_bundle, image, "--classes", "a,b"), "--classes")
    assert_one_line_error(run("predict", demo_bundle, image, "--variant", "onnx-int8"), "no variant")
    assert_one_line_error(run("info", tmp_path), "not a bundle")


def test_wrong_input_shape_model(tmp_path: Path, image: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 10])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    for k, v in {"names": "{0: 'a'}", "imgsz": "[64, 64]", "task": "detect", "stride": "32"}.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
    path = tmp_path / "flat.onnx"
    onnx.save(model, path)
    assert_one_line_error(run("predict", path, image), "NCHW")


def test_mixed_directory_reports_bad_files_and_keeps_the_good(demo_bundle: Path, image: Path, tmp_path: Path) -> None:
    shutil.copy(image, tmp_path / "good.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff")
    p = run("predict", demo_bundle, tmp_path, "--json")
    assert p.returncode == 1
    assert len(json.loads(p.stdout)) == 1
    assert "bad.jpg" in p.stderr and "1 of 2 image(s) could not be read" in p.stderr


def test_info(demo_bundle: Path) -> None:
    p = run("info", demo_bundle)
    assert p.returncode == 0, p.stderr
    for needle in ("yolo11n-shapes", "detect", "onnx-fp32", "circle", "letterbox to 256x256", "ultralytics"):
        assert needle in p.stdout
    m = json.loads(run("info", demo_bundle, "--json").stdout)
    assert m["schema_version"] == 1 and "onnx-fp32" in m["variants"]


def test_data_shapes(tmp_path: Path) -> None:
    p = run("data", "shapes", tmp_path / "ds", "--n-train", "2", "--n-val", "3", "--seed", "4")
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "ds" / "data.yaml").is_file()
    assert len(list((tmp_path / "ds" / "images" / "val").glob("*.jpg"))) == 3
    bad = run("data", "shapes", tmp_path / "ds2", "--n-val", "0")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_build_command(demo_pt: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.cvd"
    p = run("build", demo_pt, "-o", out, "--name", "demo")
    assert p.returncode == 0, p.stderr
    assert (out / "manifest.json").is_file() and "max |Δ| class scores vs torch" in p.stdout
    assert_one_line_error(run("build", demo_pt, "-o", out), "already exists", "--force")


@pytest.mark.slow
def test_demo_end_to_end(tmp_path: Path) -> None:
    p = run("demo", "--out", tmp_path / "demo", "--n", "3")
    assert p.returncode == 0, p.stderr
    assert len(list((tmp_path / "demo" / "predictions").glob("*.jpg"))) == 3
    assert "annotated images" in p.stdout and "yolo11n-shapes" in p.stdout
    again = run("demo", "--out", tmp_path / "demo", "--n", "2")  # the bundle is reused, not rebuilt
    assert again.returncode == 0 and "using the demo bundle" in again.stderr  # a note: stderr, the table is the result
    assert len(list((tmp_path / "demo" / "predictions").iterdir())) == 2  # only this run's images


@pytest.mark.slow
@pytest.mark.parametrize(("task", "folder", "cell"), [("classify", "predictions-cls", r"(circle|square|triangle|star|hexagon|cross) [01]\.\d\d"),
                                                      ("segment", "predictions-seg", r"\d+ (circle|square|triangle|star|hexagon|cross)")])
def test_demo_of_another_task(tmp_path: Path, task: str, folder: str, cell: str) -> None:
    import re

    p = run("demo", "--out", tmp_path, "--n", "3", "--task", task)
    assert p.returncode == 0, p.stderr
    assert len(list((tmp_path / folder).glob("*.jpg"))) == 3 and re.search(cell, p.stdout), p.stdout
    assert_one_line_error(run("demo", "--out", tmp_path, "--task", "depth"), "--task")


def test_bench_writes_a_table_and_json(demo_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    p = run("bench", demo_bundle, "--iterations", "3", "--warmup", "1", "--concurrency", "1,2",
            "--profile", tmp_path / "trace.json", "--top", "3", "--json", out)
    assert p.returncode == 0, p.stderr
    assert "pipelined / sequential throughput" in p.stdout and "slowest nodes" in p.stdout
    report = json.loads(out.read_text())
    assert [r["mode"] for r in report["results"]] == ["engine", "sequential", "pipelined"]
    assert all(r["latency_ms"]["n"] == 3 and r["warmup"]["calls"] == 1 for r in report["results"])
    assert len(report["profile"]["top_nodes"]) == 3 and (tmp_path / "trace.json").is_file()
    assert report["machine"]["cpu"]["flags"] is not None


def test_bench_bad_options(demo_bundle: Path) -> None:
    assert_one_line_error(run("bench", demo_bundle, "--batch", "one"), "--batch")
    assert_one_line_error(run("bench", demo_bundle, "--imgsz", "100"), "stride")
    assert_one_line_error(run("bench", demo_bundle / "nope"), "not found")


def test_bench_tune_stores_the_winner(demo_bundle: Path, tmp_path: Path) -> None:
    b = tmp_path / "b.cvd"
    shutil.copytree(demo_bundle, b)
    p = run("bench", "tune", b, "--rounds", "1", "--per-round", "1", "--json", tmp_path / "tune.json")
    assert p.returncode == 0, p.stderr
    assert "chosen:" in p.stdout and "(default)" in p.stdout
    manifest = json.loads((b / "manifest.json").read_text())
    hints = manifest["runtime"]
    assert len(hints) == 1 and hints[0]["variant"] == "onnx-fp32"
    doc = json.loads((tmp_path / "tune.json").read_text())
    assert doc["hint"] == hints[0] and hints[0]["tuned_ms"] == doc["confirmed_ms"]  # the confirmation's figure is stored
    (record,) = manifest["latencies"]  # every variant re-timed on this machine, for the Predictor's choice
    assert record["how"] == "bench tune" and set(record["variants"]) == {"onnx-fp32"} and "the Predictor now chooses" in p.stdout
    assert "tuned engine settings for onnx-fp32" in run("info", b).stdout
    dry = run("bench", "tune", demo_bundle, "--rounds", "1", "--per-round", "1", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    untouched = json.loads((demo_bundle / "manifest.json").read_text())
    assert untouched["runtime"] == [] and untouched["latencies"] == []  # --dry-run writes nothing
