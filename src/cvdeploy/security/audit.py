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

import hashlib
import hmac
import json
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cvdeploy.errors import InputError

FIELDS = ("ts", "principal", "role", "auth_method", "mfa", "action", "resource", "outcome", "client", "request_id",
          "input_sha256", "details")
GENESIS = "0" * 64
ANCHOR_TYPE = "cvdeploy.audit.anchor"
ANCHOR_VERSION = 1

_log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
  seq INTEGER PRIMARY KEY, ts REAL NOT NULL, principal TEXT, role TEXT, auth_method TEXT, mfa INTEGER, action TEXT NOT NULL,
  resource TEXT, outcome TEXT NOT NULL, client TEXT, request_id TEXT, input_sha256 TEXT, details TEXT,
  prev_mac TEXT NOT NULL, mac TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS checkpoints (seq INTEGER PRIMARY KEY, head_mac TEXT NOT NULL, ts REAL NOT NULL, mac TEXT NOT NULL);
CREATE TRIGGER IF NOT EXISTS entries_no_update BEFORE UPDATE ON entries BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS entries_no_delete BEFORE DELETE ON entries BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END;
"""
_SQLITE_MAGIC = b"SQLite format 3\x00"
_COLUMNS = {"entries": {"seq", *FIELDS, "prev_mac", "mac"}, "checkpoints": {"seq", "head_mac", "ts", "mac"}}
_ANCHOR_FIELDS = ("type", "v", "entries", "last_seq", "head_mac", "ts")


def _canonical(seq: int, entry: dict[str, Any], prev: str) -> bytes:
    return json.dumps({"seq": seq, "prev": prev, **{k: entry.get(k) for k in FIELDS}}, sort_keys=True, separators=(",", ":")).encode()


def _mac(key: bytes, data: bytes) -> str:
    return hmac.new(key, data, hashlib.sha256).hexdigest()


def _checkpoint_mac(key: bytes, seq: int, head: str, ts: float) -> str:
    return _mac(key, f"checkpoint|{seq}|{head}|{ts!r}".encode())


def _anchor_mac(key: bytes, anchor: dict[str, Any]) -> str:
    # The "anchor|" prefix keeps an anchor's MAC from ever being valid as an entry's or a checkpoint's.
    body = json.dumps({k: anchor[k] for k in _ANCHOR_FIELDS}, sort_keys=True, separators=(",", ":"))
    return _mac(key, b"anchor|" + body.encode())


def _utc(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _companions(p: Path) -> list[Path]:
    return [p.with_name(p.name + suffix) for suffix in ("-wal", "-shm", "-journal")]


# -- opening a log ---------------------------------------------------------------------------------


def _check_file(p: Path) -> None:
    """Refuse what cannot be an audit log before SQLite sees it: SQLite takes an empty file for a new
    database and notices a foreign file only at the first query, as a bare DatabaseError."""
    if not p.exists():
        raise InputError(f"audit log not found: {p}")
    if not p.is_file():
        raise InputError(f"{p} is not an audit log (not a regular file)")
    with p.open("rb") as f:
        head = f.read(len(_SQLITE_MAGIC))
    if not head:
        # Never a fresh log: AuditLog creates its file with the schema already in it, so an empty
        # file was cut to zero (a wipe) or made by someone else. Starting over in it would hide that.
        raise InputError(f"audit log {p} is empty (0 bytes): it was wiped or is not an audit log; "
                         "move it aside to start a new log")
    if head != _SQLITE_MAGIC:
        raise InputError(f"{p} is not an audit log (not a SQLite database)")


def _check_schema(db: sqlite3.Connection, p: Path) -> None:
    try:
        found = {t: {r[1] for r in db.execute(f"PRAGMA table_info({t})")} for t in _COLUMNS}
    except sqlite3.DatabaseError as e:
        raise InputError(f"{p} is not an audit log (unreadable SQLite database: {e})") from None
    missing = [t for t, cols in found.items() if not cols]
    if missing:
        raise InputError(f"{p} is a SQLite database but not an audit log (no {' or '.join(missing)} table)")
    for t, cols in found.items():
        if cols != _COLUMNS[t]:
            raise InputError(f"{p} is not an audit log: its {t} table has other columns than an audit log's")


def _open_readonly(p: Path) -> sqlite3.Connection:
    _check_file(p)
    try:
        # as_uri() percent-encodes the path: a '?' or '#' in a file name would otherwise end it.
        db = sqlite3.connect(p.resolve().as_uri() + "?mode=ro", uri=True)
    except sqlite3.Error as e:
        raise InputError(f"{p} cannot be opened as an audit log: {e}") from None
    try:
        _check_schema(db, p)
    except BaseException:
        db.close()
        raise
    return db


def _tighten(p: Path) -> None:
    """Logs made before files were created 0600 are 0644; SQLite gives -wal and -shm the database's mode,
    so tightening the database also fixes the companions it creates from now on."""
    for q in (p, *_companions(p)):
        try:
            mode = q.stat().st_mode & 0o777
            if mode & 0o077:
                os.chmod(q, mode & 0o700)
        except OSError:  # absent, or not ours to change: opening goes on, as it did before
            pass


def _create(p: Path) -> None:
    """Create the log with its schema under a temporary name, then link it into place, so that `p` never
    exists empty (an empty file is refused as a wiped log) and is 0600 from its first byte."""
    tmp = p.with_name(f".{p.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    os.close(os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
    try:
        db = sqlite3.connect(tmp, isolation_level=None)
        try:
            db.executescript(_SCHEMA)
            db.execute("PRAGMA journal_mode=WAL")  # persistent: recorded in the file's header
        finally:
            db.close()
        try:
            os.link(tmp, p)  # unlike a rename, never replaces a log another process created meanwhile
        except FileExistsError:
            pass
        except OSError:  # a file system without hard links
            if not p.exists():
                os.replace(tmp, p)
    finally:
        for q in (tmp, *_companions(tmp)):
            q.unlink(missing_ok=True)


# -- the log ---------------------------------------------------------------------------------------


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
            _create(self.path)
        _check_file(self.path)
        _tighten(self.path)
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        except sqlite3.Error as e:
            raise InputError(f"{self.path} cannot be opened as an audit log: {e}") from None
        try:
            _check_schema(self._db, self.path)
            self._db.executescript(_SCHEMA)  # puts back append-only triggers someone dropped
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
            mac = _mac(self._key, _canonical(seq, e, self._head))
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
        cp = {"seq": self._seq, "head_mac": self._head, "ts": ts, "mac": _checkpoint_mac(self._key, self._seq, self._head, ts)}
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
        if target in {q.resolve() for q in (self.path, *_companions(self.path))}:
            raise InputError(f"anchors cannot be written to the audit log's own files ({out}): keep them apart")

    def tail(self, n: int = 100) -> list[dict[str, Any]]:
        """The last `n` entries, newest last."""
        with self._lock:
            rows = self._db.execute(f"SELECT seq, {', '.join(FIELDS)} FROM entries ORDER BY seq DESC LIMIT ?", (n,)).fetchall()
        return [dict(zip(("seq", *FIELDS), r, strict=True)) for r in reversed(rows)]

    def close(self) -> None:
        self._db.close()


# -- anchors ---------------------------------------------------------------------------------------


def make_anchor(key: bytes, *, entries: int, last_seq: int, head_mac: str, ts: float | None = None) -> dict[str, Any]:
    """A small JSON-able document: the entry count, the last sequence number, the chain head's MAC and the
    time, under an HMAC-SHA256 with the audit key (which never leaves the server; anyone with the key can
    check an anchor, no one without it can make one)."""
    a: dict[str, Any] = {"type": ANCHOR_TYPE, "v": ANCHOR_VERSION, "entries": int(entries), "last_seq": int(last_seq),
                         "head_mac": head_mac, "ts": float(time.time() if ts is None else ts)}
    a["mac"] = _anchor_mac(key, a)
    return a


def _anchor_shape_ok(a: Any) -> bool:
    if not isinstance(a, dict) or a.get("type") != ANCHOR_TYPE or a.get("v") != ANCHOR_VERSION:
        return False
    ints_ok = all(isinstance(a.get(k), int) and not isinstance(a.get(k), bool) and a[k] >= 0 for k in ("entries", "last_seq"))
    return (ints_ok and isinstance(a.get("ts"), int | float) and not isinstance(a.get("ts"), bool)
            and isinstance(a.get("head_mac"), str) and len(a["head_mac"]) == 64 and isinstance(a.get("mac"), str))


def anchor_is_authentic(key: bytes, anchor: Any) -> bool:
    """Whether `anchor` is well formed and its MAC verifies with `key`."""
    return _anchor_shape_ok(anchor) and hmac.compare_digest(_anchor_mac(key, anchor), anchor["mac"])


def write_anchor(path: str | os.PathLike[str], anchor: dict[str, Any]) -> None:
    """Append `anchor` as one JSON line to `path` (created 0600), synced to disk before returning."""
    line = (json.dumps(anchor, sort_keys=True, separators=(",", ":")) + "\n").encode()
    fd = os.open(Path(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        # One write on an O_APPEND descriptor: a line from the server's writer and one from the CLI
        # cannot interleave, and a crash leaves at worst a torn last line, never a corrupted older one.
        view = memoryview(line)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_anchors(anchors: str | os.PathLike[str] | Iterable[dict[str, Any]]) -> list[tuple[int, Any]]:
    """(line number, parsed document or None when the line is not JSON) for each non-blank line."""
    if not isinstance(anchors, str | os.PathLike):
        return [(i, a) for i, a in enumerate(anchors, 1)]
    p = Path(anchors)
    if not p.is_file():
        raise InputError(f"anchor file not found: {p}")
    out: list[tuple[int, Any]] = []
    for i, raw in enumerate(p.read_bytes().splitlines(), 1):
        if not raw.strip():
            continue
        try:
            out.append((i, json.loads(raw)))
        except (ValueError, UnicodeDecodeError):
            out.append((i, None))
    return out


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


# -- verification ----------------------------------------------------------------------------------


@dataclass
class Verdict:
    ok: bool
    entries: int
    problems: list[str] = field(default_factory=list)
    last_seq: int = 0  # the highest sequence number in the log (0 when it has none)
    head_mac: str = GENESIS  # the MAC of the last entry that verified: the chain head when ok
    anchor: dict[str, Any] | None = None  # the newest valid anchor the log was held against
    anchors_valid: int = 0


def verify(path: str | os.PathLike[str], key: bytes, anchor: str | os.PathLike[str] | dict | None = None, *,
           anchors: str | os.PathLike[str] | Iterable[dict[str, Any]] | None = None) -> Verdict:
    """Walk the chain; report the first break and any checkpoint, exported checkpoint (`anchor`) or anchor it contradicts.

    `anchors` is an anchor file (JSON lines, see `AuditLog.anchor`) or a list of anchors. Every anchor's MAC is
    checked (a failing one is reported as forged); the log is then held against the newest valid one, the one
    with the highest sequence number: as the log only grows, that is the latest state, whatever order the
    lines are in. Fewer entries or a lower last sequence number than it (truncation, wipe), or another MAC at
    its sequence number (rewrite), is a problem.
    """
    p = Path(path)
    db = _open_readonly(p)
    try:
        rows = db.execute(f"SELECT seq, {', '.join(FIELDS)}, prev_mac, mac FROM entries ORDER BY rowid").fetchall()
        cps = db.execute("SELECT seq, head_mac, ts, mac FROM checkpoints ORDER BY seq").fetchall()
    except sqlite3.DatabaseError as e:
        raise InputError(f"the audit log {p} cannot be read: {e}") from None
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
        if not isinstance(anchor, dict) and not Path(anchor).is_file():
            raise InputError(f"exported checkpoint not found: {anchor}")
        try:
            a = anchor if isinstance(anchor, dict) else json.loads(Path(anchor).read_text())
            authentic = hmac.compare_digest(_checkpoint_mac(key, a["seq"], a["head_mac"], a["ts"]), a["mac"])
        except (ValueError, KeyError, TypeError):
            a, authentic = {}, False
        if not authentic:
            problems.append("the exported checkpoint is not authentic")
        elif last is not None and a["seq"] > last:
            problems.append(f"the exported checkpoint covers entry {a['seq']} but the log ends at entry {last}: truncated")
        elif a["seq"] in macs and macs[a["seq"]] != a["head_mac"]:
            problems.append(f"the log's entry {a['seq']} differs from the exported checkpoint")
    entries = len(rows)
    last_seq = max((r[0] for r in rows), default=0)
    newest, valid = None, 0
    if anchors is not None:
        # The stored MACs, chain-verified or not: a rewrite is named even past a break the walk stopped at.
        stored = {r[0]: r[-1] for r in rows}
        newest, valid = _check_anchors(key, _read_anchors(anchors), entries, last_seq, stored, problems)
    return Verdict(not problems, entries, problems, last_seq, prev, newest, valid)


def _check_anchors(key: bytes, lines: list[tuple[int, Any]], entries: int, last_seq: int, stored: dict[int, str],
                   problems: list[str]) -> tuple[dict[str, Any] | None, int]:
    valid: list[dict[str, Any]] = []
    for i, a in lines:
        if not _anchor_shape_ok(a):
            # Not skipped: hiding the newest anchor behind a garbled line would let a cut back to an older one pass.
            problems.append(f"anchor line {i} is not an anchor (damaged or forged)")
        elif not anchor_is_authentic(key, a):
            problems.append(f"anchor line {i} is forged or was modified: its MAC does not verify with this key "
                            f"(it claims {a['entries']} entries up to entry {a['last_seq']})")
        else:
            valid.append(a)
    if not valid:
        problems.append("no valid anchor to check the log against (the anchor file is empty or every line failed)")
        return None, 0
    a = max(valid, key=lambda x: (x["last_seq"], x["entries"], x["ts"]))
    when = f"the anchor of {_utc(a['ts'])} ({a['entries']} entries up to entry {a['last_seq']})"
    if entries == 0 and a["entries"] > 0:
        problems.append(f"wiped: the log has no entries, but {when}")
    elif last_seq < a["last_seq"]:
        problems.append(f"truncated: the log ends at entry {last_seq} with {entries} entries, but {when}; "
                        f"{a['last_seq'] - last_seq} entries are gone")
    elif entries < a["entries"]:
        problems.append(f"entries deleted: the log has {entries} entries up to entry {last_seq}, but {when}")
    if a["last_seq"] and a["last_seq"] in stored and not hmac.compare_digest(stored[a["last_seq"]], a["head_mac"]):
        problems.append(f"rewritten: the log's entry {a['last_seq']} is not the one anchored by {when} (another MAC): "
                        "the log was replaced or rewritten up to there")
    return a, len(valid)


# -- aggregation of denials ------------------------------------------------------------------------


@dataclass
class _Window:
    start: float
    first_seq: int
    outcome: str
    suppressed: int = 0
    written: int = 1


class DenialAggregator:
    """One entry per (action, client) per interval instead of one per denial: a flood must not flood the log.

    The first `burst` denials of a pair in an interval are written at once, each with its details (so the
    log shows the flood began, when, and a sample of what was tried); the next ones in the same interval are only counted, and one summary entry ("N more rate_limit
    denials for client X in the 10 s after entry S") is written when the interval ends: on the next
    `record` after it ends, on `flush_expired()` (for a periodic timer) or `flush()` (at shutdown: call it
    before closing the log). At most `max_pairs` pairs are tracked; past that, the oldest is summarised
    and dropped, so memory stays bounded whatever the number of addresses. Thread-safe.
    """

    def __init__(self, log: AuditLog, interval_s: float = 10.0, *, max_pairs: int = 10_000, burst: int = 1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not interval_s > 0 or max_pairs < 1 or burst < 1:
            raise InputError("the aggregation interval must be positive, max_pairs and burst at least 1")
        self.log, self.interval_s, self.max_pairs, self.burst = log, float(interval_s), max_pairs, burst
        self._clock = clock
        self._lock = threading.Lock()
        # Insertion order is start order (a pair is re-inserted when its new interval starts), so the
        # ended intervals and the oldest pair are always at the front: sweeping costs O(1) per record.
        self._open: OrderedDict[tuple[str, str | None], _Window] = OrderedDict()

    def __len__(self) -> int:
        return len(self._open)

    def record(self, action: str, client: str | None, details: Any = None, *, outcome: str = "denied", **fields: Any) -> int | None:
        """Record one denial; the sequence number of the entry written, or None when it was only counted."""
        with self._lock:
            # The append happens under this lock so that a pair's first entry always precedes its summary.
            now = self._clock()
            self._sweep_locked(now)
            w = self._open.get((action, client))
            if w is not None and w.written >= self.burst:
                w.suppressed += 1
                return None
            if w is not None:
                w.written += 1
                return self.log.append(action, outcome, client=client, details=details, **fields)
            seq = self.log.append(action, outcome, client=client, details=details, **fields)
            self._open[(action, client)] = _Window(now, seq, outcome)
            while len(self._open) > self.max_pairs:
                k, old = self._open.popitem(last=False)
                self._summarise_locked(k, old, now)
            return seq

    def flush_expired(self) -> int:
        """Write the summaries of the intervals that have ended; the number of entries written."""
        with self._lock:
            return self._sweep_locked(self._clock())

    def flush(self) -> int:
        """Write the summaries of every open interval, ended or not, and forget them; the number written."""
        with self._lock:
            now, n = self._clock(), 0
            while self._open:
                k, w = self._open.popitem(last=False)
                n += self._summarise_locked(k, w, now)
            return n

    def _sweep_locked(self, now: float) -> int:
        n = 0
        while self._open:
            k, w = next(iter(self._open.items()))
            if now - w.start < self.interval_s:
                break
            del self._open[k]
            n += self._summarise_locked(k, w, now)
        return n

    def _summarise_locked(self, k: tuple[str, str | None], w: _Window, now: float) -> int:
        if not w.suppressed:
            return 0
        action, client = k
        window = f"{min(self.interval_s, now - w.start):.1f}".removesuffix(".0")
        self.log.append(action, w.outcome, client=client,
                        details=f"{w.suppressed} more {action} denials for client {client} in the {window} s after entry {w.first_seq}")
        return 1


# -- review ----------------------------------------------------------------------------------------


def review(path: str | os.PathLike[str], *, burst: int = 5, window_s: float = 60.0, quiet_hours: tuple[int, int] = (0, 6)) -> list[str]:
    """Flags: bursts of failed authentication per address, authorization denials, revoked keys used,
    addresses seen once among many, and activity in quiet hours (UTC)."""
    p = Path(path)
    db = _open_readonly(p)
    try:
        rows = db.execute("SELECT seq, ts, principal, action, outcome, client, details FROM entries ORDER BY seq").fetchall()
    except sqlite3.DatabaseError as e:
        raise InputError(f"the audit log {p} cannot be read: {e}") from None
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
