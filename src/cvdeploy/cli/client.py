"""`cvdeploy client predict URL IMAGE`: ask a running server."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import typer

from cvdeploy.cli.app import app, console

client_app = typer.Typer(no_args_is_help=True, help="Talk to a running cvdeploy server.")
app.add_typer(client_app, name="client")


@client_app.command("predict")
def predict(
    url: str = typer.Argument(..., help="Server URL, e.g. http://127.0.0.1:8000"),
    images: list[Path] = typer.Argument(..., help="Image files."),
    model: str | None = typer.Option(None, help="Model name (default: the server's only model)."),
    conf: float | None = typer.Option(None),
    iou: float | None = typer.Option(None),
    max_det: int | None = typer.Option(None, "--max-det"),
    save: Path | None = typer.Option(None, help="Save the server's annotated images here."),
    as_json: bool = typer.Option(False, "--json", help="Print the server's answers as JSON."),
) -> None:
    """Send images to a server's image API; print detections (or JSON) and optionally save annotated images."""
    from cvdeploy.cli.predict import results_table
    from cvdeploy.client import Client
    from cvdeploy.errors import InputError

    with Client(url) as c:
        if model is None:
            names = sorted({m["name"] for m in c.models()})
            if len(names) != 1:
                raise InputError(f"the server holds {len(names)} models ({', '.join(names)}); choose one with --model")
            model = names[0]
        answers, rows = [], []
        for f in images:
            a = c.predict(model, f, conf=conf, iou=iou, max_det=max_det, annotate=save is not None)
            answers.append({"source": str(f), **{k: v for k, v in a.items() if k != "annotated_image"}})
            if save is not None and a.get("annotated_image"):
                save.mkdir(parents=True, exist_ok=True)
                (save / f"{f.stem}.jpg").write_bytes(base64.b64decode(a["annotated_image"]))
            dets = a["detections"]
            summary = ", ".join(f"{d['class_name']} {d['confidence']:.2f}" for d in dets[:6]) + (" ..." if len(dets) > 6 else "")
            rows.append((str(f), f"{a['image']['width']}x{a['image']['height']}", summary or "-", f"{a['timings_ms']['total']:.1f}"))
    if as_json:
        print(json.dumps(answers, indent=2))
    else:
        console.print(results_table(rows, title=f"{url} · {model}"))
