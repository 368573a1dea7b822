"""The command line's logging: third-party logs, warnings and native stderr hidden unless --verbose, on stderr when shown;
and the server's (`server_logs`): JSON lines only, uvicorn's and native code's included.

Why each piece is needed (all of it is undone when the command ends, so in-process callers are unaffected):

- Libraries attach their own console handlers when they are imported, and cvdeploy imports them lazily inside a
  command: NNCF logs INFO to *stdout*, Ultralytics logs to stdout, torch prints glog-style warnings to stderr. While a
  command runs, `logging.Logger.addHandler` swaps any console handler a library attaches for cvdeploy's one, which
  drops third-party records unless --verbose and writes the kept ones to stderr.
- `warnings.warn` from libraries (torch, onnx, ...) is dropped unless --verbose.
- Libraries draw progress bars on Rich's global console, which writes to stdout (NNCF's "Statistics collection"): it
  is pointed at stderr with --verbose and silenced without.
- Native code writes to file descriptor 2 directly (libpng's "libpng error: ..." on a truncated PNG, ONNX Runtime's and
  OpenVINO's C++ loggers). Without --verbose, descriptor 2 is pointed at /dev/null and Python's `sys.stderr` at a
  duplicate of the real stderr, so that cvdeploy's own progress and error lines still show.

cvdeploy's own loggers (`cvdeploy.*`) keep WARNING and above in every mode.
"""

from __future__ import annotations

import faulthandler
import io
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

OWN = "cvdeploy"
_THIRD_PARTY_FORMAT = logging.Formatter("%(levelname)s:%(name)s:%(message)s")


def _is_own(name: str) -> bool:
    return name == OWN or name.startswith(OWN + ".")


def level_for(verbosity: int) -> int:
    """0: WARNING (cvdeploy's own records only); 1 (-v): INFO from every library; 2 or more (-vv): DEBUG."""
    return logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG


class CliHandler(logging.Handler):
    """Writes to whatever `sys.stderr` is when the record comes (it is swapped while native stderr is hidden)."""

    def __init__(self, verbosity: int) -> None:
        super().__init__(level_for(verbosity))
        self.verbosity = verbosity

    def filter(self, record: logging.LogRecord) -> bool:  # type: ignore[override]
        # One handler serves the root and the libraries' own loggers: a record that propagates from one to the
        # other must print once.
        if getattr(record, "_cvdeploy_handled", False):
            return False
        record._cvdeploy_handled = True
        if self.verbosity <= 0 and not _is_own(record.name):
            return False
        return bool(super().filter(record))

    def format(self, record: logging.LogRecord) -> str:
        if _is_own(record.name):
            return f"{record.levelname.lower()}: {record.getMessage()}"
        return _THIRD_PARTY_FORMAT.format(record)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:
            self.handleError(record)


def _is_console(handler: logging.Handler) -> bool:
    """A handler that writes to the process's stdout or stderr (not a file, not cvdeploy's own). Not only StreamHandlers:
    torch's console handler is a plain Handler whose `stream` follows sys.stderr."""
    if isinstance(handler, CliHandler | logging.FileHandler):
        return False
    try:
        stream = getattr(handler, "stream", None)
    except Exception:  # a property that fails (a closed stream): not a console we can recognise
        return False
    if stream is None:
        return False
    if any(stream is s for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)):
        return True
    try:
        return stream.fileno() in (1, 2)
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return False


