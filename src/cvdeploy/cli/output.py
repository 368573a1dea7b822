"""Where the command line writes: results on stdout, progress and notes on stderr, tables that fit the terminal.

Rules every command follows (docs/commands/output.md):

- stdout carries the result only: a table and its summary lines, or JSON. Anything piped or
  captured from stdout is the answer, never progress, notes or library logs.
- Progress bars and spinners go to stderr, and only when stderr is a terminal: in a log capture
  they would be one frame of box-drawing characters.
- A table wider than the terminal is split into narrower tables that repeat the key columns
  (the variant, the configuration), or laid out vertically; a cell is never cut with an ellipsis.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from cvdeploy.cli.app import console, err_console

JSON_STDOUT = "-"  # `--json -`: the JSON on stdout, the human result on stderr


def json_to_stdout(dest: Path | None) -> bool:
    """True when `--json` names stdout (`-`) rather than a file."""
    return dest is not None and str(dest) == JSON_STDOUT


def result_console(dest: Path | None) -> Console:
    """The console for the human result: stdout, unless stdout holds the JSON (`--json -`)."""
    return err_console if json_to_stdout(dest) else console


def write_json(dest: Path, doc: Any) -> None:
    """Write `doc` as indented JSON to the file `dest`, or to stdout when `dest` is `-`."""
    text = json.dumps(doc, indent=2)
    if json_to_stdout(dest):
        print(text, flush=True)
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(text + "\n")


def progress(*columns: str | ProgressColumn, transient: bool = False, disable: bool = False) -> Progress:
    """A progress display on stderr, live on a terminal only (and not at all with `disable`). With no columns:
    description, bar, done/total, elapsed and the estimated time left."""
    if not columns:
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn())
    return Progress(*columns, console=err_console, transient=transient, disable=disable or not err_console.is_terminal)


def fit_table(out: Console, columns: Sequence[tuple[str, str]], rows: Sequence[Sequence[str]], *, key: int = 1,
              title: str | None = None, **table_kw: Any) -> RenderableType:
    """A table of `columns` ((header, justify) pairs) and `rows` that fits `out`'s width without cutting a cell.

    If the whole table is too wide, the columns after the first `key` ones are spread over several tables that each
    repeat the key columns; if even one of them does not fit, each row is shown as a vertical list of `header: value`.
    """
    def make(cols: Sequence[int], label: str | None) -> Table:
        t = Table(title=label, **table_kw)
        for i in cols:
            header, justify = columns[i]
            t.add_column(header, justify=justify, no_wrap=True)  # type: ignore[arg-type]
        for row in rows:
            t.add_row(*(row[i] for i in cols))
        return t

    width = out.width
    every = list(range(len(columns)))
    whole = make(every, title)
    if _width(out, whole) <= width:
        return whole
    keys, rest = every[:key], every[key:]
    groups: list[list[int]] = []
    for i in rest:
        if groups and _width(out, make([*keys, *groups[-1], i], title)) <= width:
            groups[-1].append(i)
        else:
            groups.append([i])
    if any(_width(out, make([*keys, *g], title)) > width for g in groups):
        return _vertical(columns, rows, key, title)
    n = len(groups)
    parts = []
    for k, g in enumerate(groups, 1):
        label = None
        if title:  # the whole title where it fits over its table, else the part number alone (never a wrapped title)
            label = f"{title} ({k}/{n})"
            if k > 1 and len(label) > _width(out, make([*keys, *g], None)):
                label = f"({k}/{n})"
        parts.append(make([*keys, *g], label))
    return Group(*parts)


def _width(out: Console, table: Table) -> int:
    return out.measure(table, options=out.options.update_width(10_000)).maximum


def _vertical(columns: Sequence[tuple[str, str]], rows: Sequence[Sequence[str]], key: int, title: str | None) -> RenderableType:
    parts: list[RenderableType] = [f"[bold]{title}[/]"] if title else []
    for row in rows:
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="dim")
        grid.add_column(overflow="fold")
        head = " · ".join(row[:key])
        for (header, _), value in zip(columns[key:], row[key:], strict=True):
            grid.add_row(header, value)
        parts += [f"[bold]{head}[/]", grid]
    return Group(*parts)
