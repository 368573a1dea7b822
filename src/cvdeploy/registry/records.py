"""What the registry answers with (a version, an alias change, an alias's history, a model's summary) and the rules for
the names it stores (models, aliases, version references)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cvdeploy.errors import InputError

LATEST = "latest"  # a reference every model has: its newest version (not an alias: it cannot be promoted)
VERSION_REF = re.compile(r"^v?([0-9]+)$")  # a version number as a reference: 3, "3" or "v3"
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_ALIAS_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class VersionInfo:
    """One registered version: where its bundle is, what it was made from, by whom, and what changed since the last."""

    model: str
    version: int
    path: Path
    stored: str  # "copy" (in the registry's content-addressed store) or "reference" (the path it was registered from)
    bundle_sha256: str  # lineage.tree_sha256 of the bundle directory as registered
    manifest_sha256: str  # the manifest's content hash (what `cvdeploy sign` signs)
    registered_at: str
    registered_by: str
    os_user: str
    note: str
    data: dict[str, Any] | None  # lineage.data_lineage of --data, or None
    class_metrics: dict[str, dict[str, float | None]] | None  # variant -> class -> mAP50-95, from a controlled report
    manifest: dict[str, Any]
    changelog: dict[str, Any]
    aliases: tuple[str, ...] = ()

    @property
    def source(self) -> dict[str, Any]:
        return self.manifest["source"]

    @property
    def metrics(self) -> dict[str, dict[str, float]]:
        return {name: dict(v.get("metrics", {})) for name, v in self.manifest["variants"].items()}

    def to_dict(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "model": self.model, "version": self.version, "aliases": list(self.aliases), "path": str(self.path),
            "stored": self.stored, "registered_at": self.registered_at, "registered_by": self.registered_by,
            "os_user": self.os_user, "note": self.note,
            "lineage": {"bundle_sha256": self.bundle_sha256, "manifest_sha256": self.manifest_sha256,
                        "source": {k: m["source"].get(k) for k in ("file", "sha256", "format", "exporter")},
                        "data": self.data, "profile": m.get("profile"), "environment": m.get("environment", {}),
                        "built_at": m.get("created_at"), "cvdeploy_version": m.get("cvdeploy_version")},
            "task": m["task"], "names": m["names"], "imgsz": m["preprocess"]["imgsz"],
            "default_variant": m["default_variant"], "metrics": self.metrics, "class_metrics": self.class_metrics,
            "latencies": m.get("latencies", []), "changelog": self.changelog,
        }  # fmt: skip


@dataclass(frozen=True)
class AliasChange:
    """What a promote or rollback did: `alias` of `model` now points at `version` (before: `previous`)."""

    model: str
    alias: str
    action: str  # "promote" or "rollback"
    version: int
    previous: int | None
    changed: bool
    at: str
    by: str

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "alias": self.alias, "action": self.action, "version": self.version,
                "previous": self.previous, "changed": self.changed, "at": self.at, "by": self.by}


@dataclass(frozen=True)
class AliasEvent:
    """One move of an alias, from its history."""

    id: int
    alias: str
    action: str
    version: int
    previous: int | None
    at: str
    by: str
    os_user: str
    reason: str
    undone: bool  # a promotion a rollback has undone

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "alias": self.alias, "action": self.action, "version": self.version, "previous": self.previous,
                "at": self.at, "by": self.by, "os_user": self.os_user, "reason": self.reason, "undone": self.undone}


@dataclass(frozen=True)
class ModelSummary:
    name: str
    versions: int
    latest: int
    aliases: dict[str, int] = field(default_factory=dict)
    created_at: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "versions": self.versions, "latest": self.latest, "aliases": dict(self.aliases),
                "created_at": self.created_at}


def check_model_name(name: str) -> str:
    if not _MODEL_NAME.match(name):
        raise InputError(f"model name {name!r} is not valid: letters, digits, '.', '_' and '-', starting with a letter or digit")
    return name


def check_alias_name(name: str) -> str:
    if name == LATEST or VERSION_REF.match(name) or not _ALIAS_NAME.match(name):
        raise InputError(f"alias {name!r} is not valid: a letter, then letters, digits, '.', '_' or '-' (not a version "
                         f"number, and not {LATEST!r}, which always means the newest version)")
    return name
