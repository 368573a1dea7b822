"""`cvdeploy data`: datasets; `data shapes` writes the synthetic shapes dataset."""

from __future__ import annotations

from pathlib import Path

import typer

from cvdeploy.cli.app import app, console
from cvdeploy.cli.output import progress as progress_bar

data_app = typer.Typer(help="Datasets: generate the synthetic shapes set.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("shapes")
def shapes(
    out: Path = typer.Argument(..., help="Output directory (images/, labels/, data.yaml)."),
    n_train: int = typer.Option(400, "--n-train", min=0, help="Training images."),
    n_val: int = typer.Option(100, "--n-val", min=1, help="Validation images."),
    seed: int = typer.Option(0, min=0, help="Seed: the same seed gives the same dataset."),
) -> None:
    """Generate a deterministic YOLO-format shapes dataset (varied sizes, textured backgrounds, small objects)."""
    from cvdeploy.demo.shapes import generate_shapes

    with progress_bar() as progress:
        task = progress.add_task("shapes", total=n_train + n_val)
        data_yaml = generate_shapes(out, n_train=n_train, n_val=n_val, seed=seed,
                                    progress=lambda k: progress.advance(task, k))
    console.print(f"dataset written: {data_yaml}", soft_wrap=True)
