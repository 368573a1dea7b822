"""The rules every generated Dockerfile keeps (`RULES`), checked by `check_dockerfile`; hadolint checks the rest
(tests/deploy/test_docker.py). Pure text checks: no Docker needed."""

from __future__ import annotations

import json
import re
from pathlib import Path

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


def instructions(text: str) -> list[tuple[str, str]]:
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
    ins = instructions(text)
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
