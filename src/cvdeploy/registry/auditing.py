"""The registry's side of the tamper-evident audit log (`cvdeploy.security.audit`): one entry per registry step.

`AuditLog` keeps the chain head in memory and is safe across threads, not across processes. The registry is used from
many short processes (a CI job, an operator's shell), so each entry is written by a log opened for that entry, under
an exclusive lock on `<log>.lock`: the log it opens reads the head the previous writer left. Before its first entry a
`RegistryAudit` verifies the whole chain with its key, and refuses to write to a log that fails: a wrong key would
otherwise start a chain no one could verify, and a tampered log would be extended as if nothing had happened.

By default the log is `audit.db` beside the registry database, with its key in `audit.key` there (32 random bytes,
base64, mode 0600, created with the log). A key beside the log proves only that entries were not edited by someone
without access to that directory: for more, keep the key elsewhere (`--audit-key-file`) and anchor the log apart
(`cvdeploy audit anchor`). Do not point it at a running server's audit log: the server keeps its own chain head.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cvdeploy.errors import CvdeployError, InputError

AUDIT_LOG = "audit.db"
AUDIT_KEY = "audit.key"


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on `path` (created 0600), held for the block; a plain block where fcntl is missing."""
    try:
        import fcntl
    except ImportError:  # Windows: one writer per log is then the user's to arrange
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def audit_key(key_file: Path, log: Path) -> bytes:
    """The audit key in `key_file`; a new one is created there only together with a new log (never for an existing
    log, whose entries a new key could not verify)."""
    from cvdeploy.security.protect import new_key_file, parse_key

    if not key_file.is_file():
        if log.exists():
            raise InputError(f"the registry's audit log {log} exists but its key {key_file} does not: give the key "
                             "(--audit-key-file or $CVDEPLOY_REGISTRY_AUDIT_KEY_FILE)")
        new_key_file(key_file)
    try:
        return parse_key(key_file.read_bytes())
    except InputError:
        raise InputError(f"{key_file}: the audit key must be 32 bytes (raw, hex or base64)") from None


class RegistryAudit:
    """Appends registry events to the audit log at `path`, authenticated with `key`."""

    def __init__(self, path: str | os.PathLike[str], key: bytes) -> None:
        self.path = Path(path)
        self._key = key
        self._verified = False
        self._client = socket.gethostname()

    def record(self, action: str, outcome: str, *, principal: str, os_user: str, resource: str,
               input_sha256: str | None = None, details: dict[str, Any] | None = None) -> int:
        """Append one entry (`registry.<action>`); its sequence number. Raises if the log cannot be written or fails
        verification: a registry step that cannot be audited does not happen."""
        from cvdeploy.security.audit import AuditLog, verify

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _exclusive(self.path.with_name(self.path.name + ".lock")):
            log = AuditLog(self.path, self._key)
            try:
                if not self._verified:
                    v = verify(self.path, self._key)
                    if not v.ok:
                        raise CvdeployError(f"the registry's audit log {self.path} fails verification ({v.problems[0]}): "
                                            "nothing was changed; check it with `cvdeploy audit verify`, keep it as "
                                            "evidence and move it aside to start a new log")
                    self._verified = True
                return log.append(f"registry.{action}", outcome, principal=principal, resource=resource,
                                  auth_method="os-user" if principal == os_user else "claimed", client=self._client,
                                  input_sha256=input_sha256, details={"os_user": os_user, **(details or {})})
            finally:
                log.close()
