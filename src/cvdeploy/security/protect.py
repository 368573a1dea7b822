"""Protected models: variants encrypted with AES-256-GCM (decrypted in memory only), optionally obfuscated.

The associated data of each encrypted file binds the bundle name, the variant, the file's path and
the plaintext's sha256: a file moved to another variant or bundle, a flipped byte or a wrong key
all fail authentication, and the model is refused. Keys come from a file, an environment variable
or an external command (a KMS hook), never from the bundle.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

from cvdeploy.errors import BundleError, InputError, MissingDependencyError
from cvdeploy.security import write_private

ALG = "AES-256-GCM"
KEY_ENV = "CVDEPLOY_MODEL_KEY"  # the key itself (base64 or hex)
KEY_FILE_ENV = "CVDEPLOY_MODEL_KEY_FILE"
KEY_COMMAND_ENV = "CVDEPLOY_MODEL_KEY_COMMAND"  # a command printing the key (KMS hook)


def _aesgcm(key: bytes) -> Any:
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    except ImportError as e:
        raise MissingDependencyError("cryptography", "serve", "encrypting or decrypting models") from e
    return AESGCM(key)


def parse_key(text: bytes | str) -> bytes:
    """32 raw bytes, or 32 bytes in base64 or hex (surrounding whitespace ignored)."""
    raw = text.encode() if isinstance(text, str) else text
    if len(raw) == 32:
        return raw
    s = raw.strip()
    for decode in (lambda t: bytes.fromhex(t.decode()), lambda t: base64.b64decode(t, validate=True)):
        try:
            k = decode(s)
        except (ValueError, UnicodeDecodeError):
            continue
        if len(k) == 32:
            return k
    raise InputError("a model key must be 32 bytes (raw, hex or base64): 256-bit AES")


def new_key_file(path: str | os.PathLike[str], force: bool = False) -> Path:
    p = Path(path)
    if p.exists() and not force:
        raise InputError(f"{p} exists; pass --force to replace it (the models encrypted with it would be lost)")
    p.parent.mkdir(parents=True, exist_ok=True)
    write_private(p, base64.b64encode(secrets.token_bytes(32)) + b"\n")
    return p


def load_key(key_file: str | os.PathLike[str] | None = None, key_command: str | None = None) -> bytes:
    """The model key from, in order: `key_file`, `key_command`, $CVDEPLOY_MODEL_KEY_FILE, $CVDEPLOY_MODEL_KEY, $CVDEPLOY_MODEL_KEY_COMMAND."""
    if key_file is not None:
        p = Path(key_file)
        if not p.is_file():
            raise InputError(f"model key file not found: {p}")
        return parse_key(p.read_bytes())
    command = key_command
    if command is None and os.environ.get(KEY_FILE_ENV):
        return load_key(os.environ[KEY_FILE_ENV])
    if command is None and os.environ.get(KEY_ENV):
        return parse_key(os.environ[KEY_ENV])
    command = command or os.environ.get(KEY_COMMAND_ENV)
    if command:
        try:
            out = subprocess.run(shlex.split(command), capture_output=True, check=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError) as e:
            raise InputError(f"the model key command failed: {e}") from None
        return parse_key(out)
    raise InputError(f"this bundle is encrypted: give its key (--key-file, ${KEY_FILE_ENV}, ${KEY_ENV} or ${KEY_COMMAND_ENV})")


def _aad(bundle: str, variant: str, rel: str, plain_sha: str) -> bytes:
    return json.dumps({"bundle": bundle, "variant": variant, "file": rel, "sha256": plain_sha}, sort_keys=True).encode()


def encrypt_bytes(key: bytes, data: bytes, *, bundle: str, variant: str, rel: str) -> tuple[bytes, dict[str, str]]:
    plain_sha = hashlib.sha256(data).hexdigest()
    nonce = secrets.token_bytes(12)
    blob = _aesgcm(key).encrypt(nonce, data, _aad(bundle, variant, rel, plain_sha))
    return blob, {"alg": ALG, "nonce": base64.b64encode(nonce).decode(), "plaintext_sha256": plain_sha}


def decrypt_bytes(key: bytes, blob: bytes, info: dict[str, str], *, bundle: str, variant: str, rel: str) -> bytes:
    from cryptography.exceptions import InvalidTag

    if info.get("alg") != ALG:
        raise BundleError(f"variant {variant!r}: unknown encryption {info.get('alg')!r}")
    try:
        data = _aesgcm(key).decrypt(base64.b64decode(info["nonce"]), blob, _aad(bundle, variant, rel, info["plaintext_sha256"]))
    except (InvalidTag, KeyError, ValueError):
        raise BundleError(f"variant {variant!r} ({rel}) cannot be decrypted: wrong key, or the file or its metadata was "
                          "changed") from None
    if hashlib.sha256(data).hexdigest() != info["plaintext_sha256"]:
        raise BundleError(f"variant {variant!r} ({rel}): decrypted content does not match its recorded hash")
    return data


# -- obfuscation -----------------------------------------------------------------------------------


def obfuscate_onnx(data: bytes, seed: int | None = None) -> bytes:
    """Rename every node, initializer and intermediate tensor, strip doc strings and producer, add inert nodes.

    The graph's input and output names stay (clients and the protocol use them); outputs are unchanged.
    """
    import onnx
    from onnx import helper

    model = onnx.load_from_string(data)
    g = model.graph
    keep = {i.name for i in g.input} | {o.name for o in g.output}
    rng = secrets.SystemRandom() if seed is None else __import__("random").Random(seed)
    names: dict[str, str] = {}

    def new(old: str) -> str:
        if old in keep or old == "":
            return old
        if old not in names:
            names[old] = f"t{len(names):05d}_{rng.randrange(16**6):06x}"
        return names[old]

    for init in g.initializer:
        init.name = new(init.name)
        init.doc_string = ""
    for vi in list(g.value_info):
        vi.name = new(vi.name)
    for k, node in enumerate(g.node):
        node.name = f"n{k:05d}_{rng.randrange(16**6):06x}"
        node.doc_string = ""
        node.input[:] = [new(x) for x in node.input]
        node.output[:] = [new(x) for x in node.output]
    # Inert nodes: identities spliced on intermediate tensors (values and outputs are unchanged).
    spliced = 0
    for k in range(len(g.node) - 1, -1, -1):
        node = g.node[k]
        if spliced >= 8 or not node.output or node.output[0] in keep or k % 9:
            continue
        t = node.output[0]
        alias = f"t{len(names) + spliced:05d}_{rng.randrange(16**6):06x}"
        node.output[0] = alias
        g.node.insert(k + 1, helper.make_node("Identity", [alias], [t], name=f"n{len(g.node):05d}_{rng.randrange(16**6):06x}"))
        spliced += 1
    g.doc_string = ""
    g.name = "graph"
    model.doc_string = ""
    model.producer_name, model.producer_version, model.domain = "", "", ""
    onnx.checker.check_model(model)
    return model.SerializeToString()


# -- bundles ---------------------------------------------------------------------------------------


def protect_bundle(src: str | os.PathLike[str], out: str | os.PathLike[str], key: bytes, *, obfuscate: bool = False,
                   force: bool = False) -> Path:
    """A copy of the bundle at `src` with every variant file encrypted (and ONNX variants obfuscated first)."""
    from cvdeploy.bundle.bundle import Bundle, sha256_file

    b = Bundle.load(src)
    if b.root is None:
        raise InputError(f"{src} is a plain .onnx file; protect a bundle directory (cvdeploy build)")
    if any(v.encryption for v in b.manifest.variants.values()):
        raise InputError(f"{src} is already protected")
    dest = Path(out)
    if dest.exists():
        if not force:
            raise InputError(f"{dest} already exists; pass --force to replace it")
        shutil.rmtree(dest)
    stage = dest.with_name(f".{dest.name}.tmp")
    if stage.exists():
        shutil.rmtree(stage)
    shutil.copytree(b.root, stage, ignore=shutil.ignore_patterns("variants", "report.html"))
    (stage / "variants").mkdir()
    m = b.manifest.model_copy(deep=True)
    for name, v in m.variants.items():
        files = [v.file, *v.companions]
        new_companions = {}
        for rel in files:
            data = (b.root / rel).read_bytes()
            if obfuscate and rel.endswith(".onnx"):
                data = obfuscate_onnx(data)
            blob, info = encrypt_bytes(key, data, bundle=m.name, variant=name, rel=rel)
            target = stage / (rel + ".enc")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(blob)
            if rel == v.file:
                v.file, v.sha256, v.encryption = rel + ".enc", sha256_file(target), {**info, "plain_file": rel, "obfuscated": obfuscate}
            else:
                new_companions[rel + ".enc"] = sha256_file(target)
                v.encryption = {**(v.encryption or {}), f"companion:{rel}": json.dumps(info)}
        v.companions = new_companions
    (stage / "manifest.json").write_text(json.dumps(m.model_dump(mode="json"), indent=2) + "\n")
    os.replace(stage, dest)
    return dest


def variant_bytes(bundle: Any, variant: str, key: bytes) -> tuple[bytes, dict[str, bytes]]:
    """Decrypted bytes of an encrypted variant's main file and of its companions (by plaintext path)."""
    v = bundle.manifest.variants[variant]
    enc = v.encryption or {}
    main = decrypt_bytes(key, bundle.variant_path(variant).read_bytes(), enc, bundle=bundle.name, variant=variant,
                         rel=enc.get("plain_file", v.file))
    extra = {}
    for k, info_json in enc.items():
        if k.startswith("companion:"):
            rel = k.split(":", 1)[1]
            extra[rel] = decrypt_bytes(key, bundle._resolve(rel + ".enc").read_bytes(), json.loads(info_json), bundle=bundle.name,
                                       variant=variant, rel=rel)
    return main, extra