@contextmanager
def library_logs(verbosity: int = 0) -> Iterator[CliHandler]:
    """Route third-party logs and warnings as the module docstring says, until the block ends."""
    handler = CliHandler(verbosity)
    root = logging.getLogger()
    swapped: list[tuple[logging.Logger, logging.Handler]] = []
    levels: list[tuple[logging.Logger, int]] = []

    def take_over(logger: logging.Logger) -> None:
        consoles = [h for h in logger.handlers if _is_console(h)]
        for h in consoles:
            logger.removeHandler(h)
            swapped.append((logger, h))
        if consoles and handler not in logger.handlers:
            original_add(logger, handler)
            if verbosity > 0:
                levels.append((logger, logger.level))
                logger.setLevel(logging.NOTSET)  # --verbose shows what the library hides by default

    original_add = logging.Logger.addHandler

    def add_handler(self: logging.Logger, h: logging.Handler) -> None:
        original_add(self, h)
        if not _is_own(self.name) and self is not root and _is_console(h):
            take_over(self)

    old_root_level = root.level
    old_showwarning = warnings.showwarning
    own_dir = os.path.dirname(os.path.abspath(__file__))

    def showwarning(message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None,
                    line: str | None = None) -> None:
        if verbosity > 0:
            sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))
        elif os.path.abspath(filename).startswith(own_dir + os.sep):
            sys.stderr.write(f"warning: {message}\n")

    root.addHandler(handler)
    root.setLevel(level_for(verbosity))
    for existing in list(logging.root.manager.loggerDict.values()):
        if isinstance(existing, logging.Logger) and not _is_own(existing.name):
            take_over(existing)
    logging.Logger.addHandler = add_handler  # type: ignore[method-assign]
    warnings.showwarning = showwarning
    try:
        yield handler
    finally:
        logging.Logger.addHandler = original_add  # type: ignore[method-assign]
        warnings.showwarning = old_showwarning
        root.removeHandler(handler)
        root.setLevel(old_root_level)
        for logger, h in swapped:
            if handler in logger.handlers:
                logger.removeHandler(handler)
            if h not in logger.handlers:
                original_add(logger, h)
        for logger, level in levels:
            logger.setLevel(level)


def _stderr_is_fd2() -> bool:
    """Whether `sys.stderr` writes to file descriptor 2 (not a test runner's buffer or another stream), flushed."""
    try:
        sys.stderr.flush()
        return sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return False


@contextmanager
def native_stderr_hidden() -> Iterator[None]:
    """Point file descriptor 2 at /dev/null and `sys.stderr` at a duplicate of the real stderr, until the block ends.

    Does nothing when stderr is not a file descriptor (an in-process test runner captures it as a buffer). A fatal
    signal still prints Python's traceback on the real stderr (faulthandler), so a native crash is not silent.
    """
    if not _stderr_is_fd2():
        yield
        return
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    real = open(saved, "w", encoding=sys.stderr.encoding or "utf-8", errors="backslashreplace", buffering=1, closefd=True)  # noqa: SIM115
    old_stderr, fault_was_on = sys.stderr, faulthandler.is_enabled()
    os.dup2(devnull, 2)
    os.close(devnull)
    sys.stderr = real
    faulthandler.enable(file=real)
    try:
        yield
    finally:
        try:
            real.flush()
        finally:
            faulthandler.disable()
            os.dup2(saved, 2)
            sys.stderr = old_stderr
            real.close()
            if fault_was_on:
                faulthandler.enable(file=sys.stderr)


@contextmanager
def library_progress(verbosity: int = 0) -> Iterator[None]:
    """Rich's global console (what a library's progress bars use when given no console, e.g. NNCF's "Statistics
    collection") writes to stderr with --verbose and nowhere without it, until the block ends. cvdeploy's own output
    goes through its own consoles, never the global one."""
    import rich

    shared = rich.get_console()
    saved = dict(shared.__dict__)
    rich.reconfigure(stderr=True, quiet=verbosity <= 0)
    try:
        yield
    finally:
        shared.__dict__.clear()
        shared.__dict__.update(saved)


@contextmanager
def cli_output(verbosity: int = 0) -> Iterator[None]:
    """Everything a command runs under: library logs, warnings and progress bars routed, and native stderr hidden,
    unless `verbosity` > 0 (then all of them go to stderr)."""
    with ExitStack() as stack:
        if verbosity <= 0:
            stack.enter_context(native_stderr_hidden())
        stack.enter_context(library_logs(verbosity))
        stack.enter_context(library_progress(verbosity))
        yield


# -- the server's logs: JSON lines only -------------------------------------------------------------------------------

