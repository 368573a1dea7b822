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
import math
import os
import secrets
import sqlite3
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cvdeploy.errors import AuthError, InputError, MissingDependencyError

ROLES: dict[str, set[str]] = {
    "viewer": {"health", "metadata"},
    "predictor": {"health", "metadata", "infer"},
    "operator": {"health", "metadata", "infer", "model.lifecycle", "metrics", "docs"},
    "admin": {"health", "metadata", "infer", "model.lifecycle", "metrics", "docs", "keys", "audit"},
}
MFA_REQUIRED = {"model.lifecycle", "keys", "audit"}
KEY_PREFIX = "cvd_"
MAX_TTL_DAYS = 3650
TOTP_MAX_FAILURES = 5  # wrong codes in a row before the principal's step-up is locked
TOTP_LOCK_S = 30.0  # the first lock; it doubles with every lock after it, up to TOTP_LOCK_MAX_S
TOTP_LOCK_MAX_S = 3600.0


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
    if path.startswith("/v1/models/") and path.endswith("/stream") and method == "GET":
        return "infer"  # the WebSocket stream's handshake (serve/routes_stream.py)
    if path.startswith("/v2/models/") and method == "GET":
        return "metadata"
    if path == "/metrics":
        return "metrics"
    if path == "/admin/audit" and method == "GET":
        return "audit"
    if path == "/admin/keys" or path.startswith("/admin/keys/"):
        return "keys"
    if path.startswith("/admin/models/") and (path.endswith("/canary") or "/canary/" in path):
        return "model.lifecycle" if method == "POST" else "metrics"  # start, promote, roll back; GET: the status
    if path in ("/admin/canary", "/admin/drift") and method == "GET":
        return "metrics"
    if path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect") or (path.startswith("/docs/assets/") and method == "GET"):
        return "docs"  # the pages and the assets they load (served from the package, never from a CDN)
    return None


@dataclass
class Principal:
    name: str
    role: str
    method: str  # "api_key" or "jwt"
    key_id: str | None = None
    mfa: bool = False


