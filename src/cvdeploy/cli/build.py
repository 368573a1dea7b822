"""`cvdeploy build`: a .pt model to a verified bundle directory."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from cvdeploy.cli.app import app, console, fail
from cvdeploy.cli.output import progress as progress_bar


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
        "native bf16 only), openvino-int8, and the edge variants ncnn-fp32, ncnn-fp16, litert-fp32, litert-int8 (from a .pt; "
        "need the edge-build packages: docs/edge.md) (default: "
        "onnx-fp32; with --data also onnx-int8, and openvino-int8 if OpenVINO is installed; onnx-fp16 where CUDA or TensorRT is present)."),
    data: Path | None = typer.Option(None, help="data.yaml of a controlled dataset: INT8 calibration (train split) and the mAP check (val split)."),
    calib_images: int = typer.Option(64, min=1, help="INT8 calibration images."),
    calib_method: str = typer.Option("minmax", help="INT8 calibration: minmax, entropy or percentile."),
    max_map_drop: float = typer.Option(1.0, min=0.0, help="Largest mAP50-95 drop (points) a variant may have against onnx-fp32."),
    quantize_head: bool = typer.Option(False, help="Also quantize the YOLO head's decoding (for experiments: it ruins scores)."),
    int8_recipes: str | None = typer.Option(None, help="onnx-int8 recipes to try, comma-separated, from u8s8-w7, u8s8-w8, "
                                            "s8s8-asym (default: all; each is verified and timed here, the fastest verified wins)."),
    private: bool = typer.Option(False, "--private", help="Make the bundle readable by its owner only (files 0600, directories "
                                 "0700); by default it is readable by every user (0644, 0755), e.g. a container's non-root user."),
) -> None:
    """Export MODEL to ONNX FP32 (dynamic batch and size, no NMS), check it against the source, write the bundle;
    then make, verify and add the optimized variants.

    stdout gets the result (the bundle line, the variants table); progress goes to stderr, and the libraries' logs only
    with --verbose."""
    import time

    from cvdeploy.build import BUILD_STEPS, build_bundle
    from cvdeploy.build.edge import EDGE_VARIANTS
    from cvdeploy.build.quantize import recipe_candidates
    from cvdeploy.build.variants import ALL_VARIANTS, default_variants, not_offered
    from cvdeploy.bundle.environment import cpu_info

    t0 = time.perf_counter()
    wanted = default_variants(data is not None) if variants is None else [v.strip() for v in variants.split(",") if v.strip()]
    unknown = [v for v in wanted if v not in ALL_VARIANTS and v not in EDGE_VARIANTS]
    if unknown:
        raise fail(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join([*ALL_VARIANTS, *EDGE_VARIANTS])}")
    edge = [v for v in wanted if v in EDGE_VARIANTS]
    if edge and model.suffix.lower() != ".pt":
        raise fail(f"{', '.join(edge)} are exported from the source .pt (Ultralytics' exporters), not from {model.name}")
    int8 = [v for v in wanted if v.endswith("-int8")]
    if int8 and data is None:
        raise fail(f"{', '.join(int8)} needs --data DATA.yaml (calibration images and the mAP check)")
    if data is not None and not (data.is_file() or data.is_dir()):
        raise fail(f"--data: {data} not found")
    flags = list(cpu_info().get("flags", []))  # type: ignore[call-overload]
    for v in wanted:  # before the slow export
        if (why := not_offered(v, flags)) is not None:
            raise fail(why)
    recipes = None if int8_recipes is None else [r.strip() for r in int8_recipes.split(",") if r.strip()]
    recipe_candidates(flags, calib_method, recipes)  # refuses unknown recipes and calibration methods now

    progress = progress_bar(SpinnerColumn(), TextColumn("{task.description:<16}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn())
    with progress:
        task = progress.add_task("build", total=len(BUILD_STEPS))
        seen: list[str] = []

        def on_step(step: str) -> None:
            if seen:
                progress.advance(task)
            seen.append(step)
            progress.update(task, description=step)

        bundle = build_bundle(model, output, imgsz=imgsz, name=name, images=images, force=force, on_step=on_step,
                              private=private)
        progress.update(task, completed=len(BUILD_STEPS), description="done")
    v = bundle.manifest.variants[bundle.manifest.default_variant]
    worst = v.parity.worst if v.parity else float("nan")
    console.print(f"bundle [bold]{bundle.name}[/] written to {output} · onnx-fp32 {v.size_bytes / 1e6:.2f} MB · "
                  f"max |Δ| class scores vs torch {worst:.1e}" + (" · private (owner only)" if private else ""), soft_wrap=True)
    extra = [v for v in wanted if v != "onnx-fp32" and v not in EDGE_VARIANTS]
    if not extra and not edge and data is None:
        return
    from cvdeploy.build.variants import add_variants
    from cvdeploy.cli.info import variants_table

    # One bar over the variants (the onnx-fp32 reference mAP with --data, each variant, the final interleaved timing),
    # with the step under way: counts and an estimate of the time left, not a spinner per variant.
    n_steps = (data is not None) + len(dict.fromkeys(extra)) + len(dict.fromkeys(edge)) + 1
    with progress_bar(SpinnerColumn(), TextColumn("{task.description:<52}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), TimeRemainingColumn()) as progress:
        overall = progress.add_task("variants", total=n_steps)
        started: list[str] = []

        def on_variant_step(variant: str, step: str) -> None:
            if variant not in started:
                if started:
                    progress.advance(overall)
                started.append(variant)
            progress.update(overall, description=f"{variant}: {step}")

        outcomes = add_variants(output, ["onnx-fp32", *extra], data=data, calib_images=calib_images, calib_method=calib_method,
                                max_map_drop=max_map_drop, quantize_head=quantize_head, int8_recipes=recipes,
                                on_step=on_variant_step)
        if edge:
            from cvdeploy.build.edge import add_edge_variants

            outcomes += add_edge_variants(output, edge, source=model, data=data, calib_images=calib_images,
                                          on_step=on_variant_step)
        progress.update(overall, completed=n_steps, description="variants: done")
    from cvdeploy.bundle.bundle import Bundle

    console.print(variants_table(Bundle.load(output).manifest))
    refused = [o for o in outcomes if not o.written]
    for o in outcomes:
        for line in o.tried:
            console.print(f"  {o.name} {line}", highlight=False, soft_wrap=True)
    for o in refused:
        console.print(f"[bold red]not written:[/] {o.name}: {o.reason}", highlight=False, soft_wrap=True)
    console.print(f"build took {time.perf_counter() - t0:.1f} s")
    if refused:
        raise typer.Exit(1)
