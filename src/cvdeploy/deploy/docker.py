"""A container build context for serving bundles: a multi-stage Dockerfile, .dockerignore, compose.yaml, the pinned
runtime lock (requirements-runtime.txt), cvdeploy's wheel and the bundles in a model repository (models/).

The runtime image holds cvdeploy's base dependencies and the serve extra only (no torch, no ultralytics), runs as an
unprivileged user, works with a read-only root filesystem (only /tmp must be writable: a tmpfs or an emptyDir) and
checks its own readiness (HEALTHCHECK on /v2/health/ready). `check_dockerfile` holds the rules every generated
Dockerfile keeps; hadolint checks the rest (tests/deploy/test_docker.py).
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cvdeploy import __version__
from cvdeploy.deploy import MODELS_DIR, ModelSource, dns_name
from cvdeploy.deploy import k8s as k
from cvdeploy.errors import InputError

RUNTIME_EXTRAS = ("serve",)
FORBIDDEN = ("torch", "torchvision", "ultralytics")  # never on the inference path (docs/design.md)
VENV = "/opt/venv"
LOCK = "requirements-runtime.txt"

# The image's own readiness check: Python's standard library only (the slim image has no curl). The certificate is not
# verified: this is the container asking itself over loopback, where a certificate's names never match 127.0.0.1.
HEALTH_SCRIPT = ("import os, ssl, sys, urllib.request as u; "
                 "url = os.environ.get('CVDEPLOY_HEALTH_URL', '{url}'); "
                 "sys.exit(0 if u.urlopen(url, timeout=2, context=ssl._create_unverified_context()).status == 200 else 1)")


@dataclass(frozen=True)
class DockerContext:
    root: Path
    dockerfile: Path
    compose: Path
    lock: Path
    image: str
    wheel: str  # what the builder installs cvdeploy from: a wheel in wheels/, or a pinned requirement
    files: list[Path]


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


# -- the files ---------------------------------------------------------------------------------------------------------


def default_base_image() -> str:
    """The official slim image of this interpreter's exact version: the lock was resolved against it."""
    v = sys.version_info
    return f"python:{v.major}.{v.minor}.{v.micro}-slim-bookworm"


def dockerfile(*, base_image: str, install: str, image: str, name: str, serve_args: list[str], port: int, startup_s: int,
               bundles: str, tls: bool = False) -> str:
    health_url = f"{'https' if tls else 'http'}://127.0.0.1:{port}/v2/health/ready"
    health = json.dumps(["python", "-c", HEALTH_SCRIPT.format(url=health_url)])
    return f"""\
# syntax=docker/dockerfile:1
# cvdeploy {__version__}: the inference server for {name} ({bundles}).
# Build: docker build -t {image} .       Run: docker compose up (read-only root filesystem, /tmp on a tmpfs)
# Generated by `cvdeploy package docker`; regenerate rather than edit.
ARG PYTHON_IMAGE={base_image}

FROM ${{PYTHON_IMAGE}} AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
WORKDIR /build
COPY {LOCK} ./
COPY wheels/ ./wheels/
# The runtime's dependencies, each pinned, from wheels only; then cvdeploy itself without dependencies; then proof that
# neither torch nor ultralytics came along.
RUN python -m venv {VENV} \\
    && {VENV}/bin/pip install --no-cache-dir --only-binary=:all: -r {LOCK} \\
    && {VENV}/bin/pip install --no-cache-dir --no-deps {install} \\
    && {VENV}/bin/python -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) for m in {FORBIDDEN!r}))"

FROM ${{PYTHON_IMAGE}} AS runtime
LABEL org.opencontainers.image.title="{name}" \\
      org.opencontainers.image.description="cvdeploy inference server (Open Inference Protocol v2)" \\
      org.opencontainers.image.version="{__version__}" \\
      io.cvdeploy.bundles="{bundles}"
RUN groupadd --system --gid {k.UID} cvdeploy \\
    && useradd --system --uid {k.UID} --gid {k.UID} --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin cvdeploy
COPY --from=builder {VENV} {VENV}
# The models belong to root and are read-only to the server: what it serves cannot be changed from inside.
COPY models/ {MODELS_DIR}/
# HOME and TMPDIR on /tmp: the only place that must be writable (mount a tmpfs there with a read-only root).
ENV PATH={VENV}/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HOME=/tmp TMPDIR=/tmp
USER {k.UID}:{k.UID}
EXPOSE {port}
HEALTHCHECK --interval=10s --timeout=3s --start-period={startup_s}s --retries=3 CMD {health}
STOPSIGNAL SIGTERM
ENTRYPOINT ["cvdeploy", "serve"]
CMD {json.dumps(serve_args)}
"""


