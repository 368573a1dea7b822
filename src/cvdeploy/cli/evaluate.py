"""`cvdeploy evaluate BUNDLE --data DATA`: a variant's accuracy on a labelled split, in its task's own figure."""

from __future__ import annotations

from pathlib import Path

import typer

from cvdeploy.cli.app import app, fail
from cvdeploy.cli.output import fit_table, json_to_stdout, result_console, write_json
from cvdeploy.cli.output import progress as progress_bar


@app.command()
def evaluate(
    bundle: Path = typer.Argument(..., help="A bundle directory or an Ultralytics .onnx file."),
    data: Path = typer.Option(..., help="The labelled set: a data.yaml (detect, segment, pose, obb) or a classify dataset's "
                              "directory (train/ and val/ of <class>/*.jpg; its data.yaml also works)."),
    variant: str | None = typer.Option(None, help="The variant to score (default: the one the Predictor picks here)."),
    split: str = typer.Option("val", help="The split of the dataset to score."),
    as_json: Path | None = typer.Option(None, "--json", help="Also write the figures to this JSON file; `--json -` prints "
                                        "them on stdout instead (the table then goes to stderr)."),
    key_file: Path | None = typer.Option(None, help="The model key of a protected bundle (else $CVDEPLOY_MODEL_KEY_FILE, ...)."),
) -> None:
    """Score a bundle on a labelled split: box mAP50-95 (detect, COCO protocol), mask mAP50-95 (segment), keypoint OKS
    mAP50-95 (pose), rotated-box mAP50-95 (obb), top-1 and top-5 (classify), at Ultralytics' validation thresholds
    (conf 0.001, iou 0.7, max_det 300), with the bundle's own pipeline."""
    from cvdeploy.evaluate import evaluate as run_evaluation
    from cvdeploy.evaluate.labels import split_images
    from cvdeploy.predict import Predictor

    console = result_console(as_json)
    if not (data.is_file() or data.is_dir()):
        raise fail(f"--data: {data} not found")
    key = None
    if key_file is not None:
        from cvdeploy.security.protect import load_key

        key = load_key(key_file)
    with Predictor(bundle, variant, model_key=key) as p:
        total = len(split_images(data, split))
        with progress_bar() as progress:
            task = progress.add_task(f"evaluating {p.variant}", total=total)
            m = run_evaluation(p, data, split=split, progress=lambda n: progress.advance(task, n))
        chosen, task_name = p.variant, p.task
    rows = [(k, f"{v:.4f}") for k, v in m.values.items()]
    console.print(fit_table(console, [("figure", "left"), ("value", "right")], rows,
                            title=f"{task_name}: {chosen}", title_style="bold"))
    if m.per_class:
        console.print(fit_table(console, [("class", "left"), (m.label, "right")],
                                [(c, f"{v:.4f}") for c, v in m.per_class.items()], title=f"{m.label} by class"))
    counted = f"{m.images} images" + (f", {m.instances} labelled objects" if task_name != "classify" else "")
    console.print(f"{m.label}: {m.score:.4f} on the {split} split ({counted})", highlight=False)
    if as_json is not None:
        write_json(as_json, {"bundle": str(bundle), "variant": chosen, "data": str(data), "split": split, **m.to_dict()})
        if not json_to_stdout(as_json):
            console.print(f"figures written to {as_json}", highlight=False, soft_wrap=True)
