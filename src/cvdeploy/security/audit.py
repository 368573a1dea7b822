"""Tamper-evident audit log: append-only SQLite with an HMAC hash chain, signed checkpoints and exported anchors.

Each entry's MAC covers its fields, its sequence number and the previous entry's MAC, so an
edited, deleted, reordered or inserted entry breaks the chain at that point. Every
`checkpoint_every` entries (and on demand) a checkpoint records the sequence number and the
chain head under its own MAC. Neither can reveal a log cut after its last checkpoint, or wiped:
the checkpoints live in the same file and go with the entries. Anchors close that gap: a signed
record of the entry count, the last sequence number and the chain head, appended to a file kept
apart from the database (`AuditLog.anchor`, `AnchorWriter`, `cvdeploy audit anchor`), which
`verify(..., anchors=...)` holds the log against. Entries hold who, what, on which resource, the
outcome and the input's sha256: never an image, never a secret.

Files are created owner-only (0600): the database, and through it SQLite's -wal and -shm files,
and the anchor file. `DenialAggregator` keeps floods of denials from flooding the log.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from cvdeploy.errors import InputError
from cvdeploy.security.audit_anchor import ANCHOR_TYPE, ANCHOR_VERSION, anchor_is_authentic, make_anchor, write_anchor
from cvdeploy.security.audit_chain import FIELDS, GENESIS, checkpoint_mac, entry_mac
from cvdeploy.security.audit_denials import DenialAggregator
from cvdeploy.security.audit_review import review
from cvdeploy.security.audit_store import SCHEMA, check_file, check_schema, companions, create, tighten
from cvdeploy.security.audit_verify import Verdict, verify

# The log and its anchor writer live here; the other public names are those of audit_chain, audit_anchor, audit_store,
# audit_verify, audit_denials and audit_review, imported from here as they always were.
__all__ = [
    "ANCHOR_TYPE",
    "ANCHOR_VERSION",
    "FIELDS",
    "GENESIS",
    "AnchorWriter",
    "AuditLog",
    "DenialAggregator",
    "Verdict",
    "anchor_is_authentic",
    "make_anchor",
    "review",
    "verify",
    "write_anchor",
]

_log = logging.getLogger(__name__)


class AuditLog:
    """Append-only, thread-safe. `key` (32+ bytes) authenticates the chain; keep it apart from the database.

    Opening a missing `path` creates the log (mode 0600); opening anything that is not an audit log (an
    empty file, another file type, a SQLite database with other tables) raises `InputError`.
    """

    def __init__(self, path: str | os.PathLike[str], key: bytes, *, checkpoint_every: int = 100) -> None:
        if len(key) < 32:
            raise InputError("the audit key must be at least 32 bytes")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._key = key
        self._every = checkpoint_every
        self._lock = threading.Lock()
        if not self.path.exists():
            create(self.path)
        check_file(self.path)
        tighten(self.path)
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        except sqlite3.Error as e:
            raise InputError(f"{self.path} cannot be opened as an audit log: {e}") from None
        try:
            check_schema(self._db, self.path)
            self._db.executescript(SCHEMA)  # puts back append-only triggers someone dropped
            self._db.execute("PRAGMA journal_mode=WAL")
            # WAL + NORMAL: an entry survives a crash of the server; an OS crash or power loss may lose the
            # last entries (the chain stays verifiable). FULL would fsync every request.
            self._db.execute("PRAGMA synchronous=NORMAL")
            row = self._db.execute("SELECT seq, mac FROM entries ORDER BY seq DESC LIMIT 1").fetchone()
            self._count = self._db.execute("SELECT COUNT(*) FROM entries").fetchone()[0]
        except sqlite3.DatabaseError as e:
            self._db.close()
            raise InputError(f"{self.path} cannot be used as an audit log: {e}") from None
        except BaseException:
            self._db.close()
            raise
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
            mac = entry_mac(self._key, seq, e, self._head)
            self._db.execute(f"INSERT INTO entries (seq, {', '.join(FIELDS)}, prev_mac, mac) VALUES (?, {', '.join('?' * len(FIELDS))}, ?, ?)",
                             (seq, *(e[k] for k in FIELDS), self._head, mac))
            self._seq, self._head, self._count = seq, mac, self._count + 1
            if self._every and seq % self._every == 0:
                self._checkpoint_locked()
        return seq

    def checkpoint(self) -> dict[str, Any]:
        with self._lock:
            return self._checkpoint_locked()

    def _checkpoint_locked(self) -> dict[str, Any]:
        ts = time.time()
        cp = {"seq": self._seq, "head_mac": self._head, "ts": ts, "mac": checkpoint_mac(self._key, self._seq, self._head, ts)}
        self._db.execute("INSERT OR REPLACE INTO checkpoints (seq, head_mac, ts, mac) VALUES (?, ?, ?, ?)",
                         (cp["seq"], cp["head_mac"], cp["ts"], cp["mac"]))
        return cp

    def export_checkpoint(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        """Write a fresh checkpoint to `path` (keep it somewhere the log's writer cannot change)."""
        cp = self.checkpoint()
        Path(path).write_text(json.dumps(cp, indent=2))
        return cp

    def anchor(self, out: str | os.PathLike[str] | None = None) -> dict[str, Any]:
        """A signed anchor of the log as this process wrote it (see `make_anchor`), appended to `out` when given.

        It is built from the writer's own state, not read back from the database: an anchor must record
        what was written, even if someone has meanwhile cut the file under the running server.
        """
        entries, last_seq, head = self._state()
        a = make_anchor(self._key, entries=entries, last_seq=last_seq, head_mac=head)
        if out is not None:
            self._refuse_own_files(out)
            write_anchor(out, a)
        return a

    def _state(self) -> tuple[int, int, str]:
        """(entry count, last sequence number, chain head MAC), consistent with one another."""
        with self._lock:
            return self._count, self._seq, self._head

    def _refuse_own_files(self, out: str | os.PathLike[str]) -> None:
        # An anchor stored with the database is lost with it: the point of an anchor is to outlive a wipe.
        target = Path(out).resolve()
        if target in {q.resolve() for q in (self.path, *companions(self.path))}:
            raise InputError(f"anchors cannot be written to the audit log's own files ({out}): keep them apart")

    def tail(self, n: int = 100) -> list[dict[str, Any]]:
        """The last `n` entries, newest last."""
        with self._lock:
            rows = self._db.execute(f"SELECT seq, {', '.join(FIELDS)} FROM entries ORDER BY seq DESC LIMIT ?", (n,)).fetchall()
        return [dict(zip(("seq", *FIELDS), r, strict=True)) for r in reversed(rows)]

    def close(self) -> None:
        self._db.close()


class AnchorWriter:
    """Appends an anchor of `log` to `path` every `every_s` seconds from a daemon thread.

    For a server: `w = AnchorWriter(log, path).start()` at startup, `w.stop()` at shutdown, before
    `log.close()`. `start()` writes a first anchor at once and raises if it cannot (a wrong path shows at
    startup, not an hour later); a periodic write that fails is logged and kept in `last_error`, and the
    writer keeps trying. Periodic anchors are skipped while the log has not changed. `stop()` wakes the
    thread, waits for it (at most `timeout_s`), writes a final anchor and returns it.
    """

    def __init__(self, log: AuditLog, path: str | os.PathLike[str], every_s: float = 60.0) -> None:
        if not every_s > 0:
            raise InputError("the anchor interval must be positive")
        log._refuse_own_files(path)
        self.log, self.path, self.every_s = log, Path(path), float(every_s)
        self.last_error: BaseException | None = None
        self.written = 0
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._last: tuple[int, int, str] | None = None
        self._write_lock = threading.Lock()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def write(self) -> dict[str, Any]:
        """Append one anchor now and return it."""
        with self._write_lock:
            a = self.log.anchor(self.path)
            self._last = (a["entries"], a["last_seq"], a["head_mac"])
            self.written += 1
            return a

    def start(self) -> AnchorWriter:
        if self._thread is not None:
            raise RuntimeError("this AnchorWriter was already started")
        self.write()
        self._wake.clear()
        self._thread = threading.Thread(target=self._run, name="audit-anchor-writer", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._wake.wait(self.every_s):
            try:
                if self.log._state() != self._last:
                    self.write()
            except Exception as e:  # a full or unmounted disk must not kill the thread: the next tick retries
                self.last_error = e
                _log.warning("audit anchor to %s failed: %s", self.path, e)

    def stop(self, timeout_s: float = 5.0) -> dict[str, Any] | None:
        """Stop the thread and write a final anchor (returned); None when the writer was not running."""
        thread, self._thread = self._thread, None
        if thread is None:
            return None
        self._wake.set()
        thread.join(timeout_s)
        return self.write()

    def __enter__(self) -> AnchorWriter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
