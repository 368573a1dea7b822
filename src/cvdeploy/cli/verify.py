"""`cvdeploy verify BUNDLE`: hashes, golden parity on this machine's engine, and optionally mAP, per variant."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from cvdeploy.cli.app import app, console, fail


@app.command()
def verify(
    bundle: Path = typer.Argument(..., help="A bundle directory."),
    data: Path | None = typer.Option(None, help="data.yaml of the controlled dataset: also re-measure each variant's mAP."),
    map_tolerance: float = typer.Option(0.5, min=0.0, help="mAP50-95 points a variant may lose against its recorded figure."),
    provider: str | None = typer.Option(None, help="Execution provider to check with (default: the best present)."),
    as_json: Path | None = typer.Option(None, "--json", help="Also write the checks to this JSON file."),
    key_file: Path | None = typer.Option(None, help="The model key of a protected bundle (else $CVDEPLOY_MODEL_KEY_FILE, ...)."),
    public_key: Path | None = typer.Option(None, "--public-key", help="Require a valid signature by this ed25519 public key "
                                           "(PEM, from `cvdeploy security sign-key`); see `cvdeploy sign`."),
) -> None:
    """Re-check a bundle: its signature (with --public-key), file hashes, every variant's golden parity with this machine's
    engine, and its mAP."""
    from cvdeploy.evaluate.verify import verify_bundle

    if data is not None and not data.is_file():
        raise fail(f"--data: {data} not found")
    if public_key is not None:
        from cvdeploy.bundle.bundle import Bundle

        # Before any parity run: an unsigned or re-written bundle is refused whatever its outputs are.
        signer = Bundle.load(bundle, public_key=public_key).signed_by
        console.print(f"signature: valid, by key {signer}", highlight=False)
    with console.status("verifying") as status:
        key = None
        if key_file is not None:
            from cvdeploy.security.protect import load_key

            key = load_key(key_file)
        checks = verify_bundle(bundle, data=data, map_tolerance=map_tolerance, providers=(provider,) if provider else None,
                               on_step=lambda v, s: status.update(f"verifying {v}: {s}"), model_key=key)
    console.print(f"hashes: every variant and golden file of {bundle} matches its sha256")
    table = Table(title=f"golden parity on {checks[0].provider}" + (" and mAP" if data else ""), title_style="bold")
    for col in ("variant", "max |Δ| scores", "at build", "tolerance", "box agreement", "mAP50-95", "at build", "verdict"):
        table.add_column(col, justify="left" if col in ("variant", "verdict") else "right")
    for c in checks:
        table.add_row(c.name, f"{c.max_abs_scores:.2e}", "-" if c.recorded_max_abs_scores is None else f"{c.recorded_max_abs_scores:.2e}",
                      f"{c.tolerance:g}", f"{c.box_agreement:.0%}", "-" if c.map50_95 is None else f"{c.map50_95:.4f}",
                      "-" if c.recorded_map50_95 is None else f"{c.recorded_map50_95:.4f}",
                      "[green]ok[/]" if c.ok else "[bold red]DRIFTED[/]")
    console.print(table)
    if as_json is not None:
        as_json.write_text(json.dumps([c.to_dict() for c in checks], indent=2))
    for c in checks:
        if c.ok:
            for d in c.differences:
                console.print(f"{c.name}: note: {d}", highlight=False)
    bad = [c for c in checks if not c.ok]
    for c in bad:
        for p in c.problems:
            console.print(f"[bold red]{c.name}:[/] {p}", highlight=False)
    if bad:
        raise fail(f"{len(bad)} of {len(checks)} variant(s) drifted: {', '.join(c.name for c in bad)}")
    console.print(f"verified: {len(checks)} variant(s) match what was built")
