"""The audit log's SQLite file: its schema, and opening, checking and creating it safely.

Files are created owner-only (0600): the database, and through it SQLite's -wal and -shm files. What is not an audit
log (an empty file, another file type, a SQLite database with other tables) is refused before SQLite touches it.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
from pathlib import Path
from typing import Any

from cvdeploy.errors import InputError
from cvdeploy.security.audit_chain import FIELDS

SCHEMA = """
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


def companions(p: Path) -> list[Path]:
    """SQLite's files beside the database `p` (-wal, -shm, -journal)."""
    return [p.with_name(p.name + suffix) for suffix in ("-wal", "-shm", "-journal")]


def check_file(p: Path) -> None:
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


def check_schema(db: sqlite3.Connection, p: Path) -> None:
    """Refuse a SQLite database whose tables are not an audit log's."""
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
    check_file(p)
    try:
        # as_uri() percent-encodes the path: a '?' or '#' in a file name would otherwise end it.
        db = sqlite3.connect(p.resolve().as_uri() + "?mode=ro", uri=True)
    except sqlite3.Error as e:
        raise InputError(f"{p} cannot be opened as an audit log: {e}") from None
    try:
        check_schema(db, p)
    except BaseException:
        db.close()
        raise
    return db


def read_rows(path: str | os.PathLike[str], *queries: str) -> list[list[tuple[Any, ...]]]:
    """The rows of each query, read from the audit log `path` opened read-only (for verifying and reviewing: neither
    may create, change or lock out the log it reads)."""
    p = Path(path)
    db = _open_readonly(p)
    try:
        return [db.execute(q).fetchall() for q in queries]
    except sqlite3.DatabaseError as e:
        raise InputError(f"the audit log {p} cannot be read: {e}") from None
    finally:
        db.close()


def tighten(p: Path) -> None:
    """Logs made before files were created 0600 are 0644; SQLite gives -wal and -shm the database's mode,
    so tightening the database also fixes the companions it creates from now on."""
    for q in (p, *companions(p)):
        try:
            mode = q.stat().st_mode & 0o777
            if mode & 0o077:
                os.chmod(q, mode & 0o700)
        except OSError:  # absent, or not ours to change: opening goes on, as it did before
            pass


def create(p: Path) -> None:
    """Create the log with its schema under a temporary name, then link it into place, so that `p` never
    exists empty (an empty file is refused as a wiped log) and is 0600 from its first byte."""
    tmp = p.with_name(f".{p.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    os.close(os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
    try:
        db = sqlite3.connect(tmp, isolation_level=None)
        try:
            db.executescript(SCHEMA)
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
        for q in (tmp, *companions(tmp)):
            q.unlink(missing_ok=True)
