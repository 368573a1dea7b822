"""The model registry: models, numbered versions of each (registered bundles with their lineage and changelog), and
aliases (`production`, `staging`, any name) that point at versions, move by promotion and roll back through their
history. `resolve(model, alias_or_version)` gives the bundle to serve.

Every step that changes the registry (and every refusal of one) is written to the tamper-evident audit log, inside the
registry's write transaction: a change that could not be audited is rolled back.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cvdeploy.errors import BundleError, CvdeployError, InputError, NotFoundError
from cvdeploy.registry import changelog as changelog_mod
from cvdeploy.registry.auditing import AUDIT_KEY, AUDIT_LOG, RegistryAudit, audit_key
from cvdeploy.registry.lineage import data_lineage, now, os_user, store_copy, tree_sha256
from cvdeploy.registry.records import (
    LATEST,
    VERSION_REF,
    AliasChange,
    AliasEvent,
    ModelSummary,
    VersionInfo,
    check_alias_name,
    check_model_name,
)
from cvdeploy.registry.store import connect, parse_location, transaction

# The Registry lives here; its records and name rules (registry.records) are imported from here as they always were.
__all__ = [
    "LATEST",
    "STORE_DIR",
    "AliasChange",
    "AliasEvent",
    "ModelSummary",
    "Registry",
    "VersionInfo",
    "check_alias_name",
    "check_model_name",
]

STORE_DIR = "store"


class Registry:
    """A model registry in one SQLite file (`location`: a path or a sqlite:/// URL; default $CVDEPLOY_REGISTRY, else
    ./cvdeploy-registry/registry.db). Copies of bundles go to `store/` beside it; the audit log to `audit_log`
    (default `audit.db` beside it) under the key in `audit_key_file` (default `audit.key` beside it, made with the
    log) or `audit_key`. The database is opened on first use; reading never creates it."""

    def __init__(self, location: str | os.PathLike[str] | None = None, *, audit_log: str | os.PathLike[str] | None = None,
                 audit_key_file: str | os.PathLike[str] | None = None, audit_key: bytes | None = None) -> None:
        self.path = parse_location(location)
        self.root = self.path.parent
        self.store = self.root / STORE_DIR
        self.audit_path = Path(audit_log) if audit_log is not None else self.root / AUDIT_LOG
        self._audit_key_file = Path(audit_key_file) if audit_key_file is not None else self.root / AUDIT_KEY
        self._audit_key = audit_key
        self._db: sqlite3.Connection | None = None
        self._audit: RegistryAudit | None = None

    # -- plumbing ---------------------------------------------------------------------------------------

    def _conn(self, *, create: bool = False) -> sqlite3.Connection:
        if self._db is None:
            self._db = connect(self.path, create=create)
        return self._db

    def _auditor(self) -> RegistryAudit:
        if self._audit is None:
            key = self._audit_key if self._audit_key is not None else audit_key(self._audit_key_file, self.audit_path)
            self._audit = RegistryAudit(self.audit_path, key)
        return self._audit

    def _refused(self, action: str, resource: str, error: CvdeployError, principal: str, user: str,
                 details: dict[str, Any] | None = None) -> None:
        """Audit a refused step. Best effort: the refusal itself is what the caller must see, even if the log cannot
        take the entry (then the refusal is of the audit log, and already in the error). Nothing is written for a
        registry that does not exist: a mistyped --registry must not leave a key and a log behind."""
        if not self.path.is_file():
            return
        with contextlib.suppress(CvdeployError):
            self._auditor().record(action, "refused", principal=principal, os_user=user, resource=resource,
                                   details={"reason": str(error), **(details or {})})

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- queries ----------------------------------------------------------------------------------------

    def _model_id(self, db: sqlite3.Connection, model: str) -> int:
        row = db.execute("SELECT id FROM models WHERE name = ?", (model,)).fetchone()
        if row is None:
            known = [r[0] for r in db.execute("SELECT name FROM models ORDER BY name")]
            raise NotFoundError(f"unknown model {model!r} in the registry {self.path}"
                                + (f"; it has {', '.join(known)}" if known else "; it has no models yet"))
        return int(row[0])

    def _version_row(self, db: sqlite3.Connection, model: str, ref: str | int) -> sqlite3.Row:
        """The versions row `ref` names: a number (3, "3", "v3"), `latest`, or an alias."""
        mid = self._model_id(db, model)
        text = str(ref).strip()
        if text == LATEST:
            row = db.execute("SELECT * FROM versions WHERE model_id = ? ORDER BY number DESC LIMIT 1", (mid,)).fetchone()
            if row is None:
                raise NotFoundError(f"model {model!r} has no versions")
            return row
        if m := VERSION_REF.match(text):
            row = db.execute("SELECT * FROM versions WHERE model_id = ? AND number = ?", (mid, int(m.group(1)))).fetchone()
            if row is None:
                latest = db.execute("SELECT MAX(number) FROM versions WHERE model_id = ?", (mid,)).fetchone()[0]
                raise NotFoundError(f"unknown version {text} of model {model!r} (versions 1 to {latest})")
            return row
        row = db.execute("SELECT v.* FROM aliases a JOIN versions v ON v.id = a.version_id WHERE a.model_id = ? AND a.name = ?",
                         (mid, text)).fetchone()
        if row is None:
            known = [r[0] for r in db.execute("SELECT name FROM aliases WHERE model_id = ? ORDER BY name", (mid,))]
            raise NotFoundError(f"unknown alias {text!r} of model {model!r}"
                                + (f"; its aliases: {', '.join(known)}" if known else "; it has no aliases (promote a version first)"))
        return row

    def _info(self, db: sqlite3.Connection, model: str, row: sqlite3.Row) -> VersionInfo:
        aliases = tuple(r[0] for r in db.execute("SELECT name FROM aliases WHERE version_id = ? ORDER BY name", (row["id"],)))
        return VersionInfo(
            model=model, version=row["number"], path=self._path_of(row), stored=row["stored"], bundle_sha256=row["bundle_sha256"],
            manifest_sha256=row["manifest_sha256"], registered_at=row["registered_at"], registered_by=row["registered_by"],
            os_user=row["os_user"], note=row["note"], data=_loads(row["data"]), class_metrics=_loads(row["class_metrics"]),
            manifest=json.loads(row["manifest"]), changelog=json.loads(row["changelog"]), aliases=aliases)

    def _path_of(self, row: sqlite3.Row) -> Path:
        """A version's bundle directory, absolute: copies are recorded relative to the registry directory."""
        return (self.root / row["path"]).resolve() if row["stored"] == "copy" else Path(row["path"])

    def models(self) -> list[ModelSummary]:
        db = self._conn()
        out = []
        for mid, name, created in db.execute("SELECT id, name, created_at FROM models ORDER BY name").fetchall():
            count, latest = db.execute("SELECT COUNT(*), MAX(number) FROM versions WHERE model_id = ?", (mid,)).fetchone()
            aliases = dict(db.execute("SELECT a.name, v.number FROM aliases a JOIN versions v ON v.id = a.version_id "
                                      "WHERE a.model_id = ? ORDER BY a.name", (mid,)).fetchall())
            out.append(ModelSummary(name, count, latest or 0, aliases, created))
        return out

    def versions(self, model: str) -> list[VersionInfo]:
        db = self._conn()
        mid = self._model_id(db, model)
        rows = db.execute("SELECT * FROM versions WHERE model_id = ? ORDER BY number", (mid,)).fetchall()
        return [self._info(db, model, r) for r in rows]

    def show(self, model: str, ref: str | int = LATEST) -> VersionInfo:
        """The version `ref` (a number, `latest` or an alias) of `model`."""
        db = self._conn()
        return self._info(db, model, self._version_row(db, model, ref))

    def history(self, model: str, alias: str | None = None) -> list[AliasEvent]:
        """Every move of `model`'s aliases (or of `alias`), oldest first."""
        db = self._conn()
        mid = self._model_id(db, model)
        sql = ("SELECT e.id, e.alias, e.action, v.number, p.number, e.at, e.by, e.os_user, e.reason, e.undone_by "
               "FROM alias_events e JOIN versions v ON v.id = e.version_id LEFT JOIN versions p ON p.id = e.previous_version_id "
               "WHERE e.model_id = ?" + (" AND e.alias = ?" if alias else "") + " ORDER BY e.id")
        rows = db.execute(sql, (mid, alias) if alias else (mid,)).fetchall()
        return [AliasEvent(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9] is not None) for r in rows]

    def resolve(self, model: str, ref: str | int = LATEST) -> Path:
        """The bundle directory of version `ref` (a number, `latest` or an alias) of `model`, for a server to load.

        Checks that the directory is still there and still holds the manifest that was registered (a bundle kept by
        reference can be rebuilt or deleted in place); the files' own hashes are checked by `Bundle.load`.
        """
        from cvdeploy.bundle.bundle import MANIFEST, manifest_content_hash

        db = self._conn()
        row = self._version_row(db, model, ref)
        path = self._path_of(row)
        where = f"version {row['number']} of {model!r}"
        how = "by reference" if row["stored"] == "reference" else "in the registry's store"
        try:
            raw = json.loads((path / MANIFEST).read_text())
        except (OSError, ValueError):
            raise BundleError(f"{where} is stored {how} at {path}, which no longer holds a readable bundle") from None
        if not isinstance(raw, dict) or manifest_content_hash(raw) != row["manifest_sha256"]:
            raise BundleError(f"the bundle at {path} is no longer the one registered as {where} (its manifest changed): "
                              "register it as a new version, or restore it")
        return path

    # -- changes ----------------------------------------------------------------------------------------

    def register(self, bundle: str | os.PathLike[str], *, model: str | None = None, data: str | os.PathLike[str] | None = None,
                 controlled: Mapping[str, Any] | str | os.PathLike[str] | None = None, copy: bool = True,
                 by: str | None = None, note: str = "", public_key: Any = None) -> VersionInfo:
        """Register the bundle directory `bundle` as the next version of `model` (default: the bundle's name).

        The bundle must verify (every file against its manifest hash; a signature by `public_key` when given). `copy`
        (default) keeps a copy in the registry's content-addressed store; otherwise the registry refers to `bundle`'s
        path, which then must stay. `data` (a data.yaml) records the controlled data and a hash of its labels;
        `controlled` (a controlled report, `cvdeploy doctor --data ... --json`, or its path) records per-class mAP.
        """
        from cvdeploy.bundle.bundle import MANIFEST, Bundle, manifest_content_hash
        from cvdeploy.bundle.card import controlled_class_map, load_controlled

        user = os_user()
        principal = by or user
        resource = f"{model or '?'} <- {bundle}"
        try:
            if model is not None:
                check_model_name(model)
            b = Bundle.load(bundle, check_hashes=True, public_key=public_key)
            if b.root is None:
                raise InputError(f"{bundle} is a plain model file: register a bundle directory (`cvdeploy build`)")
            name = check_model_name(model or b.name)
            resource = f"{name} <- {bundle}"
            data_info = data_lineage(data) if data is not None else None
            report = load_controlled(controlled) if isinstance(controlled, str | os.PathLike) else controlled
            class_metrics = controlled_class_map(report) if report is not None else None
            if copy:
                path, tree = store_copy(b.root, self.store.resolve())
                Bundle.load(path, check_hashes=True)  # the copy, as it will be served
            else:
                path = b.root.resolve()
                tree = tree_sha256(path)
            raw = json.loads((path / MANIFEST).read_text())
            digest = raw.get("content_sha256") or manifest_content_hash(raw)
            # A copy is recorded relative to the registry directory, which can then be moved or restored as a whole.
            stored_path = path.relative_to(self.root.resolve()).as_posix() if copy else str(path)
            db = self._conn(create=True)
            with transaction(db):
                row = db.execute("SELECT id FROM models WHERE name = ?", (name,)).fetchone()
                if row is None:
                    mid = db.execute("INSERT INTO models (name, created_at, created_by) VALUES (?, ?, ?)",
                                     (name, now(), principal)).lastrowid
                else:
                    mid = row[0]
                dup = db.execute("SELECT number FROM versions WHERE model_id = ? AND manifest_sha256 = ?", (mid, digest)).fetchone()
                if dup is not None:
                    raise InputError(f"this bundle (manifest {digest[:12]}) is already version {dup[0]} of {name!r}")
                prev = db.execute("SELECT * FROM versions WHERE model_id = ? ORDER BY number DESC LIMIT 1", (mid,)).fetchone()
                number = 1 if prev is None else prev["number"] + 1
                previous = None if prev is None else {"number": prev["number"], "manifest": json.loads(prev["manifest"]),
                                                      "data": _loads(prev["data"]), "class_metrics": _loads(prev["class_metrics"])}
                log = changelog_mod.compute(previous, {"number": number, "manifest": raw, "data": data_info,
                                                       "class_metrics": class_metrics})
                at = now()
                db.execute(
                    "INSERT INTO versions (model_id, number, path, stored, bundle_sha256, manifest_sha256, source_sha256, data, "
                    "class_metrics, manifest, registered_at, registered_by, os_user, note, changelog) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (mid, number, stored_path, "copy" if copy else "reference", tree, digest, raw["source"]["sha256"],
                     _dumps(data_info), _dumps(class_metrics), json.dumps(raw), at, principal, user, note, json.dumps(log)))
                self._auditor().record(
                    "register", "success", principal=principal, os_user=user, resource=f"{name}/{number}", input_sha256=digest,
                    details={"path": str(path.resolve()), "stored": "copy" if copy else "reference", "from": str(Path(bundle).resolve()),
                             "bundle_sha256": tree, "source_sha256": raw["source"]["sha256"],
                             "data_labels_sha256": data_info["labels_sha256"] if data_info else None,
                             "changes": len(log["changes"]), "note": note})
            return self.show(name, number)
        except CvdeployError as e:
            self._refused("register", resource, e, principal, user)
            raise

    def promote(self, model: str, alias: str, ref: str | int, *, by: str | None = None, reason: str = "") -> AliasChange:
        """Point `alias` of `model` at version `ref` (a number, `latest` or another alias); the previous target is
        recorded, for `rollback`. Promoting to the version the alias already points at changes nothing."""
        user = os_user()
        principal = by or user
        resource = f"{model}@{alias}"
        try:
            check_alias_name(alias)
            db = self._conn()
            with transaction(db):
                mid = self._model_id(db, model)
                target = self._version_row(db, model, ref)
                current = db.execute("SELECT a.version_id, v.number FROM aliases a JOIN versions v ON v.id = a.version_id "
                                     "WHERE a.model_id = ? AND a.name = ?", (mid, alias)).fetchone()
                at = now()
                changed = current is None or current[0] != target["id"]
                if changed:
                    db.execute("INSERT INTO aliases (model_id, name, version_id, updated_at, updated_by) VALUES (?, ?, ?, ?, ?) "
                               "ON CONFLICT (model_id, name) DO UPDATE SET version_id = excluded.version_id, "
                               "updated_at = excluded.updated_at, updated_by = excluded.updated_by",
                               (mid, alias, target["id"], at, principal))
                    db.execute("INSERT INTO alias_events (model_id, alias, action, version_id, previous_version_id, at, by, "
                               "os_user, reason) VALUES (?, ?, 'promote', ?, ?, ?, ?, ?, ?)",
                               (mid, alias, target["id"], current[0] if current else None, at, principal, user, reason))
                change = AliasChange(model, alias, "promote", target["number"], current[1] if current else None, changed, at,
                                     principal)
                self._auditor().record("promote", "success" if changed else "unchanged", principal=principal, os_user=user,
                                       resource=resource, input_sha256=target["manifest_sha256"],
                                       details={**change.to_dict(), "reason": reason})
            return change
        except CvdeployError as e:
            self._refused("promote", resource, e, principal, user, {"to": str(ref)})
            raise

    def rollback(self, model: str, alias: str, *, by: str | None = None, reason: str = "") -> AliasChange:
        """Point `alias` back at the target it had before its newest promotion not yet rolled back; repeat to go
        further back through the alias's history."""
        user = os_user()
        principal = by or user
        resource = f"{model}@{alias}"
        try:
            db = self._conn()
            with transaction(db):
                mid = self._model_id(db, model)
                if alias == LATEST or VERSION_REF.match(alias):
                    raise InputError(f"{alias!r} is not an alias: only aliases move and roll back")
                current = self._version_row(db, model, alias)
                ev = db.execute("SELECT id, version_id, previous_version_id, at, by FROM alias_events WHERE model_id = ? AND "
                                "alias = ? AND action = 'promote' AND undone_by IS NULL ORDER BY id DESC LIMIT 1",
                                (mid, alias)).fetchone()
                if ev is None or ev["previous_version_id"] is None:
                    since = f" (it was first set to version {current['number']}" + (f" on {ev['at']} by {ev['by']})" if ev else ")")
                    raise InputError(f"alias {alias!r} of {model!r} has no earlier target to roll back to{since}")
                if ev["version_id"] != current["id"]:  # only promote and rollback move aliases, inside transactions
                    raise CvdeployError(f"the history of alias {alias!r} of {model!r} does not end at its target: the registry "
                                        f"{self.path} was changed outside cvdeploy")
                back = db.execute("SELECT id, number FROM versions WHERE id = ?", (ev["previous_version_id"],)).fetchone()
                at = now()
                db.execute("UPDATE aliases SET version_id = ?, updated_at = ?, updated_by = ? WHERE model_id = ? AND name = ?",
                           (back["id"], at, principal, mid, alias))
                rid = db.execute("INSERT INTO alias_events (model_id, alias, action, version_id, previous_version_id, at, by, "
                                 "os_user, reason) VALUES (?, ?, 'rollback', ?, ?, ?, ?, ?, ?)",
                                 (mid, alias, back["id"], current["id"], at, principal, user, reason)).lastrowid
                db.execute("UPDATE alias_events SET undone_by = ? WHERE id = ?", (rid, ev["id"]))
                change = AliasChange(model, alias, "rollback", back["number"], current["number"], True, at, principal)
                target_sha = db.execute("SELECT manifest_sha256 FROM versions WHERE id = ?", (back["id"],)).fetchone()[0]
                self._auditor().record("rollback", "success", principal=principal, os_user=user, resource=resource,
                                       input_sha256=target_sha, details={**change.to_dict(), "reason": reason,
                                                                         "undid_event": ev["id"]})
            return change
        except CvdeployError as e:
            self._refused("rollback", resource, e, principal, user)
            raise


def _dumps(value: Any) -> str | None:
    return None if value is None else json.dumps(value)


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)
