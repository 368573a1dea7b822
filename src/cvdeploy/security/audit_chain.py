"""The audit log's hash chain: what an entry's and a checkpoint's MACs cover.

An entry's MAC covers its fields, its sequence number and the previous entry's MAC (`GENESIS` for the first), so an
edited, deleted, reordered or inserted entry breaks the chain at that point. Each kind of record has its own MAC
input (a checkpoint's starts with "checkpoint|", an anchor's with "anchor|"), so no MAC is ever valid as another kind's.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

FIELDS = ("ts", "principal", "role", "auth_method", "mfa", "action", "resource", "outcome", "client", "request_id",
          "input_sha256", "details")
GENESIS = "0" * 64


def _canonical(seq: int, entry: dict[str, Any], prev: str) -> bytes:
    return json.dumps({"seq": seq, "prev": prev, **{k: entry.get(k) for k in FIELDS}}, sort_keys=True, separators=(",", ":")).encode()


def hmac_hex(key: bytes, data: bytes) -> str:
    return hmac.new(key, data, hashlib.sha256).hexdigest()


def entry_mac(key: bytes, seq: int, entry: dict[str, Any], prev: str) -> str:
    """The MAC of entry `seq`: its fields, its sequence number and the previous entry's MAC `prev`."""
    return hmac_hex(key, _canonical(seq, entry, prev))


def checkpoint_mac(key: bytes, seq: int, head: str, ts: float) -> str:
    return hmac_hex(key, f"checkpoint|{seq}|{head}|{ts!r}".encode())
