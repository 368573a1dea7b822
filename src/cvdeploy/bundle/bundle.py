"""Reading bundles: load a NAME.cvd/ directory (checking schema and hashes) or a plain Ultralytics .onnx.

The manifest carries a sha256 of its own canonical form (`content_sha256`), written by `write_manifest` (every writer
goes through it) and checked by `Bundle.load`: a hand edit of names, thresholds or preprocessing is refused like an
edited model file. The same canonical bytes are what `cvdeploy sign` signs (see `cvdeploy.bundle.signing`).
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import ValidationError

from cvdeploy.bundle.manifest import (
    GoldenCase,
    Manifest,
    PostprocessSpec,
    PreprocessSpec,
    RuntimeHint,
    SourceInfo,
    TensorInfo,
    Variant,
)
from cvdeploy.errors import BundleError, InputError, ModelFormatError

if TYPE_CHECKING:
    from cvdeploy.bundle.signing import PublicKeySource

MANIFEST = "manifest.json"
SIGNATURE = "signature.json"  # written by `cvdeploy sign`, next to the manifest it signs
CONTENT_HASH = "content_sha256"  # the manifest field holding the hash of the rest of the manifest


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def canonical_manifest_bytes(raw: Mapping[str, Any]) -> bytes:
    """The manifest as it is hashed and signed: the parsed JSON without `content_sha256`, keys sorted, no whitespace,
    non-ASCII escaped (Python's `json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=True)`).

    Computed from the parsed JSON, not from the validated model: a later cvdeploy that adds optional fields (with
    defaults) must still reproduce the hash of a manifest written before them, and a value pydantic would coerce
    (a string "0.5" for a float) must not hash like the value it was coerced to.
    """
    body = {k: v for k, v in raw.items() if k != CONTENT_HASH}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def manifest_content_hash(raw: Mapping[str, Any]) -> str:
    """sha256 (hex) of `canonical_manifest_bytes(raw)`: the value `content_sha256` must hold."""
    return hashlib.sha256(canonical_manifest_bytes(raw)).hexdigest()


# File modes of a bundle. A plain bundle is readable by every user, so that a service running as another user (a
# container's non-root user) can load it; a private one (`build --private`) and a protected one (encrypted variants)
# are readable by their owner only. Set explicitly, not left to the umask or to tempfile's 0700 staging directories.
PUBLIC_MODES = (0o755, 0o644)  # directories, files
PRIVATE_MODES = (0o700, 0o600)


def is_private(root: str | os.PathLike[str]) -> bool:
    """True if the bundle directory `root` is closed to group and others (`build --private`, `protect`)."""
    return not (Path(root).stat().st_mode & 0o077)


def set_bundle_modes(root: str | os.PathLike[str], private: bool | None = None) -> None:
    """Give every directory and file under `root` (itself included) the bundle modes: 0755/0644, or 0700/0600 when
    `private`; `private=None` keeps what `root` is now (a bundle changed in place stays as open or closed as it was).
    Symbolic links are left alone (a bundle holds none that cvdeploy wrote), and so are files of another owner that
    this user may not chmod (a shared, group-writable bundle): what this user wrote gets the modes."""
    top = Path(root)
    if private is None:
        private = is_private(top)
    dir_mode, file_mode = PRIVATE_MODES if private else PUBLIC_MODES

    def chmod(path: str, mode: int) -> None:
        if not os.path.islink(path):
            with contextlib.suppress(PermissionError):
                os.chmod(path, mode)

    for parent, dirs, files in os.walk(top):
        for name in files:
            chmod(os.path.join(parent, name), file_mode)
        for name in dirs:
            chmod(os.path.join(parent, name), dir_mode)
    chmod(str(top), dir_mode)


def write_manifest(path: str | os.PathLike[str], manifest: Manifest) -> str:
    """Write `manifest` to `path` (atomically) with its content hash; set `manifest.content_sha256` and return it.

    Every writer of a manifest.json goes through here, so that `Bundle.load` can tell a manifest cvdeploy wrote from
    one edited afterwards.
    """
    p = Path(path)
    # Hash exactly what a reader will parse (JSON turns int keys into strings, tuples into lists), not the model.
    data = json.loads(json.dumps(manifest.model_dump(mode="json", exclude={CONTENT_HASH})))
    digest = manifest_content_hash(data)
    data[CONTENT_HASH] = digest
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.chmod(tmp, PRIVATE_MODES[1] if is_private(p.parent) else PUBLIC_MODES[1])  # as open as its bundle, whatever the umask
    os.replace(tmp, p)
    manifest.content_sha256 = digest
    return digest


@dataclass
class GoldenData:
    """One golden case: the network input and the source model's raw outputs for it."""

    case: GoldenCase
    input: np.ndarray
    outputs: dict[str, np.ndarray]


def read_golden(path: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    with np.load(path, allow_pickle=False) as z:
        return z["input"], {k[len("output:"):]: z[k] for k in z.files if k.startswith("output:")}


def write_golden(path: Path, inputs: np.ndarray, outputs: dict[str, np.ndarray]) -> None:
    np.savez_compressed(path, input=inputs, **{f"output:{k}": v for k, v in outputs.items()})


class Bundle:
    """A deployable model: its manifest and, for a bundle directory, the root holding its files."""

    def __init__(self, manifest: Manifest, root: Path | None, *, onnx_path: Path | None = None) -> None:
        self.manifest = manifest
        self.root = root
        self._onnx_path = onnx_path  # set when the bundle stands for a plain .onnx file
        self.signed_by: str | None = None  # the signer's key fingerprint, when loaded with a public key
        self.loaded_canonical: bytes | None = None  # the canonical manifest read by `load` (what a signature covers)

    # -- loading -------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, check_hashes: bool = True, public_key: PublicKeySource | None = None) -> Bundle:
        """Open a bundle directory or a plain .onnx; refuse anything incomplete or tampered with.

        With `public_key` (a PEM file path, PEM bytes or a loaded ed25519 public key) the bundle must carry a valid
        signature by that key (`cvdeploy sign`), and every file is hashed whatever `check_hashes` says: the signature
        covers the files only through the sha256 values it signs. Without it, signatures are not required.
        """
        p = Path(path)
        if not p.exists():
            raise InputError(f"model not found: {p}")
        if p.is_file():
            if public_key is not None:
                raise BundleError(f"{p} is a plain model file, which cannot carry a signature, and a public key was given: "
                                  "build a bundle (`cvdeploy build`) and sign it (`cvdeploy sign`)")
            if p.suffix.lower() == ".onnx":
                return cls.from_onnx(p)
            raise ModelFormatError(
                f"unknown model format {p.suffix or '(no suffix)'!r} for {p}: give a bundle directory or an .onnx file "
                "(a .pt must first go through `cvdeploy build`)"
            )
        mpath = p / MANIFEST
        if not mpath.is_file():
            raise BundleError(f"not a bundle: {p} has no {MANIFEST}")
        try:
            raw = json.loads(mpath.read_text(), object_pairs_hook=_unique_keys)
        except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError, a duplicate key
            raise BundleError(f"{mpath}: not valid JSON ({e})") from e
        canonical = canonical_manifest_bytes(raw) if isinstance(raw, dict) else b""
        if isinstance(raw, dict):
            _check_content_hash(p, raw, canonical)
        try:
            manifest = Manifest.model_validate(raw)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(x) for x in first["loc"]) or "(root)"
            raise BundleError(f"{mpath}: invalid manifest at {where}: {first['msg']} ({e.error_count()} error(s))") from e
        bundle = cls(manifest, p)
        bundle.loaded_canonical = canonical
        if public_key is not None:
            from cvdeploy.bundle.signing import verify_manifest_signature

            bundle.signed_by = verify_manifest_signature(p, canonical, public_key)
        if check_hashes or public_key is not None:
            bundle.check_files()
        return bundle

    def save_manifest(self) -> None:
        """Write the (changed) manifest back atomically, with its new content hash; only a bundle directory has one.

        A signature of the bundle is removed: it signed the old manifest and could only fail now (sign again).
        """
        if self.root is None:
            raise BundleError(f"{self._onnx_path} is a plain .onnx file, not a bundle: build a bundle to store settings")
        # Removed before the manifest changes: a crash in between leaves an unsigned bundle, never a stale signature.
        (self.root / SIGNATURE).unlink(missing_ok=True)
        self.signed_by, self.loaded_canonical = None, None
        write_manifest(self.root / MANIFEST, self.manifest)

    def runtime_hint(self, variant: str) -> RuntimeHint | None:
        return next((h for h in self.manifest.runtime if h.variant == variant), None)

    def hashed_files(self) -> list[tuple[str, str, str]]:
        """(what, path in the bundle, sha256) of every file the manifest vouches for: variants and their companions,
        golden cases, the data profile. Files it does not list (report.html, MODEL_CARD.md) are not covered."""
        m = self.manifest
        entries = [(f"variant {name!r}", v.file, v.sha256) for name, v in m.variants.items()]
        entries += [(f"variant {name!r}", f, d) for name, v in m.variants.items() for f, d in v.companions.items()]
        entries += [("golden case", g.file, g.sha256) for g in m.golden]
        entries += [("data profile", p.file, p.sha256) for p in [m.profile] if p is not None]
        return entries

    def check_files(self) -> None:
        """Check every variant, golden and data profile file exists and has the sha256 the manifest records."""
        assert self.root is not None
        for what, rel, digest in self.hashed_files():
            f = self._resolve(rel)
            if not f.is_file():
                raise BundleError(f"bundle {self.root} is incomplete: {what} file {rel} is missing")
            if sha256_file(f) != digest:
                raise BundleError(
                    f"bundle {self.root} was modified: {what} file {rel} does not match its sha256 in {MANIFEST}"
                )

    def _resolve(self, rel: str) -> Path:
        assert self.root is not None
        f = (self.root / rel).resolve()
        if self.root.resolve() not in f.parents:
            raise BundleError(f"{self.root / MANIFEST}: file {rel!r} points outside the bundle")
        return f

    @classmethod
    def from_onnx(cls, path: str | os.PathLike[str]) -> Bundle:
        """Describe a plain Ultralytics ONNX export as a one-variant bundle, from its metadata."""
        from cvdeploy.runtime.onnxruntime import OrtEngine

        p = Path(path)
        engine = OrtEngine(p)
        meta = engine.metadata
        try:
            names = {int(k): str(v) for k, v in ast.literal_eval(meta["names"]).items()}
            imgsz = [int(x) for x in ast.literal_eval(meta.get("imgsz", "[640, 640]"))]
            task = meta.get("task", "detect")
            stride = int(float(meta.get("stride", "32")))
        except (KeyError, ValueError, SyntaxError, AttributeError) as e:
            raise ModelFormatError(
                f"{p} has no Ultralytics metadata (names, imgsz, task); export it with Ultralytics or build a bundle"
            ) from e
        args = _literal(meta.get("args", "{}"))
        end2end = bool(args.get("nms")) or meta.get("end2end", "False") == "True"
        inp = engine.inputs[0]
        if len(imgsz) == 1:
            imgsz = imgsz * 2
        try:
            manifest = _onnx_manifest(p, names, task, inp, engine, imgsz, stride, end2end, meta)
        except ValidationError as e:
            engine.close()
            raise ModelFormatError(f"{p}: its Ultralytics metadata does not describe a usable model: {e.errors()[0]['msg']}") from e
        engine.close()
        return cls(manifest, None, onnx_path=p)

    # -- access --------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def names(self) -> dict[int, str]:
        return self.manifest.names

    def variant_path(self, variant: str | None = None) -> Path:
        name = variant or self.manifest.default_variant
        if name not in self.manifest.variants:
            raise InputError(f"bundle {self.name!r} has no variant {name!r}; it has {', '.join(self.manifest.variants)}")
        if self._onnx_path is not None:
            return self._onnx_path
        return self._resolve(self.manifest.variants[name].file)

    def golden(self) -> Iterator[GoldenData]:
        """The golden cases: inputs and the source model's expected outputs."""
        if self.root is None:
            return
        for case in self.manifest.golden:
            inputs, outputs = read_golden(self._resolve(case.file))
            yield GoldenData(case, inputs, outputs)

    def __repr__(self) -> str:
        where = self.root or self._onnx_path
        return f"Bundle(name={self.name!r}, task={self.manifest.task!r}, variants={list(self.manifest.variants)}, path={str(where)!r})"


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object with a key given twice is refused: readers disagree on which value wins, and the hash and the
    signature must cover the one value every reader sees."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"key {k!r} appears twice in one object")
        out[k] = v
    return out


def _check_content_hash(root: Path, raw: dict[str, Any], canonical: bytes) -> None:
    """Refuse a manifest whose content no longer matches the hash it was written with.

    A manifest without the field was written before cvdeploy recorded it and is accepted (signing, not this hash,
    is what stops someone who rewrites the hash too, or drops it).
    """
    claimed = raw.get(CONTENT_HASH)
    if claimed is None:
        return
    if not isinstance(claimed, str) or claimed != hashlib.sha256(canonical).hexdigest():
        raise BundleError(f"{MANIFEST} of bundle {root} was edited after it was written (its content hash does not match): "
                          "rebuild it or restore it (give other thresholds to predict as options, e.g. --conf, instead of editing it)")


def _literal(text: str) -> dict[str, object]:
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return {}
    return value if isinstance(value, dict) else {}


def _version() -> str:
    from cvdeploy import __version__

    return __version__


def _onnx_manifest(p: Path, names, task, inp, engine, imgsz, stride, end2end, meta) -> Manifest:
    manifest = Manifest(
        name=p.stem,
        task=task,
        names=names,
        input=TensorInfo(name=inp.name, shape=list(inp.shape), dtype=inp.dtype),  # type: ignore[arg-type]
        outputs=[TensorInfo(name=o.name, shape=list(o.shape), dtype=o.dtype) for o in engine.outputs],  # type: ignore[arg-type]
        preprocess=PreprocessSpec(imgsz=(imgsz[0], imgsz[1]), stride=stride),
        postprocess=PostprocessSpec(end2end=end2end),
        variants={"onnx-fp32": Variant(file=p.name, sha256=sha256_file(p), size_bytes=p.stat().st_size)},
        default_variant="onnx-fp32",
        source=SourceInfo(file=p.name, sha256=sha256_file(p), format="onnx", exporter=meta.get("version")),
        created_at=meta.get("date", datetime.now(UTC).isoformat()),
        cvdeploy_version=_version(),
    )
    return manifest
