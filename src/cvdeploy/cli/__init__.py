"""Command-line interface (Typer): thin commands that parse, call the library and print."""

from cvdeploy.cli.app import app, main

__all__ = ["app", "main"]
