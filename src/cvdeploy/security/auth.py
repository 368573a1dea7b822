"""Authentication (API keys, JWT), TOTP step-up, role-based access and rate limiting for the server.

- API keys look like ``cvd_<id>.<secret>``: the id is public, the secret is shown once and stored
  only as an argon2id hash; keys expire and can be revoked. They are accepted in the
  ``Authorization: Bearer`` or ``X-API-Key`` header, never in a query string.
- JWTs (``Authorization: Bearer <jwt>``) are checked against a fixed algorithm list, a key, an
  audience and an issuer; ``exp`` is required, ``nbf`` honoured; the role is the ``role`` claim.
- TOTP (RFC 6238, SHA-1, 30 s, 6 digits): privileged permissions need a fresh code in ``X-TOTP``;
  a code already used is refused (replay).
- RBAC: deny by default; every route maps to one permission; roles grant permissions.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import sqlite3
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cvdeploy.errors import InputError, MissingDependencyError

ROLES: dict[str, set[str]] = {
    "viewer": {"health", "metadata"},
    "predictor": {"health", "metadata", "infer"},
    "operator": {"health", "metadata", "infer", "model.lifecycle", "metrics", "docs"},
    "admin": {"health", "metadata", "infer", "model.lifecycle", "metrics", "docs", "keys", "audit"},
}
MFA_REQUIRED = {"model.lifecycle", "keys", "audit"}
KEY_PREFIX = "cvd_"


def route_permission(method: str, path: str) -> str | None:
    """The permission a request needs; None for an unknown route (denied)."""
    if path in ("/v2", "/v2/health/live", "/v2/health/ready"):
        return "health"
    if path.startswith("/v2/repository/models/") and method == "POST":
        return "model.lifecycle"
    if path == "/v2/repository/index":
        return "metadata"
    if path.startswith("/v2/models/") and (path.endswith("/infer") and method == "POST"):
        return "infer"
    if path.startswith("/v1/models/") and path.endswith("/predict") and method == "POST":
        return "infer"
    if path.startswith("/v2/models/") and method == "GET":
        return "metadata"
    if path == "/metrics":
        return "metrics"
    if path == "/admin/audit" and method == "GET":
        return "audit"
    if path == "/admin/keys" or path.startswith("/admin/keys/"):
        return "keys"
    if path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
        return "docs"
    return None


@dataclass
class Principal:
    name: str
    role: str
    method: str  # "api_key" or "jwt"
    key_id: str | None = None
    mfa: bool = False


class AuthError(Exception):
    def __init__(self, status: int, message: str, audit_detail: str = "") -> None:
        super().__init__(message)
        self.status, self.message, self.detail = status, message, audit_detail


# -- TOTP ------------------------------------------------------------------------------------------


def totp(secret_b32: str, at: float | None = None, step: int = 30, digits: int = 6) -> str:
    counter = int((time.time() if at is None else at) // step)
    return _hotp(secret_b32, counter, digits)


def _hotp(secret_b32: str, counter: int, digits: int = 6) -> str:
    key = base64.b32decode(secret_b32 + "=" * (-len(secret_b32) % 8), casefold=True)
    mac = hmac.new(key, struct.pack(">Q", counter), hashlib.sha1).digest()
    off = mac[-1] & 0x0F
    code = (struct.unpack(">I", mac[off : off + 4])[0] & 0x7FFFFFFF) % 10**digits
    return str(code).zfill(digits)


# -- the key store ---------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (key_id TEXT PRIMARY KEY, hash TEXT NOT NULL, principal TEXT NOT NULL, role TEXT NOT NULL,
  created REAL NOT NULL, expires REAL, revoked REAL);
CREATE TABLE IF NOT EXISTS totp (principal TEXT PRIMARY KEY, secret TEXT NOT NULL, last_step INTEGER NOT NULL DEFAULT -1);
"""


def _argon2() -> Any:
    try:
        from argon2 import PasswordHasher
    except ImportError as e:
        raise MissingDependencyError("argon2", "serve", "API keys") from e
    return PasswordHasher()  # argon2id with the library's current recommended parameters


