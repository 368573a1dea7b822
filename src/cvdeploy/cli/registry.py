"""`cvdeploy registry register|promote|rollback|list|show|history|resolve`: the model registry (docs/registry.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from cvdeploy.cli.app import app, console

if TYPE_CHECKING:
    from cvdeploy.registry import Registry, VersionInfo

registry_app = typer.Typer(no_args_is_help=True, help="The model registry: versions with lineage and changelog, aliases "
                           "(production, staging, ...) that promote and roll back; every change audited.")
app.add_typer(registry_app, name="registry")

_REGISTRY = typer.Option("cvdeploy-registry/registry.db", "--registry", envvar="CVDEPLOY_REGISTRY",
                         help="The registry database: a path or sqlite:///PATH.")
_AUDIT_LOG = typer.Option(None, "--audit-log", envvar="CVDEPLOY_REGISTRY_AUDIT_LOG",
                          help="The audit log the registry writes to [default: audit.db beside the registry].")
_AUDIT_KEY = typer.Option(None, "--audit-key-file", envvar="CVDEPLOY_REGISTRY_AUDIT_KEY_FILE",
                          help="The audit log's key (32 bytes) [default: audit.key beside the registry, made with the log].")
_JSON = typer.Option(False, "--json", help="Print the result as JSON on stdout (nothing else).")
_BY = typer.Option(None, "--by", help="Who does this, as recorded [default: the OS user, which is recorded as well].")


def _open(registry: str, audit_log: Path | None, audit_key_file: Path | None) -> Registry:
    from cvdeploy.registry import Registry

    return Registry(registry, audit_log=audit_log, audit_key_file=audit_key_file)


def _print_json(doc: Any) -> None:
    print(json.dumps(doc, indent=2), flush=True)


def _say(text: str) -> None:
    console.print(text, highlight=False, soft_wrap=True, markup=False)


@registry_app.command("register")
def register(
    bundle: Path = typer.Argument(..., help="The bundle directory to register (its hashes must verify)."),
    model: str | None = typer.Option(None, "--model", help="The model to add a version to [default: the bundle's name]."),
    data: Path | None = typer.Option(None, help="data.yaml of the controlled set: recorded with a hash of its label files."),
    controlled: Path | None = typer.Option(None, help="A controlled report (JSON of `cvdeploy doctor --data ... --json`): "
                                           "per-class mAP, recorded and compared in the changelog."),
    copy: bool = typer.Option(True, "--copy/--reference", help="Keep a copy in the registry's content-addressed store "
                              "(default), or only refer to BUNDLE's path (which must then stay)."),
    public_key: Path | None = typer.Option(None, help="Require a valid signature by this ed25519 public key (`cvdeploy sign`)."),
    note: str = typer.Option("", help="A free note kept with the version (what it is, why)."),
    by: str | None = _BY,
    registry: str = _REGISTRY,
    audit_log: Path | None = _AUDIT_LOG,
    audit_key_file: Path | None = _AUDIT_KEY,
    as_json: bool = _JSON,
) -> None:
    """Register BUNDLE as the next version of its model, with its lineage and what changed since the previous version."""
    with _open(registry, audit_log, audit_key_file) as reg:
        v = reg.register(bundle, model=model, data=data, controlled=controlled, copy=copy, by=by, note=note,
                         public_key=public_key)
    if as_json:
        _print_json(v.to_dict())
        return
    _say(f"registered {v.model} version {v.version} ({v.stored}: {v.path}), manifest {v.manifest_sha256[:12]}, "
         f"by {v.registered_by}")
    _changelog(v)


@registry_app.command("promote")
def promote(
    model: str = typer.Argument(..., help="The model."),
    alias: str = typer.Argument(..., help="The alias to move (production, staging, any name)."),
    version: str = typer.Argument(..., help="The version to point it at: a number, `latest`, or another alias."),
    reason: str = typer.Option("", help="Why, as recorded."),
    by: str | None = _BY,
    registry: str = _REGISTRY,
    audit_log: Path | None = _AUDIT_LOG,
    audit_key_file: Path | None = _AUDIT_KEY,
    as_json: bool = _JSON,
) -> None:
    """Point ALIAS of MODEL at VERSION; its previous target is kept for `rollback`."""
    with _open(registry, audit_log, audit_key_file) as reg:
        c = reg.promote(model, alias, version, by=by, reason=reason)
    if as_json:
        _print_json(c.to_dict())
    elif not c.changed:
        _say(f"{model}@{alias} already points at version {c.version}: nothing changed")
    else:
        before = f" (was version {c.previous})" if c.previous is not None else " (new alias)"
        _say(f"{model}@{alias} -> version {c.version}{before}")


@registry_app.command("rollback")
def rollback(
    model: str = typer.Argument(..., help="The model."),
    alias: str = typer.Argument(..., help="The alias to move back."),
    reason: str = typer.Option("", help="Why, as recorded."),
    by: str | None = _BY,
    registry: str = _REGISTRY,
    audit_log: Path | None = _AUDIT_LOG,
    audit_key_file: Path | None = _AUDIT_KEY,
    as_json: bool = _JSON,
) -> None:
    """Point ALIAS back at its target before its last promotion; run again to go further back through its history."""
    with _open(registry, audit_log, audit_key_file) as reg:
        c = reg.rollback(model, alias, by=by, reason=reason)
    if as_json:
        _print_json(c.to_dict())
    else:
        _say(f"{model}@{alias} -> version {c.version} (rolled back from version {c.previous})")


@registry_app.command("list")
def list_cmd(
    model: str | None = typer.Argument(None, help="List this model's versions [default: list the models]."),
    registry: str = _REGISTRY,
    as_json: bool = _JSON,
) -> None:
    """The models (versions, latest, aliases), or one model's versions."""
    from cvdeploy.cli.output import fit_table

    with _open(registry, None, None) as reg:
        if model is None:
            models = reg.models()
            if as_json:
                _print_json([m.to_dict() for m in models])
                return
            rows = [(m.name, str(m.versions), str(m.latest), ", ".join(f"{a}={v}" for a, v in m.aliases.items()) or "-")
                    for m in models]
            console.print(fit_table(console, [("model", "left"), ("versions", "right"), ("latest", "right"), ("aliases", "left")],
                                    rows, title=f"registry {reg.path}"))
            return
        versions = reg.versions(model)
    if as_json:
        _print_json([v.to_dict() for v in versions])
        return
    rows = [(str(v.version), ", ".join(v.aliases) or "-", v.registered_at, v.registered_by, v.source["sha256"][:12],
             ", ".join(v.metrics), _map(v), v.stored, v.note or "-") for v in versions]
    cols = [("version", "right"), ("aliases", "left"), ("registered", "left"), ("by", "left"), ("source", "left"),
            ("variants", "left"), ("mAP50-95", "right"), ("stored", "left"), ("note", "left")]
    console.print(fit_table(console, cols, rows, title=model))


