"""The registry's SQLite database: where it is, its schema, its migrations and its write transactions.

One file (WAL mode, foreign keys on) that several processes may open at once: a CI job registering while an operator
promotes. Every write is one `BEGIN IMMEDIATE` transaction, so writers queue on SQLite's lock (up to `BUSY_TIMEOUT_S`)
instead of failing or interleaving; readers never wait for a writer (WAL). The schema carries its version in
`schema_version`; `MIGRATIONS[n]` takes a database from version n - 1 to n, all pending steps in one transaction, so a
migration that fails leaves the database as it was.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path

from cvdeploy.errors import CvdeployError, InputError, NotFoundError

SCHEMA_VERSION = 1
DEFAULT_LOCATION = Path("cvdeploy-registry") / "registry.db"
ENV_LOCATION = "CVDEPLOY_REGISTRY"
BUSY_TIMEOUT_S = 60.0  # how long a writer waits for another one (a register copies its bundle before taking the lock)
_SQLITE_MAGIC = b"SQLite format 3\x00"

# MIGRATIONS[n]: the statements that take the schema from version n - 1 to n (version 0: an empty file).
MIGRATIONS: dict[int, Sequence[str]] = {
    1: (
        """CREATE TABLE models (
             id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, created_at TEXT NOT NULL, created_by TEXT NOT NULL)""",
        # One row per registered bundle. `manifest` is the whole manifest.json as registered: `show` and the changelog
        # read it even when a bundle stored by reference has since been deleted.
        """CREATE TABLE versions (
             id INTEGER PRIMARY KEY,
             model_id INTEGER NOT NULL REFERENCES models(id),
             number INTEGER NOT NULL CHECK (number >= 1),
             path TEXT NOT NULL,
             stored TEXT NOT NULL CHECK (stored IN ('copy', 'reference')),
             bundle_sha256 TEXT NOT NULL,
             manifest_sha256 TEXT NOT NULL,
             source_sha256 TEXT NOT NULL,
             data TEXT,
             class_metrics TEXT,
             manifest TEXT NOT NULL,
             registered_at TEXT NOT NULL,
             registered_by TEXT NOT NULL,
             os_user TEXT NOT NULL,
             note TEXT NOT NULL DEFAULT '',
             changelog TEXT NOT NULL,
             UNIQUE (model_id, number),
             UNIQUE (model_id, manifest_sha256))""",
        """CREATE TABLE aliases (
             model_id INTEGER NOT NULL REFERENCES models(id),
             name TEXT NOT NULL,
             version_id INTEGER NOT NULL REFERENCES versions(id),
             updated_at TEXT NOT NULL,
             updated_by TEXT NOT NULL,
             PRIMARY KEY (model_id, name))""",
        # Every move of an alias. A rollback undoes the newest promotion not yet undone (`undone_by`), so rollbacks
        # repeat back through the history, one promotion at a time.
        """CREATE TABLE alias_events (
             id INTEGER PRIMARY KEY AUTOINCREMENT,
             model_id INTEGER NOT NULL REFERENCES models(id),
             alias TEXT NOT NULL,
             action TEXT NOT NULL CHECK (action IN ('promote', 'rollback')),
             version_id INTEGER NOT NULL REFERENCES versions(id),
             previous_version_id INTEGER REFERENCES versions(id),
             undone_by INTEGER REFERENCES alias_events(id),
             at TEXT NOT NULL,
             by TEXT NOT NULL,
             os_user TEXT NOT NULL,
             reason TEXT NOT NULL DEFAULT '')""",
        "CREATE INDEX alias_events_by_alias ON alias_events (model_id, alias, id)",
    ),
}


def parse_location(location: str | os.PathLike[str] | None = None) -> Path:
    """The database file: `location` (a path or a `sqlite:///` URL), else $CVDEPLOY_REGISTRY, else
    ./cvdeploy-registry/registry.db.

    URLs follow SQLAlchemy's form: `sqlite:///relative/path.db`, `sqlite:////absolute/path.db`.
    """
    raw = location if location is not None else os.environ.get(ENV_LOCATION) or DEFAULT_LOCATION
    text = os.fspath(raw)
    if "://" in text:
        scheme, _, rest = text.partition("://")
        if scheme.lower() != "sqlite":
            raise InputError(f"registry {text!r}: only SQLite registries are supported (a file path or sqlite:///PATH)")
        if not rest.startswith("/") or rest in ("/", "/:memory:"):
            raise InputError(f"registry {text!r}: give a file (sqlite:///relative.db or sqlite:////absolute.db); "
                             "an in-memory registry could not be shared")
        text = rest[1:]  # sqlite:///a.db -> a.db, sqlite:////a.db -> /a.db
    if not text:
        raise InputError("the registry location is empty")
    return Path(text)


def _check_file(p: Path) -> None:
    if not p.is_file():
        raise InputError(f"{p} is not a registry (not a regular file)")
    with p.open("rb") as f:
        head = f.read(len(_SQLITE_MAGIC))
    if head and head != _SQLITE_MAGIC:
        raise InputError(f"{p} is not a registry (not a SQLite database)")


def connect(path: Path, *, create: bool) -> sqlite3.Connection:
    """An open, migrated connection to the registry at `path`; created (with its directory) when `create`.

    A registry that does not exist and is not to be created is a NotFoundError that says how to make one.
    """
    if not path.exists():
        if not create:
            raise NotFoundError(f"no registry at {path}: register a bundle first (`cvdeploy registry register`), or give "
                                f"--registry (or ${ENV_LOCATION})")
        path.parent.mkdir(parents=True, exist_ok=True)
    else:
        _check_file(path)
    try:
        db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as e:
        raise InputError(f"{path} cannot be opened as a registry: {e}") from None
    try:
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA foreign_keys = ON")  # per connection: SQLite's default is off
        if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            db.execute("PRAGMA journal_mode = WAL")  # persistent, recorded in the file
        db.execute("PRAGMA synchronous = NORMAL")  # with WAL: a committed change survives a crash of the process
        migrate(db, path)
    except sqlite3.DatabaseError as e:
        db.close()
        raise InputError(f"{path} cannot be used as a registry: {e}") from None
    except BaseException:
        db.close()
        raise
    return db


def schema_version(db: sqlite3.Connection) -> int:
    """The schema version recorded in the database; 0 for an empty one."""
    has_table = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'").fetchone()
    if not has_table:
        return 0
    row = db.execute("SELECT version FROM schema_version").fetchone()
    return int(row[0]) if row else 0


def migrate(db: sqlite3.Connection, path: Path, migrations: dict[int, Sequence[str]] | None = None) -> int:
    """Bring the schema to the newest version `migrations` knows (default `MIGRATIONS`); return that version.

    Runs in one IMMEDIATE transaction: two processes opening a new registry at once do not both create it, and a step
    that fails rolls every step back. A database newer than this cvdeploy, or one with other tables, is refused.
    """
    steps = MIGRATIONS if migrations is None else migrations
    target = max(steps)
    current = schema_version(db)
    if current == target:
        return current  # the common case: no write lock taken
    with transaction(db):
        current = schema_version(db)  # another process may have migrated meanwhile
        if current > target:
            raise InputError(f"the registry {path} has schema version {current}; this cvdeploy reads up to version {target}: "
                             "upgrade cvdeploy")
        if current == 0:
            foreign = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            if foreign:
                raise InputError(f"{path} is a SQLite database but not a cvdeploy registry (it has tables: {', '.join(foreign)})")
            db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
            db.execute("INSERT INTO schema_version (version) VALUES (0)")
        for n in range(current + 1, target + 1):
            for statement in steps[n]:
                db.execute(statement)
            db.execute("UPDATE schema_version SET version = ?", (n,))
    return target


@contextlib.contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """A write transaction that holds SQLite's write lock from its first statement (`BEGIN IMMEDIATE`): what it reads
    (the next version number, an alias's target) cannot change under it. Committed on success, rolled back otherwise."""
    try:
        db.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as e:  # "database is locked": another writer held it past the busy timeout
        where = db.execute("PRAGMA database_list").fetchone()[2]
        raise CvdeployError(f"the registry {where} is busy ({e}) for more than {BUSY_TIMEOUT_S:g} s: retry") from None
    try:
        yield db
        db.execute("COMMIT")
    except BaseException as e:
        if db.in_transaction:  # SQLite has already rolled back after some errors (a full disk, an I/O error)
            db.execute("ROLLBACK")
        if isinstance(e, sqlite3.OperationalError):  # a read-only file or directory, a full disk: say it in one line
            where = db.execute("PRAGMA database_list").fetchone()[2]
            raise CvdeployError(f"the registry {where} cannot be written: {e}") from e
        raise
