"""The registry database: where it is, its schema version and migrations, WAL and foreign keys, and two processes
writing at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cvdeploy.errors import InputError
from cvdeploy.registry import Registry
from cvdeploy.registry.store import MIGRATIONS, SCHEMA_VERSION, connect, migrate, parse_location, schema_version
from cvdeploy.security.audit import verify
from cvdeploy.security.protect import parse_key

MakeVersion = Callable[..., Path]  # the make_version fixture (conftest.py)


def test_locations_paths_urls_and_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_location(tmp_path / "r.db") == tmp_path / "r.db"
    assert parse_location("sqlite:///rel/r.db") == Path("rel/r.db")
    assert parse_location(f"sqlite:///{tmp_path}/r.db") == tmp_path / "r.db"  # sqlite:////abs: SQLAlchemy's form
    monkeypatch.setenv("CVDEPLOY_REGISTRY", str(tmp_path / "env.db"))
    assert parse_location(None) == tmp_path / "env.db"
    monkeypatch.delenv("CVDEPLOY_REGISTRY")
    assert parse_location(None) == Path("cvdeploy-registry/registry.db")
    for bad, why in [("postgresql://db/reg", "only SQLite"), ("sqlite://", "give a file"), ("sqlite:///:memory:", "give a file")]:
        with pytest.raises(InputError, match=why):
            parse_location(bad)


def test_a_new_registry_is_wal_with_foreign_keys_and_a_schema_version(tmp_path: Path) -> None:
    db = connect(tmp_path / "r" / "registry.db", create=True)
    try:
        assert schema_version(db) == SCHEMA_VERSION == max(MIGRATIONS)
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        with pytest.raises(Exception, match="FOREIGN KEY"):  # a version of a model that does not exist
            db.execute("INSERT INTO versions (model_id, number, path, stored, bundle_sha256, manifest_sha256, source_sha256, "
                       "manifest, registered_at, registered_by, os_user, changelog) VALUES (42, 1, 'p', 'copy', 'a', 'b', 'c', "
                       "'{}', 't', 'u', 'u', '{}')")
    finally:
        db.close()


def test_what_is_not_a_registry_of_this_version_is_refused(tmp_path: Path) -> None:
    text = tmp_path / "notes.db"
    text.write_text("hello")
    with pytest.raises(InputError, match="not a SQLite database"):
        connect(text, create=True)
    import sqlite3

    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE users (id INTEGER)").connection.commit()
    with pytest.raises(InputError, match=r"not a cvdeploy registry .* users"):
        connect(other, create=True)
    newer = tmp_path / "newer.db"
    connect(newer, create=True).close()
    c = sqlite3.connect(newer)
    c.execute("UPDATE schema_version SET version = 99")
    c.commit()
    c.close()
    with pytest.raises(InputError, match="schema version 99; this cvdeploy reads up to version 1: upgrade cvdeploy"):
        connect(newer, create=False)


def test_migrations_run_in_order_and_a_failing_one_changes_nothing(tmp_path: Path, make_version: MakeVersion) -> None:
    loc = tmp_path / "registry.db"
    with Registry(loc) as reg:
        reg.register(make_version("a"))
    db = connect(loc, create=False)
    try:
        broken = {**MIGRATIONS, 2: ("ALTER TABLE versions ADD COLUMN reviewed_by TEXT",), 3: ("THIS IS NOT SQL",)}
        with pytest.raises(Exception, match="syntax error"):
            migrate(db, loc, broken)
        assert schema_version(db) == 1 and "reviewed_by" not in {r[1] for r in db.execute("PRAGMA table_info(versions)")}
        upgrade = {**MIGRATIONS, 2: ("ALTER TABLE versions ADD COLUMN reviewed_by TEXT",
                                     "UPDATE versions SET reviewed_by = registered_by")}
        assert migrate(db, loc, upgrade) == 2
        assert db.execute("SELECT number, reviewed_by FROM versions").fetchall()[0][1] == db.execute(
            "SELECT registered_by FROM versions").fetchone()[0]
    finally:
        db.close()


_WORKER = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    from cvdeploy.registry import Registry
    loc, go, bundles = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    Path(f"{go}.ready-{os.getpid()}").touch()  # imported: waiting for the start
    while not go.exists():
        time.sleep(0.005)
    out = []
    reg = Registry(loc)
    for b in bundles:
        out.append(reg.register(b, by=f"worker-{os.getpid()}").version)
        reg.promote("yolo11n-shapes", "staging", "latest")
    print(json.dumps(out))
""")


def test_two_processes_registering_at_once_get_distinct_numbered_versions(tmp_path: Path, make_version: MakeVersion) -> None:
    bundles = [make_version(f"p{i}", conf=0.20 + 0.01 * i) for i in range(6)]
    loc, go = tmp_path / "reg" / "registry.db", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(loc), str(go), *map(str, part)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env)
             for part in (bundles[0::2], bundles[1::2])]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("go.ready-*"))) < 2:  # both imported and waiting, so that they write at the same time
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a worker did not start"
        time.sleep(0.01)
    go.touch()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        results.append(json.loads(out))
    assert sorted(results[0] + results[1]) == [1, 2, 3, 4, 5, 6]
    with Registry(loc) as reg:
        versions = reg.versions("yolo11n-shapes")
        assert [v.version for v in versions] == [1, 2, 3, 4, 5, 6]
        assert [v.changelog["previous"] for v in versions] == [None, 1, 2, 3, 4, 5]  # each against the one before it
        assert {v.manifest["postprocess"]["conf"] for v in versions} == {0.20 + 0.01 * i for i in range(6)}
        assert len({v.path for v in versions}) == 6 and all(v.path.is_dir() for v in versions)
        assert len({v.registered_by for v in versions}) == 2
        assert reg.show("yolo11n-shapes", "staging").version in (max(results[0]), max(results[1]))
        assert len(reg.history("yolo11n-shapes", "staging")) <= 6
    v = verify(reg.audit_path, parse_key((reg.root / "audit.key").read_bytes()))
    assert v.ok and v.entries == 12, v.problems
    assert not list((reg.root / "store").glob(".incoming-*"))
