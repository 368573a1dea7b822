"""`cvdeploy bench BUNDLE`: latency, throughput and per-stage times; warmup apart; op-level profile."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import typer
import typer.core
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from cvdeploy.cli.app import app, console, err_console, fail
from cvdeploy.cli.output import fit_table, json_to_stdout, result_console, write_json
from cvdeploy.cli.output import progress as progress_bar
from cvdeploy.errors import InputError


class _DefaultToRun(typer.core.TyperGroup):
    """`cvdeploy bench BUNDLE ...` means `cvdeploy bench run BUNDLE ...` (subcommands stay reachable by name)."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


bench_app = typer.Typer(cls=_DefaultToRun, no_args_is_help=True, help="Measure a bundle: latency, throughput, stages, ops.")
app.add_typer(bench_app, name="bench")


def int_list(text: str, option: str, minimum: int = 1) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"{option} takes comma-separated integers, got {text!r}") from None
    if not values or min(values) < minimum:
        raise InputError(f"{option} takes integers >= {minimum}, got {text!r}")
    return values


def bench_images(images: Path | None, n: int = 16) -> list[bytes]:
    """Encoded images to feed: the user's directory, or generated camera-like shapes scenes (JPEG)."""
    import cv2

    if images is not None:
        from cvdeploy.vision.image import collect_images

        files = collect_images([images])[:n]
        return [f.read_bytes() for f in files]
    from cvdeploy.demo.shapes import ShapesConfig, iter_scenes

    out = []
    for scene in iter_scenes(2024, "test", n, ShapesConfig(min_side=320, max_side=640)):
        _, buf = cv2.imencode(".jpg", scene.image, [cv2.IMWRITE_JPEG_QUALITY, 90])
        out.append(buf.tobytes())
    return out


def _fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


