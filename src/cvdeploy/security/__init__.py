"""Security: TLS, authentication and access control, the audit log, protected models."""

from __future__ import annotations

import os
from pathlib import Path


def write_private(path: str | os.PathLike[str], data: bytes) -> None:
    """Write a secret (a private key, a model key): created readable by its owner only, never world-readable first."""
    fd = os.open(Path(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
