"""`cvdeploy compress`: compression by training (prune, distill, QAT), each result verified as a bundle variant."""

from __future__ import annotations

import typer

from cvdeploy.cli.app import app

compress_app = typer.Typer(no_args_is_help=True, help="Compress a model by training: structured pruning, knowledge "
                           "distillation, quantization-aware training. Each result enters the bundle as a verified variant.")
app.add_typer(compress_app, name="compress")

# The commands live in their own modules and register on compress_app.
from cvdeploy.cli import compress_qat, compress_train  # noqa: E402,F401
