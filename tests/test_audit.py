"""The audit log detects every kind of tampering: edit, delete, reorder, insert, truncate, wipe, rewrite (against anchors)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cvdeploy.errors import CvdeployError, InputError
from cvdeploy.security.audit import AnchorWriter, AuditLog, DenialAggregator, anchor_is_authentic, review, verify

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


# -- anchors: truncation, wipe and rewrite -------------------------------------------------------------------------------


def anchored(tmp_path: Path, n: int, every: int = 100) -> tuple[Path, Path]:
    """A log of `n` entries anchored once, its anchor file kept in another directory."""
    db, anchors = tmp_path / "audit.db", tmp_path / "elsewhere" / "anchors.jsonl"
    anchors.parent.mkdir()
    log = AuditLog(db, KEY, checkpoint_every=every)
    for i in range(n):
        log.append("infer", "success", principal="svc", client="10.0.0.1", request_id=f"r{i}")
    a = log.anchor(anchors)
    log.close()
    assert (a["entries"], a["last_seq"]) == (n, n)
    return db, anchors


def test_truncating_the_last_entries_with_their_checkpoints_is_caught_by_an_anchor(tmp_path: Path) -> None:
    db, anchors = anchored(tmp_path, 1100)
    tamper(db, "DELETE FROM entries WHERE seq > 97", "DELETE FROM checkpoints WHERE seq > 97")  # the last 1,003 entries
    assert verify(db, KEY).ok  # the chain and the remaining checkpoints alone cannot see it
    v = verify(db, KEY, anchors=anchors)
    assert not v.ok and (v.entries, v.last_seq) == (97, 97)
    assert any(p.startswith("truncated: the log ends at entry 97 with 97 entries") and "1100 entries up to entry 1100" in p
               and "1003 entries are gone" in p for p in v.problems), v.problems


def test_wiping_every_row_is_caught_by_an_anchor(tmp_path: Path) -> None:
    db, anchors = anchored(tmp_path, 12, every=5)
    tamper(db, "DELETE FROM entries", "DELETE FROM checkpoints")
    assert verify(db, KEY).ok
    v = verify(db, KEY, anchors=anchors)
    assert not v.ok and (v.entries, v.last_seq) == (0, 0)
    assert any(p.startswith("wiped: the log has no entries") and "12 entries up to entry 12" in p for p in v.problems), v.problems


def test_a_rewritten_log_is_caught_by_an_anchor(tmp_path: Path) -> None:
    # Someone with the key (or the server restarted on a wiped file) writes a new, self-consistent chain past the anchor.
    db, anchors = anchored(tmp_path, 12, every=5)
    tamper(db, "DELETE FROM entries", "DELETE FROM checkpoints")
    log = AuditLog(db, KEY, checkpoint_every=5)
    for i in range(20):
        log.append("infer", "success", principal="mallory", request_id=f"x{i}")
    log.close()
    assert verify(db, KEY).ok
    v = verify(db, KEY, anchors=anchors)
    assert not v.ok and (v.entries, v.last_seq) == (20, 20)
    assert any(p.startswith("rewritten: the log's entry 12 is not the one anchored") for p in v.problems), v.problems


def test_an_intact_log_verifies_against_its_anchors_and_the_newest_is_used(tmp_path: Path) -> None:
    db, anchors = anchored(tmp_path, 5, every=0)
    log = AuditLog(db, KEY, checkpoint_every=0)
    log.append("load_model", "success", principal="ops")
    log.anchor(anchors)
    log.append("unload_model", "success", principal="ops")  # appended after the last anchor: fine
    log.close()
    lines = anchors.read_text().splitlines()
    # The highest sequence number wins, not the file order: reordering lines cannot make an older anchor the reference.
    anchors.write_text("\n".join(reversed(lines)) + "\n")
    v = verify(db, KEY, anchors=anchors)
    assert v.ok, v.problems
    assert (v.entries, v.last_seq, v.anchors_valid) == (7, 7, 2) and v.anchor is not None and v.anchor["last_seq"] == 6


def test_a_forged_or_damaged_anchor_is_reported(tmp_path: Path) -> None:
    db, anchors = anchored(tmp_path, 6, every=0)
    good = json.loads(anchors.read_text())
    assert anchor_is_authentic(KEY, good) and not anchor_is_authentic(b"x" * 32, good)
    forged = good | {"entries": 3, "last_seq": 3}
    anchors.write_text(json.dumps(good) + "\n" + json.dumps(forged) + "\n{not json\n")
    v = verify(db, KEY, anchors=anchors)
    assert not v.ok
    assert any("anchor line 2 is forged" in p and "3 entries up to entry 3" in p for p in v.problems), v.problems
    assert any("anchor line 3 is not an anchor" in p for p in v.problems), v.problems
    assert not any("truncated" in p for p in v.problems)  # held against the valid anchor only
    anchors.write_text("")
    assert any("no valid anchor" in p for p in verify(db, KEY, anchors=anchors).problems)


def test_the_anchor_writer_anchors_periodically_and_on_stop(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.db", KEY)
    anchors = tmp_path / "anchors.jsonl"
    with pytest.raises(InputError, match="apart"):
        AnchorWriter(log, tmp_path / "audit.db-wal")
    w = AnchorWriter(log, anchors, every_s=0.02).start()
    assert w.running and w.written == 1  # the first anchor is written by start() itself
    log.append("load_model", "success", principal="ops")
    deadline = time.monotonic() + 10
    while w.written < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert w.written == 2 and w.last_error is None
    time.sleep(0.1)
    assert w.written == 2  # an unchanged log is not anchored again
    log.append("unload_model", "success", principal="ops")
    final = w.stop()
    assert final is not None and (final["entries"], final["last_seq"]) == (2, 2) and not w.running
    assert w.stop() is None
    log.close()
    assert len(anchors.read_text().splitlines()) == w.written
    assert verify(tmp_path / "audit.db", KEY, anchors=anchors).ok


def test_stopping_the_anchor_writer_is_prompt(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.db", KEY)
    w = AnchorWriter(log, tmp_path / "anchors.jsonl", every_s=3600).start()
    log.append("infer", "success")
    t0 = time.monotonic()
    final = w.stop()
    assert time.monotonic() - t0 < 2 and final is not None and final["entries"] == 1
    log.close()


def test_the_anchor_and_verify_commands(tmp_path: Path) -> None:
    db = make(tmp_path)
    (tmp_path / "key").write_bytes(KEY)
    anchors = tmp_path / "elsewhere" / "anchors.jsonl"
    anchors.parent.mkdir()
    cli = [sys.executable, "-m", "cvdeploy", "audit"]
    key = ["--key-file", str(tmp_path / "key")]
    made = subprocess.run([*cli, "anchor", str(db), *key, "--out", str(anchors)], capture_output=True, text=True)
    assert made.returncode == 0 and "12 entries up to entry 12" in made.stdout, made.stderr
    assert anchors.stat().st_mode & 0o777 == 0o600
    ok = subprocess.run([*cli, "verify", str(db), *key, "--anchors", str(anchors)], capture_output=True, text=True)
    assert ok.returncode == 0 and "12 entries, last sequence number 12" in ok.stdout and "consistent" in ok.stdout, ok.stdout
    tamper(db, "DELETE FROM entries WHERE seq > 9", "DELETE FROM checkpoints WHERE seq > 9")
    bad = subprocess.run([*cli, "verify", str(db), *key, "--anchors", str(anchors)], capture_output=True, text=True)
    assert bad.returncode == 1 and "9 entries, last sequence number 9" in bad.stdout and "truncated" in bad.stdout
    assert bad.stderr.startswith("error:")
    # Anchoring a cut log would bless the cut: refused.
    again = subprocess.run([*cli, "anchor", str(db), *key, "--out", str(anchors)], capture_output=True, text=True)
    assert again.returncode == 1 and "not anchoring" in again.stderr and len(anchors.read_text().splitlines()) == 1


# -- file modes ---------------------------------------------------------------------------------------------------------


def test_the_database_and_its_wal_and_shm_files_are_private(tmp_path: Path) -> None:
    old = os.umask(0o022)  # the usual umask, under which sqlite alone makes 0644 files
    try:
        log = AuditLog(tmp_path / "audit.db", KEY)
        log.append("infer", "success")
        modes = {s: (tmp_path / f"audit.db{s}").stat().st_mode & 0o777 for s in ("", "-wal", "-shm")}
        log.close()
        assert modes == {"": 0o600, "-wal": 0o600, "-shm": 0o600}
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left
        # A log made by an earlier version (0644) is tightened when opened, and its companions follow.
        os.chmod(tmp_path / "audit.db", 0o644)
        log = AuditLog(tmp_path / "audit.db", KEY)
        log.append("infer", "success")
        modes = {s: (tmp_path / f"audit.db{s}").stat().st_mode & 0o777 for s in ("", "-wal", "-shm")}
        log.close()
        assert modes == {"": 0o600, "-wal": 0o600, "-shm": 0o600}
    finally:
        os.umask(old)


# -- files that are not audit logs --------------------------------------------------------------------------------------


def not_a_log(tmp_path: Path, kind: str) -> Path:
    p = tmp_path / f"{kind}.db"
    if kind == "text":
        p.write_text("this is not a database\n" * 10)
    elif kind == "empty":
        p.write_bytes(b"")
    elif kind == "schema":
        con = sqlite3.connect(p)
        con.execute("CREATE TABLE entries (id INTEGER PRIMARY KEY, body TEXT)")
        con.commit()
        con.close()
    elif kind == "notables":
        con = sqlite3.connect(p)
        con.execute("CREATE TABLE other (x)")
        con.commit()
        con.close()
    return p


@pytest.mark.parametrize(("kind", "needle"), [("text", "not a SQLite database"), ("empty", r"is empty \(0 bytes\)"),
                                              ("schema", "no checkpoints table"), ("notables", "no entries or checkpoints table")])
def test_opening_something_else_raises_a_clear_error(tmp_path: Path, kind: str, needle: str) -> None:
    p = not_a_log(tmp_path, kind)
    before = p.read_bytes()
    with pytest.raises(CvdeployError, match=needle):
        AuditLog(p, KEY)
    with pytest.raises(CvdeployError, match=needle):
        verify(p, KEY)
    assert p.read_bytes() == before  # nothing was written into it


@pytest.mark.parametrize(("kind", "needle"), [("text", "not a SQLite database"), ("empty", "is empty"),
                                              ("schema", "not an audit log"), ("missing", "audit log not found")])
def test_verify_command_on_something_else_prints_one_error_line(tmp_path: Path, kind: str, needle: str) -> None:
    p = not_a_log(tmp_path, kind)
    (tmp_path / "key").write_bytes(KEY)
    r = subprocess.run([sys.executable, "-m", "cvdeploy", "audit", "verify", str(p), "--key-file", str(tmp_path / "key")],
                       capture_output=True, text=True, env={**os.environ, "COLUMNS": "400"})
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr, r.stderr


# -- aggregation of denials ---------------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def rows(db: Path) -> list[tuple]:
    con = sqlite3.connect(db)
    try:
        return con.execute("SELECT seq, action, outcome, client, details FROM entries ORDER BY seq").fetchall()
    finally:
        con.close()


def test_a_flood_of_denials_from_one_client_makes_two_entries(tmp_path: Path) -> None:
    log, clock = AuditLog(tmp_path / "audit.db", KEY), Clock()
    agg = DenialAggregator(log, interval_s=10.0, clock=clock)
    written = [agg.record("rate_limit", "10.0.0.9", "rate limited (address)", resource="/v2") for _ in range(1000)]
    assert written[0] == 1 and written[1:] == [None] * 999
    clock.t += 9.9
    assert agg.flush_expired() == 0  # the interval has not ended
    clock.t += 0.1
    assert agg.record("rate_limit", "10.0.0.9", "rate limited (address)") == 3  # ended: summary (2), then a new first (3)
    assert agg.flush() == 0  # the new interval has nothing to summarise
    log.close()
    r = rows(tmp_path / "audit.db")
    assert len(r) == 3 and r[0][1:4] == ("rate_limit", "denied", "10.0.0.9") and r[0][4] == "rate limited (address)"
    assert r[1][1:4] == ("rate_limit", "denied", "10.0.0.9")
    assert r[1][4] == "999 more rate_limit denials for client 10.0.0.9 in the 10 s after entry 1"
    assert verify(tmp_path / "audit.db", KEY).ok


def test_flush_writes_the_pending_summary_at_shutdown(tmp_path: Path) -> None:
    log, clock = AuditLog(tmp_path / "audit.db", KEY), Clock()
    agg = DenialAggregator(log, interval_s=10.0, clock=clock)
    for _ in range(1000):
        agg.record("rate_limit", "10.0.0.9", "rate limited (address)")
    clock.t += 2.5
    assert agg.flush() == 1 and len(agg) == 0
    log.close()
    r = rows(tmp_path / "audit.db")
    assert len(r) == 2 and r[1][4] == "999 more rate_limit denials for client 10.0.0.9 in the 2.5 s after entry 1"


def test_clients_and_actions_are_aggregated_apart(tmp_path: Path) -> None:
    log, clock = AuditLog(tmp_path / "audit.db", KEY), Clock()
    agg = DenialAggregator(log, interval_s=10.0, clock=clock)
    for i in range(300):
        agg.record("rate_limit", "10.0.0.1" if i % 3 else "10.0.0.2", None)
    agg.record("authorize", "10.0.0.1", "missing permission")
    clock.t += 1
    assert agg.flush() == 2  # the authorize denial was alone in its interval: nothing to summarise
    log.close()
    r = rows(tmp_path / "audit.db")
    assert [(a, c) for _, a, _, c, _ in r[:3]] == [("rate_limit", "10.0.0.2"), ("rate_limit", "10.0.0.1"), ("authorize", "10.0.0.1")]
    assert r[3][4] == "99 more rate_limit denials for client 10.0.0.2 in the 1 s after entry 1"
    assert r[4][4] == "199 more rate_limit denials for client 10.0.0.1 in the 1 s after entry 2"


def test_the_aggregator_memory_is_bounded_and_loses_no_count(tmp_path: Path) -> None:
    log, clock = AuditLog(tmp_path / "audit.db", KEY), Clock()
    agg = DenialAggregator(log, interval_s=10.0, max_pairs=50, clock=clock)
    for i in range(2000):
        agg.record("rate_limit", f"10.1.{i // 4 // 250}.{i // 4 % 250}", None)  # 500 addresses, each denied 4 times in a row
        assert len(agg) <= 50
    evicted = [d for *_, d in rows(tmp_path / "audit.db") if d]
    assert len(evicted) == 450 and evicted[0] == "3 more rate_limit denials for client 10.1.0.0 in the 0 s after entry 1"
    assert agg.flush() == 50
    log.close()
    r = rows(tmp_path / "audit.db")
    summaries = [int(d.split()[0]) for *_, d in r if d]
    assert len(r) == 1000 and sum(summaries) + (len(r) - len(summaries)) == 2000  # every denial is an entry or counted in one


def test_the_aggregator_is_thread_safe(tmp_path: Path) -> None:
    log, clock = AuditLog(tmp_path / "audit.db", KEY), Clock()
    agg = DenialAggregator(log, interval_s=10.0, clock=clock)
    threads = [threading.Thread(target=lambda: [agg.record("rate_limit", "10.0.0.9", None) for _ in range(250)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    agg.flush()
    log.close()
    r = rows(tmp_path / "audit.db")
    assert len(r) == 2 and r[1][4].startswith("999 more")


def test_the_aggregator_writes_a_burst_of_denials_with_their_details_before_counting(tmp_path: Path) -> None:
    from cvdeploy.security.audit import DenialAggregator

    log = AuditLog(tmp_path / "a.db", KEY)
    now = [0.0]
    agg = DenialAggregator(log, interval_s=10.0, burst=3, clock=lambda: now[0])
    written = [agg.record("authenticate", "10.0.0.1", f"unknown key id {i}", outcome="failure") for i in range(10)]
    assert [w is not None for w in written] == [True] * 3 + [False] * 7
    assert agg.flush() == 1
    details = [r["details"] for r in log.tail(10)]
    assert details[:3] == ["unknown key id 0", "unknown key id 1", "unknown key id 2"] and details[3].startswith("7 more authenticate")
