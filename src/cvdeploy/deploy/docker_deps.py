"""What the runtime image installs: the pinned runtime lock (cvdeploy's base dependencies and the serve extra, as
installed and tested here, with their markers evaluated for the image) and cvdeploy's own wheel.

Neither torch nor ultralytics may come along (`FORBIDDEN`): the inference path must install and start without them.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from cvdeploy import __version__
from cvdeploy.errors import InputError

RUNTIME_EXTRAS = ("serve",)
FORBIDDEN = ("torch", "torchvision", "ultralytics")  # never on the inference path (docs/design.md)


# -- the runtime lock --------------------------------------------------------------------------------------------------


def _packaging() -> tuple[Any, Any]:
    try:
        from packaging.markers import default_environment
        from packaging.requirements import Requirement
    except ImportError:  # pip vendors packaging; the runtime image need not carry it
        from pip._vendor.packaging.markers import default_environment  # type: ignore[no-redef]
        from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef]
    return Requirement, default_environment


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def target_environment() -> dict[str, str]:
    """Marker values of the image: CPython on Linux, this interpreter's version, this machine's architecture."""
    _, default_environment = _packaging()
    env = dict(default_environment())
    env.update(os_name="posix", sys_platform="linux", platform_system="Linux", implementation_name="cpython",
               platform_python_implementation="CPython")
    return env


def runtime_requirements(extras: tuple[str, ...] = RUNTIME_EXTRAS) -> dict[str, str]:
    """Project name -> installed version for cvdeploy's dependencies with `extras`, transitively, as the image's
    environment evaluates their markers. Every one must be installed here: the lock pins what was tested here."""
    Requirement, _ = _packaging()
    env = target_environment()
    pinned: dict[str, str] = {}
    names: dict[str, str] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    missing: list[str] = []
    todo: list[tuple[str, frozenset[str]]] = [("cvdeploy", frozenset(extras))]
    while todo:
        dist_name, active = todo.pop()
        key = (_canon(dist_name), active)
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = md.distribution(dist_name)
        except md.PackageNotFoundError:
            missing.append(dist_name)
            continue
        if _canon(dist_name) != "cvdeploy":
            pinned[_canon(dist_name)] = dist.version
            names[_canon(dist_name)] = dist.metadata["Name"]
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is not None and not any(req.marker.evaluate({**env, "extra": e}) for e in ("", *sorted(active))):
                continue
            if _canon(req.name) == "cvdeploy":
                continue
            todo.append((req.name, frozenset(req.extras)))
    if missing:
        raise InputError(f"not installed here: {', '.join(sorted(set(missing)))}; install cvdeploy[{','.join(extras)}] "
                         "first: the lock pins the versions installed (and tested) here")
    bad = sorted(set(pinned) & set(FORBIDDEN))
    if bad:
        raise InputError(f"the runtime's dependencies pull in {', '.join(bad)}: the inference path must not need them")
    return {names[c]: pinned[c] for c in sorted(pinned)}


def lock_text(pins: dict[str, str]) -> str:
    env = target_environment()
    head = (f"# cvdeploy {__version__}'s runtime: its dependencies and the {'+'.join(RUNTIME_EXTRAS)} extra, pinned to the "
            f"versions installed where\n# `cvdeploy package docker` ran (Python {env['python_full_version']}, "
            f"{env['platform_machine']}), with their markers evaluated for Linux. No torch, no ultralytics.\n")
    return head + "".join(f"{name}=={version}\n" for name, version in pins.items())


# -- cvdeploy itself ---------------------------------------------------------------------------------------------------


def source_tree() -> Path | None:
    """The source checkout this cvdeploy runs from (an editable install), if any."""
    try:
        raw = md.distribution("cvdeploy").read_text("direct_url.json")
    except md.PackageNotFoundError:
        raw = None
    if raw:
        info = json.loads(raw)
        if info.get("dir_info", {}).get("editable") and info.get("url", "").startswith("file://"):
            root = Path(info["url"][len("file://"):])
            if (root / "pyproject.toml").is_file():
                return root
    root = Path(__file__).resolve().parents[3]
    return root if (root / "pyproject.toml").is_file() and (root / "src" / "cvdeploy").is_dir() else None


def build_wheel(dest: Path) -> Path:
    """Build cvdeploy's wheel from its source tree into `dest` (a copy of the tree: the checkout gets no build/)."""
    root = source_tree()
    if root is None:
        raise InputError("cvdeploy is not running from a source tree: give its wheel with --wheel, or --from-index to "
                         f"install cvdeploy=={__version__} from the package index")
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cvdeploy-wheel-") as tmp:
        copy = Path(tmp) / "src-tree"
        junk = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", ".*")

        def ignore(folder: str, names: list[str]) -> set[str]:  # a build/ output at the top, never cvdeploy/build
            return set(junk(folder, names)) | ({"build"} if Path(folder) == root / "src" else set())
        copy.mkdir()
        for name in ("pyproject.toml", "README.md", "LICENSE", "setup.cfg", "setup.py", "MANIFEST.in"):
            if (root / name).is_file():
                shutil.copy2(root / name, copy / name)
        shutil.copytree(root / "src", copy / "src", ignore=ignore)
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(dest), str(copy)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["(no output)"]
            raise InputError(f"building cvdeploy's wheel failed: {tail[0]} (setuptools and wheel must be installed)")
    wheels = sorted(dest.glob(f"cvdeploy-{__version__}-*.whl"))
    if not wheels:
        raise InputError(f"building cvdeploy's wheel left no cvdeploy-{__version__}-*.whl in {dest}")
    return wheels[-1]
