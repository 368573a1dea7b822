"""`cvdeploy build`: a .pt model to a verified bundle directory."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from cvdeploy.cli.app import app, console


@app.command()
def build(
    model: Path = typer.Argument(..., help="An Ultralytics .pt model (detect)."),
    output: Path = typer.Option(..., "-o", "--output", help="The bundle directory to write, e.g. model.cvd"),
    imgsz: int | None = typer.Option(None, help="Input size (default: the model's training size)."),
    name: str | None = typer.Option(None, help="Bundle name (default: the model file's stem)."),
    images: Path | None = typer.Option(None, help="Directory of images for the golden cases (default: generated scenes)."),
    force: bool = typer.Option(False, help="Replace OUTPUT if it exists."),
) -> None:
    """Export MODEL to ONNX FP32 (dynamic batch and size, no NMS), check it against the source, write the bundle."""
    from cvdeploy.build import BUILD_STEPS, build_bundle

    progress = Progress(SpinnerColumn(), TextColumn("{task.description:<16}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TimeElapsedColumn(), console=console)
    with progress:
        task = progress.add_task("build", total=len(BUILD_STEPS))
        seen: list[str] = []

        def on_step(step: str) -> None:
            if seen:
                progress.advance(task)
            seen.append(step)
            progress.update(task, description=step)

        bundle = build_bundle(model, output, imgsz=imgsz, name=name, images=images, force=force, on_step=on_step)
        progress.update(task, completed=len(BUILD_STEPS), description="done")
    v = bundle.manifest.variants[bundle.manifest.default_variant]
    worst = max((o.max_abs if o.max_abs_scores is None else o.max_abs_scores) for o in v.parity.outputs.values()) if v.parity else float("nan")
    console.print(f"bundle [bold]{bundle.name}[/] written to {output} · onnx-fp32 {v.size_bytes / 1e6:.2f} MB · "
                  f"max |Δ| class scores vs torch {worst:.1e}")
