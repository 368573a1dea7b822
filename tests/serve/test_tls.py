"""TLS and mutual TLS with certificates made in the test: old protocols, missing or foreign client certificates refused."""

from __future__ import annotations

import socket
import ssl
import threading
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


# A refusal is a TLS error or a connection torn down, never a timeout (a server that hangs has not refused) nor an answer.
REFUSED = (ssl.SSLError, ConnectionResetError, BrokenPipeError)


def _handshake(port: int, ctx: ssl.SSLContext) -> bytes:
    """Connect, send GET /v2, return the first bytes of the answer. A server that closes the connection without a TLS
    close_notify raises SSLEOFError (suppress_ragged_eofs=False) instead of reading as an empty answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1", suppress_ragged_eofs=False) as s:
        s.sendall(b"GET /v2 HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        return s.recv(64)


def test_mutual_tls_accepts_our_client_and_refuses_others(mtls, pki, tmp_path: Path) -> None:
    server, good = mtls
    assert httpx.get(f"{server.url}/v2", verify=good).json()["name"] == "cvdeploy"
    port = int(server.url.rsplit(":", 1)[1])
    assert _handshake(port, good).startswith(b"HTTP/1.1 200")

    no_cert = ssl.create_default_context(cafile=str(pki.ca_cert))
    with pytest.raises(REFUSED):
        _handshake(port, no_cert)

    other = make_dev_pki(tmp_path / "other")  # a client certificate from another CA
    foreign = ssl.create_default_context(cafile=str(pki.ca_cert))
    foreign.load_cert_chain(str(other.client_cert), str(other.client_key))
    with pytest.raises(REFUSED):
        _handshake(port, foreign)


def _only(version: ssl.TLSVersion, ctx: ssl.SSLContext) -> ssl.SSLContext:
    ctx.minimum_version = ctx.maximum_version = version
    ctx.set_ciphers("ALL:@SECLEVEL=0")  # TLS 1.0/1.1 suites need security level 0 on OpenSSL 3
    return ctx


def _negotiated_locally(version: ssl.TLSVersion, client: ssl.SSLContext, pki) -> str:
    """Handshake `client` with a throwaway server that accepts only `version`: the protocol it negotiated."""
    server = _only(version, ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    server.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    with socket.create_server(("127.0.0.1", 0)) as listener:
        def accept() -> None:
            conn, _ = listener.accept()
            with server.wrap_socket(conn, server_side=True) as s:
                s.sendall(b"x")

        t = threading.Thread(target=accept, daemon=True)
        t.start()
        with socket.create_connection(listener.getsockname(), timeout=10) as raw, \
                client.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            got = s.version()
            s.recv(1)
        t.join(10)
    return got or ""


@pytest.mark.parametrize(("version", "name"), [("TLSv1", "TLSv1"), ("TLSv1_1", "TLSv1.1")])
@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_tls_1_0_and_1_1_are_refused(mtls, pki, version: str, name: str) -> None:
    server, _ = mtls
    port = int(server.url.rsplit(":", 1)[1])
    tls_version = getattr(ssl.TLSVersion, version)
    old = _only(tls_version, ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    old.load_verify_locations(str(pki.ca_cert))
    old.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    # The client really speaks the old protocol (else its own failure would pass for the server's refusal): a server
    # that accepts it negotiates it. A setup failure here fails the test; it proves nothing about cvdeploy.
    assert _negotiated_locally(tls_version, old, pki) == name
    with pytest.raises(REFUSED):
        _handshake(port, old)


def test_plain_http_on_the_tls_port_fails(mtls) -> None:
    server, _ = mtls
    # No HTTP answer at all (not even an error status): the TLS listener drops a plaintext request.
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        httpx.get(server.url.replace("https://", "http://") + "/v2", timeout=5)


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
