"""`cvdeploy verify BUNDLE`: hashes, golden parity on this machine's engine, and optionally the task's accuracy, per
variant (mAP50-95 of boxes, masks, keypoints or rotated boxes; top-1 for a classifier)."""

from __future__ import annotations

from pathlib import Path

import typer

from cvdeploy.cli.app import app, fail
from cvdeploy.cli.output import fit_table, json_to_stdout, result_console, write_json
from cvdeploy.cli.output import progress as progress_bar


@app.command()
def verify(
    bundle: Path = typer.Argument(..., help="A bundle directory."),
    data: Path | None = typer.Option(None, help="The controlled dataset (a data.yaml; a classify dataset's directory): also "
                                     "re-measure each variant's accuracy in its task's figure."),
    map_tolerance: float = typer.Option(0.5, min=0.0, help="Points (0.01) of the task's figure (mAP50-95, or top-1) a "
                                        "variant may lose against its recorded figure."),
    provider: str | None = typer.Option(None, help="Execution provider to check with (default: the best present)."),
    as_json: Path | None = typer.Option(None, "--json", help="Also write the checks to this JSON file; `--json -` prints them "
                                        "on stdout instead (the table then goes to stderr)."),
    key_file: Path | None = typer.Option(None, help="The model key of a protected bundle (else $CVDEPLOY_MODEL_KEY_FILE, ...)."),
    public_key: Path | None = typer.Option(None, "--public-key", help="Require a valid signature by this ed25519 public key "
                                           "(PEM, from `cvdeploy security sign-key`); see `cvdeploy sign`."),
) -> None:
    """Re-check a bundle: its signature (with --public-key), file hashes, every variant's golden parity with this machine's
    engine, and its accuracy (--data)."""
    from cvdeploy.bundle.bundle import Bundle
    from cvdeploy.evaluate.verify import verify_bundle

    console = result_console(as_json)

    if data is not None and not (data.is_file() or data.is_dir()):
        raise fail(f"--data: {data} not found")
    if public_key is not None:
        # Before any parity run: an unsigned or re-written bundle is refused whatever its outputs are.
        signer = Bundle.load(bundle, public_key=public_key).signed_by
        console.print(f"signature: valid, by key {signer}", highlight=False)
    key = None
    if key_file is not None:
        from cvdeploy.security.protect import load_key

        key = load_key(key_file)
    # Counted steps (golden parity, and accuracy with --data, for each variant) with the time left, not a bare spinner.
    n_variants = len(Bundle.load(bundle, check_hashes=False).manifest.variants)
    with progress_bar() as progress:
        task = progress.add_task("verifying", total=n_variants * (2 if data is not None else 1))
        steps: list[str] = []

        def on_step(variant: str, step: str) -> None:
            if steps:
                progress.advance(task)
            steps.append(step)
            progress.update(task, description=f"verifying {variant}: {step}")

        checks = verify_bundle(bundle, data=data, map_tolerance=map_tolerance, providers=(provider,) if provider else None,
                               on_step=on_step, model_key=key)
        progress.update(task, completed=progress.tasks[0].total, description="verified")
    console.print(f"hashes: every variant and golden file of {bundle} matches its sha256", highlight=False, soft_wrap=True)
    # The accuracy columns only with --data: without a new measurement there is nothing to compare the recorded figure with.
    metric = next((c.metric for c in checks if c.metric), "mAP50-95")
    rows = [(c.name, f"{c.max_abs_scores:.2e}", "-" if c.recorded_max_abs_scores is None else f"{c.recorded_max_abs_scores:.2e}",
             f"{c.tolerance:g}", f"{c.box_agreement:.0%}",
             *(("-" if c.accuracy is None else f"{c.accuracy:.4f}",
                "-" if c.recorded_accuracy is None else f"{c.recorded_accuracy:.4f}") if data is not None else ()),
             "[green]ok[/]" if c.ok else "[bold red]DRIFTED[/]") for c in checks]
    names = ("variant", "max |Δ| scores", "at build", "tolerance", "box agreement",
             *((metric, f"{metric} at build") if data is not None else ()), "verdict")
    columns = [(col, "left" if col in ("variant", "verdict") else "right") for col in names]
    console.print(fit_table(console, columns, rows, title=f"golden parity on {checks[0].provider}" + (f" and {metric}" if data else ""),
                            title_style="bold"))
    if as_json is not None:
        write_json(as_json, [c.to_dict() for c in checks])
        if not json_to_stdout(as_json):
            console.print(f"checks written to {as_json}", highlight=False, soft_wrap=True)
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
