"""The Typer app, its error handling and the global `--version` and `--verbose` flags; commands live in sibling modules."""

from __future__ import annotations

import os
import re
from typing import Any

import typer
import typer.core
from rich.console import Console
from rich.text import Text

from cvdeploy import __version__
from cvdeploy.errors import CvdeployError

# Commands that keep the process's logging as it is: a server's logs are its own (`serve --log-level`).
OWN_LOGGING = frozenset({"serve"})
_VERBOSE = re.compile(r"^(-v+|--verbose)$")


class _CvdeployGroup(typer.core.TyperGroup):
    """`-v`/`--verbose` are accepted after the command too (`cvdeploy build M.pt -o B -v`): they are moved before it."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        end = args.index("--") if "--" in args else len(args)
        flags = [a for a in args[:end] if _VERBOSE.match(a)]
        if flags:
            args = flags + [a for a in args[:end] if not _VERBOSE.match(a)] + args[end:]
        return super().parse_args(ctx, args)


app = typer.Typer(
    cls=_CvdeployGroup,
    name="cvdeploy",
    help="Deploy Ultralytics YOLO models the careful way: build verified bundles, predict, inspect. Results (tables, JSON) "
         "go to stdout; progress, notes and errors to stderr; the libraries' own logs only with --verbose.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


class _Console(Console):
    """Lines of text are soft-wrapped unless told otherwise: the terminal wraps them, and a pipe or a file gets each
    line whole (a path is never broken by an inserted newline). Tables keep Rich's layout (`cli.output.fit_table`)."""

    def print(self, *objects: Any, soft_wrap: bool | None = None, **kwargs: Any) -> None:
        if soft_wrap is None:
            soft_wrap = all(isinstance(o, str | Text) for o in objects)
        super().print(*objects, soft_wrap=soft_wrap, **kwargs)


# Results go to stdout, everything else (progress, notes, errors) to stderr.
console = _Console()
err_console = _Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        console.print(f"cvdeploy {__version__}")
        raise typer.Exit()


def _debug() -> bool:
    return os.environ.get("CVDEPLOY_DEBUG", "").strip().lower() not in ("", "0", "false", "no", "off")


def _env_verbosity() -> int:
    raw = os.environ.get("CVDEPLOY_VERBOSE", "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return 0
    return int(raw) if raw.isdigit() else 1


@app.callback()
def _root(
    ctx: typer.Context,
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version and exit."),
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="Show the libraries' logs and warnings (NNCF, ONNX "
                                "Runtime, Ultralytics, torch, libpng) on stderr; -vv for debug logs. Also $CVDEPLOY_VERBOSE=1. "
                                "May also follow the command."),
) -> None:
    """cvdeploy: export, verify, predict and serve vision models."""
    from cvdeploy.logs import cli_output

    if ctx.invoked_subcommand in OWN_LOGGING:
        return
    verbosity = max(verbose, _env_verbosity(), 1 if _debug() else 0)
    ctx.with_resource(cli_output(verbosity))


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print one error line and return the Exit to raise."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


# Every module that registers commands on `app`, imported by `main` (and by tests that walk the whole command tree).
COMMAND_MODULES = ("audit", "bench", "build", "card", "client", "compress", "data", "demo", "doctor", "evaluate", "fleet",
                   "info", "package", "predict", "protect", "registry", "security", "serve", "sign", "verify")


def register_commands() -> None:
    """Import every command module, so that each registers its commands on `app`."""
    import importlib

    for name in COMMAND_MODULES:
        importlib.import_module(f"cvdeploy.cli.{name}")


def main() -> None:
    """Console entry point: user errors become one line on stderr and a non-zero exit code."""
    register_commands()

    debug = _debug()
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
