"""Bundle signatures: ed25519 over the canonical manifest, which holds the sha256 of every file of the bundle.

`sign_bundle` writes `signature.json` next to `manifest.json`:

    {"format": 1, "algorithm": "ed25519", "key_fingerprint": "sha256:<hex>", "manifest_sha256": "<hex>",
     "signature": "<base64>", "signed_at": "<ISO 8601>"}

The signature is over `CONTEXT + canonical_manifest_bytes(manifest)` (see `cvdeploy.bundle.bundle`). Since the manifest
records every variant, companion and golden file's sha256, and `Bundle.load` checks those, a valid signature vouches
for every file. Only `signature` is authenticated; the other fields help to read an error (which key signed it).

`Bundle.load(path, public_key=...)` refuses an unsigned bundle, a signature by another key, and any change to the
manifest or a file after signing. Without a public key, signatures are neither required nor checked.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cvdeploy.bundle.bundle import SIGNATURE, Bundle
from cvdeploy.errors import BundleError, InputError, MissingDependencyError
from cvdeploy.security import write_private

if TYPE_CHECKING:
    from typing import TypeAlias

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

    PublicKeySource: TypeAlias = str | os.PathLike[str] | bytes | Ed25519PublicKey
    PrivateKeySource: TypeAlias = str | os.PathLike[str] | bytes | Ed25519PrivateKey

ALGORITHM = "ed25519"
FORMAT = 1
# Domain separation: a signature made for a bundle manifest cannot be passed off as one over anything else signed
# with the same key, and the other way round.
CONTEXT = b"cvdeploy bundle manifest v1\x00"


def _ed25519() -> Any:
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as e:
        raise MissingDependencyError("cryptography", "serve", "signing or verifying bundles") from e
    return ed25519


@dataclass(frozen=True)
class Signature:
    """The content of a bundle's signature.json."""

    algorithm: str
    key_fingerprint: str
    manifest_sha256: str
    signature: str  # base64 of the 64-byte ed25519 signature
    signed_at: str
    format: int = FORMAT


# -- keys ------------------------------------------------------------------------------------------


def public_key_path(private_key_path: str | os.PathLike[str]) -> Path:
    """Where `new_signing_key` writes the public half: the private key's path with `.pub` appended."""
    p = Path(private_key_path)
    return p.with_name(p.name + ".pub")