_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "color_message"}
_LEVELS = {"critical": logging.CRITICAL, "error": logging.ERROR, "warning": logging.WARNING, "info": logging.INFO,
           "debug": logging.DEBUG, "trace": 5}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: `ts` (ISO 8601, UTC, milliseconds), `level`, `logger`, `message`, then
    the record's extra fields (`log.info(..., extra={"model": name})`), and `exc` (the traceback) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        import datetime
        import json

        ts = datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds")
        doc: dict[str, Any] = {"ts": ts.replace("+00:00", "Z"), "level": record.levelname.lower(), "logger": record.name,
                               "message": record.getMessage().rstrip("\n")}
        for key, value in record.__dict__.items():
            if key not in _RECORD_FIELDS and not key.startswith("_") and key not in doc:
                doc[key] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str, ensure_ascii=False)


class JsonHandler(logging.Handler):
    """JSON lines on whatever `sys.stderr` is when the record comes (it is swapped while native stderr is captured)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(JsonFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:
            self.handleError(record)


@contextmanager
def server_logs(level: str = "info", *, capture_native: bool = True) -> Iterator[JsonHandler]:
    """Everything a server process logs, as JSON lines on stderr, until the block ends.

    - The root logger gets one JSON handler at `level` (uvicorn's names: critical ... debug, trace); uvicorn's loggers
      (`uvicorn`, `uvicorn.error`) lose any handler of their own and reach it (`serve.app.uvicorn_config` passes
      `log_config=None`, and turns uvicorn's access log off: cvdeploy's own, `cvdeploy.access`, replaces it).
    - `cvdeploy.access` logs at INFO whatever `level` is: the access log is on unless the access middleware leaves a
      request out (probes and scrapes, see `serve.access`).
    - `warnings.warn` becomes a record of `py.warnings`.
    - With `capture_native`, what native code writes to file descriptor 2 (ONNX Runtime's or OpenVINO's C++ loggers)
      is read from a pipe, line by line, and logged as `native.stderr` warnings: no line on stderr is not JSON.
    """
    handler = JsonHandler()
    root = logging.getLogger()
    saved: list[tuple[logging.Logger, list[logging.Handler], bool, int]] = []
    for name in ("", "uvicorn", "uvicorn.error", "cvdeploy.access"):
        lg = logging.getLogger(name)
        saved.append((lg, list(lg.handlers), lg.propagate, lg.level))
        for h in [h for h in lg.handlers if _is_console(h) or name == "cvdeploy.access"]:
            lg.removeHandler(h)
        lg.propagate = True
    root.addHandler(handler)
    root.setLevel(_LEVELS.get(level.lower(), logging.INFO))
    logging.getLogger("cvdeploy.access").setLevel(logging.INFO)
    logging.captureWarnings(True)
    try:
        with ExitStack() as stack:
            if capture_native:
                stack.enter_context(_native_stderr_logged())
            yield handler
    finally:
        logging.captureWarnings(False)
        root.removeHandler(handler)
        for lg, handlers, propagate, lvl in saved:
            for h in handlers:
                if h not in lg.handlers:
                    lg.addHandler(h)
            lg.propagate, lg.level = propagate, lvl


@contextmanager
def _native_stderr_logged() -> Iterator[None]:
    """Point file descriptor 2 at a pipe whose lines are logged (`native.stderr`), and `sys.stderr` at a duplicate of
    the real stderr (where the JSON handler writes). Does nothing when stderr is not descriptor 2."""
    import threading

    if not _stderr_is_fd2():
        yield
        return
    saved = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    real = open(os.dup(saved), "w", encoding=sys.stderr.encoding or "utf-8", errors="backslashreplace", buffering=1)  # noqa: SIM115
    old_stderr, fault_was_on = sys.stderr, faulthandler.is_enabled()
    sys.stderr = real
    faulthandler.enable(file=real)  # a fatal signal's traceback still reaches the real stderr
    native = logging.getLogger("native.stderr")

    def pump() -> None:
        with open(read_end, "rb") as lines:
            for raw in lines:
                text = raw.decode("utf-8", "backslashreplace").rstrip()
                if text:
                    native.warning(text)

    reader = threading.Thread(target=pump, name="cvd-stderr", daemon=True)
    reader.start()
    try:
        yield
    finally:
        faulthandler.disable()
        os.dup2(saved, 2)  # closes the pipe's last write end: the reader sees its end and stops
        os.close(saved)
        reader.join(timeout=2)
        sys.stderr = old_stderr
        real.close()
        if fault_was_on:
            faulthandler.enable(file=sys.stderr)
