"""`cvdeploy client predict URL IMAGES...`: ask a running server (API key, private CA and mutual TLS included)."""

from __future__ import annotations

import base64
import ipaddress
import json
from pathlib import Path
from urllib.parse import urlsplit

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cvdeploy.cli.app import app, console, err_console, fail

client_app = typer.Typer(no_args_is_help=True, help="Talk to a running cvdeploy server.")
app.add_typer(client_app, name="client")

# Answers that concern one image (undecodable, too large, wrong type): with several images the
# others still go through; every other refusal (auth, unknown model, overload) stops the run.
PER_IMAGE_STATUSES = frozenset({400, 413, 415, 422})


def _is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@client_app.command("predict")
def predict(
    url: str = typer.Argument(..., help="Server URL, e.g. http://127.0.0.1:8000 or https://host:8443"),
    images: list[Path] = typer.Argument(..., help="Image files and/or directories (searched recursively, as `cvdeploy predict`)."),
    model: str | None = typer.Option(None, help="Model name (default: the server's only model)."),
    conf: float | None = typer.Option(None),
    iou: float | None = typer.Option(None),
    max_det: int | None = typer.Option(None, "--max-det"),
    save: Path | None = typer.Option(None, help="Save the server's annotated images here."),
    as_json: bool = typer.Option(False, "--json", help="Print the server's answers as JSON."),
    api_key_file: Path | None = typer.Option(None, "--api-key-file", help="File holding the API key (cvd_<id>.<secret>) or a "
                                             "bearer token (else $CVDEPLOY_API_KEY_FILE or $CVDEPLOY_API_KEY)."),
    ca: Path | None = typer.Option(None, "--ca", help="CA certificates (PEM) to trust instead of the public roots: a server "
                                   "with a private CA."),
    client_cert: Path | None = typer.Option(None, "--client-cert", help="Client certificate (PEM) for mutual TLS."),
    client_key: Path | None = typer.Option(None, "--client-key", help="The client certificate's private key (PEM, unencrypted)."),
    timeout: float = typer.Option(30.0, min=0.1, help="Seconds to wait for each answer."),
    api_key: str | None = typer.Option(None, "--api-key", hidden=True),
) -> None:
    """Send images to a server's image API; print one result per image and a summary, optionally save annotated images."""
    from cvdeploy.cli.predict import results_table, save_path
    from cvdeploy.client import Client, ServerError
    from cvdeploy.vision.image import collect_images

    if api_key is not None:
        # Not accepted on purpose: a key on the command line shows in `ps`, /proc and shell history.
        raise fail("API keys are not taken on the command line (other users see them in ps and shell history): put the key "
                   "in a file only you can read and pass --api-key-file FILE, or set $CVDEPLOY_API_KEY")
    files = collect_images(images)
    with Client(url, timeout=timeout, api_key_file=api_key_file, ca=ca, client_cert=client_cert, client_key=client_key) as c:
        if c.sends_credentials and urlsplit(url).scheme == "http" and not _is_loopback(url):
            err_console.print(f"[yellow]warning:[/] the API key goes to {urlsplit(url).netloc} over plain HTTP, readable on the "
                              "way: prefer https://", highlight=False, soft_wrap=True)
        if model is None:
            names = sorted({m["name"] for m in c.models()})
            if len(names) != 1:
                raise fail(f"the server holds {len(names)} models ({', '.join(names) or 'none'}); choose one with --model")
            model = names[0]
        answers, rows, failed, used = [], [], 0, set()
        # Progress goes to stderr (and vanishes when done) so that --json output stays clean.
        progress = Progress(TextColumn("client predict"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            console=err_console, transient=True, disable=len(files) < 2)
        task = progress.add_task("predict", total=len(files))
        with progress:
            for f in files:
                try:
                    a = c.predict(model, f, conf=conf, iou=iou, max_det=max_det, annotate=save is not None)
                except ServerError as e:
                    if len(files) == 1 or e.status not in PER_IMAGE_STATUSES:
                        raise
                    err_console.print(f"[bold red]error:[/] {f}: {e}", highlight=False, soft_wrap=True)
                    failed += 1
                    progress.advance(task)
                    continue
                answers.append({"source": str(f), **{k: v for k, v in a.items() if k != "annotated_image"}})
                if save is not None and a.get("annotated_image"):
                    save.mkdir(parents=True, exist_ok=True)
                    save_path(save, f, used).write_bytes(base64.b64decode(a["annotated_image"]))
                dets = a["detections"]
                summary = ", ".join(f"{d['class_name']} {d['confidence']:.2f}" for d in dets[:6]) + (" ..." if len(dets) > 6 else "")
                rows.append((str(f), f"{a['image']['width']}x{a['image']['height']}", summary or "-",
                             f"{a['timings_ms']['total']:.1f}"))
                progress.advance(task)
    n_dets = sum(len(a["detections"]) for a in answers)
    mean_ms = sum(a["timings_ms"]["total"] for a in answers) / len(answers) if answers else 0.0
    line = (f"{len(answers)} of {len(files)} image(s) predicted by {model}, {n_dets} detection(s), "
            f"{mean_ms:.1f} ms mean server time" + (f"; annotated images: {save}" if save is not None and answers else ""))
    if as_json:
        print(json.dumps(answers, indent=2))
        err_console.print(line, highlight=False, soft_wrap=True)  # stdout holds only the JSON
    else:
        console.print(results_table(rows, title=f"{url} · {model}"))
        console.print(line, highlight=False, soft_wrap=True)
    if failed:
        raise fail(f"{failed} of {len(files)} image(s) could not be predicted")
