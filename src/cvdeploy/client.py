"""Clients of a cvdeploy server (sync and async), over its image API and health endpoints.

>>> from cvdeploy.client import Client
>>> with Client("http://127.0.0.1:8000") as c:
...     result = c.predict("yolo11n-shapes", "image.jpg", conf=0.3)
...     result["detections"]

A server started with ``--auth-keys`` wants an API key (``cvd_<id>.<secret>``) or a JWT, sent as
``Authorization: Bearer <key>``; one behind TLS with a private CA, or with mutual TLS, wants the
CA and a client certificate:

>>> Client("https://10.0.0.5:8443", api_key_file="predictor.key", ca="pki/ca.pem",
...        client_cert="pki/client.pem", client_key="pki/client.key")

The key comes from ``api_key`` / ``api_key_file``, else from ``$CVDEPLOY_API_KEY_FILE`` (a file)
or ``$CVDEPLOY_API_KEY`` (the key itself). Errors are ``CvdeployError`` subclasses whose message
is one line that says what to do: `AuthenticationError` (401), `PermissionDenied` (403),
`ServerError` (any other refusal), `TlsError` and `ConnectionFailed` (the server was not reached).
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cvdeploy.errors import CvdeployError, InputError

API_KEY_ENV = "CVDEPLOY_API_KEY"  # the key (or bearer token) itself
API_KEY_FILE_ENV = "CVDEPLOY_API_KEY_FILE"  # a file holding it
_KEY_HINT = f"put the key in a file and pass --api-key-file FILE (api_key_file= in Python), or set ${API_KEY_ENV}"


class ServerError(CvdeployError):
    """The server refused the request; `status` is its HTTP status and the message its error text."""

    def __init__(self, status: int, message: str, hint: str = "") -> None:
        super().__init__(f"server answered {status}: {message}" + (f"; {hint}" if hint else ""))
        self.status = status
        self.server_message = message


class AuthenticationError(ServerError):
    """401: no credentials were sent, or the server did not accept them (wrong, expired, revoked)."""


class PermissionDenied(ServerError):
    """403: the credentials are valid, but their role does not allow this request."""


class ConnectionFailed(CvdeployError):
    """The server could not be reached (refused, timed out, TLS failure)."""


class TlsError(ConnectionFailed):
    """The TLS handshake failed: the server's certificate was not trusted, or ours was refused."""


def _httpx() -> Any:
    try:
        import httpx
    except ImportError as e:
        from cvdeploy.errors import MissingDependencyError

        raise MissingDependencyError("httpx", "serve", "talking to a cvdeploy server") from e
    return httpx


# -- credentials -----------------------------------------------------------------------------------


