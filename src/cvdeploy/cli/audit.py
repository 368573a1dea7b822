"""`cvdeploy audit verify|anchor|review`: check the audit log's hash chain against its anchors; anchor it; flag suspicious activity."""

from __future__ import annotations

from pathlib import Path

import typer

from cvdeploy.cli.app import app, console, fail

audit_app = typer.Typer(no_args_is_help=True, help="The tamper-evident audit log.")
app.add_typer(audit_app, name="audit")


def _audit_key(key_file: Path) -> bytes:
    """The key, with errors that say "audit key": load_key's own messages speak of model keys."""
    from cvdeploy.errors import InputError
    from cvdeploy.security.protect import parse_key

    if not key_file.is_file():
        raise InputError(f"audit key file not found: {key_file}")
    try:
        return parse_key(key_file.read_bytes())
    except InputError:
        raise InputError(f"{key_file}: the audit key must be 32 bytes (raw, hex or base64)") from None


@audit_app.command("verify")
def verify_cmd(
    log: Path = typer.Argument(..., help="The audit log (SQLite)."),
    key_file: Path = typer.Option(..., help="The audit key (32 bytes, raw, hex or base64)."),
    anchors: Path | None = typer.Option(None, help="The anchor file (JSON lines, `cvdeploy audit anchor`): detects truncation, "
                                                   "wipe and rewrite."),
    anchor: Path | None = typer.Option(None, help="A checkpoint exported earlier with AuditLog.export_checkpoint."),
) -> None:
    """Recompute the HMAC chain, the checkpoints and the anchors; exit 1 naming the first entry edited, deleted, reordered or
    inserted, or the truncation, wipe or rewrite an anchor reveals."""
    from cvdeploy.security.audit import verify

    v = verify(log, _audit_key(key_file), anchor, anchors=anchors)
    summary = f"audit log {log}: {v.entries} entries, last sequence number {v.last_seq}"
    if not v.ok:
        console.print(summary, soft_wrap=True, highlight=False)
        for p in v.problems:
            console.print(f"[bold red]{p}[/]", highlight=False, soft_wrap=True)
        raise fail(f"the audit log {log} was tampered with ({len(v.problems)} problem(s))")
    checked = "chain and checkpoints intact"
    if v.anchor is not None:
        a = v.anchor
        checked += (f"; consistent with the newest of {v.anchors_valid} anchor(s) ({a['entries']} entries up to entry "
                    f"{a['last_seq']})")
    console.print(f"{summary}; {checked}", soft_wrap=True, highlight=False)


@audit_app.command("anchor")
def anchor_cmd(
    log: Path = typer.Argument(..., help="The audit log (SQLite)."),
    key_file: Path = typer.Option(..., help="The audit key (32 bytes, raw, hex or base64)."),
    out: Path = typer.Option(..., help="The anchor file to append to (JSON lines, created mode 600). Keep it apart from the log."),
) -> None:
    """Append a signed anchor of the log (entry count, last sequence number, chain head) to OUT.

    The log is verified first, against OUT's anchors when it has any: anchoring a log that was already cut or
    rewritten would make its present state look legitimate, so that is refused.
    """
    from cvdeploy.security.audit import make_anchor, verify, write_anchor

    key = _audit_key(key_file)
    if out.resolve() in {log.resolve(), *(log.with_name(log.name + s).resolve() for s in ("-wal", "-shm", "-journal"))}:
        raise fail(f"--out {out} is one of the audit log's own files: keep anchors apart from the log")
    has_anchors = out.is_file() and out.stat().st_size > 0
    # Read-only: anchoring must not write to a database a running server is appending to.
    v = verify(log, key, anchors=out if has_anchors else None)
    if not v.ok:
        for p in v.problems:
            console.print(f"[bold red]{p}[/]", highlight=False, soft_wrap=True)
        raise fail(f"not anchoring {log}: it fails verification ({len(v.problems)} problem(s))")
    a = make_anchor(key, entries=v.entries, last_seq=v.last_seq, head_mac=v.head_mac)
    write_anchor(out, a)
    console.print(f"anchored {log}: {a['entries']} entries up to entry {a['last_seq']} (head {a['head_mac'][:12]}) in {out}",
                  soft_wrap=True, highlight=False)


@audit_app.command("review")
def review_cmd(log: Path = typer.Argument(..., help="The audit log (SQLite).")) -> None:
    """Flag bursts of failed logins, denials, revoked keys, rare addresses and quiet-hour activity."""
    from cvdeploy.security.audit import review

    flags = review(log)
    for f in flags:
        console.print(f"[yellow]{f}[/]", highlight=False)
    console.print(f"{len(flags)} flag(s)")