DOCKERIGNORE = f"""\
# An allow-list: only what the Dockerfile copies goes to the builder (never the compose file, keys or notes).
*
!{LOCK}
!wheels/
!models/
**/__pycache__
**/*.pyc
"""


def compose(*, name: str, image: str, port: int, sizing: k.Sizing, stop_grace_s: int) -> dict[str, Any]:
    return {"services": {name: {
        "build": {"context": ".", "target": "runtime"},
        "image": image,
        "ports": [f"127.0.0.1:{port}:{port}"],  # loopback only: without TLS and API keys it must not face a network
        "read_only": True,
        "tmpfs": ["/tmp:size=256m,mode=1777"],
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges:true"],
        "deploy": {"resources": {"limits": {"cpus": str(sizing.cpu), "memory": f"{sizing.memory_mib}M"}}},
        "stop_grace_period": f"{stop_grace_s}s",
        "restart": "unless-stopped",
    }}}


COMPOSE_HEADER = """\
# docker compose up --build: the server on http://127.0.0.1:{port} with a read-only root filesystem and /tmp on a
# tmpfs. For TLS or API keys, mount them read-only and add the flags to `command:` (see docs/deploy.md):
#   volumes: ["./tls:/run/tls:ro"]   command: [..., "--tls-cert", "/run/tls/tls.crt", "--tls-key", "/run/tls/tls.key"]
"""


def _copy_bundles(source: ModelSource, models: Path) -> None:
    """The bundles into a model repository (<model>/<version>/), readable by the image's user whatever their modes."""
    for rel, src in source.layout().items():
        dest = models / rel
        shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__"))
    for root, dirs, files in os.walk(models):
        os.chmod(root, 0o755)
        for f in files:
            os.chmod(os.path.join(root, f), 0o644)
        dirs.sort()


def _check_engines(source: ModelSource) -> None:
    for name, versions in source.models.items():
        for v, b in versions.items():
            variant = b.manifest.variants[b.manifest.default_variant]
            if variant.engine != "onnxruntime":
                raise InputError(f"{name}/{v}: its default variant {b.manifest.default_variant} runs on {variant.engine}, "
                                 "and the runtime image carries ONNX Runtime only: choose an ONNX default variant")


def write_docker(source: ModelSource, out: str | os.PathLike[str], *, port: int = k.PORT, base_image: str | None = None,
                 image: str | None = None, wheel: str | os.PathLike[str] | None = None, from_index: bool = False,
                 force: bool = False, max_batch: int = 8, inflight_mib: int = 256) -> DockerContext:
    """Write the build context for serving `source` to `out` (a new directory, or replaced with `force`)."""
    root = Path(out)
    if root.exists():
        if not force:
            raise InputError(f"{root} already exists; choose another -o or pass --force to replace it")
        shutil.rmtree(root)
    _check_engines(source)
    pins = runtime_requirements()
    name = dns_name(source.name)
    image = image or k.default_image(source)
    sizing = k.size_for(source, max_batch=max_batch, inflight_mib=inflight_mib)
    options = k.K8sOptions(name=name, image=image, max_batch=max_batch)
    args = k.serve_args(options, sizing, port)
    root.mkdir(parents=True)
    try:
        wheels = root / "wheels"
        wheels.mkdir()
        (wheels / ".keep").write_text("")  # COPY wheels/ needs the folder even when cvdeploy comes from the index
        if from_index:
            install = f"cvdeploy=={__version__}"
        elif wheel is not None:
            w = Path(wheel)
            if not w.is_file() or not w.name.startswith("cvdeploy-") or w.suffix != ".whl":
                raise InputError(f"--wheel {w}: not a cvdeploy wheel file")
            shutil.copy2(w, wheels / w.name)
            install = f"wheels/{w.name}"
        else:
            install = f"wheels/{build_wheel(wheels).name}"
        _copy_bundles(source, root / "models")
        bundles = k._bundles_annotation(source)
        (root / LOCK).write_text(lock_text(pins))
        (root / "Dockerfile").write_text(dockerfile(base_image=base_image or default_base_image(), install=install, image=image,
                                                    name=name, serve_args=args, port=port, startup_s=sizing.startup_s,
                                                    bundles=bundles))
        (root / ".dockerignore").write_text(DOCKERIGNORE)
        (root / "compose.yaml").write_text(COMPOSE_HEADER.format(port=port) + yaml.safe_dump(
            compose(name=name, image=image, port=port, sizing=sizing, stop_grace_s=k.termination_grace_s()), sort_keys=False))
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return DockerContext(root, root / "Dockerfile", root / "compose.yaml", root / LOCK, image, install, files)


# -- the rules ---------------------------------------------------------------------------------------------------------

