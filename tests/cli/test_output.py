"""Output hygiene of the command line, run as a user runs it (real subprocesses): stdout carries the result only (a
table or JSON), progress and notes go to stderr, the libraries' logs only with --verbose, and tables fit 80 columns.

Where it matters, stderr is a real terminal (a pseudo-terminal), so that the progress bars are drawn: a bar or a log
line that went to stdout would then break the JSON or show up in the result.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pty
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from rich.cells import cell_len

CLI = [sys.executable, "-m", "cvdeploy"]
BAR = "━"  # what Rich's progress bars are drawn with (table borders too, which start with a corner or an edge)
ELLIPSIS = "…"  # what Rich puts at the end of a cell it cuts
# A third-party log record as Python's logging prints it (NNCF's own handler, logging.basicConfig, cvdeploy --verbose),
# and torch's glog-style lines ("W1130 01:55:20.263000 15651 torch/utils/cpp_extension.py:183] ...").
LIBRARY_LOG = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL):(?!cvdeploy)[\w.]+:|^[DIWEF]\d{4} \d\d:\d\d", re.M)
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")
SECRET_ENVS = ("CVDEPLOY_API_KEY", "CVDEPLOY_API_KEY_FILE", "CVDEPLOY_MODEL_KEY", "CVDEPLOY_MODEL_KEY_FILE",
               "CVDEPLOY_MODEL_KEY_COMMAND", "CVDEPLOY_VERBOSE", "CVDEPLOY_DEBUG")


def run(*args: str | Path, columns: int = 200, tty_stderr: bool = False, umask: int | None = None,
        timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """The CLI in a subprocess; with `tty_stderr`, stderr is a pseudo-terminal (progress bars drawn), stdout a pipe."""
    env = {k: v for k, v in os.environ.items() if k not in SECRET_ENVS}
    env.update(COLUMNS=str(columns), TERM="xterm-256color")
    cmd = [*CLI, *map(str, args)]
    preexec = (lambda: os.umask(umask)) if umask is not None else None
    if not tty_stderr:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, preexec_fn=preexec)
    master, slave = pty.openpty()
    chunks: list[bytes] = []

    def pump() -> None:
        while True:
            try:
                data = os.read(master, 1 << 16)
            except OSError:  # EIO: every copy of the terminal's other end is closed
                break
            if not data:
                break
            chunks.append(data)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave, text=True, timeout=timeout,
                           env=env, preexec_fn=preexec)
    finally:
        os.close(slave)
        reader.join(10)
        os.close(master)
    # The terminal's text without its control sequences (colours, cursor moves) and with plain line ends.
    err = ANSI.sub("", b"".join(chunks).decode("utf-8", "replace")).replace("\r\n", "\n")
    return subprocess.CompletedProcess(p.args, p.returncode, p.stdout, err)


def has_progress(text: str) -> bool:
    """A progress bar's frame: a line with a bar that is not a table's border."""
    return any(BAR in line and line.lstrip()[:1] not in "┏┡┗└┃│" for line in text.splitlines())


def only_json(p: subprocess.CompletedProcess[str]) -> object:
    """stdout parsed as one JSON document: nothing else may be on it (no progress, no log, no summary)."""
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-2000:])
    assert not has_progress(p.stdout) and not LIBRARY_LOG.search(p.stdout), p.stdout[-2000:]
    try:
        return json.loads(p.stdout)
    except json.JSONDecodeError as e:
        raise AssertionError(f"stdout is not only JSON ({e}): {p.stdout[:1000]!r}") from None


def human_only(p: subprocess.CompletedProcess[str]) -> str:
    """stdout of a command whose --json went to a file: the human result, and neither JSON nor progress nor logs."""
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-2000:])
    out = p.stdout
    assert out.strip() and not has_progress(out) and not LIBRARY_LOG.search(out), out[-2000:]
    assert not out.lstrip().startswith(("{", "[")), out[:500]
    return out


def has_openvino() -> bool:
    return importlib.util.find_spec("openvino") is not None


@pytest.fixture(scope="module")
def images(shapes_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four shapes images under a long, nested directory: long paths in the table."""
    d = tmp_path_factory.mktemp("out") / "a-rather-long-directory-name" / "holding-the-images-for" / "output-hygiene-tests"
    d.mkdir(parents=True)
    for f in sorted((shapes_data / "images" / "val").glob("*.jpg"))[:4]:
        shutil.copy(f, d / f"camera-07-frame-{f.stem}.jpg")
    return d


