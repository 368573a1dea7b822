"""Hostile clients against a real server on 127.0.0.1: every input a 4xx (never a 5xx), slow and idle clients dropped,
memory admission, credential floods that cannot starve a legitimate client, spoofed addresses, TOTP guessing."""

from __future__ import annotations

import base64
import json
import random
import socket
import statistics
import struct
import threading
import time
from pathlib import Path

import httpx
import pytest

from cvdeploy.security.auth import AuthPolicy, JwtConfig, KeyStore, totp

MODEL = "yolo11n-shapes"
INFER = f"/v2/models/{MODEL}/infer"
PREDICT = f"/v1/models/{MODEL}/predict"


@pytest.fixture(scope="module")
def jpeg(shapes_data: Path) -> bytes:
    return sorted((shapes_data / "images" / "val").glob("*.jpg"))[0].read_bytes()


def v2(*inputs: dict, **extra: object) -> bytes:
    return json.dumps({"inputs": list(inputs), **extra}).encode()


def binary_request(header: dict, payload: bytes) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    return head + payload, {"Inference-Header-Content-Length": str(len(head)), "content-type": "application/octet-stream"}


def hostile_corpus(jpeg: bytes) -> list[tuple[str, str, bytes, dict[str, str]]]:
    """(name, path, body, headers): every class of input that once produced a 500."""
    deep = b"[" * 100_000 + b"]" * 100_000
    digits = b"9" * 5000
    img = {"name": "image", "shape": [1], "datatype": "BYTES"}
    out = [
        ("deep JSON (v2)", INFER, b'{"inputs":' + deep + b"}", {"content-type": "application/json"}),
        ("deep JSON (image API)", PREDICT, b'{"image":' + deep + b"}", {"content-type": "application/json"}),
        ("5000-digit integer (v2)", INFER, b'{"inputs":[{"name":"images","shape":[1],"datatype":"INT64","data":[' + digits + b"]}]}",
         {"content-type": "application/json"}),
        ("5000-digit integer (image API)", PREDICT, b'{"image":' + digits + b"}", {"content-type": "application/json"}),
        ("int64 overflow in a shape (JSON)", INFER, v2({"name": "images", "shape": [2**32, 2**32, 1, 1], "datatype": "FP32",
                                                        "data": [0.0]}), {}),
        ("huge shape literal", INFER, v2({"name": "images", "shape": [10**30], "datatype": "FP32", "data": [0.0]}), {}),
        ("BYTES data null", INFER, v2(img | {"data": [None]}), {}),
        ("BYTES data 1.5", INFER, v2(img | {"data": [1.5]}), {}),
        ("BYTES data -1", INFER, v2(img | {"data": [-1]}), {}),
        ("outputs[].parameters not an object", INFER,
         v2(img | {"data": [base64.b64encode(jpeg).decode()]}, outputs=[{"name": "detections", "parameters": 7}]), {}),
        ("inputs[].parameters not an object", INFER, v2(img | {"data": ["x"], "parameters": [1]}), {}),
        ("parameters not an object", INFER, v2(img | {"data": ["x"]}, parameters="yes"), {}),
        ("binary_data_size a bool", INFER, *binary_request({"inputs": [img | {"parameters": {"binary_data_size": True}}]}, b"x")),
        ("image JSON form not an object", PREDICT, b"[1, 2]", {"content-type": "application/json"}),
        ("image JSON form not base64", PREDICT, b'{"image": "***"}', {"content-type": "application/json"}),
        ("image JSON form a number", PREDICT, b'{"image": 5}', {"content-type": "application/json"}),
        ("not JSON", INFER, b"\xff\xfe\x00", {"content-type": "application/json"}),
        ("truncated gzip", INFER, b"\x1f\x8b\x08\x00", {"content-encoding": "gzip"}),
        ("unknown encoding", INFER, b"{}", {"content-encoding": "br"}),
        ("huge inputs give NaN: JSON cannot carry it", INFER,
         v2({"name": "images", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": [1e30] * 3072}), {}),
    ]
    # The same overflow in the binary form: the header's shape wraps int64, the payload is tiny.
    over = {"name": "images", "shape": [2**33, 2**31, 1, 1], "datatype": "FP32", "parameters": {"binary_data_size": 4}}
    out.append(("int64 overflow in a shape (binary)", INFER, *binary_request({"inputs": [over]}, b"\0\0\0\0")))
    return out


def status_counts(server) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("cvdeploy_http_responses_total{"):
            label = line.split('status_class="', 1)[1].split('"', 1)[0]
            counts[label] = float(line.rsplit(" ", 1)[1])
    return counts


def test_every_hostile_input_is_a_4xx_with_a_json_error_and_counted_as_such(server, jpeg: bytes) -> None:
    before = status_counts(server)
    corpus = hostile_corpus(jpeg)
    for name, path, body, headers in corpus:
        r = httpx.post(server.url + path, content=body, headers=headers, timeout=60)
        assert 400 <= r.status_code < 500, (name, r.status_code, r.text[:300])
        doc = json.loads(r.text)  # always valid JSON: never a bare NaN, never an HTML page
        assert isinstance(doc.get("error"), str) and "\n" not in doc["error"], (name, doc)
    nan = httpx.post(server.url + INFER, content=corpus[-2][2], timeout=60)
    assert nan.status_code == 422 and "NaN or inf" in nan.json()["error"]
    missing = httpx.get(f"{server.url}/no/such/route", timeout=10)
    assert missing.status_code == 404 and missing.json() == {"error": "Not Found"}  # the same shape as every error
    after = status_counts(server)
    assert after.get("4xx", 0) - before.get("4xx", 0) >= len(corpus) + 2 and after.get("5xx", 0) == before.get("5xx", 0)
    assert httpx.post(server.url + PREDICT, content=jpeg, timeout=60).status_code == 200  # and it keeps serving


@pytest.mark.slow
def test_a_thousand_mutated_requests_get_no_5xx_and_memory_stays_bounded(server, jpeg: bytes) -> None:
    """Seeded mutations of valid requests (bytes flipped, cut, duplicated; JSON values swapped for hostile ones)."""
    import resource

    rng = random.Random(7)
    good_json = v2({"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(jpeg).decode()]})
    good_binary = binary_request({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                              "parameters": {"binary_data_size": len(jpeg) + 4}}]},
                                 struct.pack("<I", len(jpeg)) + jpeg)
    hostile_values = [None, -1, 1.5, 10**30, "x", [], {}, [[[[]]]], True, 2**63, "\u00e9\u0000", 1e308]
    seeds = [(PREDICT, jpeg, {"content-type": "image/jpeg"}), (INFER, good_json, {"content-type": "application/json"}),
             (INFER, *good_binary)]
    corpus = hostile_corpus(jpeg)
    codes: dict[int, int] = {}
    with httpx.Client(base_url=server.url, timeout=60) as c:
        for i in range(1000):
            path, body, headers = rng.choice(seeds)
            kind = rng.randrange(5)
            if kind == 0:  # flip bytes
                b = bytearray(body)
                for _ in range(rng.randint(1, 20)):
                    b[rng.randrange(len(b))] = rng.randrange(256)
                body = bytes(b)
            elif kind == 1:  # cut
                body = body[: rng.randrange(len(body) + 1)]
            elif kind == 2 and path == INFER and headers.get("content-type") == "application/json":  # hostile JSON values
                doc = json.loads(body)
                t = doc["inputs"][0]
                t[rng.choice(["name", "shape", "datatype", "data", "parameters"])] = rng.choice(hostile_values)
                body = json.dumps(doc).encode()
            elif kind == 3:  # hostile headers
                headers = {**headers, rng.choice(["content-encoding", "inference-header-content-length", "content-type"]):
                           rng.choice(["gzip", "-5", "999999999999", "multipart/form-data; boundary=x", b"\xff\xfe"])}
            else:
                _, path, body, headers = corpus[i % len(corpus)]
            r = c.post(path, content=body, headers=headers, params={"conf": rng.choice(["0.5", "2", "nan", "-1"])}
                       if path == PREDICT and rng.random() < 0.2 else None)
            codes[r.status_code] = codes.get(r.status_code, 0) + 1
            assert r.status_code < 500, (i, kind, r.status_code, r.text[:300])
    assert sum(codes.values()) == 1000 and any(400 <= k < 500 for k in codes) and 200 in codes
    assert httpx.get(f"{server.url}/v2/health/ready", timeout=10).status_code == 200
    # The server runs in this process: its peak resident memory stays under the documented order of magnitude.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss < 3 * 1024 * 1024  # KiB: 3 GiB


def test_a_client_that_disconnects_mid_upload_is_a_client_abort(server) -> None:
    before = status_counts(server)
    with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])), timeout=10) as s:
        s.sendall(b"POST " + PREDICT.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                  b"Content-Length: 100000\r\n\r\n" + b"\xff\xd8" * 100)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and status_counts(server).get("client_abort", 0) == before.get("client_abort", 0):
        time.sleep(0.05)
    after = status_counts(server)
    assert after.get("client_abort", 0) == before.get("client_abort", 0) + 1 and after.get("5xx", 0) == before.get("5xx", 0)


