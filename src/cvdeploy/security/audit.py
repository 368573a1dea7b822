"""Tamper-evident audit log: append-only SQLite with an HMAC hash chain and signed checkpoints.

Each entry's MAC covers its fields, its sequence number and the previous entry's MAC, so an
edited, deleted, reordered or inserted entry breaks the chain at that point. Every
`checkpoint_every` entries (and on demand) a checkpoint records the sequence number and the
chain head under its own MAC; exported elsewhere (`export_checkpoint`), it also reveals a log
truncated after it. Entries hold who, what, on which resource, the outcome and the input's
sha256: never an image, never a secret.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import sqlite3
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cvdeploy.errors import InputError

FIELDS = ("ts", "principal", "role", "auth_method", "mfa", "action", "resource", "outcome", "client", "request_id",
          "input_sha256", "details")
GENESIS = "0" * 64

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
  seq INTEGER PRIMARY KEY, ts REAL NOT NULL, principal TEXT, role TEXT, auth_method TEXT, mfa INTEGER, action TEXT NOT NULL,
  resource TEXT, outcome TEXT NOT NULL, client TEXT, request_id TEXT, input_sha256 TEXT, details TEXT,
  prev_mac TEXT NOT NULL, mac TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS checkpoints (seq INTEGER PRIMARY KEY, head_mac TEXT NOT NULL, ts REAL NOT NULL, mac TEXT NOT NULL);
CREATE TRIGGER IF NOT EXISTS entries_no_update BEFORE UPDATE ON entries BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS entries_no_delete BEFORE DELETE ON entries BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END;
"""


def _canonical(seq: int, entry: dict[str, Any], prev: str) -> bytes:
    return json.dumps({"seq": seq, "prev": prev, **{k: entry.get(k) for k in FIELDS}}, sort_keys=True, separators=(",", ":")).encode()


def _mac(key: bytes, data: bytes) -> str:
    return hmac.new(key, data, hashlib.sha256).hexdigest()


def _checkpoint_mac(key: bytes, seq: int, head: str, ts: float) -> str:
    return _mac(key, f"checkpoint|{seq}|{head}|{ts!r}".encode())


