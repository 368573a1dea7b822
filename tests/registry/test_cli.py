"""`cvdeploy registry ...` as a user runs it: real subprocesses, a real registry file, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

MakeVersion = Callable[..., Path]  # the make_version fixture (conftest.py)


def cli(*args: str | Path, registry: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "CVDEPLOY_REGISTRY": str(registry)}
    return subprocess.run([sys.executable, "-m", "cvdeploy", *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=300)


def one_line_error(p: subprocess.CompletedProcess[str], needle: str) -> None:
    assert p.returncode == 1, p.stdout + p.stderr
    err = p.stderr.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err, p.stderr
    assert needle in err, err


def test_register_promote_rollback_show_resolve(tmp_path: Path, make_version: MakeVersion) -> None:
    reg = tmp_path / "reg" / "registry.db"
    one, two = make_version("one"), make_version("two", conf=0.35)
    p = cli("registry", "register", one, "--json", "--note", "first", registry=reg)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["version"] == 1 and doc["stored"] == "copy" and doc["lineage"]["manifest_sha256"] and doc["note"] == "first"
    p = cli("registry", "register", two, "--reference", "--by", "alice", registry=reg)
    assert p.returncode == 0 and "registered yolo11n-shapes version 2 (reference" in p.stdout, p.stderr
    assert "since version 1:" in p.stdout and "postprocess.conf: 0.25 -> 0.35" in p.stdout
    assert cli("registry", "promote", "yolo11n-shapes", "production", "1", registry=reg).stdout.strip() == \
        "yolo11n-shapes@production -> version 1 (new alias)"
    assert "(was version 1)" in cli("registry", "promote", "yolo11n-shapes", "production", "2", registry=reg).stdout
    p = cli("registry", "rollback", "yolo11n-shapes", "production", "--reason", "p99", "--json", registry=reg)
    assert json.loads(p.stdout) | {"at": None} == {"model": "yolo11n-shapes", "alias": "production", "action": "rollback",
                                                   "version": 1, "previous": 2, "changed": True, "at": None,
                                                   "by": json.loads(p.stdout)["by"]}
    p = cli("registry", "resolve", "yolo11n-shapes", "production", registry=reg)
    assert p.stdout.strip() == doc["path"] and p.stderr == ""
    p = cli("registry", "show", "yolo11n-shapes", "2", registry=reg)
    assert p.returncode == 0, p.stderr
    for needle in ("yolo11n-shapes version 2", "registered", "by alice", "source     yolo11n-shapes.pt", "metrics per variant",
                   "data       not recorded", "since version 1:", "postprocess.conf: 0.25 -> 0.35"):
        assert needle in p.stdout, (needle, p.stdout)
    listing = json.loads(cli("registry", "list", "--json", registry=reg).stdout)
    assert listing == [{"name": "yolo11n-shapes", "versions": 2, "latest": 2, "aliases": {"production": 1},
                        "created_at": listing[0]["created_at"]}]
    p = cli("registry", "history", "yolo11n-shapes", registry=reg)
    assert "promote (rolled back)" in p.stdout and "p99" in p.stdout


def test_errors_are_one_line(tmp_path: Path, make_version: MakeVersion) -> None:
    reg = tmp_path / "reg" / "registry.db"
    one_line_error(cli("registry", "list", registry=reg), "no registry at")
    bad = make_version("bad")
    (bad / "golden" / "case_000.npz").write_bytes(b"not the golden case")
    one_line_error(cli("registry", "register", bad, registry=reg), "does not match its sha256")
    assert not reg.exists()
    assert cli("registry", "register", make_version("good"), registry=reg).returncode == 0
    one_line_error(cli("registry", "show", "nope", registry=reg), "unknown model 'nope'")
    one_line_error(cli("registry", "resolve", "yolo11n-shapes", "5", registry=reg), "unknown version 5")
    one_line_error(cli("registry", "resolve", "yolo11n-shapes", "production", registry=reg), "unknown alias 'production'")
    one_line_error(cli("registry", "rollback", "yolo11n-shapes", "latest", registry=reg), "'latest' is not an alias")


def test_every_registry_command_answers_json_alone_on_stdout(tmp_path: Path, make_version: MakeVersion) -> None:
    reg = tmp_path / "reg" / "registry.db"
    first = json.loads(cli("registry", "register", make_version("one"), "--json", registry=reg).stdout)
    p = cli("registry", "promote", "yolo11n-shapes", "staging", "1", "--json", registry=reg)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) | {"at": None, "by": None} == {"model": "yolo11n-shapes", "alias": "staging", "action": "promote",
                                                               "version": 1, "previous": None, "changed": True, "at": None,
                                                               "by": None}
    resolved = json.loads(cli("registry", "resolve", "yolo11n-shapes", "staging", "--json", registry=reg).stdout)
    assert resolved["path"] == first["path"] and resolved["version"] == 1
    shown = json.loads(cli("registry", "show", "yolo11n-shapes", "1", "--json", registry=reg).stdout)
    assert shown["version"] == 1 and shown["lineage"]["manifest_sha256"] == first["lineage"]["manifest_sha256"]
    history = json.loads(cli("registry", "history", "yolo11n-shapes", "--json", registry=reg).stdout)
    assert [(e["action"], e["alias"], e["version"]) for e in history] == [("promote", "staging", 1)]