def new_signing_key(path: str | os.PathLike[str], force: bool = False) -> tuple[Path, Path]:
    """A new ed25519 key pair: the private key at `path` (PEM, PKCS#8, mode 600) and the public key at `path`.pub
    (PEM). Returns (private, public)."""
    ed = _ed25519()
    from cryptography.hazmat.primitives import serialization

    private, public = Path(path), public_key_path(path)
    for p in (private, public):
        if p.exists() and not force:
            raise InputError(f"{p} exists; pass --force to replace it (bundles signed with the old key would no longer verify "
                             "against the new public key)")
    key = ed.Ed25519PrivateKey.generate()
    private.parent.mkdir(parents=True, exist_ok=True)
    if private.exists():
        private.unlink()  # write_private keeps an existing file's mode: start from a fresh 600 file
    write_private(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def _read_source(source: str | os.PathLike[str] | bytes, what: str) -> tuple[bytes, str]:
    if isinstance(source, str) and source.lstrip().startswith("-----BEGIN"):
        source = source.encode()  # PEM text given as a string (e.g. from an environment variable), not a path
    if isinstance(source, bytes):
        return source, f"the {what} given"
    p = Path(source)
    if not p.is_file():
        raise InputError(f"{what} file not found: {p}")
    return p.read_bytes(), str(p)


def load_public_key(source: PublicKeySource) -> Ed25519PublicKey:
    """An ed25519 public key from a PEM file path, PEM text or bytes, 32 raw bytes, or an already loaded key.

    A private key is refused: the machines that verify should never hold it.
    """
    ed = _ed25519()
    if isinstance(source, ed.Ed25519PublicKey):
        return source
    from cryptography.hazmat.primitives import serialization

    data, where = _read_source(source, "public key")  # type: ignore[arg-type]
    if len(data) == 32 and not data.startswith(b"-----"):
        return ed.Ed25519PublicKey.from_public_bytes(data)
    if b"PRIVATE KEY" in data:
        raise InputError(f"{where} is a private key: give its public key (the .pub file from `cvdeploy security sign-key`); "
                         "keep the private key off the machines that verify")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise InputError(f"{where} is not a PEM public key ({e})") from None
    if not isinstance(key, ed.Ed25519PublicKey):
        raise InputError(f"{where} is a {type(key).__name__.lstrip('_')}, not an ed25519 public key; make one with "
                         "`cvdeploy security sign-key`")
    return key


def load_private_key(source: PrivateKeySource) -> Ed25519PrivateKey:
    """An ed25519 private key from an unencrypted PEM (PKCS#8) file path or bytes, or an already loaded key."""
    ed = _ed25519()
    if isinstance(source, ed.Ed25519PrivateKey):
        return source
    from cryptography.hazmat.primitives import serialization

    data, where = _read_source(source, "private key")  # type: ignore[arg-type]
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise InputError(f"{where} is encrypted with a passphrase; cvdeploy reads unencrypted PEM private keys (mode 600)") from None
    except ValueError as e:
        hint = " (that is a public key: signing needs the private one)" if b"PUBLIC KEY" in data else ""
        raise InputError(f"{where} is not a PEM private key{hint} ({e})") from None
    if not isinstance(key, ed.Ed25519PrivateKey):
        raise InputError(f"{where} is a {type(key).__name__.lstrip('_')}, not an ed25519 private key; make one with "
                         "`cvdeploy security sign-key`")
    return key


def key_fingerprint(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """`sha256:` and the hex sha256 of the 32 raw public-key bytes (the same for a private key and its public key)."""
    from cryptography.hazmat.primitives import serialization

    public = key if isinstance(key, _ed25519().Ed25519PublicKey) else key.public_key()  # type: ignore[union-attr]
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "sha256:" + hashlib.sha256(raw).hexdigest()


# -- signing and verifying -------------------------------------------------------------------------


def sign_bundle(path: str | os.PathLike[str], private_key: PrivateKeySource) -> Signature:
    """Sign the bundle at `path` (a protected one too) and write its signature.json; return what was written.

    The bundle is loaded first, hashes and all: what is signed is a bundle that holds together now.
    """
    key = load_private_key(private_key)
    bundle = Bundle.load(path)
    if bundle.root is None:
        raise InputError(f"{path} is a plain .onnx file; only a bundle directory can be signed (`cvdeploy build` makes one)")
    # Sign the bytes just checked, not a second read: the manifest cannot change between check and signature.
    canonical = bundle.loaded_canonical
    assert canonical is not None
    sig = Signature(algorithm=ALGORITHM, key_fingerprint=key_fingerprint(key),
                    manifest_sha256=hashlib.sha256(canonical).hexdigest(),
                    signature=base64.b64encode(key.sign(CONTEXT + canonical)).decode(),
                    signed_at=datetime.now(UTC).isoformat(timespec="seconds"))
    target = bundle.root / SIGNATURE
    tmp = target.with_name(f".{SIGNATURE}.tmp")
    tmp.write_text(json.dumps(asdict(sig), indent=2) + "\n")
    os.replace(tmp, target)
    return sig


def read_signature(root: str | os.PathLike[str]) -> Signature | None:
    """The bundle's signature.json as written (not verified), or None when the bundle is not signed."""
    p = Path(root) / SIGNATURE
    if not p.is_file():
        return None
    try:
        doc = json.loads(p.read_text())
        return Signature(**{k: doc[k] for k in ("algorithm", "key_fingerprint", "manifest_sha256", "signature", "signed_at")},
                         format=doc.get("format", FORMAT))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise BundleError(f"{p}: not a cvdeploy signature ({type(e).__name__}: {e}); sign the bundle again") from None


def verify_manifest_signature(root: str | os.PathLike[str], canonical: bytes, public_key: PublicKeySource) -> str:
    """Check the bundle's signature over `canonical` (its canonical manifest) with `public_key`; return the key's
    fingerprint, or raise BundleError. `Bundle.load(path, public_key=...)` calls this; it does not hash the files."""
    key = load_public_key(public_key)
    expected = key_fingerprint(key)
    sig = read_signature(root)
    if sig is None:
        raise BundleError(f"bundle {root} is not signed (no {SIGNATURE}) and a signature is required: sign it with "
                          f"`cvdeploy sign {root} --key PRIVATE_KEY` (commands that rewrite the manifest remove the signature)")
    if sig.algorithm != ALGORITHM:
        raise BundleError(f"{Path(root) / SIGNATURE}: unknown signature algorithm {sig.algorithm!r} (cvdeploy verifies {ALGORITHM})")
    from cryptography.exceptions import InvalidSignature

    try:
        key.verify(base64.b64decode(sig.signature, validate=True), CONTEXT + canonical)
    except (InvalidSignature, binascii.Error, ValueError, TypeError):
        # The recorded fingerprint is not authenticated; it only names the likely cause.
        if sig.key_fingerprint != expected:
            raise BundleError(f"bundle {root} is signed by another key ({sig.key_fingerprint}), not by the public key given "
                              f"({expected}): verify with the signer's public key, or sign the bundle with yours") from None
        raise BundleError(f"the signature of bundle {root} does not match it: its manifest (or a file it lists) was changed "
                          "after it was signed; restore the bundle as signed, or sign it again if the change is yours") from None
    return expected
