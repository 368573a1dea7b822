"""Deployment generators. Here: what a package serves (`load_source`), its object names (`dns_name`) and the output
directory it is written to (`clear_output`), shared by the container build context (`docker`), the Kubernetes and KServe
manifests (`k8s`), the Helm chart (`helm`) and the monitoring files (`monitoring`), none of which imports the server,
torch or ultralytics; the other modules of this package add further targets."""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cvdeploy.errors import InputError

MODELS_DIR = "/models"  # where the image holds the model repository (DIR/<model>/<version>/ bundles)
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


@dataclass(frozen=True)
class ModelSource:
    """What a package serves: one bundle (served as version 1 of the model named in its manifest) or a model
    repository (DIR/<model>/<version>/ bundles, each model named after its folder), as `cvdeploy serve` reads them."""

    kind: Literal["bundle", "repository"]
    path: Path
    models: dict[str, dict[str, Any]]  # model name -> {version: Bundle}, versions in serving order

    @property
    def bundles(self) -> list[Any]:
        return [b for versions in self.models.values() for b in versions.values()]

    @property
    def name(self) -> str:
        """The package's name: the model's for one model, else the repository folder's."""
        return next(iter(self.models)) if len(self.models) == 1 else self.path.name

    def layout(self) -> dict[str, Path]:
        """Repository-relative destination (`<model>/<version>`) -> the bundle directory to copy there."""
        return {f"{name}/{v}": Path(b.root) for name, versions in self.models.items() for v, b in versions.items()}


def load_source(path: str | Path) -> ModelSource:
    """Load a bundle or a model repository, checking every bundle's hashes as the server will."""
    from cvdeploy.bundle.bundle import Bundle

    p = Path(path)
    if not p.is_dir():
        raise InputError(f"{p} is not a bundle or a model repository (a directory)")
    if (p / "manifest.json").is_file():
        b = Bundle.load(p)
        return ModelSource("bundle", p, {b.name: {"1": b}})
    models: dict[str, dict[str, Any]] = {}
    for d in sorted(x for x in p.iterdir() if x.is_dir()):
        versions = sorted((v.name for v in d.iterdir() if (v / "manifest.json").is_file()), key=_version_key)
        if versions:
            models[d.name] = {v: Bundle.load(d / v) for v in versions}
    if not models:
        raise InputError(f"{p} is neither a bundle (DIR/manifest.json) nor a model repository (DIR/<model>/<version>/manifest.json)")
    return ModelSource("repository", p, models)


def dns_name(text: str) -> str:
    """`text` as a Kubernetes object name (RFC 1035 label: lower case, digits and '-', a letter first, 63 at most)."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    name = re.sub(r"^[^a-z]+", "", name)[:63].rstrip("-")
    if not _DNS_LABEL.match(name):
        raise InputError(f"cannot make a Kubernetes name of {text!r}: give one with --name (lower case letters, digits, '-')")
    return name


def check_dns_name(name: str, what: str = "--name") -> str:
    if not _DNS_LABEL.match(name) or len(name) > 63:
        raise InputError(f"{what} {name!r} is not a valid name: lower case letters, digits and '-', a letter first, 63 at most")
    return name


def clear_output(out: str | os.PathLike[str], force: bool, *, choose: str = "another -o") -> Path:
    """`out` as a path to write a generator's output to: refused when it exists (a package is never written over what
    is there), unless `force`, then removed with everything in it."""
    root = Path(out)
    if root.exists():
        if not force:
            raise InputError(f"{root} already exists; choose {choose} or pass --force to replace it")
        shutil.rmtree(root)
    return root


def _version_key(v: str) -> tuple[int, str]:
    return (int(v), v) if v.isdigit() else (10**9, v)


# YAML 1.2 (Go's yaml, which kubectl, Helm and Docker Compose read) takes `123456e78901`, `0x1f` or `0o17` as numbers,
# where PyYAML's YAML 1.1 resolver dumps them as plain strings: an image tag made of hex digits then broke `helm lint`.
_YAML12_NUMBER = re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$|^0x[0-9a-fA-F]+$|^0o[0-7]+$"
                            r"|^[-+]?\.(inf|Inf|INF)$|^\.(nan|NaN|NAN)$")


def dump_yaml(doc: Any, **kwargs: Any) -> str:
    """`yaml.safe_dump`, with every string a YAML 1.2 reader would take for a number quoted."""
    import yaml

    class _Dumper(yaml.SafeDumper):
        pass

    def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
        if _YAML12_NUMBER.match(value):
            return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="'")
        return dumper.represent_str(value)

    _Dumper.add_representer(str, _str)
    return yaml.dump(doc, Dumper=_Dumper, **kwargs)