@bench_app.command("run")
def run(
    bundle: Path = typer.Argument(..., help="A bundle directory or an Ultralytics .onnx file."),
    variant: str | None = typer.Option(None, help="Variant to measure (default: the bundle's default)."),
    batch: str = typer.Option("1", help="Batch sizes, comma-separated, e.g. 1,4,8."),
    concurrency: str = typer.Option("1,4", help="Requests in flight; 1 is sequential, more is pipelined (async)."),
    imgsz: str | None = typer.Option(None, help="Input sizes, comma-separated (dynamic models only; default: the bundle's)."),
    threads: str = typer.Option("0", help="ONNX Runtime intra-op threads, comma-separated (0: its default)."),
    iterations: int | None = typer.Option(None, min=1, help="Measured requests per configuration (default 30)."),
    duration: float | None = typer.Option(None, min=0.1, help="Measure each configuration for this many seconds instead."),
    warmup: int = typer.Option(3, min=0, help="Calls before measuring; reported apart, never in the percentiles."),
    images: Path | None = typer.Option(None, help="Directory of images to feed (default: 16 generated JPEGs)."),
    engine: bool = typer.Option(True, "--engine/--no-engine", help="Also time the engine alone (the raw figure)."),
    profile: Path | None = typer.Option(None, help="Also profile ops (ONNX Runtime) and save the trace here (.json)."),
    top: int = typer.Option(10, min=1, help="Rows in the op profile tables."),
    as_json: Path | None = typer.Option(None, "--json", help="Write every figure to this JSON file; `--json -` prints it on "
                                        "stdout instead (the tables then go to stderr)."),
) -> None:
    """Time BUNDLE end to end (JPEG bytes in, boxes out) and its engine alone, over a grid of settings."""
    console = result_console(as_json)
    from cvdeploy.bench.harness import bench_engine, bench_pipelined, bench_sequential
    from cvdeploy.bundle.environment import cpu_info
    from cvdeploy.predict import Predictor
    from cvdeploy.runtime.onnxruntime import OrtOptions

    batches, concs = int_list(batch, "--batch"), int_list(concurrency, "--concurrency")
    thread_list = int_list(threads, "--threads", minimum=0)
    sizes: list[int | None] = list(int_list(imgsz, "--imgsz")) if imgsz else [None]
    if iterations is None and duration is None:
        iterations = 30
    if iterations is not None and duration is not None:
        raise fail("give --iterations or --duration, not both", 2)
    data = bench_images(images)
    if not data:
        raise fail(f"no images in {images}")

    plan = [(s, t, b, c) for s in sizes for t in thread_list for b in batches for c in concs]
    steps = len(plan) + (len(sizes) * len(thread_list) * len(batches) if engine else 0)
    rows: list[dict[str, Any]] = []
    progress = progress_bar(TextColumn("{task.description:<34}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            TimeRemainingColumn(), transient=True)
    count = iterations if iterations is not None else None
    with progress:
        overall = progress.add_task("bench", total=steps)
        for size in sizes:
            for t in thread_list:
                predictor = Predictor(bundle, variant, engine_options=OrtOptions(intra_op_threads=t), imgsz=size)
                label = f"imgsz {predictor.spec.imgsz[0]} · threads {t or 'auto'}"
                for b in batches:
                    configs = [("engine", 1)] if engine else []
                    configs += [("sequential" if c == 1 else "pipelined", c) for c in concs]
                    for mode, c in configs:
                        progress.update(overall, description=f"{label} · {mode} b{b} c{c}")
                        inner = progress.add_task(f"  {mode}", total=count)
                        kw = dict(batch=b, warmup=warmup, iterations=iterations, duration=duration,
                                  on_step=lambda inner=inner: progress.advance(inner))
                        if mode == "engine":
                            res = bench_engine(predictor, data, **kw)
                        elif mode == "sequential":
                            res = bench_sequential(predictor, data, **kw)
                        else:
                            res = bench_pipelined(predictor, data, concurrency=c, **kw)
                        progress.remove_task(inner)
                        progress.advance(overall)
                        rows.append({"imgsz": predictor.spec.imgsz[0], "threads": t, **res.to_dict()})
                model_name, variant_name, provider = predictor.bundle.name, predictor.variant, predictor.engine.provider
                predictor.close()

    console.print(results_tables(rows, f"{model_name} · {variant_name} · {provider}", console))
    console.print("warmup calls (1st ms: the first of them) are excluded from every percentile", style="dim")
    ratios = pipelining_ratios(rows)
    for key, ratio in ratios.items():
        console.print(f"pipelined / sequential throughput ({key}): [bold]{ratio:.2f}x[/]")

    report: dict[str, Any] = {"bundle": str(bundle), "model": model_name, "variant": variant_name, "provider": provider,
                              "machine": {"python": platform.python_version(), "cpu": cpu_info()}, "results": rows,
                              "pipelined_over_sequential": ratios}
    if profile is not None:
        report["profile"] = _profile(bundle, variant, data, sizes[0], top, profile, console)
    if as_json is not None:
        write_json(as_json, report)
        if not json_to_stdout(as_json):
            console.print(f"figures written to {as_json}", highlight=False, soft_wrap=True)


def results_tables(rows: list[dict[str, Any]], title: str, out: Console | None = None) -> Any:
    """Two tables: latency, throughput and resources; then the p50 time of each stage (each split to fit `out`)."""
    from rich.console import Group

    key_cols = ("mode", "size", "thr", "b", "c")
    lat_rows, stage_rows = [], []
    for r in rows:
        key = (r["mode"], str(r["imgsz"]), str(r["threads"] or "auto"), str(r["batch"]), str(r["concurrency"]))
        q = r["latency_ms"]
        lat_rows.append((*key, _fmt(q["p50"], 2), _fmt(q["p90"], 2), _fmt(q["p99"], 2), _fmt(r["throughput_ips"]),
                         _fmt(r["warmup"]["first_ms"]), _fmt(r["cpu_percent"], 0), _fmt(r["peak_rss_mb"], 0)))
        st = r["stages_ms"]
        stage_rows.append((*key, *(_fmt(st[k]["p50"], 2) if k in st else "-"
                                   for k in ("decode", "preprocess", "queue", "infer", "postprocess"))))

    def cols(names: tuple[str, ...]) -> list[tuple[str, str]]:
        return [(c, "left" if c == "mode" else "right") for c in names]

    out = out or console
    return Group(fit_table(out, cols((*key_cols, "p50 ms", "p90 ms", "p99 ms", "img/s", "1st ms", "cpu %", "rss MB")), lat_rows,
                           key=len(key_cols), title=title, title_style="bold"),
                 fit_table(out, cols((*key_cols, "decode", "pre", "queue", "infer", "post")), stage_rows, key=len(key_cols),
                           title="stages, p50 ms per request", title_style="bold"))


def pipelining_ratios(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Throughput of each pipelined row over the sequential row of the same size, threads and batch."""
    seq = {(r["imgsz"], r["threads"], r["batch"]): r["throughput_ips"] for r in rows if r["mode"] == "sequential"}
    out = {}
    for r in rows:
        base = seq.get((r["imgsz"], r["threads"], r["batch"]))
        if r["mode"] == "pipelined" and base:
            out[f"imgsz {r['imgsz']}, threads {r['threads'] or 'auto'}, batch {r['batch']}, c{r['concurrency']}"] = round(
                r["throughput_ips"] / base, 3)
    return out


def _profile(bundle: Path, variant: str | None, data: list[bytes], size: int | None, top: int, trace: Path,
             console: Console) -> dict[str, Any]:
    from cvdeploy.bench.profile import profile_variant
    from cvdeploy.predict import Predictor
    from cvdeploy.vision.image import load_image

    with err_console.status("profiling ops (ONNX Runtime profiler)"):
        predictor = Predictor(bundle, variant, imgsz=size)
        tensor, _ = predictor.preprocess([load_image(data[0])])
        feeds = {predictor.engine.inputs[0].name: tensor}
        kind = predictor.bundle.manifest.variants[predictor.variant].engine
        predictor.close()
        prof = profile_variant(predictor.bundle, predictor.variant, feeds, trace_out=trace)
    nodes, ops = prof.top(top)
    head = f"{prof.node_ms_per_run:.2f} ms of kernel time per run, {prof.runs} runs"
    t = Table(title=f"slowest nodes · {head}", title_style="bold")
    for col in ("node", "op", "ms/run", "share"):
        t.add_column(col, justify="left" if col in ("node", "op") else "right", overflow="fold")  # long names wrap, never cut
    for n in nodes:
        t.add_row(n.name, n.op_type, f"{n.ms_per_run:.3f}", f"{100 * n.share:.1f}%")
    console.print(t)
    t = Table(title=f"op types · {head}", title_style="bold")
    for col in ("op type", "nodes", "ms/run", "share"):
        t.add_column(col, justify="left" if col == "op type" else "right", overflow="fold")
    for n in ops:
        t.add_row(n.op_type, str(n.calls), f"{n.ms_per_run:.3f}", f"{100 * n.share:.1f}%")
    console.print(t)
    console.print(f"trace: {trace}" + ("" if kind == "openvino" else " (open in https://ui.perfetto.dev or chrome://tracing)"),
                  highlight=False, soft_wrap=True)
    return prof.to_dict(top)


@bench_app.command("layers")
def layers_cmd(
    bundle: Path = typer.Argument(..., help="A bundle directory."),
    variants: str | None = typer.Option(None, help="Two variants, A,B (default: onnx-fp32 and its INT8 or, failing that, "
                                        "another variant)."),
    imgsz: int | None = typer.Option(None, min=32, help="Input size (default: the bundle's)."),
    rounds: int = typer.Option(5, min=1, help="Alternating rounds (A then B, B then A, ...): per-node medians over them."),
    runs: int = typer.Option(10, min=1, help="Profiled runs per variant per round (after 3 warmup runs)."),
    threads: int = typer.Option(0, min=0, help="ONNX Runtime intra-op threads (0: its default)."),
    top: int = typer.Option(15, min=1, help="Layers shown."),
    images: Path | None = typer.Option(None, help="Directory of images; the first one is fed (default: a generated JPEG)."),
    as_json: Path | None = typer.Option(None, "--json", help="Write the comparison to this JSON file; `--json -` prints it on "
                                        "stdout instead (the tables then go to stderr)."),
) -> None:
    """Profile two variants op by op and set them side by side, by layer and by kind of op.

    The question it answers: where does a variant win or lose its time, e.g. whether this CPU runs
    INT8 convolutions faster than FP32 ones at all, or whether quantize/dequantize work eats the gain.
    """
    from cvdeploy.bench.profile import profile_pair
    from cvdeploy.bundle.environment import cpu_info
    from cvdeploy.predict import Predictor
    from cvdeploy.vision.image import load_image

    console = result_console(as_json)

    first = Predictor(bundle, "onnx-fp32" if variants is None else variants.split(",")[0].strip(), imgsz=imgsz)
    known = list(first.bundle.manifest.variants)
    if variants is None:
        others = [v for v in known if v != first.variant]
        if not others:
            raise fail(f"{bundle} has one variant ({first.variant}); build more with `cvdeploy build --variants ...`")
        pair = [first.variant, "onnx-int8" if "onnx-int8" in others else others[0]]
    else:
        pair = [v.strip() for v in variants.split(",") if v.strip()]
        if len(pair) != 2 or pair[0] == pair[1]:
            raise fail(f"--variants takes two different variants, A,B; got {variants!r}")
        if (missing := [v for v in pair if v not in known]):
            raise fail(f"{bundle} has no variant {missing[0]!r} (variants: {', '.join(known)})")
    tensor, _ = first.preprocess([load_image(bench_images(images, n=1)[0])])
    feeds = {first.engine.inputs[0].name: tensor}
    first.close()
    with err_console.status("profiling") as status:
        cmp_, per_round = profile_pair(first.bundle, pair[0], pair[1], feeds, rounds=rounds, runs=runs, threads=threads,
                                       on_step=lambda s: status.update(f"profiling · {s}"))
    a, b = pair
    shape = "x".join(str(d) for d in tensor.shape)
    t = Table(title=f"{first.bundle.name} · input {shape} · kernel ms per run, medians of {rounds} rounds of {runs} runs",
              title_style="bold")
    for col in ("layer", a, b, f"{b} speed-up"):
        t.add_column(col, justify="left" if col == "layer" else "right", overflow="fold")
    for name, ta, tb in cmp_.layers[:top]:
        t.add_row(name, f"{ta:.3f}", f"{tb:.3f}", f"{ta / tb:.2f}x" if ta > 0 and tb > 0 else "-")
    console.print(t)
    t = Table(title="by kind of op", title_style="bold")
    for col in ("kind", a, b, f"{b} speed-up"):
        t.add_column(col, justify="left" if col == "kind" else "right", overflow="fold")
    for kind, (ta, tb) in cmp_.categories.items():
        t.add_row(kind, f"{ta:.3f}", f"{tb:.3f}", f"{ta / tb:.2f}x" if ta > 0 and tb > 0 else "-")
    t.add_row("[bold]all[/]", f"{cmp_.totals[0]:.3f}", f"{cmp_.totals[1]:.3f}", f"{cmp_.speedup():.2f}x")
    console.print(t)
    conv = cmp_.speedup("convolution")
    precisions = {v: first.bundle.manifest.variants[v].precision for v in pair}
    console.print(f"convolutions: {b} runs them {conv:.2f}x as fast as {a}; all kernels {cmp_.speedup():.2f}x "
                  f"(convolutions round by round: {', '.join(f'{x:.2f}x' for x in per_round)})", highlight=False)
    flags = set(cpu_info().get("flags", []))  # type: ignore[arg-type]
    if "int8" in precisions.values() and not flags & {"avx512_vnni", "avx_vnni", "amx_int8", "asimddp"} and conv < 1.2:
        console.print("this CPU has no VNNI, AMX or dot-product instructions: its 8-bit multiply-adds run at about the "
                      "rate of its FP32 FMAs, so INT8 buys size more than speed here.", highlight=False)
    if as_json is not None:
        write_json(as_json, {**cmp_.to_dict(), "input": list(tensor.shape), "rounds": rounds, "runs": runs,
                             "convolution_speedup_per_round": [round(x, 3) for x in per_round],
                             "precisions": precisions, "cpu": cpu_info()})
        if not json_to_stdout(as_json):
            console.print(f"comparison written to {as_json}", highlight=False, soft_wrap=True)


@bench_app.command("tune")
def tune_cmd(
    bundle: Path = typer.Argument(..., help="A bundle directory (the winner is stored in its manifest)."),
    variant: str | None = typer.Option(None, help="Variant to tune (default: the bundle's default)."),
    batch: int = typer.Option(1, min=1, help="Batch size to tune for."),
    concurrency: int = typer.Option(1, min=1, help="Requests in flight to tune for (1: latency; more: throughput)."),
    rounds: int = typer.Option(5, min=1, help="Interleaved rounds over all candidates."),
    per_round: int = typer.Option(3, min=1, help="Timed runs per candidate per round."),
    images: Path | None = typer.Option(None, help="Directory of images to feed (default: generated JPEGs)."),
    save: bool = typer.Option(True, "--save/--dry-run", help="Store the winner in the bundle (or only print it)."),
    as_json: Path | None = typer.Option(None, "--json", help="Write every trial to this JSON file; `--json -` prints it on "
                                        "stdout instead (the table then goes to stderr)."),
    variants: bool = typer.Option(True, "--variants/--no-variants", help="Also time every verified variant here, "
                                  "interleaved, and store the figures: the Predictor picks the fastest verified variant from them."),
) -> None:
    """Search engine threads, execution mode and graph optimization for the fastest setting here; confirm it against the
    default in fresh rounds; re-measure every variant's latency on this machine."""
    from cvdeploy.bench.tune import describe, hint_from, tune
    from cvdeploy.bundle.environment import cpu_info
    from cvdeploy.predict import Predictor
    from cvdeploy.vision.image import load_image

    console = result_console(as_json)

    predictor = Predictor(bundle, variant)
    kind = predictor.bundle.manifest.variants[predictor.variant].engine
    if save and predictor.bundle.root is None:
        raise fail(f"{bundle} is a plain .onnx file: build a bundle to store settings, or pass --dry-run")
    data = bench_images(images, n=batch)
    tensor, _ = predictor.preprocess([load_image(data[k % len(data)]) for k in range(batch)])
    path, name = predictor.bundle.variant_path(predictor.variant), predictor.variant
    predictor.close()
    with err_console.status("tuning") as status:
        result = tune(path, tensor, concurrency=concurrency, rounds=rounds, per_round=per_round,
                      on_step=lambda s: status.update(f"tuning · {s}"), engine_kind=kind,
                      precision=predictor.bundle.manifest.variants[name].precision)
    table = Table(title=f"{predictor.bundle.name} · {name} · batch {batch} · concurrency {concurrency}", title_style="bold")
    for col in ("#", "settings", "median ms / request", "vs default"):
        table.add_column(col, justify="left" if col == "settings" else "right", overflow="fold")
    shown = [(k, t) for k, t in enumerate(result.trials, 1) if k <= 10 or t is result.default]  # the default always shows
    for k, t in shown:
        table.add_row(str(k), describe(t.options) + ("  (default)" if t is result.default else ""), f"{t.median_ms:.2f}",
                      f"{result.default.median_ms / t.median_ms:.2f}x")
    console.print(table)
    if result.chosen is result.best and result.best is not result.default:
        console.print(f"chosen: [bold]{describe(result.chosen.options)}[/], confirmed in fresh interleaved rounds: "
                      f"{result.confirmed_ms:.2f} ms against {result.confirmed_default_ms:.2f} ms with the engine's defaults "
                      f"({result.speedup:.2f}x); {len(result.trials)} candidates searched", highlight=False)
    else:
        console.print(f"chosen: [bold]the engine's defaults[/] ({result.confirmed_default_ms:.2f} ms): "
                      + ("they were the fastest of the search" if result.best is result.default else
                         f"the search's fastest ({describe(result.best.options)}) was not faster in fresh rounds "
                         f"({result.confirmed_ms:.2f} ms)"), highlight=False)
    hint = hint_from(result, name, batch=batch, concurrency=concurrency, cpu=str(cpu_info().get("model", "")))
    b = predictor.bundle
    if save:
        b.manifest.runtime = [h for h in b.manifest.runtime if h.variant != name] + [hint]
        b.save_manifest()
        console.print(f"stored in {b.root / 'manifest.json'}: the Predictor and the server now use it for {name}")
    if variants and b.root is not None:
        from cvdeploy.bench.latency import measure_here, store_record
        from cvdeploy.predict import variant_choice

        with err_console.status("timing every verified variant here, interleaved"):
            record = measure_here(b, how="bench tune")
        base = record.variants.get(b.manifest.default_variant)
        console.print("variants here (batch 1, interleaved): " + ", ".join(
            f"{n} {ms:.2f} ms" + (f" ({base / ms:.2f}x)" if base and n != b.manifest.default_variant else "")
            for n, ms in record.variants.items()), highlight=False)
        if save:
            store_record(b.manifest, record)
            b.save_manifest()
            console.print(f"the Predictor now chooses {variant_choice(b).name}: {variant_choice(b).reason}", highlight=False)
    if as_json is not None:
        write_json(as_json, {"hint": hint.model_dump(mode="json"), "trials": [t.to_dict() for t in result.trials],
                             "default": result.default.to_dict(), "chosen": result.chosen.to_dict(),
                             "confirmed_ms": round(result.confirmed_ms, 3),
                             "confirmed_default_ms": round(result.confirmed_default_ms, 3),
                             "speedup": round(result.speedup, 3)})
        if not json_to_stdout(as_json):
            console.print(f"trials written to {as_json}", highlight=False, soft_wrap=True)


@bench_app.command("sweep")
def sweep_cmd(
    models: str = typer.Option(..., help="Ultralytics .pt models, comma-separated."),
    data: Path = typer.Option(..., help="data.yaml of the controlled dataset (calibration and mAP)."),
    imgsz: str = typer.Option("320,480,640", help="Input sizes, comma-separated."),
    variants: str = typer.Option("onnx-fp32,onnx-int8", help="Variants, comma-separated."),
    latency_budget: str = typer.Option(..., help="Latency budget at batch 1, e.g. 30ms."),
    min_map: float | None = typer.Option(None, min=0.0, max=1.0, help="Accuracy floor: mAP50-95 at least this."),
    out: Path = typer.Option(Path("cvdeploy-sweep"), help="Where the bundles, sweep.html, sweep.png and sweep.json go."),
    calib_images: int = typer.Option(32, min=1, help="INT8 calibration images."),
) -> None:
    """Build and measure every model x size x variant; plot the Pareto front; recommend the best within the budget."""
    from cvdeploy.bench.sweep import parse_budget, sweep, write_outputs

    budget = parse_budget(latency_budget)
    if not data.is_file():
        raise fail(f"--data: {data} not found")
    model_list = [m.strip() for m in models.split(",") if m.strip()]
    sizes = int_list(imgsz, "--imgsz", minimum=32)
    names = [v.strip() for v in variants.split(",") if v.strip()]
    import time

    t0 = time.perf_counter()
    with err_console.status("sweep") as status:
        result = sweep(model_list, data, sizes, names, out, budget_ms=budget, min_map=min_map, calib_images=calib_images,
                       on_step=lambda s: status.update(f"sweep · {s} · {time.perf_counter() - t0:.0f} s"))
    page, png = write_outputs(result, out)
    (out / "sweep.json").write_text(json.dumps(result.to_dict(), indent=2))
    table = Table(title=f"sweep · budget {budget:g} ms" + ("" if min_map is None else f" · mAP floor {min_map:g}"), title_style="bold")
    for col in ("point", "mAP50-95", "ms b1", "front", "budget"):
        table.add_column(col, justify="left" if col == "point" else "right", overflow="fold")
    front = {p.label for p in result.front}
    best = result.recommendation
    for p in sorted(result.points, key=lambda p: p.latency_ms):
        mark = " ←" if best is not None and p == best else ""
        table.add_row(p.label + mark, f"{p.map50_95:.4f}", f"{p.latency_ms:.2f}", "●" if p.label in front else "",
                      "ok" if p.latency_ms <= budget else "over")
    console.print(table)
    for r in result.refused:
        console.print(f"[bold red]refused:[/] {r}", highlight=False)
    console.print(f"[bold]{result.explanation()}[/]", highlight=False)
    console.print(f"report: {page}" + (f", plot: {png}" if png else "") + f"; {time.perf_counter() - t0:.0f} s")