class KeyStore:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        new = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        if new:
            os.chmod(self.path, 0o600)
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()
        # argon2id is slow on purpose; once a key's secret has been verified, later requests compare a
        # SHA-256 of it in constant time (revocation and expiry are still read from the store every time).
        self._verified: dict[str, tuple[bytes, float]] = {}
        self.cache_s = 300.0

    def create(self, principal: str, role: str, *, ttl_days: float | None = 90) -> tuple[str, str]:
        """A new key: returns (key id, the full key shown once)."""
        if role not in ROLES:
            raise InputError(f"unknown role {role!r}; roles: {', '.join(ROLES)}")
        key_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)
        now = time.time()
        with self._lock:
            self._db.execute("INSERT INTO keys VALUES (?, ?, ?, ?, ?, ?, NULL)",
                             (key_id, _argon2().hash(secret), principal, role, now, None if ttl_days is None else now + ttl_days * 86400))
        return key_id, f"{KEY_PREFIX}{key_id}.{secret}"

    def revoke(self, key_id: str) -> None:
        self._verified.pop(key_id, None)
        with self._lock:
            if self._db.execute("UPDATE keys SET revoked=? WHERE key_id=? AND revoked IS NULL", (time.time(), key_id)).rowcount == 0:
                raise InputError(f"no active key {key_id!r}")

    def list(self) -> list[dict[str, Any]]:
        rows = self._db.execute("SELECT key_id, principal, role, created, expires, revoked FROM keys ORDER BY created").fetchall()
        return [dict(zip(("key_id", "principal", "role", "created", "expires", "revoked"), r, strict=True)) for r in rows]

    def check(self, presented: str) -> Principal:
        if not presented.startswith(KEY_PREFIX) or "." not in presented:
            raise AuthError(401, "malformed API key", "malformed key")
        key_id, secret = presented[len(KEY_PREFIX):].split(".", 1)
        row = self._db.execute("SELECT hash, principal, role, expires, revoked FROM keys WHERE key_id=?", (key_id,)).fetchone()
        from argon2.exceptions import VerificationError, VerifyMismatchError

        if row is None:
            _argon2().hash(secret)  # spend the same time as for a known id
            raise AuthError(401, "invalid API key", f"unknown key id {key_id}")
        digest = hashlib.sha256(secret.encode()).digest()
        cached = self._verified.get(key_id)
        if cached is None or cached[1] < time.monotonic() or not hmac.compare_digest(cached[0], digest):
            try:
                _argon2().verify(row[0], secret)
            except (VerifyMismatchError, VerificationError):
                raise AuthError(401, "invalid API key", f"wrong secret for key {key_id}") from None
            self._verified[key_id] = (digest, time.monotonic() + self.cache_s)
        if row[4] is not None:
            raise AuthError(401, "invalid API key", f"revoked key {key_id} used")
        if row[3] is not None and row[3] < time.time():
            raise AuthError(401, "API key expired", f"expired key {key_id}")
        return Principal(row[1], row[2], "api_key", key_id)

    def enrol_totp(self, principal: str) -> str:
        secret = base64.b32encode(secrets.token_bytes(20)).decode().rstrip("=")
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO totp (principal, secret, last_step) VALUES (?, ?, -1)", (principal, secret))
        return secret

    def check_totp(self, principal: str, code: str | None, at: float | None = None) -> None:
        if not code:
            raise AuthError(401, "this action needs a TOTP code (X-TOTP header)", "missing TOTP")
        row = self._db.execute("SELECT secret, last_step FROM totp WHERE principal=?", (principal,)).fetchone()
        if row is None:
            raise AuthError(403, f"{principal} has no TOTP enrolment; privileged actions need one", "no TOTP enrolment")
        now = time.time() if at is None else at
        step = int(now // 30)
        for s in (step, step - 1, step + 1):  # one step of clock drift either way
            if hmac.compare_digest(_hotp(row[0], s), code.strip()):
                with self._lock:
                    updated = self._db.execute("UPDATE totp SET last_step=? WHERE principal=? AND last_step < ?", (s, principal, s)).rowcount
                if not updated:
                    raise AuthError(401, "TOTP code already used", "replayed TOTP code")
                return
        raise AuthError(401, "wrong TOTP code", "wrong TOTP code")


# -- the policy ------------------------------------------------------------------------------------


@dataclass
class JwtConfig:
    key: str | bytes  # HMAC secret or PEM public key
    algorithms: tuple[str, ...] = ("HS256",)
    audience: str = "cvdeploy"
    issuer: str | None = None


@dataclass
class AuthPolicy:
    store: KeyStore | None = None
    jwt: JwtConfig | None = None
    roles: dict[str, set[str]] = field(default_factory=lambda: {k: set(v) for k, v in ROLES.items()})
    mfa_required: set[str] = field(default_factory=lambda: set(MFA_REQUIRED))
    rate_per_s: float = 50.0  # token bucket per principal and per address
    burst: int = 100
    trusted_proxies: set[str] = field(default_factory=set)
    _buckets: dict[str, list[float]] = field(default_factory=dict)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], store: KeyStore | None, jwt_cfg: JwtConfig | None = None) -> AuthPolicy:
        doc = json.loads(Path(path).read_text())
        roles = {r: set(p) for r, p in doc.get("roles", ROLES).items()}
        return cls(store, jwt_cfg, roles, set(doc.get("mfa_required", MFA_REQUIRED)), float(doc.get("rate_per_s", 50)),
                   int(doc.get("burst", 100)), set(doc.get("trusted_proxies", [])))

    def client_address(self, peer: str | None, forwarded_for: str | None) -> str | None:
        if forwarded_for and peer in self.trusted_proxies:
            return forwarded_for.split(",")[0].strip()
        return peer

    def rate_ok(self, key: str, now: float | None = None) -> float:
        """0 if allowed; else the seconds to wait."""
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.get(key, [float(self.burst), now])
        tokens = min(float(self.burst), tokens + (now - last) * self.rate_per_s)
        if tokens < 1:
            self._buckets[key] = [tokens, now]
            return (1 - tokens) / self.rate_per_s
        self._buckets[key] = [tokens - 1, now]
        return 0.0

    def authenticate(self, headers: dict[str, str], query: dict[str, str]) -> Principal:
        for bad in ("api_key", "apikey", "key", "token", "access_token"):
            if bad in query:
                raise AuthError(400, "credentials are never accepted in the query string; use the Authorization header",
                                "credential in query string")
        auth = headers.get("authorization", "")
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else headers.get("x-api-key")
        if not token:
            raise AuthError(401, "authentication required (Authorization: Bearer <key or JWT>)", "no credentials")
        if token.startswith(KEY_PREFIX):
            if self.store is None:
                raise AuthError(401, "API keys are not enabled", "API key without a key store")
            return self.store.check(token)
        if self.jwt is None:
            raise AuthError(401, "invalid credentials", "JWT without JWT configuration")
        import jwt

        try:
            claims = jwt.decode(token, self.jwt.key, algorithms=list(self.jwt.algorithms), audience=self.jwt.audience,
                                issuer=self.jwt.issuer, options={"require": ["exp", "sub"]})
        except jwt.PyJWTError as e:
            raise AuthError(401, "invalid token", f"JWT refused: {type(e).__name__}") from None
        role = claims.get("role")
        if role not in self.roles:
            raise AuthError(403, "the token's role is not known here", f"JWT with unknown role {role!r}")
        return Principal(str(claims["sub"]), role, "jwt")

    def authorize(self, principal: Principal, permission: str | None, totp_code: str | None) -> None:
        if permission is None or permission not in self.roles.get(principal.role, set()):
            raise AuthError(403, f"{principal.role} may not do this", f"denied {permission}")
        if permission in self.mfa_required:
            if self.store is None:
                raise AuthError(403, "privileged actions need TOTP, which needs the key store", "no key store for TOTP")
            self.store.check_totp(principal.name, totp_code)
            principal.mfa = True