def read_api_key_file(path: str | os.PathLike[str]) -> str:
    """The API key (or bearer token) held in `path`: one line, surrounding whitespace ignored."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise InputError(f"API key file not found: {p}") from None
    except OSError as e:
        raise InputError(f"cannot read the API key file {p}: {e.strerror or e}") from None
    try:
        text = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise InputError(f"the API key file {p} is not text: it must hold the key (cvd_<id>.<secret>) or a token") from None
    if not text:
        raise InputError(f"the API key file {p} is empty: it must hold the key (cvd_<id>.<secret>) or a token")
    # Anything with inner whitespace (two lines, "Bearer ...", a note beside the key) would be sent
    # as a wrong credential and only come back as a puzzling 401: refuse it here, saying why.
    if not re.fullmatch(r"[\x21-\x7e]+", text):
        raise InputError(f"the API key file {p} must hold only the key (cvd_<id>.<secret>) or a token, on one line")
    return text


def resolve_api_key(api_key: str | None = None, api_key_file: str | os.PathLike[str] | None = None) -> str | None:
    """The credential to send: `api_key`, else `api_key_file`, else $CVDEPLOY_API_KEY_FILE, else $CVDEPLOY_API_KEY; None if none."""
    if api_key is not None and api_key_file is not None:
        raise InputError("give an API key or an API key file, not both")
    if api_key is not None:
        key = api_key.strip()
        if not re.fullmatch(r"[\x21-\x7e]+", key):
            raise InputError("the API key must be one printable word (cvd_<id>.<secret>) or a token")
        return key
    if api_key_file is not None:
        return read_api_key_file(api_key_file)
    if os.environ.get(API_KEY_FILE_ENV):
        return read_api_key_file(os.environ[API_KEY_FILE_ENV])
    if os.environ.get(API_KEY_ENV, "").strip():
        key = os.environ[API_KEY_ENV].strip()
        if not re.fullmatch(r"[\x21-\x7e]+", key):
            raise InputError(f"${API_KEY_ENV} must hold only the key (cvd_<id>.<secret>) or a token")
        return key
    return None


def tls_context(ca: str | os.PathLike[str] | None = None, client_cert: str | os.PathLike[str] | None = None,
                client_key: str | os.PathLike[str] | None = None) -> ssl.SSLContext | None:
    """A TLS 1.2+ client context trusting `ca` (else the default roots) and presenting `client_cert`; None if none is given."""
    if ca is None and client_cert is None and client_key is None:
        return None
    if client_key is not None and client_cert is None:
        raise InputError("--client-key needs --client-cert (the certificate it belongs to)")
    for f, what in ((ca, "--ca"), (client_cert, "--client-cert"), (client_key, "--client-key")):
        if f is not None and not Path(f).is_file():
            raise InputError(f"{what}: {f} {'is not a file' if Path(f).exists() else 'not found'}")
    if ca is not None:
        # Only this bundle is trusted (as curl --cacert): a private CA replaces the public roots.
        try:
            ctx = ssl.create_default_context(cafile=str(ca))
        except ssl.SSLError as e:
            raise InputError(f"--ca: {ca} holds no usable PEM certificate ({e.reason or e})") from None
    else:
        ctx = _httpx().create_ssl_context()  # the same roots as without a client certificate (certifi or $SSL_CERT_FILE)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if client_cert is not None:

        def no_password() -> bytes:
            # Without a callback OpenSSL would prompt on the terminal, which hangs a script.
            raise InputError(f"the client key {client_key or client_cert} is encrypted: decrypt it to a file only you can read "
                             "(openssl pkey -in KEY -out plain.key; chmod 600 plain.key) and pass that")

        try:
            ctx.load_cert_chain(str(client_cert), None if client_key is None else str(client_key), password=no_password)
        except ssl.SSLError as e:
            what = "" if client_key is None else f" with the key {client_key}"
            raise InputError(f"cannot use the client certificate {client_cert}{what}: {e.reason or e}") from None
    return ctx


def _has_auth_header(headers: dict[str, str] | None) -> bool:
    return any(k.lower() in ("authorization", "x-api-key") for k in headers or {})


def _client_options(url: str, timeout: float, headers: dict[str, str] | None, verify: Any, api_key: str | None,
                    api_key_file: str | os.PathLike[str] | None, ca: str | os.PathLike[str] | None,
                    client_cert: str | os.PathLike[str] | None, client_key: str | os.PathLike[str] | None) -> dict[str, Any]:
    """The httpx client arguments shared by `Client` and `AsyncClient` (credentials and TLS checked here, before any request)."""
    hdrs = dict(headers or {})
    explicit = api_key is not None or api_key_file is not None
    if explicit and _has_auth_header(hdrs):
        raise InputError("give an API key or an Authorization/X-API-Key header, not both")
    # An Authorization header given by the caller wins over the environment's key.
    key = resolve_api_key(api_key, api_key_file) if explicit or not _has_auth_header(hdrs) else None
    if key is not None:
        hdrs["Authorization"] = f"Bearer {key}"
    ctx = tls_context(ca, client_cert, client_key)
    if ctx is not None:
        if verify is not True:
            raise InputError("give ca/client_cert or verify, not both")
        verify = ctx
    return {"base_url": url.rstrip("/"), "timeout": timeout, "headers": hdrs, "verify": verify}


# -- requests and answers --------------------------------------------------------------------------


def _blob(image: str | os.PathLike[str] | bytes) -> bytes:
    if isinstance(image, bytes | bytearray):
        return bytes(image)
    p = Path(image)
    if not p.is_file():
        raise InputError(f"image not found: {p}")
    return p.read_bytes()


def _params(conf: float | None, iou: float | None, max_det: int | None, classes: list[int] | None, annotate: bool,
            retina_masks: bool = False) -> dict:
    out: dict[str, Any] = {k: v for k, v in (("conf", conf), ("iou", iou), ("max_det", max_det)) if v is not None}
    if classes:
        out["classes"] = ",".join(str(int(c)) for c in classes)
    for key, on in (("annotate", annotate), ("retina_masks", retina_masks)):
        if on:
            out[key] = "true"
    return out


def _one_line(text: str, limit: int = 300) -> str:
    # A proxy's HTML error page or a multi-line message must not break the one-line error contract.
    s = " ".join(text.split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _answer(r: Any, sent_key: bool) -> Any:
    if r.status_code >= 400:
        try:
            body = r.json()
            msg = body.get("error", r.text) if isinstance(body, dict) else r.text
        except ValueError:
            msg = r.text
        msg = _one_line(str(msg)) or r.reason_phrase
        if r.status_code == 401:
            hint = ("the server did not accept the API key (wrong, expired or revoked): check the key in --api-key-file or "
                    f"${API_KEY_ENV}, or ask for a new one (cvdeploy security keys create)") if sent_key else \
                   f"no API key was sent: {_KEY_HINT}"
            raise AuthenticationError(401, f"unauthorized: {msg}", hint)
        if r.status_code == 403:
            raise PermissionDenied(403, f"forbidden: {msg}", "the key is valid, but its role does not allow this request: use "
                                   "a key whose role does (predicting needs predictor, operator or admin)")
        raise ServerError(r.status_code, msg)
    try:
        return r.json()
    except ValueError:
        raise ServerError(r.status_code, "the answer is not JSON: is this a cvdeploy server?") from None


def _chain(e: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    seen: BaseException | None = e
    while seen is not None and seen not in out:
        out.append(seen)
        seen = seen.__cause__ or seen.__context__
    return out


_CLIENT_CERT_REFUSED = ("CERTIFICATE_REQUIRED", "UNKNOWN_CA", "DECRYPT_ERROR", "BAD_CERTIFICATE", "CERTIFICATE_UNKNOWN",
                        "ACCESS_DENIED", "UNSUPPORTED_CERTIFICATE", "CERTIFICATE_EXPIRED", "CERTIFICATE_REVOKED",
                        "HANDSHAKE_FAILURE")


def _handshake_refused(host: str, port: int, context: ssl.SSLContext, timeout: float) -> bool:
    """Whether the server aborts a TLS 1.2 handshake made with `context` (our trust and client certificate).

    uvicorn drops a client whose certificate is missing or untrusted without sending an alert, and
    under TLS 1.3 that only shows after the handshake, as a connection closed without an answer:
    indistinguishable from a server that failed. Under TLS 1.2 the client certificate is checked
    inside the handshake, so an aborted 1.2 handshake says that the certificate was the problem.
    """
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    try:
        with socket.create_connection((host, port), timeout=min(timeout, 5.0)) as raw, \
                context.wrap_socket(raw, server_hostname=host):
            return False
    except ssl.SSLCertVerificationError:
        return False
    except (ssl.SSLEOFError, ConnectionResetError, BrokenPipeError):
        return True
    except ssl.SSLError as e:
        return any(a in str(e.reason or e) for a in _CLIENT_CERT_REFUSED)
    except OSError:
        return False


def _connection_error(e: Exception, has_client_cert: bool, timeout: float,
                      probe_context: Callable[[], ssl.SSLContext | None] | None = None) -> ConnectionFailed:
    """A one-line, actionable error for an httpx transport failure (the cause is found in its exception chain)."""
    httpx = _httpx()
    try:
        url = e.request.url  # type: ignore[attr-defined]
        origin, host, scheme, port = f"{url.scheme}://{url.netloc.decode()}", url.host, url.scheme, url.port
    except (AttributeError, RuntimeError):
        origin, host, scheme, port = "the server", "the server", "", None
    needs_cert = (f"{origin} requires a client certificate (mutual TLS): pass --client-cert and --client-key "
                  "(client_cert=, client_key= in Python)")
    cert_refused = (f"{origin} refused our client certificate: use one signed by the CA the server trusts (its "
                    "--tls-client-ca), and not expired")
    chain = _chain(e)
    for c in chain:
        if isinstance(c, ssl.SSLCertVerificationError):
            reason = c.verify_message or str(c)
            if "mismatch" in reason:
                return TlsError(f"TLS verification of {origin} failed: its certificate is not valid for {host} ({reason}); "
                                "connect with a name or address the certificate holds")
            return TlsError(f"TLS verification of {origin} failed: {reason}; if the server uses a private CA, pass that CA's "
                            "certificate with --ca (ca= in Python)")
    for c in chain:
        if isinstance(c, ssl.SSLError) and not isinstance(c, ssl.SSLEOFError):
            reason = str(c.reason or c)
            if "CERTIFICATE_REQUIRED" in reason or (not has_client_cert and "HANDSHAKE_FAILURE" in reason):
                return TlsError(f"{needs_cert} ({reason})")
            if has_client_cert and any(a in reason for a in _CLIENT_CERT_REFUSED):
                return TlsError(f"{cert_refused} ({reason})")
            if "WRONG_VERSION_NUMBER" in reason or "RECORD_LAYER" in reason or "PACKET_LENGTH" in reason:
                return TlsError(f"{origin} does not speak TLS ({reason}): use http://")
            return TlsError(f"TLS with {origin} failed: {_one_line(str(c))}")
    if any(isinstance(c, ConnectionRefusedError) for c in chain):
        return ConnectionFailed(f"connection refused by {origin}: is the server running (cvdeploy serve) and listening there?")
    if isinstance(e, httpx.TimeoutException):
        return ConnectionFailed(f"no answer from {origin} within {timeout:g} s ({type(e).__name__})")
    dropped = isinstance(e, httpx.RemoteProtocolError | httpx.ReadError | httpx.WriteError)
    if dropped and scheme == "http":
        return ConnectionFailed(f"{origin} closed the connection without answering ({_one_line(str(e))}): if the server uses "
                                "TLS, use https://")
    if dropped and scheme == "https":
        context = probe_context() if probe_context is not None else None
        if context is not None and port is not None and _handshake_refused(host, port, context, timeout):
            return TlsError(cert_refused if has_client_cert else needs_cert)
        return ConnectionFailed(f"{origin} closed the connection without answering ({_one_line(str(e))})" +
                                ("" if has_client_cert else "; if it requires a client certificate (mutual TLS), pass "
                                 "--client-cert and --client-key"))
    return ConnectionFailed(f"cannot reach {origin}: {type(e).__name__}: {_one_line(str(e)) or 'no detail'}")


class _Base:
    """What the two clients share: options, and turning transport failures into `ConnectionFailed`."""

    def __init__(self, url: str, timeout: float, headers: dict[str, str] | None, verify: Any, api_key: str | None,
                 api_key_file: str | os.PathLike[str] | None, ca: str | os.PathLike[str] | None,
                 client_cert: str | os.PathLike[str] | None, client_key: str | os.PathLike[str] | None) -> None:
        self._options = _client_options(url, timeout, headers, verify, api_key, api_key_file, ca, client_cert, client_key)
        self._sends_key = _has_auth_header(self._options["headers"])
        self._has_client_cert = client_cert is not None
        self._timeout = timeout
        self._tls_files = (ca, client_cert, client_key)
        self._verify = verify

    @property
    def sends_credentials(self) -> bool:
        """Whether requests carry an API key or token (from the arguments, the headers or the environment)."""
        return self._sends_key

    def _probe_context(self) -> ssl.SSLContext | None:
        """A fresh context like the one in use, for `_handshake_refused`; None when the caller gave their own."""
        if any(f is not None for f in self._tls_files):
            return tls_context(*self._tls_files)
        if self._verify is True:
            return _httpx().create_ssl_context()
        return None

    def _failed(self, e: Exception) -> ConnectionFailed:
        return _connection_error(e, self._has_client_cert, self._timeout, self._probe_context)


class Client(_Base):
    """A synchronous client. `api_key`/`api_key_file` (else the environment), `ca`, `client_cert`/`client_key` as in the module doc."""

    def __init__(self, url: str, *, timeout: float = 30.0, headers: dict[str, str] | None = None, verify: Any = True,
                 api_key: str | None = None, api_key_file: str | os.PathLike[str] | None = None,
                 ca: str | os.PathLike[str] | None = None, client_cert: str | os.PathLike[str] | None = None,
                 client_key: str | os.PathLike[str] | None = None) -> None:
        super().__init__(url, timeout, headers, verify, api_key, api_key_file, ca, client_cert, client_key)
        self._c = _httpx().Client(**self._options)

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            return self._c.request(method, path, **kwargs)
        except _httpx().HTTPError as e:
            raise self._failed(e) from e

    def ready(self) -> bool:
        r = self._call("GET", "/v2/health/ready")
        if r.status_code in (401, 403):
            _answer(r, self._sends_key)  # "not ready" would hide that the credentials are the problem
        return r.status_code == 200

    def models(self) -> list[dict[str, str]]:
        return _answer(self._call("POST", "/v2/repository/index"), self._sends_key)

    def predict(self, model: str, image: str | os.PathLike[str] | bytes, *, conf: float | None = None, iou: float | None = None,
                max_det: int | None = None, classes: list[int] | None = None, annotate: bool = False,
                retina_masks: bool = False) -> dict[str, Any]:
        """The image API's answer (`Result.to_dict()` with the model's name and version); `retina_masks`: a segment
        model's masks at the image's own size."""
        return _answer(self._call("POST", f"/v1/models/{model}/predict", content=_blob(image),
                                  params=_params(conf, iou, max_det, classes, annotate, retina_masks),
                                  headers={"content-type": "application/octet-stream"}), self._sends_key)

    def close(self) -> None:
        self._c.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_Base):
    """The asyncio twin of `Client`, with the same options."""

    def __init__(self, url: str, *, timeout: float = 30.0, headers: dict[str, str] | None = None, verify: Any = True,
                 api_key: str | None = None, api_key_file: str | os.PathLike[str] | None = None,
                 ca: str | os.PathLike[str] | None = None, client_cert: str | os.PathLike[str] | None = None,
                 client_key: str | os.PathLike[str] | None = None) -> None:
        super().__init__(url, timeout, headers, verify, api_key, api_key_file, ca, client_cert, client_key)
        self._c = _httpx().AsyncClient(**self._options)

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            return await self._c.request(method, path, **kwargs)
        except _httpx().HTTPError as e:
            # Explaining a dropped connection may take a blocking TLS probe: keep it off the event loop.
            raise await asyncio.to_thread(self._failed, e) from e

    async def ready(self) -> bool:
        r = await self._call("GET", "/v2/health/ready")
        if r.status_code in (401, 403):
            _answer(r, self._sends_key)
        return r.status_code == 200

    async def models(self) -> list[dict[str, str]]:
        return _answer(await self._call("POST", "/v2/repository/index"), self._sends_key)

    async def predict(self, model: str, image: str | os.PathLike[str] | bytes, *, conf: float | None = None,
                      iou: float | None = None, max_det: int | None = None, classes: list[int] | None = None,
                      annotate: bool = False, retina_masks: bool = False) -> dict[str, Any]:
        return _answer(await self._call("POST", f"/v1/models/{model}/predict", content=_blob(image),
                                        params=_params(conf, iou, max_det, classes, annotate, retina_masks),
                                        headers={"content-type": "application/octet-stream"}), self._sends_key)

    async def aclose(self) -> None:
        await self._c.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