class AuditLog:
    """Append-only, thread-safe. `key` (32+ bytes) authenticates the chain; keep it apart from the database."""

    def __init__(self, path: str | os.PathLike[str], key: bytes, *, checkpoint_every: int = 100) -> None:
        if len(key) < 32:
            raise InputError("the audit key must be at least 32 bytes")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._key = key
        self._every = checkpoint_every
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.executescript(_SCHEMA)
        self._db.execute("PRAGMA journal_mode=WAL")
        # WAL + NORMAL: an entry survives a crash of the server; an OS crash or power loss may lose the
        # last entries (the chain stays verifiable). FULL would fsync every request.
        self._db.execute("PRAGMA synchronous=NORMAL")
        row = self._db.execute("SELECT seq, mac FROM entries ORDER BY seq DESC LIMIT 1").fetchone()
        self._seq, self._head = (row[0], row[1]) if row else (0, GENESIS)

    def append(self, action: str, outcome: str, **entry: Any) -> int:
        """Record one event; returns its sequence number."""
        unknown = set(entry) - set(FIELDS)
        if unknown:
            raise InputError(f"unknown audit field(s): {', '.join(sorted(unknown))}")
        e = {k: entry.get(k) for k in FIELDS}
        e["action"], e["outcome"] = action, outcome
        e["ts"] = float(entry.get("ts") or time.time())
        e["mfa"] = None if e["mfa"] is None else int(bool(e["mfa"]))
        if e["details"] is not None and not isinstance(e["details"], str):
            e["details"] = json.dumps(e["details"], sort_keys=True)
        with self._lock:
            seq = self._seq + 1
            mac = _mac(self._key, _canonical(seq, e, self._head))
            self._db.execute(f"INSERT INTO entries (seq, {', '.join(FIELDS)}, prev_mac, mac) VALUES (?, {', '.join('?' * len(FIELDS))}, ?, ?)",
                             (seq, *(e[k] for k in FIELDS), self._head, mac))
            self._seq, self._head = seq, mac
            if self._every and seq % self._every == 0:
                self._checkpoint_locked()
        return seq

    def checkpoint(self) -> dict[str, Any]:
        with self._lock:
            return self._checkpoint_locked()

    def _checkpoint_locked(self) -> dict[str, Any]:
        ts = time.time()
        cp = {"seq": self._seq, "head_mac": self._head, "ts": ts, "mac": _checkpoint_mac(self._key, self._seq, self._head, ts)}
        self._db.execute("INSERT OR REPLACE INTO checkpoints (seq, head_mac, ts, mac) VALUES (?, ?, ?, ?)",
                         (cp["seq"], cp["head_mac"], cp["ts"], cp["mac"]))
        return cp

    def export_checkpoint(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        """Write a fresh checkpoint to `path` (keep it somewhere the log's writer cannot change)."""
        cp = self.checkpoint()
        Path(path).write_text(json.dumps(cp, indent=2))
        return cp

    def tail(self, n: int = 100) -> list[dict[str, Any]]:
        """The last `n` entries, newest last."""
        with self._lock:
            rows = self._db.execute(f"SELECT seq, {', '.join(FIELDS)} FROM entries ORDER BY seq DESC LIMIT ?", (n,)).fetchall()
        return [dict(zip(("seq", *FIELDS), r, strict=True)) for r in reversed(rows)]

    def close(self) -> None:
        self._db.close()


@dataclass
class Verdict:
    ok: bool
    entries: int
    problems: list[str] = field(default_factory=list)


def verify(path: str | os.PathLike[str], key: bytes, anchor: str | os.PathLike[str] | dict | None = None) -> Verdict:
    """Walk the chain; report the first break and any checkpoint or anchor it contradicts."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"audit log not found: {p}")
    db = sqlite3.connect(f"file:{p}?mode=ro", uri=True)
    try:
        rows = db.execute(f"SELECT seq, {', '.join(FIELDS)}, prev_mac, mac FROM entries ORDER BY rowid").fetchall()
        cps = db.execute("SELECT seq, head_mac, ts, mac FROM checkpoints ORDER BY seq").fetchall()
    finally:
        db.close()
    problems: list[str] = []
    prev, expected_seq = GENESIS, 1
    macs: dict[int, str] = {}
    for row in rows:
        seq, values, prev_mac, mac = row[0], dict(zip(FIELDS, row[1 : 1 + len(FIELDS)], strict=True)), row[-2], row[-1]
        if seq != expected_seq:
            problems.append(f"entry {expected_seq} is missing or out of order (found {seq} next): deleted, inserted or reordered")
            break
        if prev_mac != prev:
            problems.append(f"entry {seq} does not follow entry {seq - 1} (chain broken: reordered or inserted)")
            break
        if not hmac.compare_digest(_mac(key, _canonical(seq, values, prev)), mac):
            problems.append(f"entry {seq} was modified (its MAC does not match its content)")
            break
        macs[seq] = mac
        prev, expected_seq = mac, seq + 1
    last = expected_seq - 1 if not problems else None
    for seq, head, ts, mac in cps:
        if not hmac.compare_digest(_checkpoint_mac(key, seq, head, ts), mac):
            problems.append(f"checkpoint at entry {seq} was forged or modified")
        elif last is not None and seq > last:
            problems.append(f"checkpoint at entry {seq} but the log ends at entry {last}: truncated")
        elif seq in macs and macs[seq] != head:
            problems.append(f"checkpoint at entry {seq} does not match the log's entry {seq}")
    if anchor is not None:
        a = anchor if isinstance(anchor, dict) else json.loads(Path(anchor).read_text())
        if not hmac.compare_digest(_checkpoint_mac(key, a["seq"], a["head_mac"], a["ts"]), a["mac"]):
            problems.append("the exported checkpoint is not authentic")
        elif last is not None and a["seq"] > last:
            problems.append(f"the exported checkpoint covers entry {a['seq']} but the log ends at entry {last}: truncated")
        elif a["seq"] in macs and macs[a["seq"]] != a["head_mac"]:
            problems.append(f"the log's entry {a['seq']} differs from the exported checkpoint")
    return Verdict(not problems, len(rows), problems)


def review(path: str | os.PathLike[str], *, burst: int = 5, window_s: float = 60.0, quiet_hours: tuple[int, int] = (0, 6)) -> list[str]:
    """Flags: bursts of failed authentication per address, authorization denials, revoked keys used,
    addresses seen once among many, and activity in quiet hours (UTC)."""
    db = sqlite3.connect(f"file:{Path(path)}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT seq, ts, principal, action, outcome, client, details FROM entries ORDER BY seq").fetchall()
    finally:
        db.close()
    flags: list[str] = []
    fails: dict[str, list[float]] = defaultdict(list)
    clients = Counter(r[5] for r in rows if r[5])
    for seq, ts, principal, action, outcome, client, details in rows:
        if action == "authenticate" and outcome != "success":
            times = [t for t in fails[client or "?"] if ts - t <= window_s] + [ts]
            fails[client or "?"] = times
            if len(times) == burst:
                flags.append(f"entry {seq}: {burst} failed authentications from {client} within {window_s:g} s")
        if outcome == "denied":
            flags.append(f"entry {seq}: {principal or 'anonymous'} denied {action} from {client}")
        if details and "revoked" in details:
            flags.append(f"entry {seq}: a revoked key was used from {client}")
        hour = time.gmtime(ts).tm_hour
        if quiet_hours[0] <= hour < quiet_hours[1] and action not in ("infer",):
            flags.append(f"entry {seq}: {action} by {principal or 'anonymous'} at {hour:02d}h UTC (quiet hours)")
    if len(rows) >= 20:
        for c, n in clients.items():
            if n == 1:
                flags.append(f"address {c} appears once in {len(rows)} entries")
    return flags
