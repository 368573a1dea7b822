"""The model registry: versions of models with their lineage and changelog, aliases that promote and roll back, in
SQLite, every change audited (see docs/registry.md)."""

from cvdeploy.registry.registry import (
    LATEST,
    AliasChange,
    AliasEvent,
    ModelSummary,
    Registry,
    VersionInfo,
)
from cvdeploy.registry.store import DEFAULT_LOCATION, ENV_LOCATION, SCHEMA_VERSION

__all__ = [
    "DEFAULT_LOCATION",
    "ENV_LOCATION",
    "LATEST",
    "SCHEMA_VERSION",
    "AliasChange",
    "AliasEvent",
    "ModelSummary",
    "Registry",
    "VersionInfo",
]
