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
    out: Path = typer.Argument(..., help="Output directory (images/, labels/, data.yaml; classify: train/, val/)."),
    n_train: int = typer.Option(400, "--n-train", min=0, help="Training images (classify: crops)."),
    n_val: int = typer.Option(100, "--n-val", min=1, help="Validation images (classify: crops, at least 6)."),
    seed: int = typer.Option(0, min=0, help="Seed: the same seed gives the same dataset."),
    task: str = typer.Option("detect", "--task", help="detect, segment, pose, obb or classify: which labels to write."),
) -> None:
    """Generate a deterministic shapes dataset (varied sizes, textured backgrounds, small objects).

    detect, segment, pose, obb: YOLO format with a data.yaml; classify: class folders of object crops.
    """
    from cvdeploy.demo.shapes import TASKS, generate_shapes
    from cvdeploy.errors import CvdeployError

    if task not in TASKS:
        raise CvdeployError(f"unknown task {task!r}; use one of: {', '.join(TASKS)}")
    with progress_bar() as progress:
        bar = progress.add_task(f"shapes ({task})", total=n_train + n_val)
        data = generate_shapes(out, n_train=n_train, n_val=n_val, seed=seed, task=task,
                               progress=lambda k: progress.advance(bar, k))
    console.print(f"dataset written: {data}", soft_wrap=True)
    if task == "classify":
        console.print(f"train with: yolo classify train data={data}", soft_wrap=True)
