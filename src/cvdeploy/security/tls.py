"""TLS for the server: a development PKI (CA, server and client certificates) and a hardened SSL context.

The context accepts TLS 1.2 and 1.3 only, with forward-secret AEAD cipher suites; with a client
CA it requires a client certificate signed by that CA (mutual TLS).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cvdeploy.errors import InputError, MissingDependencyError
from cvdeploy.security import write_private

# TLS 1.2 suites: ECDHE (forward secrecy) with AES-GCM or ChaCha20-Poly1305 only. TLS 1.3 suites are all strong.
CIPHERS_TLS12 = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL:!MD5:!RC4:!3DES:!SHA1"


@dataclass(frozen=True)
class DevPki:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _crypto():
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError as e:
        raise MissingDependencyError("cryptography", "serve", "making certificates") from e
    return x509, hashes, serialization, ec, ExtendedKeyUsageOID, NameOID


def make_dev_pki(out: str | os.PathLike[str], *, hosts: tuple[str, ...] = ("localhost", "127.0.0.1", "::1"),
                 client_name: str = "cvdeploy-client", days: int = 30, force: bool = False) -> DevPki:
    """A development CA and, signed by it, a server certificate for `hosts` and a client certificate.

    For development and tests: a production deployment uses certificates from its own PKI.
    """
    x509, hashes, serialization, ec, EKU, NameOID = _crypto()
    root = Path(out)
    pki = DevPki(*(root / n for n in ("ca.pem", "ca.key", "server.pem", "server.key", "client.pem", "client.key")))
    if not force and any(p.exists() for p in vars(pki).values()):
        raise InputError(f"{root} already holds certificates; pass --force to replace them")
    root.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)

    def key():
        return ec.generate_private_key(ec.SECP256R1())

    def name(cn: str):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cvdeploy dev")])

    ca_key = key()
    ca = (x509.CertificateBuilder().subject_name(name("cvdeploy development CA")).issuer_name(name("cvdeploy development CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))

    def leaf(cn: str, usage, sans=None):
        k = key()
        b = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca.subject).public_key(k.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
             .not_valid_after(now + dt.timedelta(days=days))
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return k, b.sign(ca_key, hashes.SHA256())

    sans = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    server_key, server = leaf(hosts[0], EKU.SERVER_AUTH, sans)
    client_key, client = leaf(client_name, EKU.CLIENT_AUTH)
    pem = serialization.Encoding.PEM
    for cert, path in ((ca, pki.ca_cert), (server, pki.server_cert), (client, pki.client_cert)):
        path.write_bytes(cert.public_bytes(pem))
    for k, path in ((ca_key, pki.ca_key), (server_key, pki.server_key), (client_key, pki.client_key)):
        write_private(path, k.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return pki


def server_context(cert: str | os.PathLike[str], key: str | os.PathLike[str], client_ca: str | os.PathLike[str] | None = None) -> ssl.SSLContext:
    """TLS 1.2+ server context; with `client_ca`, clients must present a certificate signed by it."""
    for f, what in ((cert, "--tls-cert"), (key, "--tls-key"), (client_ca, "--tls-client-ca")):
        if f is not None and not Path(f).is_file():
            raise InputError(f"{what}: {f} not found")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(CIPHERS_TLS12)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_SINGLE_ECDH_USE
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except (ssl.SSLError, ValueError) as e:
        raise InputError(f"cannot use the TLS certificate {cert} with the key {key}: {e}") from None
    if client_ca is not None:
        ctx.load_verify_locations(cafile=str(client_ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
