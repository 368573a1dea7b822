"""The Typer app, its error handling and the `--version` flag; commands live in sibling modules."""

from __future__ import annotations

import os

import typer
from rich.console import Console

from cvdeploy import __version__
from cvdeploy.errors import CvdeployError

app = typer.Typer(
    name="cvdeploy",
    help="Deploy Ultralytics YOLO models the careful way: build verified bundles, predict, inspect.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        console.print(f"cvdeploy {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version and exit."),
) -> None:
    """cvdeploy: export, verify, predict and serve vision models."""


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print one error line and return the Exit to raise."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def main() -> None:
    """Console entry point: user errors become one line on stderr and a non-zero exit code."""
    from cvdeploy.cli import audit, bench, build, client, data, demo, info, predict, protect, security, serve, sign, verify  # noqa: F401  (register the commands)

    debug = os.environ.get("CVDEPLOY_DEBUG", "").strip().lower() not in ("", "0", "false", "no", "off")
    try:
        app()  # standalone: usage errors print click's usage message and exit 2
    except CvdeployError as e:
        if debug:
            raise
        raise SystemExit(fail(str(e)).exit_code) from None
    except OSError as e:
        if debug:
            raise
        raise SystemExit(fail(f"{e.strerror or e}: {e.filename}" if e.filename else str(e)).exit_code) from None