@pytest.fixture(scope="module")
def two_variants(demo_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the demo bundle with a second variant (openvino-fp32: converted and verified in seconds)."""
    if not has_openvino():
        pytest.skip("OpenVINO is not installed: no second variant to compare")
    from cvdeploy.build.variants import add_variants

    b = tmp_path_factory.mktemp("variants") / "two.cvd"
    shutil.copytree(demo_bundle, b)
    (outcome,) = [o for o in add_variants(b, ["openvino-fp32"]) if o.name == "openvino-fp32"]
    assert outcome.written, outcome.reason
    return b


# -- every --json: JSON alone on stdout, or a file that parses and the human result alone on stdout --------------------


def json_commands() -> set[str]:
    """Every command of the CLI that takes --json, by its path (`bench tune`), from the click command tree."""
    import typer.main

    from cvdeploy.cli.app import app, register_commands

    register_commands()  # every command module, as `main` does: a command missing here would escape the check

    found: set[str] = set()

    def walk(cmd: Any, path: tuple[str, ...]) -> None:  # Typer's own click: duck-typed, groups have `commands`
        if hasattr(cmd, "commands"):
            for name, sub in cmd.commands.items():
                walk(sub, (*path, name))
        elif any("--json" in getattr(p, "opts", ()) for p in cmd.params):
            found.add(" ".join(path))

    walk(typer.main.get_command(app), ())
    return found


COVERED = {"info", "predict", "verify", "bench run", "bench layers", "bench tune", "client predict"}
# Commands whose --json output is checked (parsed from stdout) by another test file, next to the rest of their tests.
ELSEWHERE = {
    "doctor": "tests/cli/test_doctor.py",
    "evaluate": "tests/evaluate/test_task_accuracy.py",
    "fleet agent": "tests/fleet/conftest.py",
    "fleet publish": "tests/fleet/conftest.py",
    "fleet status": "tests/fleet/test_fleet.py",
    "compress prune": "tests/compress/test_cli.py",
    "compress distill": "tests/compress/test_cli.py",
    "compress qat": "tests/compress/test_cli.py",
    **{f"registry {c}": "tests/registry/test_cli.py"
       for c in ("register", "promote", "rollback", "list", "resolve", "show", "history")},
}


def test_every_json_command_is_covered() -> None:
    """A new command with --json must join the tests below, or name the test file that checks its JSON."""
    assert json_commands() == COVERED | set(ELSEWHERE)
    root = Path(__file__).resolve().parents[2]
    for command, test_file in ELSEWHERE.items():
        text = (root / test_file).read_text()
        words = command.split()
        assert "--json" in text and all(f'"{w}"' in text for w in words), f"{test_file} does not run `{command} --json`"


def test_every_command_module_is_registered() -> None:
    """A module that declares commands but is missing from COMMAND_MODULES would be absent from `cvdeploy --help`."""
    from cvdeploy.cli.app import COMMAND_MODULES

    cli = Path(__file__).resolve().parents[2] / "src" / "cvdeploy" / "cli"
    declaring = {f.stem for f in cli.glob("*.py") if re.search(r"@\w*app\.command|\.add_typer\(", f.read_text())}
    imports = "\n".join(line for m in COMMAND_MODULES for line in (cli / f"{m}.py").read_text().splitlines()
                        if re.match(r"\s*(from \S+ )?import ", line))
    reached = set(COMMAND_MODULES) | {f.stem for f in cli.glob("*.py") if re.search(rf"\b{f.stem}\b", imports)}
    assert declaring - {"app"} <= reached, sorted(declaring - {"app"} - reached)


def test_info_json(demo_bundle: Path) -> None:
    doc = only_json(run("info", demo_bundle, "--json", tty_stderr=True))
    assert isinstance(doc, dict) and doc["name"] == "yolo11n-shapes" and "onnx-fp32" in doc["variants"]


def test_predict_json_with_progress_on_a_terminal(demo_bundle: Path, images: Path) -> None:
    p = run("predict", demo_bundle, images, "--json", tty_stderr=True)
    doc = only_json(p)
    assert isinstance(doc, list) and len(doc) == 4 and all(r["detections"] for r in doc)
    assert has_progress(p.stderr)  # the progress bar was drawn, on stderr
    assert re.search(r"4 image\(s\), \d+ detection\(s\) \(", p.stderr), p.stderr  # the summary too: stdout is the JSON


def test_verify_json_to_stdout_and_to_a_file(demo_bundle: Path, tmp_path: Path) -> None:
    p = run("verify", demo_bundle, "--json", "-", tty_stderr=True)
    (check,) = only_json(p)  # type: ignore[misc]
    assert check["variant"] == "onnx-fp32" and check["ok"] and "verified: 1 variant(s)" in p.stderr  # the human result moved to stderr
    out = tmp_path / "deep" / "checks.json"
    p = run("verify", demo_bundle, "--json", out, tty_stderr=True)
    text = human_only(p)
    assert "verified: 1 variant(s) match what was built" in text and f"checks written to {out}" in text
    assert json.loads(out.read_text())[0]["variant"] == "onnx-fp32"
    assert "verifying" in p.stderr  # the counted progress, on the terminal


def test_bench_run_json_to_stdout_and_to_a_file(demo_bundle: Path, tmp_path: Path) -> None:
    args = ("bench", demo_bundle, "--iterations", "2", "--warmup", "1", "--concurrency", "1", "--no-engine")
    doc = only_json(run(*args, "--json", "-", tty_stderr=True))
    assert isinstance(doc, dict) and [r["mode"] for r in doc["results"]] == ["sequential"]
    out = tmp_path / "bench.json"
    text = human_only(run(*args, "--json", out, tty_stderr=True))
    assert "p50 ms" in text and f"figures written to {out}" in text
    assert json.loads(out.read_text())["results"][0]["latency_ms"]["n"] == 2


def test_bench_layers_json_to_stdout_and_to_a_file(two_variants: Path, tmp_path: Path) -> None:
    args = ("bench", "layers", two_variants, "--variants", "onnx-fp32,openvino-fp32", "--rounds", "1", "--runs", "1",
            "--top", "3")
    doc = only_json(run(*args, "--json", "-"))
    assert isinstance(doc, dict) and doc["rounds"] == 1
    out = tmp_path / "layers.json"
    text = human_only(run(*args, "--json", out))
    assert "by kind of op" in text and f"comparison written to {out}" in text
    assert json.loads(out.read_text())["runs"] == 1


def test_bench_tune_json_to_stdout_and_to_a_file(demo_bundle: Path, tmp_path: Path) -> None:
    args = ("--rounds", "1", "--per-round", "1", "--dry-run", "--no-variants")
    doc = only_json(run("bench", "tune", demo_bundle, *args, "--json", "-", tty_stderr=True))
    assert isinstance(doc, dict) and doc["hint"]["variant"] == "onnx-fp32"
    out = tmp_path / "tune.json"
    text = human_only(run("bench", "tune", demo_bundle, *args, "--json", out, tty_stderr=True))
    assert "chosen:" in text and f"trials written to {out}" in text
    assert json.loads(out.read_text())["trials"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_client_predict_json(demo_bundle: Path, images: Path, tmp_path: Path) -> None:
    pytest.importorskip("uvicorn")
    pytest.importorskip("fastapi")
    import httpx

    port = _free_port()
    log = tmp_path / "server.log"  # a file, not a pipe nobody reads: the access log cannot fill it and stall the server
    with log.open("w") as sink:
        server = subprocess.Popen([*CLI, "serve", str(demo_bundle), "--port", str(port), "--log-level", "warning"],
                                  stdout=subprocess.DEVNULL, stderr=sink, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.3)
        p = run("client", "predict", url, images, "--json", tty_stderr=True)
        doc = only_json(p)
        assert isinstance(doc, list) and len(doc) == 4 and "4 of 4 image(s) predicted" in p.stderr
    finally:
        server.terminate()
        server.wait(30)


# -- tables at 80 columns ------------------------------------------------------------------------------------------------


def assert_fits(text: str, width: int = 80) -> None:
    assert ELLIPSIS not in text, text
    wide = [line for line in text.splitlines() if cell_len(line) > width and ("│" in line or "┃" in line or "━" in line)]
    assert not wide, "\n".join(wide)


def test_info_fits_80_columns(demo_bundle: Path, tmp_path: Path) -> None:
    from cvdeploy.bundle import Bundle

    bundle = demo_bundle
    if has_openvino():  # two rows, one with the engine's precision: the widest cells
        from cvdeploy.build.variants import add_variants

        bundle = tmp_path / "two.cvd"
        shutil.copytree(demo_bundle, bundle)
        add_variants(bundle, ["openvino-fp32"])
    p = run("info", bundle, columns=80)
    assert p.returncode == 0, p.stderr
    assert_fits(p.stdout)
    m = Bundle.load(bundle).manifest
    for name, v in m.variants.items():  # every cell in full
        assert name in p.stdout and v.sha256[:12] in p.stdout and v.engine in p.stdout
    for header in ("variant", "engine", "size", "mAP50-95", "ms b1", "max |Δ| scores", "sha256", "default"):
        assert header in p.stdout, header
    assert "letterbox to 256x256" in p.stdout and "ultralytics" in p.stdout


def first_column(table: str) -> str:
    """The text of a table's first column, its lines joined (folded paths put back together)."""
    return "".join(line.split("│")[1].strip() for line in table.splitlines() if line.startswith("│"))


def test_predict_fits_80_columns_with_a_summary(demo_bundle: Path, images: Path, tmp_path: Path) -> None:
    save = tmp_path / "annotated-output-directory-with-a-long-name" / "for-the-cameras-of-building-seven"
    p = run("predict", demo_bundle, images, "--save", save, columns=80, tty_stderr=True)
    assert p.returncode == 0, p.stderr
    assert_fits(p.stdout)
    assert not has_progress(p.stdout) and has_progress(p.stderr)  # progress on the terminal, not in the result
    files = sorted(images.iterdir())
    joined = first_column(p.stdout)
    for f in files:
        assert str(f) in joined, (str(f), joined)  # no path is cut: folded over lines, it is whole
    (summary,) = [line for line in p.stdout.splitlines() if line.startswith("4 image(s)")]
    m = re.fullmatch(r"4 image\(s\), (\d+) detection\(s\) \((.+)\), [\d.]+ ms mean per image, [\d.]+ s in all; "
                     r"annotated images: (.+)", summary)
    assert m, summary
    per_class = dict((name, int(n)) for n, name in (c.split(" ", 1) for c in m.group(2).split(", ")))
    assert sum(per_class.values()) == int(m.group(1)) and set(per_class) <= {"circle", "square", "triangle", "star", "hexagon", "cross"}
    assert m.group(3) == str(save) and len(list(save.iterdir())) == 4  # one line, the whole path: not cut at 80


# -- third-party logs: hidden without --verbose, on stderr with it ----------------------------------------------------------


def test_native_library_messages_only_with_verbose(demo_bundle: Path, images: Path, tmp_path: Path) -> None:
    """libpng prints "libpng error: ..." itself (file descriptor 2) on a truncated PNG; cvdeploy's own line says it."""
    import cv2

    d = tmp_path / "in"
    d.mkdir()
    shutil.copy(next(images.iterdir()), d / "good.jpg")
    ok, png = cv2.imencode(".png", cv2.imread(str(d / "good.jpg")))
    assert ok
    (d / "cut.png").write_bytes(png.tobytes()[: len(png) // 2])
    quiet = run("predict", demo_bundle, d, "--json")
    assert quiet.returncode == 1 and len(json.loads(quiet.stdout)) == 1
    assert "libpng" not in quiet.stderr + quiet.stdout, quiet.stderr
    lines = quiet.stderr.splitlines()  # cvdeploy's lines only: the bad file, the summary (stdout holds the JSON), the verdict
    assert len(lines) == 3 and lines[0].startswith(f"error: {d / 'cut.png'}: ") and lines[1].startswith("1 of 2 image(s), ")
    assert lines[2] == "error: 1 of 2 image(s) could not be read", quiet.stderr
    loud = run("-v", "predict", demo_bundle, d, "--json")
    assert loud.returncode == 1 and len(json.loads(loud.stdout)) == 1
    assert "libpng error" in loud.stderr, loud.stderr


@pytest.mark.slow
def test_build_int8_library_logs_only_with_verbose(demo_pt: Path, tmp_path: Path) -> None:
    ds = run("data", "shapes", tmp_path / "ds", "--n-train", "8", "--n-val", "8", "--seed", "1")
    assert ds.returncode == 0, ds.stderr
    assert ds.stdout.strip() == f"dataset written: {tmp_path / 'ds' / 'data.yaml'}" and not ds.stderr.strip()
    nncf = has_openvino() and importlib.util.find_spec("nncf") is not None
    variants = "onnx-fp32,onnx-int8" + (",openvino-int8" if nncf else "")  # NNCF (openvino-int8) logs INFO to stdout
    args = ("build", demo_pt, "--data", tmp_path / "ds" / "data.yaml", "--calib-images", "4", "--variants", variants)

    def check_result(p: subprocess.CompletedProcess[str]) -> None:
        # openvino-int8 may be refused on so small a calibration set: then exit 1 with a "not written" line.
        assert p.returncode == 0 or (p.returncode == 1 and "not written: openvino-int8" in p.stdout), (p.stdout, p.stderr)
        assert p.stdout.startswith("bundle yolo11n-shapes written to") and "build took" in p.stdout, p.stdout
        assert not has_progress(p.stdout) and "onnx-int8" in p.stdout

    quiet = run(*args, "-o", tmp_path / "quiet.cvd")
    check_result(quiet)
    assert not LIBRARY_LOG.search(quiet.stdout) and not LIBRARY_LOG.search(quiet.stderr), quiet.stdout + quiet.stderr
    assert quiet.stderr.strip() == "", quiet.stderr  # no terminal: no progress either; nothing but the result anywhere

    loud = run(*args, "-o", tmp_path / "loud.cvd", "--verbose")  # --verbose after the command, as people type it
    check_result(loud)
    assert not LIBRARY_LOG.search(loud.stdout), loud.stdout
    assert LIBRARY_LOG.search(loud.stderr), loud.stderr[-3000:]
    if nncf:
        assert "INFO:nncf:" in loud.stderr