RULES = {
    "base-tag": "every FROM names an explicit tag or digest, never `latest` (a rebuild must get the same base)",
    "user": "the last USER is a numeric, non-root uid (Kubernetes' runAsNonRoot can check only a number)",
    "healthcheck": "a HEALTHCHECK that asks /v2/health/ready",
    "expose": "an EXPOSE of the port the server listens on",
    "add-url": "no ADD of a URL (unverified downloads): COPY what the context holds",
    "pip-pinned": "pip installs only pinned requirements (-r LOCK, a wheel file or name==version), without a cache",
    "no-torch": "neither torch nor ultralytics is installed or copied into the runtime",
    "entrypoint": "ENTRYPOINT and CMD in exec (JSON) form, so that the server is PID 1 and gets SIGTERM",
    "multi-stage": "a builder stage and a runtime stage; the runtime copies only the built environment from it",
}


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def check_dockerfile(text: str, port: int | None = None) -> list[str]:
    """The rules (`RULES`) this Dockerfile breaks, as 'rule: what was found'; [] when it keeps them all."""
    ins = _instructions(text)
    args = {}
    for word, rest in ins:
        if word == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            args[key.strip()] = value.strip()
    found: list[str] = []
    froms = [rest for word, rest in ins if word == "FROM"]
    for rest in froms:
        ref = rest.split()[0]
        ref = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), ref)
        last = ref.rsplit("/", 1)[-1]
        if "@" not in last and (":" not in last or last.endswith(":latest")):
            found.append(f"base-tag: FROM {ref}")
    stages = [rest.split() for rest in froms]
    if len(stages) < 2 or not any(len(s) >= 3 and s[1].upper() == "AS" for s in stages[:-1]):
        found.append("multi-stage: fewer than two named stages")
    runtime_start = max((i for i, (w, _) in enumerate(ins) if w == "FROM"), default=0)
    runtime = ins[runtime_start:]
    users = [rest for word, rest in runtime if word == "USER"]
    if not users:
        found.append("user: no USER in the runtime stage (it would run as root)")
    else:
        uid = users[-1].split(":")[0]
        if not uid.isdigit() or int(uid) == 0:
            found.append(f"user: USER {users[-1]}")
    health = [rest for word, rest in runtime if word == "HEALTHCHECK"]
    if not health or "/v2/health/ready" not in health[-1] or health[-1].upper().startswith("NONE"):
        found.append("healthcheck: none asks /v2/health/ready")
    exposed = [rest for word, rest in runtime if word == "EXPOSE"]
    if not exposed or (port is not None and not any(str(port) in e.split() or f"{port}/tcp" in e.split() for e in exposed)):
        found.append(f"expose: {exposed or 'no EXPOSE'}")
    for word, rest in ins:
        if word == "ADD" and re.search(r"\b(https?|ftp)://", rest):
            found.append(f"add-url: ADD {rest}")
        if word == "RUN":
            for cmd in re.split(r"&&|;|\|\|", rest):
                found += _pip_findings(cmd.strip())
        if word in ("RUN", "COPY", "ADD") and re.search(r"\b(torch|torchvision|ultralytics)\b", rest) and "find_spec" not in rest:
            found.append(f"no-torch: {word} {rest}")
    for word in ("ENTRYPOINT", "CMD"):
        last = [rest for w, rest in runtime if w == word]
        if not last:
            found.append(f"entrypoint: no {word}")
            continue
        try:
            ok = isinstance(json.loads(last[-1]), list)
        except ValueError:
            ok = False
        if not ok:
            found.append(f"entrypoint: {word} {last[-1]} is not in exec form")
    copies = [rest for word, rest in runtime if word == "COPY" and "--from=" in rest]
    if not copies:
        found.append("multi-stage: the runtime copies nothing from the builder")
    return found


def _pip_findings(cmd: str) -> list[str]:
    words = cmd.split()
    if "pip" not in {Path(w).name for w in words[:2]} and not (len(words) > 2 and words[1:3] == ["-m", "pip"]):
        return []
    if "install" not in words:
        return []
    out = []
    if "--no-cache-dir" not in words:
        out.append(f"pip-pinned: {cmd} (no --no-cache-dir)")
    rest = words[words.index("install") + 1:]
    skip_next = False
    for w in rest:
        if skip_next:
            skip_next = False
            continue
        if w in ("-r", "--requirement", "-c", "--constraint", "-w", "--target", "--index-url", "--extra-index-url"):
            skip_next = True
            continue
        if w.startswith("-"):
            continue
        if not (w.endswith(".whl") or re.fullmatch(r"[A-Za-z0-9_.\-\[\],]+==[A-Za-z0-9_.+!\-]+", w)):
            out.append(f"pip-pinned: {w} is not pinned")
    return out