@dataclass(frozen=True)
class PendingKey:
    """A known, active key whose secret still has to be checked with argon2."""

    key_id: str
    secret: str
    hash: str
    principal: str
    role: str
    digest: bytes


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
        self._totp_fails: dict[str, int] = {}  # principal -> wrong codes in a row
        self._totp_locks: dict[str, tuple[int, float]] = {}  # principal -> (locks so far, locked until)

    def create(self, principal: str, role: str, *, ttl_days: float | None = 90) -> tuple[str, str]:
        """A new key: returns (key id, the full key shown once)."""
        if role not in ROLES:
            raise InputError(f"unknown role {role!r}; roles: {', '.join(ROLES)}")
        if ttl_days is not None and (isinstance(ttl_days, bool) or not isinstance(ttl_days, int | float)
                                     or not math.isfinite(ttl_days) or not 0 < ttl_days <= MAX_TTL_DAYS):
            raise InputError(f"ttl_days must be a number of days in (0, {MAX_TTL_DAYS}], got {ttl_days!r} "
                             "(keys that never expire are not issued: rotate them)")
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
        """The key's principal, hashing with argon2 here when needed (see `lookup` and `verify` for the split)."""
        found = self.lookup(presented)
        return found if isinstance(found, Principal) else self.verify(found)

    def lookup(self, presented: str) -> Principal | PendingKey:
        """Everything that needs no argon2: the format, the id (an unknown id costs no hashing at all: ids are not
        secret), revocation, expiry and the cache of secrets already verified. Returns the principal, or what
        `verify` must hash (run it off the event loop)."""
        if not presented.startswith(KEY_PREFIX) or "." not in presented:
            raise AuthError(401, "malformed API key", "malformed key")
        key_id, secret = presented[len(KEY_PREFIX):].split(".", 1)
        if not key_id.isascii() or not key_id.isalnum() or len(key_id) > 64:
            raise AuthError(401, "malformed API key", "malformed key id")
        row = self._db.execute("SELECT hash, principal, role, expires, revoked FROM keys WHERE key_id=?", (key_id,)).fetchone()
        if row is None:
            raise AuthError(401, "invalid API key", f"unknown key id {key_id}")
        if row[4] is not None:
            raise AuthError(401, "invalid API key", f"revoked key {key_id} used")
        if row[3] is not None and row[3] < time.time():
            raise AuthError(401, "API key expired", f"expired key {key_id}")
        digest = hashlib.sha256(secret.encode("utf-8", "surrogateescape")).digest()
        cached = self._verified.get(key_id)
        if cached is not None and cached[1] >= time.monotonic() and hmac.compare_digest(cached[0], digest):
            return Principal(row[1], row[2], "api_key", key_id)
        return PendingKey(key_id, secret, row[0], row[1], row[2], digest)

    def verify(self, pending: PendingKey) -> Principal:
        """argon2id verification of a secret `lookup` could not vouch for: slow on purpose (~0.1 s of CPU)."""
        from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

        try:
            _argon2().verify(pending.hash, pending.secret)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            raise AuthError(401, "invalid API key", f"wrong secret for key {pending.key_id}") from None
        self._verified[pending.key_id] = (pending.digest, time.monotonic() + self.cache_s)
        return Principal(pending.principal, pending.role, "api_key", pending.key_id)

    def enrol_totp(self, principal: str) -> str:
        secret = base64.b32encode(secrets.token_bytes(20)).decode().rstrip("=")
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO totp (principal, secret, last_step) VALUES (?, ?, -1)", (principal, secret))
        return secret

    def check_totp(self, principal: str, code: str | None, at: float | None = None) -> None:
        """A fresh, unused code of the principal's. After TOTP_MAX_FAILURES wrong codes in a row its step-up is locked
        for TOTP_LOCK_S, doubling with each lock (a 6-digit code is a million guesses: without a lock, 300 tries in a
        few seconds are cheap); the lock holds even against the right code."""
        now = time.time() if at is None else at
        if not code:
            raise AuthError(401, "this action needs a TOTP code (X-TOTP header)", "missing TOTP")
        with self._lock:
            locked_until = self._totp_locks.get(principal, (0, 0.0))[1]
        if locked_until > now:
            raise AuthError(429, f"TOTP step-up is locked after repeated wrong codes; retry in {locked_until - now:.0f} s",
                            f"TOTP locked for {principal}", retry_after=locked_until - now)
        code = code.strip()
        if len(code) != 6 or not code.isascii() or not code.isdigit():
            self._totp_failed(principal, now)
            raise AuthError(401, "malformed TOTP code: 6 digits expected", "malformed TOTP code")
        row = self._db.execute("SELECT secret, last_step FROM totp WHERE principal=?", (principal,)).fetchone()
        if row is None:
            raise AuthError(403, f"{principal} has no TOTP enrolment; privileged actions need one", "no TOTP enrolment")
        step = int(now // 30)
        for s in (step, step - 1, step + 1):  # one step of clock drift either way
            if hmac.compare_digest(_hotp(row[0], s), code):
                with self._lock:
                    updated = self._db.execute("UPDATE totp SET last_step=? WHERE principal=? AND last_step < ?", (s, principal, s)).rowcount
                if not updated:
                    raise AuthError(401, "TOTP code already used", "replayed TOTP code")
                with self._lock:
                    self._totp_fails.pop(principal, None)
                return
        locked = self._totp_failed(principal, now)
        raise AuthError(401, "wrong TOTP code", "wrong TOTP code" + (f"; step-up locked for {locked:.0f} s" if locked else ""))

    def _totp_failed(self, principal: str, now: float) -> float:
        """Count a wrong code; returns the lock's length when this failure locks the principal, else 0."""
        with self._lock:
            fails = self._totp_fails.get(principal, 0) + 1
            if fails < TOTP_MAX_FAILURES:
                self._totp_fails[principal] = fails
                return 0.0
            self._totp_fails.pop(principal, None)
            locks = self._totp_locks.get(principal, (0, 0.0))[0] + 1
            length = min(TOTP_LOCK_MAX_S, TOTP_LOCK_S * 2 ** (locks - 1))
            self._totp_locks[principal] = (locks, now + length)
            return length


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
    # Failed authentications, per client address and per key id, checked before any hashing: a wrong key costs
    # ~0.1 s of argon2, so guessing is throttled far below the request rate.
    fail_rate_per_s: float = 0.2
    fail_burst: int = 10
    max_buckets: int = 100_000  # token buckets kept (least recently used dropped): memory stays bounded under spoofing
    hash_workers: int = 1  # argon2 verifications run on these threads, never on the event loop
    max_pending_hashes: int = 16  # beyond, 503: a flood of wrong secrets cannot queue unbounded work
    _buckets: OrderedDict[str, list[float]] = field(default_factory=OrderedDict)
    _pending: int = 0
    _pool: Any = None

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], store: KeyStore | None, jwt_cfg: JwtConfig | None = None) -> AuthPolicy:
        try:
            doc = json.loads(Path(path).read_text())
            roles = {str(r): {str(x) for x in p} for r, p in doc.get("roles", ROLES).items()}
            return cls(store, jwt_cfg, roles, set(doc.get("mfa_required", MFA_REQUIRED)), float(doc.get("rate_per_s", 50)),
                       int(doc.get("burst", 100)), set(doc.get("trusted_proxies", [])),
                       float(doc.get("fail_rate_per_s", 0.2)), int(doc.get("fail_burst", 10)))
        except OSError as e:
            raise InputError(f"auth policy {path}: {e.strerror or e}") from None
        except (ValueError, TypeError, AttributeError) as e:
            raise InputError(f"auth policy {path} is not a valid policy document: {e}") from None

    def client_address(self, peer: str | None, forwarded_for: str | None) -> str | None:
        """The client: the peer, or behind a trusted proxy the rightmost X-Forwarded-For address that is not a trusted
        proxy. The leftmost entries are whatever the client wrote; only what our proxies appended can be believed."""
        if not forwarded_for or peer not in self.trusted_proxies:
            return peer
        hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
        for hop in reversed(hops):
            if hop not in self.trusted_proxies:
                return hop
        return hops[0] if hops else peer

    def rate_ok(self, key: str, now: float | None = None) -> float:
        """0 if allowed; else the seconds to wait."""
        return self._take(key, self.rate_per_s, self.burst, time.monotonic() if now is None else now)

    def _take(self, key: str, rate: float, burst: int, now: float) -> float:
        tokens, last = self._buckets.get(key, (float(burst), now))
        tokens = min(float(burst), tokens + (now - last) * rate)
        wait = 0.0 if tokens >= 1 else (1 - tokens) / rate
        self._buckets[key] = [tokens - 1 if tokens >= 1 else tokens, now]
        self._buckets.move_to_end(key)
        while len(self._buckets) > self.max_buckets:
            self._buckets.popitem(last=False)
        return wait

    def _peek(self, key: str, rate: float, burst: int, now: float) -> float:
        entry = self._buckets.get(key)
        if entry is None:
            return 0.0
        tokens = min(float(burst), entry[0] + (now - entry[1]) * rate)
        return 0.0 if tokens >= 1 else (1 - tokens) / rate

    def failures_wait(self, client: str | None, key_id: str | None, now: float | None = None) -> float:
        """Seconds this client (or anyone using this key id) must wait after too many failed authentications; 0: go on."""
        now = time.monotonic() if now is None else now
        waits = [self._peek(f"fail:addr:{client}", self.fail_rate_per_s, self.fail_burst, now)]
        if key_id:
            waits.append(self._peek(f"fail:key:{key_id}", self.fail_rate_per_s, self.fail_burst, now))
        return max(waits)

    def record_failure(self, client: str | None, key_id: str | None, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._take(f"fail:addr:{client}", self.fail_rate_per_s, self.fail_burst, now)
        if key_id:
            self._take(f"fail:key:{key_id}", self.fail_rate_per_s, self.fail_burst, now)

    def credentials(self, headers: dict[str, str], query: dict[str, str]) -> str:
        """The presented credential (API key or JWT) from the headers; refuses credentials in the query string."""
        for bad in ("api_key", "apikey", "key", "token", "access_token"):
            if bad in query:
                raise AuthError(400, "credentials are never accepted in the query string; use the Authorization header",
                                "credential in query string")
        auth = headers.get("authorization", "")
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else headers.get("x-api-key")
        if not token:
            raise AuthError(401, "authentication required (Authorization: Bearer <key or JWT>)", "no credentials")
        return token

    @staticmethod
    def key_id_of(token: str) -> str | None:
        if token.startswith(KEY_PREFIX) and "." in token:
            return token[len(KEY_PREFIX):].split(".", 1)[0][:64]
        return None

    def identify(self, token: str) -> Principal | PendingKey:
        """Everything but argon2: JWTs in full (an HMAC or a signature check), API keys up to the hash (`KeyStore.lookup`)."""
        if token.startswith(KEY_PREFIX):
            if self.store is None:
                raise AuthError(401, "API keys are not enabled", "API key without a key store")
            return self.store.lookup(token)
        if self.jwt is None:
            raise AuthError(401, "invalid credentials", "JWT without JWT configuration")
        import jwt

        try:
            claims = jwt.decode(token, self.jwt.key, algorithms=list(self.jwt.algorithms), audience=self.jwt.audience,
                                issuer=self.jwt.issuer, options={"require": ["exp", "sub"]})
        except jwt.PyJWTError as e:
            raise AuthError(401, "invalid token", f"JWT refused: {type(e).__name__}") from None
        for claim in ("exp", "nbf", "iat"):  # PyJWT casts a numeric string with int(); RFC 7519 wants a NumericDate
            if claim in claims and (isinstance(claims[claim], bool) or not isinstance(claims[claim], int | float)):
                raise AuthError(401, "invalid token", f"JWT refused: {claim} is not a number")
        role = claims.get("role")
        if role not in self.roles:
            raise AuthError(403, "the token's role is not known here", f"JWT with unknown role {role!r}")
        return Principal(str(claims["sub"]), role, "jwt")

    def authenticate(self, headers: dict[str, str], query: dict[str, str]) -> Principal:
        """The whole check in the calling thread (argon2 included): for tools and tests; the server uses `identify` and
        `verify_async` so that hashing stays off its event loop."""
        found = self.identify(self.credentials(headers, query))
        return found if isinstance(found, Principal) else self.store.verify(found)  # type: ignore[union-attr]

    async def verify_async(self, pending: PendingKey) -> Principal:
        """argon2 on the policy's bounded worker pool; 503 when too many verifications are already waiting."""
        import asyncio
        from concurrent.futures import ThreadPoolExecutor

        if self._pending >= self.max_pending_hashes:
            raise AuthError(503, "authentication is busy; retry later", "argon2 queue full", retry_after=1.0)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.hash_workers, thread_name_prefix="cvdeploy-argon2")
        self._pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, self.store.verify, pending)  # type: ignore[union-attr]
        finally:
            self._pending -= 1

    def authorize(self, principal: Principal, permission: str | None, totp_code: str | None) -> None:
        if permission is None or permission not in self.roles.get(principal.role, set()):
            raise AuthError(403, f"{principal.role} may not do this", f"denied {permission}")
        if permission in self.mfa_required:
            if self.store is None:
                raise AuthError(403, "privileged actions need TOTP, which needs the key store", "no key store for TOTP")
            self.store.check_totp(principal.name, totp_code)
            principal.mfa = True
