"""TLS and mutual TLS with certificates made in the test: old protocols, missing or foreign client certificates refused."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import httpx
import pytest

from cvdeploy.security.tls import make_dev_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory):
    return make_dev_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def mtls(demo_bundle: Path, pki, server_factory):
    client_ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    client_ctx.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    tls = {"tls_cert": str(pki.server_cert), "tls_key": str(pki.server_key), "tls_client_ca": str(pki.ca_cert)}
    return server_factory([str(demo_bundle)], tls=tls, client_verify=client_ctx), client_ctx


def _handshake(port: int, ctx: ssl.SSLContext) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
        s.sendall(b"GET /v2 HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        if not s.recv(64).startswith(b"HTTP/1.1 200"):
            raise ssl.SSLError("no HTTP answer")


def test_mutual_tls_accepts_our_client_and_refuses_others(mtls, pki, tmp_path: Path) -> None:
    server, good = mtls
    assert httpx.get(f"{server.url}/v2", verify=good).json()["name"] == "cvdeploy"
    port = int(server.url.rsplit(":", 1)[1])
    _handshake(port, good)

    no_cert = ssl.create_default_context(cafile=str(pki.ca_cert))
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        _handshake(port, no_cert)

    other = make_dev_pki(tmp_path / "other")  # a client certificate from another CA
    foreign = ssl.create_default_context(cafile=str(pki.ca_cert))
    foreign.load_cert_chain(str(other.client_cert), str(other.client_key))
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        _handshake(port, foreign)


@pytest.mark.parametrize("version", ["TLSv1", "TLSv1_1"])
def test_tls_1_0_and_1_1_are_refused(mtls, pki, version: str) -> None:
    server, _ = mtls
    port = int(server.url.rsplit(":", 1)[1])
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.load_verify_locations(str(pki.ca_cert))
    old.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    try:
        old.minimum_version = getattr(ssl.TLSVersion, version)
        old.maximum_version = getattr(ssl.TLSVersion, version)
        old.set_ciphers("ALL:@SECLEVEL=0")
    except (ValueError, ssl.SSLError):
        pass  # this OpenSSL cannot even offer it: refused all the same
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        _handshake(port, old)


def test_plain_http_on_the_tls_port_fails(mtls) -> None:
    server, _ = mtls
    with pytest.raises(httpx.HTTPError):
        r = httpx.get(server.url.replace("https://", "http://") + "/v2", timeout=5)
        r.raise_for_status()


def test_private_keys_are_owner_only(pki) -> None:
    for key in (pki.ca_key, pki.server_key, pki.client_key):
        assert key.stat().st_mode & 0o777 == 0o600


def test_tls_options_must_come_together(demo_bundle: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "cvdeploy", "serve", str(demo_bundle), "--tls-cert", str(tmp_path / "x.pem")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and p.stderr.startswith("error:") and "--tls-key" in p.stderr


def test_the_server_context_itself_allows_tls_1_2_and_up_only(pki) -> None:
    from cvdeploy.security.tls import server_context

    ctx = server_context(pki.server_cert, pki.server_key, pki.ca_cert)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2 and ctx.verify_mode == ssl.CERT_REQUIRED
    suites = {c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"}
    assert suites and all("ECDHE" in c and ("GCM" in c or "CHACHA20" in c) for c in suites)
