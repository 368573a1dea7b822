"""`cvdeploy demo`: shapes images -> demo bundle (built once) -> predictions, a table and annotated images."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import typer

from cvdeploy.cli.app import app, console, err_console
from cvdeploy.cli.output import progress as progress_bar


@app.command()
def demo(
    out: Path = typer.Option(Path("cvdeploy-demo"), help="Working directory for the images, bundle and predictions."),
    n: int = typer.Option(8, min=1, max=500, help="Number of shapes images to generate and predict."),
    seed: int = typer.Option(7, min=0, help="Seed for the demo images (the model was trained on seed 0)."),
    task: str = typer.Option("detect", help="Which demo model: detect, segment, pose, obb or classify."),
) -> None:
    """Run the bundled YOLO11n shapes model (of --task) end to end on freshly generated images.

    stdout gets the predictions table and where things were written; progress and notes go to stderr.
    """
    from cvdeploy.cli.app import fail
    from cvdeploy.cli.predict import results_table
    from cvdeploy.demo import TASK_MODELS
    from cvdeploy.demo.shapes import generate_shapes
    from cvdeploy.predict import Predictor
    from cvdeploy.vision.draw import draw
    from cvdeploy.vision.image import image_files, load_image

    if task not in TASK_MODELS:
        raise fail(f"--task {task!r}: one of {', '.join(TASK_MODELS)}")
    model = TASK_MODELS[task]
    suffix = {"detect": "", "segment": "-seg", "pose": "-pose", "obb": "-obb", "classify": "-cls"}[task]
    name = f"yolo11n-shapes{suffix}"
    t0 = time.perf_counter()
    data_dir, bundle_dir, pred_dir = out / f"data{suffix}", out / f"{name}.cvd", out / f"predictions{suffix}"
    for stale in (data_dir, pred_dir):  # a previous run's images (maybe more, another seed) must not be mixed in
        if stale.exists():
            shutil.rmtree(stale)
    with progress_bar() as progress:
        bar = progress.add_task("generate images", total=n)
        generate_shapes(data_dir, n_train=0, n_val=max(n, 6) if task == "classify" else n, seed=seed, task=task,
                        progress=lambda k: progress.advance(bar, k))
    if not _bundle_is_current(bundle_dir, model):
        from cvdeploy.build import BUILD_STEPS, build_bundle

        with progress_bar() as progress:
            bar = progress.add_task("build demo bundle", total=len(BUILD_STEPS))
            build_bundle(model, bundle_dir, name=name, force=bundle_dir.exists(),
                         on_step=lambda s: progress.update(bar, advance=1, description=f"build: {s}"))
    else:
        err_console.print(f"using the demo bundle in {bundle_dir}", highlight=False, soft_wrap=True)
    predictor = Predictor(bundle_dir)
    pred_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    import cv2

    files = image_files(data_dir / "val" if task == "classify" else data_dir / "images" / "val")[:n]
    with progress_bar(transient=True) as progress:
        bar = progress.add_task("predict", total=len(files))
        for f in files:
            result = predictor.predict(f)
            cv2.imwrite(str(pred_dir / f.name), draw(load_image(f), result))
            h, w = result.orig_shape
            rows.append((f.name, f"{w}x{h}", result.line(), f"{result.timings.total:.1f}"))
            progress.advance(bar)
    console.print(results_table(rows, title=f"{predictor.bundle.name} · {predictor.variant} · {predictor.engine.provider}"))
    console.print(f"annotated images: {pred_dir.resolve()}", soft_wrap=True)
    console.print(f"bundle: {bundle_dir.resolve()}  (try: cvdeploy info {bundle_dir})", soft_wrap=True)
    console.print(f"done in {time.perf_counter() - t0:.1f} s")


def _bundle_is_current(bundle_dir: Path, model: Path) -> bool:
    """True if `bundle_dir` holds a readable bundle built from exactly this `model` file."""
    from cvdeploy.bundle.bundle import Bundle, sha256_file
    from cvdeploy.errors import BundleError

    if not (bundle_dir / "manifest.json").is_file():
        return False
    try:
        return Bundle.load(bundle_dir).manifest.source.sha256 == sha256_file(model)
    except BundleError:
        return False
