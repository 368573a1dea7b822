"""The slow-inference check's verdicts: the figures it measured (`SpeedFigures`) judged against thresholds. Pure: tests
inject every figure; `speed.measure_speed` measures them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cvdeploy.diagnose.finding import Finding, Likelihood, rank
from cvdeploy.diagnose.threads import ThreadSettings

__all__ = ["ENGINE_BOUND", "SLOWER_THAN_RECORDED", "STAGES", "STAGE_INFO", "STAGE_WARNING", "VARIANT_GAIN", "WARMUP_MIN_EXTRA_MS",
           "WARMUP_RATIO", "SpeedFigures", "speed_findings"]

STAGES = ("decode", "prepare", "infer", "finish")  # the Predictor's public stages, in the order a request runs them
WARMUP_RATIO = 3.0  # first call over steady median: at or above, warm up before serving ...
WARMUP_MIN_EXTRA_MS = 20.0  # ... when the first call also costs this much more (a 3x of 1 ms is nobody's problem)
STAGE_WARNING = 0.35  # a stage around the engine taking this share of end to end is the thing to fix
STAGE_INFO = 0.20  # ... this share is worth a note
ENGINE_BOUND = 0.60  # the engine's share above which the model itself is the cost
VARIANT_GAIN = 0.90  # another verified variant at or under this fraction of the served one's time (the Predictor's 10 %)
SLOWER_THAN_RECORDED = 1.5  # the engine now this many times its recorded time here: the machine changed, not the model

_FIRST_CALL = {  # why a stage's first call costs more, by stage
    "decode": "the image decoder's first call loads and initialises its codec",
    "prepare": "OpenCV's first resize initialises its code paths and thread pool",
    "infer": "a fresh engine allocates its memory arena and picks kernels on its first runs",
    "finish": "the first box decoding and NMS run cold code paths",
}
_STAGE_FIX = {
    "decode": ("decode (JPEG/PNG to pixels) takes {share:.0%} of end to end ({ms:.1f} of {total:.1f} ms) for "
               "{w}x{h} images: the bytes are large for what the model needs",
               "send smaller images (resize to about the model's {iw}x{ih} on the client; JPEG decodes faster than PNG); "
               "`cvdeploy bench BUNDLE --images DIR` times the stages with your own images"),
    "prepare": ("prepare (letterbox: resize {w}x{h} to {iw}x{ih}, pad, normalise) takes {share:.0%} of end to end "
                "({ms:.1f} of {total:.1f} ms)",
                "send images close to the model's input size ({iw}x{ih}) so the resize has little to do, or resize them "
                "where they are produced; `cvdeploy bench BUNDLE --images DIR` times the stages with your own images"),
    "finish": ("finish (box decoding and NMS) takes {share:.0%} of end to end ({ms:.1f} of {total:.1f} ms): NMS sees "
               "many candidate boxes",
               "raise the confidence threshold (`--conf`, the bundle's is {conf:g}) or lower `--max-det`; "
               "`cvdeploy bench BUNDLE` shows the post stage"),
}


@dataclass(frozen=True)
class SpeedFigures:
    """What the speed check measured and read (milliseconds); `speed_findings` judges them."""

    variant: str  # the variant served
    variant_reason: str  # why the Predictor chose it ("asked for" when it was given)
    engine: str  # onnxruntime or openvino
    provider: str
    image_shape: tuple[int, int]  # (height, width) of the decoded image measured
    input_shape: tuple[int, ...]  # the tensor the engine ran on (N, C, H, W)
    load_ms: float  # opening the Predictor (engine session)
    first_ms: float  # the first call of the fresh Predictor, end to end
    first_stages_ms: dict[str, float]  # that call's stages
    steady_ms: float  # median end to end after warm-up
    stages_ms: dict[str, float]  # median of each stage after warm-up
    calls: int  # steady calls measured
    threads: ThreadSettings
    conf: float = 0.25  # the Predictor's confidence threshold (what NMS is fed)
    variants: tuple[str, ...] = ()  # every variant of the bundle
    runnable: tuple[str, ...] = ()  # the verified variants whose engine runs here
    record: dict[str, Any] | None = None  # this machine's latency record: variants (ms), input_shape, how, measured_at
    other_machines: int = 0  # latency records of other machines (not used to choose here)
    engine_record_ms: float | None = None  # the served variant's engine now, on the record's input (median)
    tuned: dict[str, Any] | None = None  # the served variant's runtime hint (bench tune): cpu, tuned_ms, default_ms
    cpu: str = ""  # this machine's CPU model
    sweep: dict[str, Any] | None = None  # a bench sweep next to the bundle: recommendation, budget_ms, this point, path
    budget_ms: float | None = None  # the deployment's latency budget, if given

    @property
    def end_to_end_ms(self) -> float:
        """The steady stages summed: the request as the Predictor runs it."""
        return sum(self.stages_ms.get(s, 0.0) for s in STAGES)

    def share(self, stage: str) -> float:
        total = self.end_to_end_ms
        return self.stages_ms.get(stage, 0.0) / total if total > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        def r(x: float | None) -> float | None:
            return None if x is None else round(x, 3)

        return {"variant": self.variant, "variant_reason": self.variant_reason, "engine": self.engine,
                "provider": self.provider, "image_shape": list(self.image_shape), "input_shape": list(self.input_shape),
                "load_ms": r(self.load_ms), "first_ms": r(self.first_ms),
                "first_stages_ms": {k: r(v) for k, v in self.first_stages_ms.items()}, "steady_ms": r(self.steady_ms),
                "stages_ms": {k: r(v) for k, v in self.stages_ms.items()},
                "shares": {s: round(self.share(s), 4) for s in STAGES}, "end_to_end_ms": r(self.end_to_end_ms),
                "warmup_ratio": round(self.first_ms / self.steady_ms, 2) if self.steady_ms > 0 else None,
                "calls": self.calls, "threads": self.threads.to_dict(), "conf": self.conf, "variants": list(self.variants),
                "runnable": list(self.runnable), "record": self.record, "other_machines": self.other_machines,
                "engine_record_ms": r(self.engine_record_ms), "tuned": self.tuned, "cpu": self.cpu, "sweep": self.sweep,
                "budget_ms": self.budget_ms}


def _likelihood(x: float, high: float, medium: float) -> Likelihood:
    return "high" if x >= high else "medium" if x >= medium else "low"


# -- the verdicts (pure) ---------------------------------------------------------------------------


def _warmup(f: SpeedFigures) -> list[Finding]:
    if f.steady_ms <= 0:
        return []
    ratio, extra = f.first_ms / f.steady_ms, f.first_ms - f.steady_ms
    ev = {"first_ms": round(f.first_ms, 3), "steady_ms": round(f.steady_ms, 3), "ratio": round(ratio, 2),
          "first_stages_ms": {k: round(v, 3) for k, v in f.first_stages_ms.items()}}
    if ratio < 1.5 or extra <= 0:
        return []
    where = max(STAGES, key=lambda s: f.first_stages_ms.get(s, 0.0) - f.stages_ms.get(s, 0.0))
    more = f.first_stages_ms.get(where, 0.0) - f.stages_ms.get(where, 0.0)
    message = (f"the first call took {f.first_ms:.1f} ms, {ratio:.1f}x the steady {f.steady_ms:.1f} ms (mostly {where}: "
               f"+{more:.1f} ms): {_FIRST_CALL[where]}")
    fix = ("warm up before serving: run a few predictions on a representative encoded image, through the whole "
           "pipeline, before taking traffic" + (
               " (`cvdeploy serve` warms every instance's engine, CVDEPLOY_SERVE_WARMUP_RUNS, default 2)" if where == "infer"
               else f" (`cvdeploy serve` warms the engine only: the first request still pays for {where})")
           + "; `cvdeploy bench BUNDLE` reports `1st ms` against p50")
    if ratio >= WARMUP_RATIO and extra >= WARMUP_MIN_EXTRA_MS:
        return [Finding("warning", _likelihood(ratio, 10.0, WARMUP_RATIO), "warm-up", message, fix, {**ev, "stage": where})]
    return [Finding("info", "low", "warm-up", message, fix, {**ev, "stage": where})]


def _stages(f: SpeedFigures) -> list[Finding]:
    out = []
    total = f.end_to_end_ms
    if total <= 0:
        return out
    h, w = f.image_shape
    ih, iw = (f.input_shape[2], f.input_shape[3]) if len(f.input_shape) == 4 else (0, 0)
    shares = {s: round(f.share(s), 4) for s in STAGES}
    for stage, (what, fix) in _STAGE_FIX.items():
        share, ms = f.share(stage), f.stages_ms.get(stage, 0.0)
        if share < STAGE_INFO:
            continue
        values = {"share": share, "ms": ms, "total": total, "w": w, "h": h, "iw": iw, "ih": ih, "conf": f.conf}
        severity = "warning" if share >= STAGE_WARNING else "info"
        out.append(Finding(severity, _likelihood(share, 0.5, STAGE_WARNING), stage, what.format(**values),
                           fix.format(**values), {"stage": stage, "share": round(share, 4), "ms": round(ms, 3),
                                                  "end_to_end_ms": round(total, 3), "shares": shares}))
    infer = f.share("infer")
    if infer >= ENGINE_BOUND:
        budget = "" if f.budget_ms is None else f" --latency-budget {f.budget_ms:g}ms"
        out.append(Finding(
            "info", "low", "infer",
            f"the engine takes {infer:.0%} of end to end ({f.stages_ms.get('infer', 0.0):.1f} of {total:.1f} ms at input "
            f"{iw}x{ih}): the model itself is the cost, not what cvdeploy does around it",
            "`cvdeploy bench BUNDLE --profile trace.json` shows which ops; `cvdeploy bench tune BUNDLE` tunes threads and "
            "times the variants; `cvdeploy bench sweep --models MODEL.pt --data data.yaml --imgsz 320,480,640"
            f"{budget or ' --latency-budget 30ms'}` weighs smaller inputs and models against mAP",
            {"share": round(infer, 4), "shares": shares, "input_shape": list(f.input_shape)}))
    return out


def _threads(f: SpeedFigures) -> list[Finding]:
    t = f.threads
    usable = t.cores.usable
    out = []
    if t.oversubscribed:
        why = (" (ONNX Runtime's default is one thread per physical core of the whole machine; it does not see "
               "the affinity mask or the container's CPU quota)" if t.engine == "onnxruntime" and not t.configured else "")
        out.append(Finding(
            "warning", _likelihood(t.effective / usable, 2.0, 1.0 + 1e-9), "threads",
            f"{t.engine} runs {t.effective} intra-op threads on {usable} usable core(s){why}: threads that wait for a core "
            "stall every operator at its barrier",
            f"give the engine at most {usable} thread(s): `cvdeploy bench tune BUNDLE` finds and stores the fastest count, "
            f"`cvdeploy serve --threads {usable}` or `Predictor(..., threads={usable})` sets it; "
            f"`cvdeploy bench BUNDLE --threads 1,{usable}` compares",
            t.to_dict()))
    elif t.configured and t.effective * 2 <= usable and not t.source.startswith("tuned"):
        out.append(Finding(
            "info", "low", "threads",
            f"{t.engine} runs {t.effective} thread(s) of {usable} usable cores ({t.source})",
            "`cvdeploy bench tune BUNDLE` times more threads (fewer often win on a shared machine: measure)", t.to_dict()))
    for name, value in t.variables.items():
        try:
            n = int(value)
        except ValueError:
            continue
        if n > usable:
            out.append(Finding(
                "info", "low", "threads",
                f"{name}={value} asks for more threads than the {usable} usable core(s): libraries that read it "
                "(OpenMP, BLAS, OpenVINO, some ONNX Runtime builds) oversubscribe the CPU",
                f"set {name}={usable} or unset it", {"variable": name, "value": value, "usable": usable}))
    return out


def _variant(f: SpeedFigures) -> list[Finding]:
    out = []
    if f.record is None:
        if len(f.variants) > 1 or f.other_machines:
            where = (f"the bundle has latencies of {f.other_machines} other machine(s) only, which do not transfer (another "
                     "CPU can rank INT8 and FP32 the other way round)" if f.other_machines else
                     "no variant latencies were measured on this machine")
            out.append(Finding(
                "info", "low", "variant",
                f"{where}: the Predictor serves {f.variant} ({f.variant_reason})",
                "`cvdeploy bench tune BUNDLE` times every verified variant here and stores the figures: the Predictor then "
                "serves the fastest", {"variants": list(f.variants), "other_machines": f.other_machines}))
        return out
    timed: dict[str, float] = {str(k): float(v) for k, v in f.record.get("variants", {}).items()}
    when = f"{f.record.get('how') or 'measured'} {f.record.get('measured_at', '')}".strip()
    served_ms = timed.get(f.variant)
    candidates = {n: ms for n, ms in timed.items() if n in f.runnable}
    if served_ms is not None and candidates:
        best = min(candidates, key=lambda n: candidates[n])
        best_ms = candidates[best]
        if best != f.variant and best_ms <= VARIANT_GAIN * served_ms:
            gain = 1.0 - best_ms / served_ms
            out.append(Finding(
                "warning", _likelihood(gain, 0.5, 0.2), "variant",
                f"{best} ran {served_ms / best_ms:.2f}x as fast as the served {f.variant} on this machine ({best_ms:.2f} vs "
                f"{served_ms:.2f} ms at batch 1, {when}) and is verified; {f.variant} is served because: {f.variant_reason}",
                f"serve {best}: leave the variant to the Predictor (no --variant) or ask for it; `cvdeploy info BUNDLE` shows "
                "its mAP against FP32; `cvdeploy bench tune BUNDLE` re-times the variants",
                {"served": f.variant, "served_ms": served_ms, "fastest": best, "fastest_ms": best_ms, "record": f.record}))
    elif served_ms is None:
        out.append(Finding("info", "low", "variant", f"the served {f.variant} was not timed on this machine ({when})",
                           "`cvdeploy bench tune BUNDLE` times every verified variant here", {"record": f.record}))
    if served_ms and f.engine_record_ms is not None and f.engine_record_ms >= SLOWER_THAN_RECORDED * served_ms:
        ratio = f.engine_record_ms / served_ms
        out.append(Finding(
            "warning", _likelihood(ratio, 3.0, SLOWER_THAN_RECORDED), "machine",
            f"the engine now takes {f.engine_record_ms:.2f} ms for {f.variant} on the golden input, {ratio:.1f}x the "
            f"{served_ms:.2f} ms recorded on this very machine ({when}): "
            + (f"most likely the {f.threads.effective} threads on {f.threads.cores.usable} core(s) above (the record was "
               "timed with the engine's default threads)" if f.threads.oversubscribed else
               "the machine is busier or slower than it was (other processes, CPU throttling, a smaller CPU quota, "
               "other thread settings)"),
            f"give the engine at most {f.threads.cores.usable} thread(s) first (see the threads finding)"
            if f.threads.oversubscribed else
            "look at what else runs here (top, the container's CPU limit); `cvdeploy bench tune BUNDLE` re-times in "
            "interleaved rounds",
            {"now_ms": round(f.engine_record_ms, 3), "recorded_ms": served_ms, "ratio": round(ratio, 2)}))
    return out


def _tuning(f: SpeedFigures) -> list[Finding]:
    if f.tuned is None:
        return [Finding("info", "low", "tuning", f"{f.variant} has no tuned engine settings (threads, execution mode, graph "
                        "optimization): it runs with the engine's defaults",
                        "`cvdeploy bench tune BUNDLE` searches them here and stores the fastest in the bundle", {})]
    cpu = str(f.tuned.get("cpu", ""))
    if cpu and f.cpu and cpu != f.cpu:
        return [Finding("info", "low", "tuning", f"{f.variant}'s engine settings were tuned on {cpu}; this machine is {f.cpu}",
                        "`cvdeploy bench tune BUNDLE` re-tunes here (a hint from another CPU is only a hint)", dict(f.tuned))]
    return []


def _input_size(f: SpeedFigures) -> list[Finding]:
    out = []
    ih = f.input_shape[2] if len(f.input_shape) == 4 else 0
    size = max(f.input_shape[2:]) if len(f.input_shape) == 4 else 0
    if f.sweep is not None and (rec := f.sweep.get("recommendation")):
        rec_size = int(rec.get("imgsz", 0))
        label = rec.get("label", f"{rec.get('model')}@{rec_size} {rec.get('variant')}")
        this = f.sweep.get("this")
        if rec_size and size and rec_size < size:
            out.append(Finding(
                "warning", "medium", "input-size",
                f"the sweep ({f.sweep.get('path')}) recommends {label}: mAP50-95 {float(rec.get('map50_95', 0)):.4f} at "
                f"{float(rec.get('latency_ms', 0)):.2f} ms within its {float(f.sweep.get('budget_ms', 0)):g} ms budget; this "
                f"bundle runs at {size}" + (f" ({this['latency_ms']:.2f} ms)" if this else ""),
                f"serve the recommended bundle ({rec.get('bundle')}); `cvdeploy bench sweep` re-measures the front",
                {"recommendation": rec, "this": this, "input": size}))
        elif this is None or rec.get("bundle") != this.get("bundle") or rec.get("variant") != f.variant:
            out.append(Finding(
                "info", "low", "input-size",
                f"the sweep ({f.sweep.get('path')}) recommends {label}; this deployment serves {f.variant} at {size}",
                "compare the two points in the sweep's sweep.html", {"recommendation": rec, "this": this}))
    elif f.budget_ms is not None and f.steady_ms > f.budget_ms:
        out.append(Finding(
            "warning", "medium", "input-size",
            f"end to end takes {f.steady_ms:.1f} ms, over the {f.budget_ms:g} ms budget, at input {size}"
            + (f" (height {ih})" if ih and ih != size else ""),
            f"`cvdeploy bench sweep --models MODEL.pt --data data.yaml --imgsz 320,480,{size} --latency-budget "
            f"{f.budget_ms:g}ms` measures smaller inputs, models and variants against mAP and recommends one",
            {"steady_ms": round(f.steady_ms, 3), "budget_ms": f.budget_ms, "input": size}))
    return out


def speed_findings(f: SpeedFigures) -> list[Finding]:
    """Judge measured figures: warm-up, stage shares, threads against cores, the variant against the fastest verified one
    timed here, the engine against its record, the input size against a sweep or budget. Ranked; an "ok" line when
    nothing above "info" turned up. Pure (tests inject every figure)."""
    findings = _warmup(f) + _stages(f) + _threads(f) + _variant(f) + _tuning(f) + _input_size(f)
    if not any(x.severity in ("serious", "warning") for x in findings):
        findings.append(Finding(
            "ok", "none", "speed",
            f"nothing slows {f.variant} here beyond its engine: {f.steady_ms:.1f} ms per request, median (engine "
            f"{f.share('infer'):.0%}), first call {f.first_ms:.1f} ms, {f.threads.effective} thread(s) on "
            f"{f.threads.cores.usable} usable core(s)", "", {"steady_ms": round(f.steady_ms, 3)}))
    return rank(findings)
