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

from cvdeploy.errors import BundleError, InputError, MissingDependencyError, ModelFormatError
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

_QDQ_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
# Obfuscation must not change what a variant computes: its outputs on the golden inputs, before and after, may differ
# by float rounding only (the graph is the same computation; ONNX Runtime may fuse it a little differently).
OBFUSCATION_ATOL = 1e-4
OBFUSCATION_RTOL = 1e-4


def _subgraphs(node: Any) -> list[Any]:
    """The bodies of If, Loop and Scan nodes (graph-valued attributes)."""
    from onnx import AttributeProto

    out: list[Any] = []
    for a in node.attribute:
        if a.type == AttributeProto.GRAPH:
            out.append(a.g)
        elif a.type == AttributeProto.GRAPHS:
            out.extend(a.graphs)
    return out


def _reads(node: Any) -> list[str]:
    """The tensor names a node reads: its inputs and the outer-scope names its subgraphs read."""
    names = list(node.input)
    for sub in _subgraphs(node):
        for n in sub.node:
            names.extend(_reads(n))
    return names


def _sort_topologically(graph: Any) -> None:
    """Reorder the nodes so that each comes after the producers of what it reads, keeping the given order where it holds.

    ONNX Runtime runs nodes in any order, and onnxruntime's fp16 converter appends the Cast nodes it adds at the end of
    the list; the ONNX checker refuses such a graph and the Identity splicing assumes producers come first (an fp16
    variant made `protect --obfuscate` fail with "Nodes in a graph must be topologically sorted").
    """
    import heapq

    from onnx import NodeProto

    nodes = list(graph.node)
    producer = {out: i for i, n in enumerate(nodes) for out in n.output if out}
    users: list[list[int]] = [[] for _ in nodes]
    waiting = [0] * len(nodes)
    for i, n in enumerate(nodes):
        deps = {producer[x] for x in _reads(n) if x in producer and producer[x] != i}
        waiting[i] = len(deps)
        for j in deps:
            users[j].append(i)
    ready = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)  # smallest original index first: a sorted graph keeps its order
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users[i]:
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        raise ModelFormatError("the ONNX graph has a cycle: it cannot be obfuscated")
    if order != list(range(len(nodes))):
        copies = []
        for i in order:
            c = NodeProto()
            c.CopyFrom(nodes[i])
            copies.append(c)
        del graph.node[:]
        graph.node.extend(copies)
    for n in graph.node:
        for sub in _subgraphs(n):
            _sort_topologically(sub)


def obfuscate_onnx(data: bytes, seed: int | None = None) -> bytes:
    """Rename every node, initializer and intermediate tensor, strip doc strings and producer, add inert nodes.

    The graph's input and output names stay (clients and the protocol use them); outputs are unchanged. Works on any
    ONNX variant: fp32, fp16 (whose converter leaves the graph unsorted), INT8 QDQ (Identity nodes are kept away from
    Quantize/DequantizeLinear, whose pairs ONNX Runtime fuses into integer kernels) and graphs with If/Loop bodies.
    """
    import random

    import onnx
    from onnx import helper

    model = onnx.load_from_string(data)
    g = model.graph
    _sort_topologically(g)
    keep = {i.name for i in g.input} | {o.name for o in g.output}
    rng = secrets.SystemRandom() if seed is None else random.Random(seed)
    names: dict[str, str] = {}
    node_count = 0

    def new(old: str) -> str:
        if old in keep or old == "":
            return old
        if old not in names:
            names[old] = f"t{len(names):05d}_{rng.randrange(16**6):06x}"
        return names[old]

    def node_name() -> str:
        nonlocal node_count
        node_count += 1
        return f"n{node_count - 1:05d}_{rng.randrange(16**6):06x}"

    def rename(graph: Any, main: bool) -> None:
        # One mapping for the whole model: a subgraph reads outer tensors by name, so they must be renamed alike.
        for init in graph.initializer:
            init.name, init.doc_string = new(init.name), ""
        for sparse in graph.sparse_initializer:
            sparse.values.name = new(sparse.values.name)
            sparse.indices.name = new(sparse.indices.name)
        for vi in graph.value_info:
            vi.name, vi.doc_string = new(vi.name), ""
        for vi in (*graph.input, *graph.output):
            vi.doc_string = ""
            if not main:  # a subgraph's formal inputs and outputs are its own; the model's stay as clients know them
                vi.name = new(vi.name)
        for node in graph.node:
            node.name, node.doc_string = node_name(), ""
            node.input[:] = [new(x) for x in node.input]
            node.output[:] = [new(x) for x in node.output]
            for sub in _subgraphs(node):
                rename(sub, main=False)
                sub.name, sub.doc_string = "body", ""  # the checker wants a name; the original may say what it is

    rename(g, main=True)
    # Inert nodes: identities spliced on intermediate tensors (values and outputs are unchanged). Not next to a
    # Quantize/DequantizeLinear: ONNX Runtime recognises QDQ patterns to run integer kernels, and an INT8 variant must
    # keep computing what it did.
    consumers: dict[str, set[str]] = {}
    for node in g.node:
        for x in _reads(node):
            consumers.setdefault(x, set()).add(node.op_type)
    spliced = 0
    for k in range(len(g.node) - 1, -1, -1):
        node = g.node[k]
        if spliced >= 8 or k % 9 or not node.output or node.output[0] in keep or node.output[0] == "":
            continue
        t = node.output[0]
        if node.op_type in _QDQ_OPS or consumers.get(t, set()) & _QDQ_OPS:
            continue
        alias = new(f"\0alias{spliced}")  # a key no tensor has: a fresh, unique name
        node.output[0] = alias
        g.node.insert(k + 1, helper.make_node("Identity", [alias], [t], name=node_name()))
        spliced += 1
    g.doc_string = ""
    g.name = "graph"
    model.doc_string = ""
    model.producer_name, model.producer_version, model.domain = "", "", ""
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise ModelFormatError(f"obfuscation made an invalid ONNX graph ({str(e).splitlines()[0]}); protect this bundle "
                               "without --obfuscate") from None
    return model.SerializeToString()