def _map(v: VersionInfo) -> str:
    m = v.metrics.get(v.manifest["default_variant"], {}).get("map50_95")
    return "-" if m is None else f"{m:.4f}"


@registry_app.command("show")
def show(
    model: str = typer.Argument(..., help="The model."),
    version: str = typer.Argument("latest", help="A version number, `latest` or an alias."),
    registry: str = _REGISTRY,
    as_json: bool = _JSON,
) -> None:
    """A version's lineage (source, data, environment, hashes, who and when), metrics per variant, aliases and changelog."""
    with _open(registry, None, None) as reg:
        v = reg.show(model, version)
    if as_json:
        _print_json(v.to_dict())
        return
    d = v.to_dict()
    lin = d["lineage"]
    src = lin["source"]
    env = lin["environment"] or {}
    cpu = env.get("cpu", {})
    _say(f"{v.model} version {v.version}" + (f"  aliases: {', '.join(v.aliases)}" if v.aliases else "  (no alias)"))
    _say(f"  registered {v.registered_at} by {v.registered_by}" + (f" (OS user {v.os_user})" if v.os_user != v.registered_by else "")
         + (f": {v.note}" if v.note else ""))
    _say(f"  bundle     {v.path} ({v.stored}), tree sha256 {v.bundle_sha256[:16]}, manifest {v.manifest_sha256[:16]}")
    _say(f"  source     {src['file']} ({src['format']}) sha256 {src['sha256'][:16]}, exported by {src.get('exporter') or '?'}")
    if v.data:
        counts = ", ".join(f"{s} {c['images']} images/{c['label_files']} labels" for s, c in v.data["splits"].items())
        _say(f"  data       {v.data['yaml']} (labels sha256 {v.data['labels_sha256'][:16]}; {counts})")
    else:
        _say("  data       not recorded (register with --data DATA.yaml)")
    if lin["profile"]:
        _say(f"  profiled   {lin['profile']['images']} images: {lin['profile'].get('source') or '?'}")
    _say(f"  built      {lin['built_at']} with cvdeploy {lin['cvdeploy_version']}, Python {env.get('python', '?')}, "
         f"{cpu.get('model', '?')}; " + ", ".join(f"{k} {val}" for k, val in env.get("packages", {}).items()))
    _say(f"  task       {d['task']}, {len(d['names'])} classes ({', '.join(d['names'].values())}), imgsz "
         f"{'x'.join(map(str, d['imgsz']))}, default variant {d['default_variant']}")
    _metrics_table(v)
    if v.class_metrics:
        _say("  per-class mAP50-95: " + "; ".join(f"{var}: " + ", ".join(f"{c} {x:.3f}" if x is not None else f"{c} -"
                                                                          for c, x in cls.items())
                                              for var, cls in v.class_metrics.items()))
    _changelog(v)


