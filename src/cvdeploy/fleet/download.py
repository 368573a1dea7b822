"""The device's HTTP client for the update server: small documents, resumable file downloads checked by sha256, reports.

A file is downloaded into `downloads/<sha256>.part`. When the connection breaks, the next try (in this poll, or the next
poll) asks for the rest with `Range: bytes=<have>-`; the server answers 206 and the part grows; a server that answers
200 instead (it ignored the range) sends the whole file again. Only a file whose sha256 is the one the signed manifest
gives leaves downloads/; one that is not is deleted and refused, and so is one that grows past its size limit.
"""

from __future__ import annotations

import os
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from cvdeploy.bundle.bundle import sha256_file
from cvdeploy.errors import BundleError, CvdeployError, InputError
from cvdeploy.fleet.protocol import API, DEVICE_HEADER

RETRYABLE = frozenset({408, 425, 429, 500, 502, 503, 504})


@dataclass
class Transfer:
    """What the downloads of one update cost: the figures a status report carries."""

    bytes: int = 0
    files: int = 0
    reused: int = 0  # files already on the device (same sha256): copied, not downloaded
    resumed: int = 0
    ranges: list[str] = field(default_factory=list)  # the Range headers sent, for the log


class Fetcher:
    """One device's session with the update server (keep-alive; the fleet token and the device name on every request)."""

    def __init__(self, url: str, token: str, device: str, *, ca: str | os.PathLike[str] | None = None, timeout: float = 30.0,
                 retries: int = 3, backoff_s: float = 0.5) -> None:
        if not url.startswith(("http://", "https://")):
            raise InputError(f"update server URL {url!r} must start with http:// or https://")
        if ca is not None and not Path(ca).is_file():
            raise InputError(f"CA file not found: {ca}")
        self.url = url.rstrip("/")
        self.retries, self.backoff_s = retries, backoff_s
        verify: Any = ssl.create_default_context(cafile=str(ca)) if ca is not None else True
        self.client = httpx.Client(base_url=self.url, timeout=timeout, verify=verify, follow_redirects=False,
                                   headers={"Authorization": f"Bearer {token}", DEVICE_HEADER: device})

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> Fetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- documents --------------------------------------------------------------------------------

    def get_bytes(self, path: str, limit: int) -> bytes:
        """A small document (a channel, a manifest, a signature), at most `limit` bytes; retried like a file."""
        for attempt in range(self.retries + 1):
            try:
                with self.client.stream("GET", API + path) as r:
                    if r.status_code != 200:
                        self._refuse_status(r, path, attempt)
                        continue
                    body = bytearray()
                    for chunk in r.iter_bytes():
                        body += chunk
                        if len(body) > limit:
                            raise BundleError(f"{self.url}{API}{path} is larger than {limit} bytes: refused")
                    return bytes(body)
            except httpx.TransportError as e:
                self._wait_or_fail(attempt, f"{self.url}{API}{path}: {type(e).__name__}: {e}")
        raise CvdeployError(f"{self.url}{API}{path}: no answer after {self.retries + 1} tries")

    def post_json(self, path: str, body: bytes) -> None:
        """POST a JSON document (already encoded); one try: a lost report is sent again at the next poll."""
        r = self.client.post(API + path, content=body, headers={"Content-Type": "application/json"})
        if r.status_code >= 300:
            raise CvdeployError(f"{self.url}{API}{path} answered {r.status_code}: {_error_text(r)}")

    # -- files ----------------------------------------------------------------------------------

    def fetch_file(self, sha256: str, part: Path, limit: int, transfer: Transfer) -> Path:
        """Download the file `sha256` into `part` (continuing what is there), check its sha256 and return `part`."""
        path = f"/files/{sha256}"
        done = False
        for attempt in range(self.retries + 1):
            have = part.stat().st_size if part.exists() else 0
            if have > limit:
                part.unlink()
                have = 0
            headers = {"Range": f"bytes={have}-"} if have else {}
            try:
                with self.client.stream("GET", API + path, headers=headers) as r:
                    if r.status_code == 416 and have:  # nothing after `have`: the part is whole (the hash will tell)
                        done = True
                        break
                    if r.status_code == 206 and have:
                        if not r.headers.get("content-range", "").startswith(f"bytes {have}-"):
                            raise BundleError(f"{self.url}{API}{path}: asked for bytes {have}- and got "
                                              f"{r.headers.get('content-range')!r}: refused")
                        mode = "ab"
                        transfer.resumed += 1
                        transfer.ranges.append(headers["Range"])
                    elif r.status_code == 200:
                        mode, have = "wb", 0  # a whole file (a server that ignores Range sends it all again)
                    else:
                        self._refuse_status(r, path, attempt)
                        continue
                    with open(part, mode) as f:
                        for chunk in r.iter_bytes(1 << 16):
                            have += len(chunk)
                            if have > limit:
                                raise BundleError(f"file {sha256[:12]} from {self.url} is larger than its {limit}-byte limit: "
                                                  "refused")
                            f.write(chunk)
                            transfer.bytes += len(chunk)
                        f.flush()
                        os.fsync(f.fileno())
                done = True
                break
            except httpx.TransportError as e:  # a dropped connection, a timeout: what arrived stays in the part
                self._wait_or_fail(attempt, f"downloading file {sha256[:12]} from {self.url}: {type(e).__name__}: {e}")
            except BundleError:
                part.unlink(missing_ok=True)
                raise
        if not done:
            raise CvdeployError(f"downloading file {sha256[:12]} from {self.url}: no complete answer after {self.retries + 1} tries")
        got = sha256_file(part)
        if got != sha256:
            part.unlink(missing_ok=True)
            raise BundleError(f"file {sha256[:12]} downloaded from {self.url} has sha256 {got[:12]}, not the one the signed "
                              "manifest gives: refused (altered on the server or on the way)")
        transfer.files += 1
        return part

    # -- errors ---------------------------------------------------------------------------------

    def _refuse_status(self, r: httpx.Response, path: str, attempt: int) -> None:
        r.read()
        message = f"{self.url}{API}{path} answered {r.status_code}: {_error_text(r)}"
        if r.status_code in RETRYABLE:
            self._wait_or_fail(attempt, message)
            return
        if r.status_code in (401, 403):
            raise InputError(f"{message} (check the fleet token: --token-file or $CVDEPLOY_FLEET_TOKEN)")
        raise CvdeployError(message)

    def _wait_or_fail(self, attempt: int, message: str) -> None:
        if attempt >= self.retries:
            raise CvdeployError(f"{message} (after {attempt + 1} tries)")
        time.sleep(self.backoff_s * 2**attempt)


def _error_text(r: httpx.Response) -> str:
    try:
        doc = r.json()
        return str(doc.get("error", doc)) if isinstance(doc, dict) else str(doc)
    except ValueError:
        return r.text[:200]