def check_obfuscation(bundle: Any, variant: str, original: bytes, obfuscated: bytes) -> float:
    """Run an ONNX variant before and after obfuscation on the bundle's golden inputs; return the largest difference,
    or raise BundleError when the outputs differ (in names, shapes, types, or values beyond float rounding)."""
    import numpy as np

    from cvdeploy.runtime.onnxruntime import OrtEngine, OrtOptions

    options = OrtOptions(providers=("CPUExecutionProvider",))
    before, after = OrtEngine(original, options), OrtEngine(obfuscated, options)
    worst, cases = 0.0, 0
    try:
        for g in bundle.golden():
            cases += 1
            a = before.run({before.inputs[0].name: g.input})
            b = after.run({after.inputs[0].name: g.input})
            for name, ref in a.items():
                got = b.get(name)
                if got is None or got.shape != ref.shape or got.dtype != ref.dtype:
                    raise BundleError(f"obfuscating variant {variant!r} changed its output {name!r} (name, shape or type); "
                                      "protect the bundle without --obfuscate")
                r, o = ref.astype(np.float64), got.astype(np.float64)
                if not np.array_equal(np.isfinite(r), np.isfinite(o)):
                    raise BundleError(f"obfuscating variant {variant!r} made output {name!r} non-finite on golden case "
                                      f"{g.case.file}; protect the bundle without --obfuscate")
                diff = np.abs(np.where(np.isfinite(r), r - o, 0.0))
                if (diff > OBFUSCATION_ATOL + OBFUSCATION_RTOL * np.abs(np.where(np.isfinite(r), r, 0.0))).any():
                    raise BundleError(f"obfuscating variant {variant!r} changed output {name!r} on golden case {g.case.file} "
                                      f"by up to {diff.max():.3g}; protect the bundle without --obfuscate")
                worst = max(worst, float(diff.max(initial=0.0)))
    finally:
        before.close()
        after.close()
    if cases == 0:
        raise BundleError(f"bundle {bundle.name!r} has no golden cases to check its obfuscated variants against; protect it "
                          "without --obfuscate, or rebuild it")
    return worst


# -- bundles ---------------------------------------------------------------------------------------


def protect_bundle(src: str | os.PathLike[str], out: str | os.PathLike[str], key: bytes, *, obfuscate: bool = False,
                   force: bool = False) -> Path:
    """A copy of the bundle at `src` with every variant file encrypted.

    With `obfuscate`, every ONNX variant is obfuscated first and must give the outputs it gave before on the bundle's
    golden inputs; OpenVINO variants are encrypted only (their manifest entry says `obfuscated: false`). The copy has a
    new manifest, so a signature of `src` is not carried over: sign the protected bundle (`cvdeploy sign`).
    """
    from cvdeploy.bundle.bundle import MANIFEST, SIGNATURE, Bundle, set_bundle_modes, sha256_file, write_manifest

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
    try:
        shutil.copytree(b.root, stage, ignore=shutil.ignore_patterns("variants", "report.html", SIGNATURE))
        os.chmod(stage, 0o700)  # closed while it is written: copytree gave it the source bundle's (public) mode
        (stage / "variants").mkdir()
        m = b.manifest.model_copy(deep=True)
        for name, v in m.variants.items():
            files = [v.file, *v.companions]
            new_companions = {}
            for rel in files:
                data = (b.root / rel).read_bytes()
                obfuscated = obfuscate and v.format == "onnx" and rel == v.file
                record: dict[str, Any] = {"obfuscated": obfuscated}
                if obfuscated:
                    plain, data = data, obfuscate_onnx(data)
                    record["obfuscation_max_abs_diff"] = check_obfuscation(b, name, plain, data)
                blob, info = encrypt_bytes(key, data, bundle=m.name, variant=name, rel=rel)
                target = stage / (rel + ".enc")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(blob)
                if rel == v.file:
                    v.file, v.sha256, v.encryption = rel + ".enc", sha256_file(target), {**info, "plain_file": rel, **record}
                else:
                    new_companions[rel + ".enc"] = sha256_file(target)
                    v.encryption = {**(v.encryption or {}), f"companion:{rel}": json.dumps(info)}
            v.companions = new_companions
        write_manifest(stage / MANIFEST, m)
        set_bundle_modes(stage, private=True)  # a protected bundle is its owner's only: 0700 directories, 0600 files
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)  # nothing half-written is left next to the output
        raise
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
