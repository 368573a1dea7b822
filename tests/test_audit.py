"""The audit log detects every kind of tampering: edit, delete, reorder, insert, truncate."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from cvdeploy.security.audit import AuditLog, review, verify

KEY = b"k" * 32


def make(tmp_path: Path, n: int = 12, every: int = 5) -> Path:
    log = AuditLog(tmp_path / "audit.db", KEY, checkpoint_every=every)
    for i in range(n):
        log.append("infer", "success", principal=f"user{i % 3}", role="predictor", auth_method="api_key", mfa=False,
                   resource="yolo11n-shapes@1", client="127.0.0.1", request_id=f"r{i}", input_sha256="ab" * 32)
    log.close()
    return tmp_path / "audit.db"


def tamper(db: Path, *sql: str) -> None:
    con = sqlite3.connect(db)
    con.executescript("DROP TRIGGER entries_no_update; DROP TRIGGER entries_no_delete;" + ";".join(sql))
    con.commit()
    con.close()


def test_an_intact_log_verifies_and_is_append_only(tmp_path: Path) -> None:
    db = make(tmp_path)
    v = verify(db, KEY)
    assert v.ok and v.entries == 12
    con = sqlite3.connect(db)
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        con.execute("UPDATE entries SET outcome='denied' WHERE seq=2")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        con.execute("DELETE FROM entries WHERE seq=2")
    assert not verify(db, b"x" * 32).ok  # another key does not verify


@pytest.mark.parametrize(("sql", "needle"), [
    (["UPDATE entries SET outcome='denied' WHERE seq=3"], "entry 3 was modified"),
    (["DELETE FROM entries WHERE seq=3"], "entry 3 is missing"),
    (["UPDATE entries SET seq=100 WHERE seq=3", "UPDATE entries SET seq=3 WHERE seq=4", "UPDATE entries SET seq=4 WHERE seq=100"],
     "entry 3 does not follow entry 2"),
    (["UPDATE entries SET seq=seq+1000 WHERE seq>=6", "UPDATE entries SET seq=seq-999 WHERE seq>=1006",
      "INSERT INTO entries SELECT 6, ts, 'mallory', role, auth_method, mfa, action, resource, outcome, client, request_id, "
      "input_sha256, details, prev_mac, mac FROM entries WHERE seq=5"], "entry 6"),
    (["DELETE FROM entries WHERE seq>=8"], "truncated"),
])
def test_each_kind_of_tampering_is_detected(tmp_path: Path, sql: list[str], needle: str) -> None:
    db = make(tmp_path)
    tamper(db, *sql)
    v = verify(db, KEY)
    assert not v.ok and any(needle in p for p in v.problems), v.problems


def test_truncation_after_the_last_checkpoint_needs_the_exported_anchor(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.db", KEY, checkpoint_every=1000)
    for i in range(8):
        log.append("load_model", "success", principal="ops", request_id=str(i))
    anchor = log.export_checkpoint(tmp_path / "anchor.json")
    log.close()
    assert anchor["seq"] == 8
    tamper(tmp_path / "a.db", "DELETE FROM entries WHERE seq>=7", "DELETE FROM checkpoints")
    assert verify(tmp_path / "a.db", KEY).ok  # without an anchor, a clean cut after the last checkpoint looks whole
    v = verify(tmp_path / "a.db", KEY, tmp_path / "anchor.json")
    assert not v.ok and "truncated" in v.problems[0]
    forged = json.loads((tmp_path / "anchor.json").read_text()) | {"seq": 3}
    assert "not authentic" in verify(tmp_path / "a.db", KEY, forged).problems[0]


def test_review_flags_and_the_commands(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "r.db", KEY)
    for i in range(6):
        log.append("authenticate", "failure", client="10.0.0.9", ts=1_700_000_000 + i)
    log.append("load_model", "denied", principal="bob", client="10.0.0.2", ts=1_700_000_100)
    log.append("authenticate", "failure", client="10.0.0.3", details={"reason": "revoked key"}, ts=1_700_000_200)
    log.close()
    flags = review(tmp_path / "r.db")
    assert any("5 failed authentications from 10.0.0.9" in f for f in flags)
    assert any("bob denied load_model" in f for f in flags) and any("revoked key" in f for f in flags)
    (tmp_path / "key").write_bytes(KEY)
    cli = [sys.executable, "-m", "cvdeploy", "audit"]
    ok = subprocess.run([*cli, "verify", str(tmp_path / "r.db"), "--key-file", str(tmp_path / "key")], capture_output=True, text=True)
    assert ok.returncode == 0 and "8 entries" in ok.stdout
    tamper(tmp_path / "r.db", "UPDATE entries SET principal='alice' WHERE seq=7")
    bad = subprocess.run([*cli, "verify", str(tmp_path / "r.db"), "--key-file", str(tmp_path / "key")], capture_output=True, text=True)
    assert bad.returncode == 1 and "entry 7 was modified" in bad.stdout and bad.stderr.startswith("error:")
