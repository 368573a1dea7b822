"""Lineage of a registered version: a bundle's tree hash, the controlled data's label hash, who and when; and the
content-addressed store that keeps copies of registered bundles."""

from __future__ import annotations

import getpass
import hashlib
import os
import secrets
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cvdeploy.bundle.bundle import is_private, set_bundle_modes, sha256_file
from cvdeploy.errors import InputError

SPLITS = ("train", "val", "test")


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def os_user() -> str:
    """The operating-system user running this process (recorded beside any `--by` name, which is only a claim)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry and no LOGNAME/USER (a container's arbitrary uid)
        return f"uid {os.getuid()}" if hasattr(os, "getuid") else "unknown"


def tree_sha256(root: str | os.PathLike[str]) -> str:
    """sha256 of a directory's content: one line `<file sha256>  <relative path>` per regular file, sorted by path.

    Covers every file, the ones the manifest lists and the others (report.html, MODEL_CARD.md, signature.json), and
    their names; not modes or times, so a copy hashes like its original.
    """
    top = Path(root)
    lines = []
    for parent, dirs, files in os.walk(top):
        dirs.sort()
        for name in files:
            f = Path(parent) / name
            if f.is_symlink() or not f.is_file():
                raise InputError(f"{f} is not a regular file: a registered bundle holds regular files only")
            lines.append(f"{sha256_file(f)}  {f.relative_to(top).as_posix()}\n")
    return hashlib.sha256("".join(sorted(lines, key=lambda line: line[66:])).encode()).hexdigest()


def store_copy(src: Path, store: Path) -> tuple[Path, str]:
    """Copy the bundle directory `src` into the content-addressed `store` (STORE/<tree sha256>.cvd); return the stored
    path and its tree hash.

    The copy is made under a temporary name inside the store, hashed (the copy, not the source: what is stored is what
    was hashed, even if the source changes meanwhile) and renamed into place. Content already stored (the same bundle
    registered under another model, or twice at once) is kept and the new copy dropped.
    """
    store.mkdir(parents=True, exist_ok=True)
    incoming = store / f".incoming-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        shutil.copytree(src, incoming, symlinks=True)
        digest = tree_sha256(incoming)
        set_bundle_modes(incoming, is_private(src))
        final = store / f"{digest}.cvd"
        if not final.exists():
            try:
                incoming.rename(final)
            except OSError:
                if not final.is_dir():  # not a concurrent copy of the same content: a real failure
                    raise
        return final, digest
    finally:
        shutil.rmtree(incoming, ignore_errors=True)


def data_lineage(data_yaml: str | os.PathLike[str]) -> dict[str, Any]:
    """What a data.yaml points at: its path, its sha256, and one sha256 over the label files of its splits.

    Label files are found as Ultralytics finds them (`.../images/...` -> `.../labels/....txt`); each enters the hash as
    `split, path relative to the dataset root, sha256` (or `missing` for an image without a label file), so that the
    hash changes when a label is edited, added or removed, and not when the dataset is moved.
    """
    import yaml

    from cvdeploy.vision.image import image_files

    yml = Path(data_yaml)
    if not yml.is_file():
        raise InputError(f"--data: {yml} not found")
    try:
        spec = yaml.safe_load(yml.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise InputError(f"--data: cannot read {yml}: {e}") from None
    if not isinstance(spec, dict):
        raise InputError(f"--data: {yml} is not a dataset description (a mapping with path, train, val, names)")
    root = Path(spec.get("path") or yml.parent)
    if not root.is_absolute():
        root = (yml.parent / root).resolve()
    h = hashlib.sha256()
    splits: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        entries = spec.get(split)
        if not entries:
            continue
        images: list[Path] = []
        for entry in entries if isinstance(entries, list) else [entries]:
            where = root / str(entry)
            if where.is_dir():
                images += image_files(where)
            elif where.is_file() and where.suffix == ".txt":  # Ultralytics' list-of-images form
                images += [(root / line.strip()).resolve() for line in where.read_text().splitlines() if line.strip()]
            else:
                raise InputError(f"--data: the {split} split of {yml} points at {where}, which does not exist")
        labelled = 0
        for image in sorted(images):
            label = Path(str(image.parent).replace(f"{os.sep}images", f"{os.sep}labels", 1)) / f"{image.stem}.txt"
            rel = label.relative_to(root).as_posix() if label.is_relative_to(root) else label.as_posix()
            digest = sha256_file(label) if label.is_file() else "missing"
            labelled += digest != "missing"
            h.update(f"{split}\t{rel}\t{digest}\n".encode())
        splits[split] = {"images": len(images), "label_files": labelled}
    if not splits:
        raise InputError(f"--data: {yml} names no train, val or test split")
    return {"yaml": str(yml.resolve()), "yaml_sha256": sha256_file(yml), "labels_sha256": h.hexdigest(), "splits": splits}
