"""The bundle: manifest schema, reading, hashing and golden I/O."""

from cvdeploy.bundle.bundle import Bundle, GoldenData, sha256_file
from cvdeploy.bundle.manifest import SCHEMA_VERSION, Manifest

__all__ = ["SCHEMA_VERSION", "Bundle", "GoldenData", "Manifest", "sha256_file"]