def test_slow_header_and_idle_clients_are_disconnected(demo_bundle: Path, server_factory) -> None:
    s = server_factory([str(demo_bundle)], header_timeout_s=0.5, keep_alive_timeout_s=0.5)
    port = int(s.url.rsplit(":", 1)[1])
    for first in (b"", b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n"):  # idle from the start; headers never finished
        with socket.create_connection(("127.0.0.1", port), timeout=20) as c:
            c.sendall(first)
            t0 = time.monotonic()
            assert c.recv(100) == b""  # closed by the server (a timeout here would raise)
            assert time.monotonic() - t0 < 15  # well before the socket's own timeout: the server dropped it
    with httpx.Client(base_url=s.url) as c:  # a normal client is unaffected
        assert c.get("/v2/health/live").status_code == 200


def test_connections_beyond_the_cap_are_closed(demo_bundle: Path, server_factory) -> None:
    s = server_factory([str(demo_bundle)], max_connections=4, header_timeout_s=30)
    port = int(s.url.rsplit(":", 1)[1])
    held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(4)]
    try:
        time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as extra:
            try:
                extra.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
                answer = extra.recv(100)
            except ConnectionResetError:
                answer = b""
            assert answer == b""  # closed at once, without an answer
    finally:
        for h in held:
            h.close()
    time.sleep(0.2)
    assert httpx.get(f"{s.url}/v2/health/live", timeout=10).status_code == 200  # room again


