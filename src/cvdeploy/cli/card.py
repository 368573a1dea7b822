"""`cvdeploy card BUNDLE [-o FILE]`: the bundle's model card (MODEL_CARD.md) as Markdown."""

from __future__ import annotations

from pathlib import Path

import typer

from cvdeploy.cli.app import app, console, fail


@app.command()
def card(
    bundle: Path = typer.Argument(..., help="A bundle directory (or an Ultralytics .onnx file)."),
    output: Path | None = typer.Option(None, "-o", "--output", help="Write the card to this file (BUNDLE/MODEL_CARD.md to "
                                       "store it in the bundle) [default: print it on stdout]."),
    intended_use: str | None = typer.Option(None, help="The intended use, in your words [default: a note that it must be "
                                            "filled in]."),
    intended_use_file: Path | None = typer.Option(None, help="Read the intended use from this (Markdown) file."),
    controlled: Path | None = typer.Option(None, help="A controlled report (JSON of `cvdeploy doctor BUNDLE --data DATA.yaml "
                                           "--json FILE`) for per-class mAP."),
) -> None:
    """Render the bundle's model card (MODEL_CARD.md) as Markdown.

    Intended use, classes, data, metrics per variant (and per class with --controlled), known limitations derived from
    the manifest, environment and hashes. The bundle's hashes are checked first."""
    from cvdeploy.bundle.card import render_card, write_card

    if intended_use is not None and intended_use_file is not None:
        raise fail("give the intended use once: --intended-use or --intended-use-file")
    if intended_use_file is not None:
        if not intended_use_file.is_file():
            raise fail(f"--intended-use-file: {intended_use_file} not found")
        intended_use = intended_use_file.read_text(encoding="utf-8")
    if controlled is not None and not controlled.is_file():
        raise fail(f"--controlled: {controlled} not found")
    options = {"intended_use": intended_use, "controlled": controlled}
    if output is None:
        print(render_card(bundle, **options), end="", flush=True)  # plain print: Markdown is not Rich markup
        return
    path = write_card(bundle, output, **options)
    console.print(f"model card written to {path}", highlight=False, soft_wrap=True)
