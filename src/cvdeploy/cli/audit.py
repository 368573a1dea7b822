"""`cvdeploy audit verify|review`: check the audit log's hash chain; flag suspicious activity."""

from __future__ import annotations

from pathlib import Path

import typer

from cvdeploy.cli.app import app, console, fail

audit_app = typer.Typer(no_args_is_help=True, help="The tamper-evident audit log.")
app.add_typer(audit_app, name="audit")


@audit_app.command("verify")
def verify_cmd(
    log: Path = typer.Argument(..., help="The audit log (SQLite)."),
    key_file: Path = typer.Option(..., help="The audit key (32 bytes, raw, hex or base64)."),
    anchor: Path | None = typer.Option(None, help="A checkpoint exported earlier (detects truncation after it)."),
) -> None:
    """Recompute the HMAC chain and the checkpoints; exit 1 naming the first entry edited, deleted, reordered or inserted."""
    from cvdeploy.security.audit import verify
    from cvdeploy.security.protect import load_key

    v = verify(log, load_key(key_file), anchor)
    if not v.ok:
        for p in v.problems:
            console.print(f"[bold red]{p}[/]", highlight=False, soft_wrap=True)
        raise fail(f"the audit log {log} was tampered with ({len(v.problems)} problem(s))")
    console.print(f"audit log {log}: {v.entries} entries, chain and checkpoints intact", soft_wrap=True)


@audit_app.command("review")
def review_cmd(log: Path = typer.Argument(..., help="The audit log (SQLite).")) -> None:
    """Flag bursts of failed logins, denials, revoked keys, rare addresses and quiet-hour activity."""
    from cvdeploy.security.audit import review

    flags = review(log)
    for f in flags:
        console.print(f"[yellow]{f}[/]", highlight=False)
    console.print(f"{len(flags)} flag(s)")