def test_bytes_in_flight_beyond_the_budget_get_503_with_retry_after(demo_bundle: Path, server_factory, jpeg: bytes) -> None:
    s = server_factory([str(demo_bundle)], max_inflight_bytes=300_000, body_timeout_s=30)
    port = int(s.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as hold:  # declares 200 kB x3 and sends it slowly
        hold.sendall(b"POST " + PREDICT.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                     b"Content-Length: 200000\r\n\r\n" + b"\xff" * 10)
        time.sleep(0.3)
        r = httpx.post(s.url + PREDICT, content=jpeg, headers={"content-type": "image/jpeg"}, timeout=30)
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and "in flight" in r.json()["error"]
    time.sleep(0.3)
    assert httpx.post(s.url + PREDICT, content=jpeg, headers={"content-type": "image/jpeg"}, timeout=30).status_code == 200


@pytest.fixture(scope="module")
def guarded(demo_bundle: Path, server_factory, tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("guarded")
    store = KeyStore(d / "keys.db")
    _, legit = store.create("legit", "predictor")
    known_id, _ = store.create("victim", "predictor")
    policy = AuthPolicy(store, JwtConfig(b"j" * 32), rate_per_s=1000, burst=1000, trusted_proxies={"127.0.0.1"})
    return server_factory([str(demo_bundle)], auth=policy), legit, known_id, store, policy


def _p50_ms(url: str, key: str, n: int = 25) -> float:
    times = []
    with httpx.Client(headers={"Authorization": f"Bearer {key}"}, timeout=30) as c:
        for _ in range(n):
            t0 = time.perf_counter()
            assert c.get(url).status_code == 200
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def test_an_unknown_key_flood_does_not_starve_a_legitimate_client(guarded) -> None:
    """The reported attack: ~10 requests/s of unknown key ids and wrong secrets, under the rate limit, used to cost
    argon2 (~0.1 s of CPU) each and starve real clients. Counted, not timed: unknown ids cost no argon2 at all, wrong
    secrets for one key id cost at most that id's failure allowance, and the real client's requests all succeed."""
    server, legit, known_id, store, policy = guarded
    url = f"{server.url}/v2/models/{MODEL}"
    _p50_ms(url, legit, 3)  # its secret is verified once, then cached
    hashed: list[str] = []
    verify = store.verify

    def counting(pending):
        hashed.append(pending.key_id)
        return verify(pending)

    store.verify = counting  # the policy calls its store's verify for every argon2 check: count them
    stop = threading.Event()
    sent, codes = [0], []

    def flood(k: int) -> None:
        with httpx.Client(timeout=30) as c:
            while not stop.is_set():
                key = f"cvd_{k:08x}.guess" if k % 2 else f"cvd_{known_id}.wrong-secret-{sent[0]}"  # unknown ids; wrong secrets
                r = c.get(url, headers={"Authorization": f"Bearer {key}", "X-Forwarded-For": f"10.9.{k}.{sent[0] % 250}"})
                codes.append(r.status_code)
                sent[0] += 1
                time.sleep(0.8)  # ~10 requests/s in all: under the rate limit, as in the attack that was reported

    threads = [threading.Thread(target=flood, args=(k,), daemon=True) for k in range(8)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    try:
        time.sleep(2.0)
        _p50_ms(url, legit)  # 25 requests of the real client during the flood: every one answered 200
        deadline = time.monotonic() + 20
        while sent[0] < 2 * (policy.fail_burst + 3) and time.monotonic() < deadline:
            time.sleep(0.1)  # enough wrong secrets for the key id's allowance to run out
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
        store.verify = verify
    elapsed = time.monotonic() - t0
    assert sent[0] >= 16 and set(codes) <= {401, 429}, (sent[0], sorted(set(codes)))
    assert set(hashed) <= {known_id}, hashed  # an unknown key id never reaches argon2
    allowance = policy.fail_burst + policy.fail_rate_per_s * elapsed + 1
    assert len(hashed) <= allowance, (len(hashed), allowance)  # wrong secrets: throttled per key id before hashing
    assert codes.count(429) >= 1  # the wrong-secret guesser met the throttle


def test_failed_authentications_are_throttled_before_any_hashing(guarded) -> None:
    server, _, _, store, policy = guarded
    known_id, _ = store.create("target", "viewer")  # a key id no other test has guessed at
    url = f"{server.url}/v2/models/{MODEL}"
    codes = [httpx.get(url, headers={"Authorization": f"Bearer cvd_{known_id}.nope{i}", "X-Forwarded-For": "10.1.1.1"},
                       timeout=30).status_code for i in range(policy.fail_burst + 3)]
    assert codes[: policy.fail_burst] == [401] * policy.fail_burst and codes[-1] == 429  # then no argon2 at all
    # Another address guessing the same key id is throttled too: the key id has its own bucket.
    other = httpx.get(url, headers={"Authorization": f"Bearer cvd_{known_id}.again", "X-Forwarded-For": "10.2.2.2"}, timeout=30)
    assert other.status_code == 429 and int(other.headers["retry-after"]) >= 1


def test_spoofed_forwarded_for_cannot_escape_the_rate_limit(demo_bundle: Path, server_factory, tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "k.db")
    _, key = store.create("p", "viewer")
    policy = AuthPolicy(store, rate_per_s=0.01, burst=5, trusted_proxies={"127.0.0.1"})
    s = server_factory([str(demo_bundle)], auth=policy)
    codes = []
    for i in range(40):  # the client rotates the leftmost address; our proxy (127.0.0.1) appended the real one
        r = httpx.get(f"{s.url}/v2/health/live", headers={"Authorization": f"Bearer {key}",
                                                          "X-Forwarded-For": f"198.51.100.{i}, 203.0.113.9"}, timeout=30)
        codes.append(r.status_code)
    assert codes.count(429) >= 34, codes  # 5 in the burst (the probe took none from this address), the rest refused
    assert policy.client_address("127.0.0.1", "1.1.1.1, 203.0.113.9") == "203.0.113.9"
    assert policy.client_address("127.0.0.1", "203.0.113.9, 127.0.0.1") == "203.0.113.9"  # trusted hops skipped
    assert policy.client_address("192.0.2.1", "1.1.1.1") == "192.0.2.1"  # an untrusted peer's header is ignored
    many = AuthPolicy(store, max_buckets=100)
    for i in range(1000):
        many.rate_ok(f"addr:{i}")
    assert len(many._buckets) == 100  # bounded: rotating addresses cannot grow memory


def test_totp_guessing_locks_the_step_up_with_a_growing_delay(tmp_path: Path) -> None:
    from cvdeploy.security.auth import TOTP_LOCK_S, TOTP_MAX_FAILURES, AuthError

    store = KeyStore(tmp_path / "k.db")
    secret = store.enrol_totp("admin")
    now = 1_000_000.0
    for _ in range(TOTP_MAX_FAILURES):
        with pytest.raises(AuthError, match="wrong TOTP code"):
            store.check_totp("admin", "000000" if totp(secret, at=now) != "000000" else "111111", at=now)
    with pytest.raises(AuthError, match="locked") as locked:
        store.check_totp("admin", totp(secret, at=now), at=now)  # even the right code, while locked
    assert locked.value.status == 429 and locked.value.retry_after == pytest.approx(TOTP_LOCK_S)
    later = now + TOTP_LOCK_S + 1
    store.check_totp("admin", totp(secret, at=later), at=later)  # the lock ends; the right code works
    for _ in range(TOTP_MAX_FAILURES):
        with pytest.raises(AuthError):
            store.check_totp("admin", "12345x", at=later)  # malformed codes count as failures too
    with pytest.raises(AuthError) as again:
        store.check_totp("admin", totp(secret, at=later + 60), at=later + 1)
    assert again.value.retry_after == pytest.approx(2 * TOTP_LOCK_S - 1, abs=1)  # the second lock is twice as long


def test_non_ascii_totp_header_is_a_401_and_audited(demo_bundle: Path, server_factory, tmp_path: Path) -> None:
    import sqlite3

    from cvdeploy.security.audit import AuditLog

    store = KeyStore(tmp_path / "k.db")
    _, key = store.create("ops", "operator")
    store.enrol_totp("ops")
    audit = AuditLog(tmp_path / "audit.db", b"a" * 32)
    s = server_factory([str(demo_bundle)], auth=AuthPolicy(store, fail_burst=1000), audit=audit)
    with socket.create_connection(("127.0.0.1", int(s.url.rsplit(":", 1)[1])), timeout=30) as c:
        c.sendall(f"POST /v2/repository/models/{MODEL}/load HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n".encode()
                  + b"X-TOTP: \xff\xfe12\xe9\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := c.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 401") and b"malformed TOTP code" in answer
    rows = sqlite3.connect(tmp_path / "audit.db").execute("SELECT action, outcome, details FROM entries").fetchall()
    assert ("authorize", "denied", "malformed TOTP code") in rows


def test_key_lifetimes_and_jwt_dates_are_checked(tmp_path: Path) -> None:
    import jwt

    from cvdeploy.errors import InputError
    from cvdeploy.security.auth import AuthError

    store = KeyStore(tmp_path / "k.db")
    for bad in (float("inf"), -1, 0, float("nan"), 10**6, True, "90"):
        with pytest.raises(InputError, match="ttl_days"):
            store.create("p", "viewer", ttl_days=bad)  # type: ignore[arg-type]
    policy = AuthPolicy(None, JwtConfig(b"j" * 32))
    good = {"sub": "s", "role": "viewer", "aud": "cvdeploy", "exp": int(time.time()) + 60}
    assert policy.authenticate({"authorization": "Bearer " + jwt.encode(good, b"j" * 32)}, {}).name == "s"
    for claim, value in (("exp", str(int(time.time()) + 600)), ("nbf", "0"), ("exp", True)):
        token = jwt.encode(good | {claim: value}, b"j" * 32)
        with pytest.raises(AuthError, match="invalid token"):
            policy.authenticate({"authorization": f"Bearer {token}"}, {})


def test_serve_refuses_a_wrong_or_missing_model_key_in_one_line(demo_bundle: Path, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from cvdeploy.security.protect import load_key, new_key_file, protect_bundle

    right, wrong = new_key_file(tmp_path / "right.key"), new_key_file(tmp_path / "wrong.key")
    locked = protect_bundle(demo_bundle, tmp_path / "locked.cvd", load_key(right))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CVDEPLOY_MODEL_KEY")}

    def serve(*args: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cvdeploy", "serve", str(locked), "--port", "0", *args], capture_output=True,
                              text=True, timeout=120, env={**env, **extra_env})

    for args, extra, message in (((), {}, "this bundle is encrypted: give its key"),
                                 (("--key-file", str(wrong)), {}, "cannot be decrypted: wrong key"),
                                 (("--key-file", str(tmp_path / "nope.key")), {}, "--key-file"),
                                 ((), {"CVDEPLOY_MODEL_KEY_COMMAND": "false"}, "the model key command failed")):
        p = serve(*args, **extra)
        assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
        (line,) = p.stderr.strip().splitlines()
        assert line.startswith("error:") and message in line, line


def test_serve_with_a_public_key_serves_signed_bundles_only(demo_bundle: Path, server_factory, tmp_path: Path, jpeg: bytes) -> None:
    import shutil
    import subprocess
    import sys

    from cvdeploy.bundle.signing import load_public_key

    copy = tmp_path / "signed.cvd"
    shutil.copytree(demo_bundle, copy)
    cli = [sys.executable, "-m", "cvdeploy"]
    assert subprocess.run([*cli, "security", "sign-key", str(tmp_path / "sign.pem")], capture_output=True, timeout=120).returncode == 0
    pub = tmp_path / "sign.pem.pub"
    unsigned = subprocess.run([*cli, "serve", str(copy), "--port", "0", "--public-key", str(pub)], capture_output=True, text=True,
                              timeout=120)
    assert unsigned.returncode == 1 and "Traceback" not in unsigned.stderr and "sign" in unsigned.stderr.strip().splitlines()[-1]
    signed = subprocess.run([*cli, "sign", str(copy), "--key", str(tmp_path / "sign.pem")], capture_output=True, text=True, timeout=120)
    assert signed.returncode == 0, signed.stderr
    s = server_factory([str(copy)], public_key=load_public_key(pub))
    assert httpx.post(s.url + PREDICT, content=jpeg, timeout=60).status_code == 200
    m = json.loads((copy / "manifest.json").read_text())  # tampered after signing: a reload refuses it, the old version serves
    m["postprocess"]["conf"] = 0.9
    (copy / "manifest.json").write_text(json.dumps(m))
    reload = httpx.post(f"{s.url}/v2/repository/models/{MODEL}/load", timeout=60)
    assert reload.status_code == 400 and "still serves" in reload.json()["error"]
    assert httpx.post(s.url + PREDICT, content=jpeg, timeout=60).status_code == 200


def test_workers_share_one_port_and_stop_together(demo_bundle: Path, jpeg: bytes) -> None:
    import os
    import signal
    import subprocess
    import sys

    from tests.serve.conftest import free_port

    port = free_port()
    parent = subprocess.Popen([sys.executable, "-m", "cvdeploy", "serve", str(demo_bundle), "--port", str(port), "--workers", "2",
                               "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        children = [int(x) for x in Path(f"/proc/{parent.pid}/task/{parent.pid}/children").read_text().split()]
        assert len(children) == 2  # two server processes, one port
        # A connection the kernel hands to a worker still warming up waits in its listen queue: no request fails.
        codes = [httpx.post(f"http://127.0.0.1:{port}{PREDICT}", content=jpeg, headers={"Connection": "close"}, timeout=60).status_code
                 for _ in range(12)]
        assert codes == [200] * 12
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=60) == 0
        assert not any(Path(f"/proc/{c}").exists() and "zombie" not in Path(f"/proc/{c}/status").read_text().lower()
                       for c in children)  # the workers ended with it
    finally:
        if parent.poll() is None:
            parent.kill()
            os.waitpid(parent.pid, 0)
    refused = subprocess.run([sys.executable, "-m", "cvdeploy", "serve", str(demo_bundle), "--port", "0", "--workers", "2"],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and "needs a fixed --port" in refused.stderr