def _metrics_table(v: VersionInfo) -> None:
    from cvdeploy.cli.output import fit_table

    keys = {"map50_95": "mAP50-95", "map50": "mAP50", "map50_95_drop_points": "drop pts", "box_agreement": "box agreement",
            "latency_ms_b1": "ms b1", "speedup_vs_fp32": "vs fp32"}
    rows = [(name, *(("-" if k not in mt else f"{mt[k]:g}") for k in keys)) for name, mt in v.metrics.items()]
    console.print(fit_table(console, [("variant", "left"), *((h, "right") for h in keys.values())], rows,
                            title="metrics per variant (build machine)"))


def _changelog(v: VersionInfo) -> None:
    from cvdeploy.registry.changelog import lines

    for line in lines(v.changelog):
        _say(line)


@registry_app.command("history")
def history(
    model: str = typer.Argument(..., help="The model."),
    alias: str | None = typer.Argument(None, help="Only this alias."),
    registry: str = _REGISTRY,
    as_json: bool = _JSON,
) -> None:
    """Every promotion and rollback of MODEL's aliases, oldest first (an undone promotion is marked)."""
    from cvdeploy.cli.output import fit_table

    with _open(registry, None, None) as reg:
        events = reg.history(model, alias)
    if as_json:
        _print_json([e.to_dict() for e in events])
        return
    rows = [(str(e.id), e.alias, e.action + (" (rolled back)" if e.undone else ""), "-" if e.previous is None else str(e.previous),
             str(e.version), e.at, e.by, e.reason or "-") for e in events]
    cols = [("#", "right"), ("alias", "left"), ("action", "left"), ("from", "right"), ("to", "right"), ("at", "left"),
            ("by", "left"), ("reason", "left")]
    console.print(fit_table(console, cols, rows, title=f"{model} aliases"))


@registry_app.command("resolve")
def resolve(
    model: str = typer.Argument(..., help="The model."),
    version: str = typer.Argument("latest", help="A version number, `latest` or an alias."),
    registry: str = _REGISTRY,
    as_json: bool = _JSON,
) -> None:
    """Print the bundle path VERSION (a number, `latest` or an alias) of MODEL resolves to.

    For scripts: `cvdeploy serve $(cvdeploy registry resolve MODEL production)`."""
    with _open(registry, None, None) as reg:
        path = reg.resolve(model, version)
        if as_json:
            v = reg.show(model, version)
            _print_json({"model": model, "ref": version, "version": v.version, "path": str(path)})
            return
    print(path, flush=True)
