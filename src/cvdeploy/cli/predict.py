"""`cvdeploy predict`: run a bundle or an Ultralytics .onnx on images, directories, globs, URLs, videos, streams and
webcams."""

from __future__ import annotations

import json
import re
import signal
import sys
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import typer
from rich.progress import ProgressColumn, Task, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from cvdeploy.cli.app import app, console, err_console, fail
from cvdeploy.cli.output import progress as progress_bar
from cvdeploy.errors import CvdeployError
from cvdeploy.predict import Predictor
from cvdeploy.sources import Source, SourceSpec, predict_frames, resolve_sources
from cvdeploy.sources.files import Images
from cvdeploy.sources.writer import VideoSink
from cvdeploy.vision.draw import draw

INTERRUPTED = 130  # the shell's code for a command stopped by Ctrl-C (128 + SIGINT)


def results_table(rows: list[tuple[str, str, str, str]], title: str | None = None) -> Table:
    """One row per image (or video, or stream): path, size, detections, ms. Paths and detections wrap (folding inside a
    long path) rather than being cut, so that every cell reads in full at any terminal width."""
    table = Table(title=title, show_lines=False)
    table.add_column("image", overflow="fold", ratio=3)
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("detections", overflow="fold", ratio=2)
    table.add_column("ms", justify="right", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    return table


def save_path(save: Path, f: Path, used: set[str], suffix: str = ".jpg") -> Path:
    """Where the annotated copy of `f` goes: its stem with `suffix`, made unique (a.png and a.jpg must not overwrite
    each other, nor two videos called clip)."""
    name, k = f"{f.stem}{suffix}", 1
    while name in used:
        name, k = f"{f.stem}-{k}{suffix}", k + 1
    used.add(name)
    return save / name


def _line(result: dict[str, Any]) -> str:
    """'3 circle, 1 star' (by class id) or 'no detections': an image's cell in the table; a classification's top-1
    with its probability ('star 0.97')."""
    if "detections" not in result and result.get("classes"):
        top = result["classes"][0]
        return f"{top['class_name']} {top['confidence']:.2f}"
    counts = Counter((d["class_id"], d["class_name"]) for d in result.get("detections") or [])
    return ", ".join(f"{n} {name}" for (_, name), n in sorted(counts.items())) or "no detections"


def _per_class(counts: Counter[str]) -> str:
    return ", ".join(f"{n} {name}" for name, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


@dataclass
class Tally:
    """What the summary line needs, counted as results come (a stream may run for hours: no result is kept)."""

    images: int = 0  # still images predicted
    image_inputs: int = 0  # still images given
    frames: int = 0  # frames of videos and streams predicted
    media: int = 0  # videos and streams given
    failed_images: int = 0
    failed_media: int = 0
    counts: Counter[str] = field(default_factory=Counter)
    total_ms: float = 0.0
    frame_seconds: float = 0.0  # wall time spent on videos and streams
    saved_images: bool = False
    saved_videos: bool = False

    def add(self, result: dict[str, Any], *, frame: bool) -> None:
        if frame:
            self.frames += 1
        else:
            self.images += 1
        self.counts.update(d["class_name"] for d in result.get("detections") or [])
        self.total_ms += result["timings_ms"]["total"]


def summary_line(t: Tally, wall_s: float, save: Path | None) -> str:
    """`N image(s), M detection(s) (3 circle, 1 star), X ms mean per image, Y s in all[; annotated images: DIR]`; with
    videos or streams, `F frame(s) of V video(s)/stream(s) at R fps` leads (after the images, if any). Classes by count,
    most frequent first; `N of T image(s)` when some could not be read."""
    heads = []
    if t.image_inputs or not t.media:
        heads.append(f"{t.images} image(s)" if t.images == t.image_inputs else f"{t.images} of {t.image_inputs} image(s)")
    if t.media:
        fps = f" at {t.frames / t.frame_seconds:.1f} fps" if t.frame_seconds > 0 and t.frames else ""
        heads.append(f"{t.frames} frame(s) of {t.media} video(s)/stream(s){fps}")
    n = t.images + t.frames
    per_class = _per_class(t.counts)
    line = (" and ".join(heads) + f", {sum(t.counts.values())} detection(s)" + (f" ({per_class})" if per_class else "")
            + f", {t.total_ms / n if n else 0.0:.1f} ms mean per {'frame' if t.media else 'image'}, {wall_s:.1f} s in all")
    if save is not None:
        what = {(True, False): "images", (False, True): "videos", (True, True): "images and videos"}.get(
            (t.saved_images, t.saved_videos), "images")
        line += f"; annotated {what}: {save}"
    return line


class JsonList:
    """The results as one JSON list on stdout, written as they come (what `json.dumps(list, indent=2)` would print):
    a stream's results are not held in memory, and Ctrl-C still leaves a complete list."""

    def __init__(self, enabled: bool) -> None:
        self.enabled, self.count = enabled, 0
        # The stream as it is now: while a progress bar is live, Rich redirects sys.stdout to its own console (stderr).
        self.out = sys.stdout

    def _print(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def add(self, item: dict[str, Any]) -> None:
        if not self.enabled:
            return
        text = json.dumps(item, indent=2).replace("\n", "\n  ")
        self._print(("[\n  " if self.count == 0 else ",\n  ") + text)
        self.count += 1

    def close(self, *, complete: bool = True) -> None:
        if not self.enabled:
            return
        if self.count:
            self._print("\n]\n")
        elif complete:
            self._print("[]\n")
        self.enabled = False


class FpsColumn(ProgressColumn):
    """Frames per second of a progress task (Rich's speed estimate)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.1f} fps" if speed else "-- fps", style="progress.data.speed")


def _stream_stem(spec: SourceSpec) -> str:
    """A file name for a stream's annotated video: the URL's last path segment, or its host; webcam0 for webcam 0."""
    if spec.kind == "webcam":
        return f"webcam{spec.target}"
    parts = urllib.parse.urlsplit(str(spec.target))
    segment = next((s for s in reversed(parts.path.split("/")) if s), "")
    stem = Path(segment).stem or parts.hostname or "stream"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "stream"


class Interrupts:
    """Ctrl-C, held off while one result is being written out, so that the JSON, the table, the summary and the saved
    video always hold the same frames. Anywhere else (waiting for a frame, in the engine) it stops at once."""

    def __init__(self) -> None:
        self.requested = False
        self._holding = False

    def _handler(self, signum: int, frame: Any) -> None:
        self.requested = True
        if not self._holding:
            raise KeyboardInterrupt

    @contextmanager
    def installed(self) -> Iterator[Interrupts]:
        if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread only
            yield self
            return
        previous = signal.signal(signal.SIGINT, self._handler)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)

    @contextmanager
    def held(self) -> Iterator[None]:
        self._holding = True
        try:
            yield
        finally:
            self._holding = False
        if self.requested:
            raise KeyboardInterrupt


@dataclass
class Run:
    """One `cvdeploy predict`: the predictor, where results go, and what has been counted so far."""

    predictor: Predictor
    save: Path | None
    json: JsonList
    batch: int
    overrides: dict[str, Any]
    source_options: dict[str, Any]
    interrupts: Interrupts = field(default_factory=Interrupts)
    rows: list[tuple[str, str, str, str]] = field(default_factory=list)
    tally: Tally = field(default_factory=Tally)
    used: set[str] = field(default_factory=set)
    iolog: Any = None  # cvdeploy.diagnose.iolog.IOLog with --log-io

    def log_io(self, frame: Any, result: Any) -> None:
        """Offer one answer to the I/O log (sampled, or kept for an anomaly); the file's own bytes when it is one."""
        if self.iolog is None:
            return
        data = None
        if self.iolog.store == "image" and "://" not in frame.name and Path(frame.name).is_file():
            data = Path(frame.name).read_bytes()
        self.iolog.record(model=f"{self.predictor.bundle.name}:{self.predictor.variant}", image=frame.image, data=data,
                          result=result, meta={"source": frame.name})

    def images(self, specs: list[SourceSpec], single: bool) -> None:
        """Still image files, in order, one row each; an unreadable one is reported and skipped unless it is the only
        input (then its error is the command's)."""
        def report(name: str, e: CvdeployError) -> None:
            self.tally.failed_images += 1
            err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)

        source = Images.from_paths("images", [str(s.target) for s in specs], limits=self.predictor.limits,
                                   on_error=None if single else report)
        self.tally.image_inputs += len(specs)
        # Progress goes to stderr (and vanishes when done) so that --json output stays clean.
        progress = progress_bar(transient=True, disable=len(specs) < 2)
        task = progress.add_task("predict", total=len(specs))
        with progress, closing(source):
            for frame, result in predict_frames(self.predictor, source, batch=self.batch, **self.overrides):
                with self.interrupts.held():
                    self._image_result(frame, result)
                    progress.advance(task)

    def _image_result(self, frame: Any, result: Any) -> None:
        self.log_io(frame, result)
        d = result.to_dict()
        self.json.add(d)
        self.tally.add(d, frame=False)
        h, w = result.orig_shape
        self.rows.append((frame.name, f"{w}x{h}", _line(d), f"{result.timings.total:.1f}"))
        if self.save:
            name = Path(urllib.parse.urlsplit(frame.name).path) if "://" in frame.name else Path(frame.name)
            cv2.imwrite(str(save_path(self.save, name, self.used)), draw(frame.image, result))
            self.tally.saved_images = True

    def media(self, spec: SourceSpec) -> None:
        """A video, URL, stream or webcam: predicted frame by frame, one row for the whole source."""
        self.tally.media += 1  # counted before opening: one that cannot be opened is one of those that failed
        source = spec.open(limits=self.predictor.limits, **self.source_options)
        with closing(source):
            if source.kind == "image":  # a URL that answered with an image
                self.tally.media -= 1
                self.tally.image_inputs += 1
                for frame, result in predict_frames(self.predictor, source, **self.overrides):
                    with self.interrupts.held():
                        self._image_result(frame, result)
                return
            self._frames(spec, source)

    def _frames(self, spec: SourceSpec, source: Source) -> None:
        sink = None
        if self.save:
            # A video file keeps its name and container; a stream, a webcam or a video URL is saved as NAME.mp4. The
            # stem is reserved here: the writer may still change the suffix (a container it cannot write).
            f = Path(str(spec.target)) if spec.kind == "video" else Path(_stream_stem(spec) + ".mp4")
            stem, suffix = save_path(self.save, f, self.used, ""), f.suffix.lower()
            # A file: its own rate (over vid_stride: the same duration). A live source skips frames when the model is
            # slower than it: its video is written at the rate frames were predicted (measured), to play in real time.
            fps = None if source.live or not source.fps else source.fps / source.vid_stride
            sink = VideoSink(stem, suffix, fps=fps, fourcc=getattr(source, "fourcc", None))
        live = source.live
        if live:
            progress = progress_bar(TextColumn("{task.description}"), TextColumn("{task.completed} frames"), FpsColumn(),
                                    TimeElapsedColumn(), transient=True)
        else:
            progress = progress_bar(*_finite_columns(), transient=True)
        task = progress.add_task(source.name if live else Path(source.name).name, total=None if live else source.total)
        n, counts, total_ms, size = 0, Counter[str](), 0.0, source.size
        t0 = time.perf_counter()
        try:
            with progress:
                for frame, result in predict_frames(self.predictor, source, batch=self.batch, **self.overrides):
                    annotated = draw(frame.image, result) if sink is not None else None
                    with self.interrupts.held():
                        self.log_io(frame, result)
                        d = result.to_dict()
                        self.json.add(d)
                        self.tally.add(d, frame=True)
                        n += 1
                        counts.update(x["class_name"] for x in d.get("detections") or [])
                        total_ms += result.timings.total
                        size = size or (frame.image.shape[1], frame.image.shape[0])
                        if sink is not None:
                            sink.write(annotated, frame.timestamp)
                        progress.advance(task)
        finally:
            seconds = time.perf_counter() - t0
            self.tally.frame_seconds += seconds
            if sink is not None and sink.close() is not None:
                self.tally.saved_videos = True
            fps = f"{n / seconds:.1f} fps" if seconds > 0 and n else "-- fps"
            dets = _per_class(counts) or "no detections"
            self.rows.append((source.name, f"{size[0]}x{size[1]}" if size else "-", f"{n} frame(s), {fps}: {dets}",
                              f"{total_ms / n:.1f}" if n else "-"))


def _finite_columns() -> tuple[ProgressColumn, ...]:
    from rich.progress import BarColumn, MofNCompleteColumn, TimeRemainingColumn

    return (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), FpsColumn(), TimeElapsedColumn(),
            TimeRemainingColumn())


def _groups(specs: list[SourceSpec]) -> Iterator[list[SourceSpec]]:
    """Consecutive image files together (one progress bar), every other source alone."""
    images: list[SourceSpec] = []
    for s in specs:
        if s.kind == "image":
            images.append(s)
            continue
        if images:
            yield images
            images = []
        yield [s]
    if images:
        yield images


@app.command()
def predict(
    model: Path = typer.Argument(..., help="A bundle directory (NAME.cvd) or an Ultralytics .onnx file."),
    sources: list[str] = typer.Argument(..., metavar="SOURCE", help="Image files, directories, globs (quoted: "
                                        "'imgs/**/*.jpg'), video files, http(s) URLs (an image, an MJPEG stream or a "
                                        "video), rtsp:// or rtmp:// streams, webcam indices (0)."),
    variant: str | None = typer.Option(None, help="Bundle variant to run (default: the bundle's default)."),
    conf: float | None = typer.Option(None, help="Confidence threshold (default: the bundle's, 0.25)."),
    iou: float | None = typer.Option(None, help="NMS IoU threshold (default: the bundle's, 0.7)."),
    max_det: int | None = typer.Option(None, "--max-det", help="Maximum detections per image."),
    classes: str | None = typer.Option(None, help="Only these class ids, comma-separated, e.g. 0,2."),
    retina_masks: bool = typer.Option(False, "--retina-masks", help="Segment: decode masks at the image's own size "
                                      "(Ultralytics' retina_masks); other tasks ignore it."),
    save: Path | None = typer.Option(None, help="Write annotated images and videos (same size and frame rate) to this "
                                     "directory."),
    vid_stride: int = typer.Option(1, "--vid-stride", min=1, help="Predict every N-th frame of videos and streams."),
    batch: int = typer.Option(1, "--batch", min=1, help="Frames per engine call (a live stream: the frames waiting, up "
                              "to N; images of different sizes in one batch are letterboxed square)."),
    timeout: float = typer.Option(10.0, "--timeout", min=0.1, help="Seconds to wait for a URL's answer, a stream's "
                                  "first frame, or a stalled stream."),
    reconnect: int = typer.Option(5, "--reconnect", min=0, help="Reconnection attempts after a stream drops "
                                  "(exponential backoff)."),
    as_json: bool = typer.Option(False, "--json", help="Print results as JSON (one list, one item per image or frame) "
                                 "instead of a table."),
    key_file: Path | None = typer.Option(None, "--key-file", help="The model key of a protected bundle (else "
                                         "$CVDEPLOY_MODEL_KEY_FILE, $CVDEPLOY_MODEL_KEY or $CVDEPLOY_MODEL_KEY_COMMAND)."),
    log_io: Path | None = typer.Option(None, "--log-io", help="Record sampled inputs and answers in this directory, for "
                                       "`cvdeploy doctor --io-log` (see docs/io-log.md)."),
    log_io_sample: float = typer.Option(0.05, "--log-io-sample", min=0.0, max=1.0, help="Share of images or frames "
                                        "recorded; NaN outputs and black or saturated inputs are always recorded."),
    log_io_store: str = typer.Option("thumbnail", "--log-io-store", help="What is kept of a recorded input: image "
                                     "(the file's bytes), thumbnail or hash."),
) -> None:
    """Detect objects in images, videos and streams; print a table and a summary line (or JSON) and optionally save
    annotated images and videos.

    stdout holds the table and the summary, or only the JSON with --json (the summary then goes to stderr). Ctrl-C
    stops a video or a stream cleanly: the annotated video, the JSON and the summary are still written (exit code 130).
    """
    class_ids = None
    if classes:
        try:
            class_ids = [int(c) for c in classes.split(",") if c.strip()]
        except ValueError:
            raise fail(f"--classes takes comma-separated integers, got {classes!r}") from None
    model_key = None
    if key_file is not None:
        from cvdeploy.security.protect import load_key

        model_key = load_key(key_file)  # read before any image, so that a bad key file is the first thing reported
    specs = resolve_sources(sources)  # every argument checked (missing files, empty globs) before the model loads
    # Without --key-file the Predictor looks for the key in the environment, and only if the bundle is protected.
    predictor = Predictor(model, variant, conf=conf, iou=iou, max_det=max_det, classes=class_ids, model_key=model_key)
    if save:
        save.mkdir(parents=True, exist_ok=True)
    if retina_masks and predictor.task != "segment":
        err_console.print(f"note: --retina-masks changes segment masks only; {predictor.bundle.name} is a {predictor.task} "
                          "model", highlight=False, soft_wrap=True)
    run = Run(predictor, save, JsonList(as_json), batch, overrides={"retina_masks": True} if retina_masks else {},
              source_options=dict(vid_stride=vid_stride, buffer=batch, reconnect=reconnect, timeout=timeout))
    if log_io is not None:
        from cvdeploy.diagnose.iolog import IOLog

        run.iolog = IOLog(log_io, sample=log_io_sample, store=log_io_store)
    single = len(specs) == 1
    t0 = time.perf_counter()
    try:
        with run.interrupts.installed():
            interrupted = _run_all(run, specs, single)
    finally:
        if run.iolog is not None:
            run.iolog.close()  # every queued record written before the command ends
    _report(run, predictor, time.perf_counter() - t0, interrupted)


def _run_all(run: Run, specs: list[SourceSpec], single: bool) -> bool:
    """Every source in turn; True when Ctrl-C stopped them (the sources are closed and the video finalised by then)."""
    try:
        for group in _groups(specs):
            if group[0].kind == "image":
                run.images(group, single)
                continue
            try:
                run.media(group[0])
            except CvdeployError as e:
                if single and not run.tally.frames:  # the only source, and nothing came of it: its error is the answer
                    raise
                run.tally.failed_media += 1
                err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
    except KeyboardInterrupt:
        return True  # the sources are closed and the video finalised on the way here; report what was done
    except BaseException:
        run.json.close(complete=False)  # a list already begun is closed: stdout stays valid JSON
        raise
    return False


def _report(run: Run, predictor: Predictor, wall_s: float, interrupted: bool) -> None:
    t = run.tally
    line = summary_line(t, wall_s, run.save)
    if run.json.enabled:
        run.json.close()
        err_console.print(line, highlight=False, soft_wrap=True)  # stdout holds only the JSON
    else:
        console.print(results_table(run.rows, title=f"{predictor.bundle.name} · {predictor.variant} · {predictor.engine.provider}"))
        console.print(line, highlight=False, soft_wrap=True)
    if interrupted:
        err_console.print("stopped by Ctrl-C", highlight=False)
        raise typer.Exit(INTERRUPTED)
    failed = []
    if t.failed_images:
        failed.append(f"{t.failed_images} of {t.image_inputs} image(s)")
    if t.failed_media:
        failed.append(f"{t.failed_media} of {t.media} video, stream or URL source(s)")
    if failed:
        raise fail(" and ".join(failed) + " could not be read")
