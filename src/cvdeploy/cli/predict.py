"""`cvdeploy predict`: run a bundle or an Ultralytics .onnx on images and directories."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import cv2
import typer
from rich.table import Table

from cvdeploy.cli.app import app, console, err_console, fail
from cvdeploy.cli.output import progress as progress_bar
from cvdeploy.errors import ImageDecodeError
from cvdeploy.predict import Predictor
from cvdeploy.vision.draw import draw
from cvdeploy.vision.image import collect_images, load_image


def results_table(rows: list[tuple[str, str, str, str]], title: str | None = None) -> Table:
    """One row per image: path, size, detections, ms. Paths and detections wrap (folding inside a long path) rather than
    being cut, so that every cell reads in full at any terminal width."""
    table = Table(title=title, show_lines=False)
    table.add_column("image", overflow="fold", ratio=3)
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("detections", overflow="fold", ratio=2)
    table.add_column("ms", justify="right", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    return table


def save_path(save: Path, f: Path, used: set[str]) -> Path:
    """Where the annotated copy of `f` goes: its stem as .jpg, made unique (a.png and a.jpg must not overwrite each other)."""
    name, k = f"{f.stem}.jpg", 1
    while name in used:
        name, k = f"{f.stem}-{k}.jpg", k + 1
    used.add(name)
    return save / name


def summary_line(results: list[dict[str, Any]], n_files: int, wall_s: float, save: Path | None) -> str:
    """`N image(s), M detection(s) (3 circle, 1 star), X ms mean per image, Y s in all[; annotated images: DIR]`; classes
    by count, most frequent first; `N of T image(s)` when some could not be read."""
    counts = Counter(d["class_name"] for r in results for d in r.get("detections") or [])
    per_class = ", ".join(f"{n} {name}" for name, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    n_dets = sum(counts.values())
    mean = sum(r["timings_ms"]["total"] for r in results) / len(results) if results else 0.0
    head = f"{len(results)} image(s)" if len(results) == n_files else f"{len(results)} of {n_files} image(s)"
    line = (f"{head}, {n_dets} detection(s)" + (f" ({per_class})" if per_class else "")
            + f", {mean:.1f} ms mean per image, {wall_s:.1f} s in all")
    if save is not None:
        line += f"; annotated images: {save}"
    return line


def _predict_one(predictor: Predictor, f: Path, n_files: int, out: list, rows: list, save: Path | None,
                 used: set[str]) -> int:
    """Predict one file into `out`/`rows`; return 1 if it could not be read (0 otherwise)."""
    try:
        result = predictor.predict(f)
    except ImageDecodeError as e:
        if n_files == 1:
            raise
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        return 1
    out.append(result.to_dict())
    h, w = result.orig_shape
    rows.append((str(f), f"{w}x{h}", result.summary(), f"{result.timings.total:.1f}"))
    if save:
        cv2.imwrite(str(save_path(save, f, used)), draw(load_image(f), result))
    return 0


@app.command()
def predict(
    model: Path = typer.Argument(..., help="A bundle directory (NAME.cvd) or an Ultralytics .onnx file."),
    images: list[Path] = typer.Argument(..., help="Image files and/or directories."),
    variant: str | None = typer.Option(None, help="Bundle variant to run (default: the bundle's default)."),
    conf: float | None = typer.Option(None, help="Confidence threshold (default: the bundle's, 0.25)."),
    iou: float | None = typer.Option(None, help="NMS IoU threshold (default: the bundle's, 0.7)."),
    max_det: int | None = typer.Option(None, "--max-det", help="Maximum detections per image."),
    classes: str | None = typer.Option(None, help="Only these class ids, comma-separated, e.g. 0,2."),
    save: Path | None = typer.Option(None, help="Write annotated images to this directory."),
    as_json: bool = typer.Option(False, "--json", help="Print results as JSON (one list) instead of a table."),
    key_file: Path | None = typer.Option(None, "--key-file", help="The model key of a protected bundle (else "
                                         "$CVDEPLOY_MODEL_KEY_FILE, $CVDEPLOY_MODEL_KEY or $CVDEPLOY_MODEL_KEY_COMMAND)."),
) -> None:
    """Detect objects in images; print a table and a summary line (or JSON) and optionally save annotated images.

    stdout holds the table and the summary, or only the JSON with --json (the summary then goes to stderr).
    """
    class_ids = None
    if classes:
        try:
            class_ids = [int(c) for c in classes.split(",") if c.strip()]
        except ValueError:
            raise fail(f"--classes takes comma-separated integers, got {classes!r}") from None
    model_key = None
    if key_file is not None:
        from cvdeploy.security.protect import load_key

        model_key = load_key(key_file)  # read before any image, so that a bad key file is the first thing reported
    files = collect_images(images)
    # Without --key-file the Predictor looks for the key in the environment, and only if the bundle is protected.
    predictor = Predictor(model, variant, conf=conf, iou=iou, max_det=max_det, classes=class_ids, model_key=model_key)
    if save:
        save.mkdir(parents=True, exist_ok=True)
    out: list[dict[str, Any]] = []
    rows: list[tuple[str, str, str, str]] = []
    failed, used = 0, set()
    t0 = time.perf_counter()
    # Progress goes to stderr (and vanishes when done) so that --json output stays clean.
    progress = progress_bar(transient=True, disable=len(files) < 2)
    task = progress.add_task("predict", total=len(files))
    with progress:
        for f in files:
            failed += _predict_one(predictor, f, len(files), out, rows, save, used)
            progress.advance(task)
    line = summary_line(out, len(files), time.perf_counter() - t0, save)
    if as_json:
        print(json.dumps(out, indent=2))
        err_console.print(line, highlight=False, soft_wrap=True)  # stdout holds only the JSON
    else:
        console.print(results_table(rows, title=f"{predictor.bundle.name} · {predictor.variant} · {predictor.engine.provider}"))
        console.print(line, highlight=False, soft_wrap=True)
    if failed:
        raise fail(f"{failed} of {len(files)} image(s) could not be read")
