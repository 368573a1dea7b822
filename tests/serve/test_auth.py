"""Authentication, RBAC, TOTP step-up, rate limits: every role against every route, bad tokens, all audited."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import httpx
import jwt
import pytest

from cvdeploy.security.audit import AuditLog, verify
from cvdeploy.security.auth import AuthPolicy, JwtConfig, KeyStore, totp

MODEL = "yolo11n-shapes"
SECRET = b"s" * 32
ROUTES = [  # (method, path, permission)
    ("GET", "/v2/health/ready", "health"),
    ("GET", f"/v2/models/{MODEL}", "metadata"),
    ("POST", f"/v1/models/{MODEL}/predict", "infer"),
    ("GET", "/metrics", "metrics"),
    ("GET", "/openapi.json", "docs"),
    ("POST", f"/v2/repository/models/{MODEL}/load", "model.lifecycle"),
]
ALLOWED = {
    "viewer": {"health", "metadata"},
    "predictor": {"health", "metadata", "infer"},
    "operator": {"health", "metadata", "infer", "metrics", "docs", "model.lifecycle"},
    "admin": {"health", "metadata", "infer", "metrics", "docs", "model.lifecycle"},
}


@pytest.fixture(scope="module")
def secured(demo_bundle: Path, server_factory, tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("auth")
    store = KeyStore(d / "keys.db")
    keys = {role: store.create(f"{role}-user", role)[1] for role in ALLOWED}
    totp_secrets = {role: store.enrol_totp(f"{role}-user") for role in ("operator", "admin")}
    revoked_id, revoked = store.create("gone", "admin")
    store.revoke(revoked_id)
    audit = AuditLog(d / "audit.db", b"a" * 32)
    # These tests send many bad credentials from one address on purpose: the failed-authentication throttle is
    # opened wide here and tested on its own server (test_hardening.py).
    policy = AuthPolicy(store, JwtConfig(SECRET, ("HS256",), "cvdeploy", "issuer-1"), rate_per_s=1000, burst=1000, fail_burst=1000)
    server = server_factory([str(demo_bundle)], auth=policy, audit=audit, client_verify=None)
    return server, keys, totp_secrets, revoked, d, policy


def call(server, method: str, path: str, token: str | None = None, **kw) -> httpx.Response:
    headers = kw.pop("headers", {})
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.request(method, server.url + path, headers=headers, timeout=60, **kw)


def test_every_role_against_every_route(secured, image_bytes: bytes) -> None:
    server, keys, *_ = secured
    for role, key in keys.items():
        for method, path, perm in ROUTES:
            expected = perm in ALLOWED[role]
            if perm == "model.lifecycle" and expected:
                continue  # allowed with a fresh TOTP code: see test_privileged_actions_need_a_fresh_totp
            r = call(server, method, path, key, content=image_bytes if method == "POST" else None)
            assert (r.status_code < 400) == expected, (role, path, r.status_code, r.text)
            if not expected:
                assert r.status_code == 403 and "error" in r.json()
    for method, path, _ in ROUTES:  # no credentials at all
        assert call(server, method, path).status_code == 401


def test_privileged_actions_need_a_fresh_totp(secured) -> None:
    server, keys, totps, _, d, _ = secured
    load = f"/v2/repository/models/{MODEL}/load"
    assert call(server, "POST", load, keys["operator"]).status_code == 401  # no code
    assert call(server, "POST", load, keys["operator"], headers={"X-TOTP": "000000"}).status_code == 401  # wrong code
    code = totp(totps["operator"])
    assert call(server, "POST", load, keys["operator"], headers={"X-TOTP": code}).status_code == 200
    replay = call(server, "POST", load, keys["operator"], headers={"X-TOTP": code})
    assert replay.status_code == 401 and "already used" in replay.json()["error"]
    rows = sqlite3.connect(d / "audit.db").execute("SELECT action, outcome, details, mfa FROM entries").fetchall()
    assert ("authorize", "denied", "missing TOTP", None) in [(a, o, det, None) for a, o, det, _ in rows]
    assert any(a == "authorize" and det == "replayed TOTP code" for a, _, det, _ in rows)
    assert any(a == "load_model" and o == "success" and mfa == 1 for a, o, _, mfa in rows)


def _jwt(**over) -> str:
    now = int(time.time())
    claims = {"sub": "svc", "role": "predictor", "aud": "cvdeploy", "iss": "issuer-1", "exp": now + 60, "nbf": now - 5} | over
    return jwt.encode(claims, SECRET, algorithm="HS256")


def test_bad_tokens_and_keys_get_401_and_are_audited(secured, image_bytes: bytes) -> None:
    server, _, _, revoked, d, _ = secured
    path = f"/v1/models/{MODEL}/predict"
    good = _jwt()
    assert call(server, "POST", path, good, content=image_bytes).status_code == 200
    now = int(time.time())
    header, payload, sig = good.split(".")
    import base64
    import json

    def b64(d: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(d).encode()).decode().rstrip("=")

    edited = ".".join([header, b64(jwt.decode(good, options={"verify_signature": False}) | {"role": "admin"}), sig])
    none_alg = ".".join([b64({"alg": "none", "typ": "JWT"}), payload, ""])
    confused = jwt.encode(jwt.decode(good, options={"verify_signature": False}), SECRET, algorithm="HS512")
    bad = {
        "expired": _jwt(exp=now - 10),
        "not yet valid": _jwt(nbf=now + 600),
        "wrong audience": _jwt(aud="someone-else"),
        "wrong issuer": _jwt(iss="mallory"),
        "alg none": none_alg,
        "algorithm confusion": confused,
        "edited": edited,
        "revoked key": revoked,
        "garbage key": "cvd_abc.def",
    }
    for what, token in bad.items():
        r = call(server, "POST", path, token, content=image_bytes)
        assert r.status_code == 401, (what, r.status_code, r.text)
        assert r.headers["www-authenticate"].startswith("Bearer")
    assert call(server, "POST", path + "?api_key=cvd_x.y", content=image_bytes).status_code == 400  # never in a query string
    rows = sqlite3.connect(d / "audit.db").execute("SELECT action, outcome, details FROM entries WHERE action='authenticate'").fetchall()
    details = [det for _, o, det in rows if o == "failure"]
    assert any("ExpiredSignature" in (x or "") for x in details) and any("revoked key" in (x or "") for x in details)
    assert any("ImmatureSignature" in (x or "") for x in details) and any("InvalidAudience" in (x or "") for x in details)
    assert verify(d / "audit.db", b"a" * 32).ok


def test_rate_limit_answers_429_with_retry_after(demo_bundle: Path, server_factory, tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "k.db")
    _, key = store.create("busy", "viewer")
    s = server_factory([str(demo_bundle)], auth=AuthPolicy(store, rate_per_s=0.5, burst=5))
    codes = [call(s, "GET", f"/v2/models/{MODEL}", key).status_code for _ in range(8)]  # (the readiness probe took tokens too)
    assert codes[:2] == [200, 200] and 429 in codes and set(codes) == {200, 429}
    r = call(s, "GET", f"/v2/models/{MODEL}", key)
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1


def test_keys_are_stored_hashed_only(secured) -> None:
    _, keys, _, _, d, _ = secured
    raw = (d / "keys.db").read_bytes()
    for key in keys.values():
        assert key.split(".", 1)[1].encode() not in raw
    assert (d / "keys.db").stat().st_mode & 0o777 == 0o600


@pytest.fixture(scope="module")
def image_bytes(shapes_data: Path) -> bytes:
    return sorted((shapes_data / "images" / "val").glob("*.jpg"))[0].read_bytes()


def test_admin_routes_need_admin_and_totp(secured) -> None:
    server, keys, totps, _, _, policy = secured
    assert call(server, "GET", "/admin/audit", keys["operator"]).status_code == 403
    assert call(server, "GET", "/admin/audit", keys["admin"]).status_code == 401  # no TOTP
    r = call(server, "GET", "/admin/audit?limit=5", keys["admin"], headers={"X-TOTP": totp(totps["admin"])})
    assert r.status_code == 200 and len(r.json()) == 5 and {"seq", "action", "outcome"} <= set(r.json()[0])
    created = call(server, "POST", "/admin/keys", keys["admin"], json={"principal": "new", "role": "viewer"},
                   headers={"X-TOTP": totp(totps["admin"], at=time.time() + 30)})
    assert created.status_code == 200, created.text
    new_key = created.json()["key"]
    assert call(server, "GET", f"/v2/models/{MODEL}", new_key).status_code == 200
    fresh = policy.store.enrol_totp("admin-user")  # codes are single-use and only one step ahead is accepted: re-enrol
    revoked = call(server, "POST", f"/admin/keys/{created.json()['key_id']}/revoke", keys["admin"], headers={"X-TOTP": totp(fresh)})
    assert revoked.status_code == 200
    assert call(server, "GET", f"/v2/models/{MODEL}", new_key).status_code == 401
