"""`cvdeploy build`: a .pt model to a verified bundle directory."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from cvdeploy.cli.app import app, console, fail


@app.command()
def build(
    model: Path = typer.Argument(..., help="An Ultralytics .pt model (detect)."),
    output: Path = typer.Option(..., "-o", "--output", help="The bundle directory to write, e.g. model.cvd"),
    imgsz: int | None = typer.Option(None, help="Input size (default: the model's training size)."),
    name: str | None = typer.Option(None, help="Bundle name (default: the model file's stem)."),
    images: Path | None = typer.Option(None, help="Directory of images for the golden cases (default: generated scenes)."),
    force: bool = typer.Option(False, help="Replace OUTPUT if it exists."),
    variants: str | None = typer.Option(
        None, help="Variants, comma-separated, from onnx-fp32, onnx-fp16, onnx-int8, openvino-fp32, openvino-bf16 (CPUs with "
        "native bf16 only), openvino-int8 (default: "
        "onnx-fp32; with --data also onnx-int8, and openvino-int8 if OpenVINO is installed; onnx-fp16 where CUDA or TensorRT is present)."),
    data: Path | None = typer.Option(None, help="data.yaml of a controlled dataset: INT8 calibration (train split) and the mAP check (val split)."),
    calib_images: int = typer.Option(64, min=1, help="INT8 calibration images."),
    calib_method: str = typer.Option("minmax", help="INT8 calibration: minmax, entropy or percentile."),
    max_map_drop: float = typer.Option(1.0, min=0.0, help="Largest mAP50-95 drop (points) a variant may have against onnx-fp32."),
    quantize_head: bool = typer.Option(False, help="Also quantize the YOLO head's decoding (for experiments: it ruins scores)."),
    int8_recipes: str | None = typer.Option(None, help="onnx-int8 recipes to try, comma-separated, from u8s8-w7, u8s8-w8, "
                                            "s8s8-asym (default: all; each is verified and timed here, the fastest verified wins)."),
) -> None:
    """Export MODEL to ONNX FP32 (dynamic batch and size, no NMS), check it against the source, write the bundle;
    then make, verify and add the optimized variants."""
    import time

    from cvdeploy.build import BUILD_STEPS, build_bundle
    from cvdeploy.build.quantize import recipe_candidates
    from cvdeploy.build.variants import ALL_VARIANTS, default_variants, not_offered
    from cvdeploy.bundle.environment import cpu_info

    t0 = time.perf_counter()
    wanted = default_variants(data is not None) if variants is None else [v.strip() for v in variants.split(",") if v.strip()]
    unknown = [v for v in wanted if v not in ALL_VARIANTS]
    if unknown:
        raise fail(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(ALL_VARIANTS)}")
    int8 = [v for v in wanted if v.endswith("-int8")]
    if int8 and data is None:
        raise fail(f"{', '.join(int8)} needs --data DATA.yaml (calibration images and the mAP check)")
    if data is not None and not data.is_file():
        raise fail(f"--data: {data} not found")
    flags = list(cpu_info().get("flags", []))  # type: ignore[call-overload]
    for v in wanted:  # before the slow export
        if (why := not_offered(v, flags)) is not None:
            raise fail(why)
    recipes = None if int8_recipes is None else [r.strip() for r in int8_recipes.split(",") if r.strip()]
    recipe_candidates(flags, calib_method, recipes)  # refuses unknown recipes and calibration methods now

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
    extra = [v for v in wanted if v != "onnx-fp32"]
    if not extra and data is None:
        return
    from cvdeploy.build.variants import add_variants
    from cvdeploy.cli.info import variants_table

    with Progress(SpinnerColumn(), TextColumn("{task.description:<44}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console) as progress:
        tasks: dict[str, int] = {}
        last: dict[str, str] = {}

        def on_variant_step(variant: str, step: str) -> None:
            if variant not in tasks:
                for other in tasks.values():
                    progress.update(other, completed=progress.tasks[other].total)
                tasks[variant] = progress.add_task(variant, total=None)
            if last.get(variant):
                progress.advance(tasks[variant])
            last[variant] = step
            progress.update(tasks[variant], description=f"{variant}: {step}")

        outcomes = add_variants(output, ["onnx-fp32", *extra], data=data, calib_images=calib_images, calib_method=calib_method,
                                max_map_drop=max_map_drop, quantize_head=quantize_head, int8_recipes=recipes,
                                on_step=on_variant_step)
        for t in tasks.values():
            progress.update(t, total=progress.tasks[t].completed or 1, completed=progress.tasks[t].completed or 1)
    from cvdeploy.bundle.bundle import Bundle

    console.print(variants_table(Bundle.load(output).manifest))
    refused = [o for o in outcomes if not o.written]
    for o in outcomes:
        for line in o.tried:
            console.print(f"  {o.name} {line}", highlight=False)
    for o in refused:
        console.print(f"[bold red]not written:[/] {o.name}: {o.reason}", highlight=False)
    console.print(f"build took {time.perf_counter() - t0:.1f} s")
    if refused:
        raise typer.Exit(1)
