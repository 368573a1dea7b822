"""Sweep models x input sizes x variants: accuracy and latency at every point, the Pareto front, a recommendation.

Every point is a bundle built by the build command's own code (`build_bundle` + `add_variants`),
so its figures are the ones a deployment would get: mAP50-95 on the controlled set through the
Predictor at that input size, and the median batch-1 latency measured with all variants of the
same bundle interleaved.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cvdeploy.errors import InputError


@dataclass(frozen=True)
class Point:
    model: str
    imgsz: int
    variant: str
    map50_95: float
    latency_ms: float
    bundle: str

    @property
    def label(self) -> str:
        return f"{self.model}@{self.imgsz} {self.variant}"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "label": self.label}


@dataclass
class SweepResult:
    points: list[Point]
    refused: list[str]  # "model@imgsz variant: reason"
    budget_ms: float
    min_map: float | None

    @property
    def front(self) -> list[Point]:
        return pareto_front(self.points)

    @property
    def recommendation(self) -> Point | None:
        fits = [p for p in self.points if p.latency_ms <= self.budget_ms and (self.min_map is None or p.map50_95 >= self.min_map)]
        return max(fits, key=lambda p: (p.map50_95, -p.latency_ms)) if fits else None

    def explanation(self) -> str:
        best = self.recommendation
        floor = "" if self.min_map is None else f" and mAP50-95 >= {self.min_map:.3f}"
        if best is not None:
            return (f"recommended: {best.label}: mAP50-95 {best.map50_95:.4f} at {best.latency_ms:.2f} ms "
                    f"(budget {self.budget_ms:g} ms{floor})")
        if not self.points:
            return "no point was measured"
        fastest = min(self.points, key=lambda p: p.latency_ms)
        within = [p for p in self.points if p.latency_ms <= self.budget_ms]
        if within:  # fast enough, but not accurate enough
            top = max(within, key=lambda p: p.map50_95)
            return (f"nothing fits: within {self.budget_ms:g} ms the most accurate is {top.label} with mAP50-95 "
                    f"{top.map50_95:.4f}, below the floor {self.min_map:.3f}")
        return (f"nothing fits the {self.budget_ms:g} ms budget{floor}; the closest is {fastest.label} at "
                f"{fastest.latency_ms:.2f} ms (mAP50-95 {fastest.map50_95:.4f})")

    def to_dict(self) -> dict[str, Any]:
        best = self.recommendation
        return {"budget_ms": self.budget_ms, "min_map": self.min_map, "points": [p.to_dict() for p in self.points],
                "front": [p.label for p in self.front], "recommendation": None if best is None else best.to_dict(),
                "explanation": self.explanation(), "refused": self.refused}


def pareto_front(points: Sequence[Point]) -> list[Point]:
    """The points no other point beats on both latency (lower) and mAP (higher), fastest first."""
    front: list[Point] = []
    for p in sorted(points, key=lambda p: (p.latency_ms, -p.map50_95)):
        if not front or p.map50_95 > front[-1].map50_95:
            front.append(p)
    return front


def parse_budget(text: str) -> float:
    """'30ms', '30 ms', '30' -> 30.0 (milliseconds); '0.03s' -> 30.0."""
    t = text.strip().lower().replace(" ", "")
    try:
        if t.endswith("ms"):
            value = float(t[:-2])
        elif t.endswith("s"):
            value = float(t[:-1]) * 1000.0
        else:
            value = float(t)
    except ValueError:
        raise InputError(f"latency budget must look like 30ms or 0.03s, got {text!r}") from None
    if value <= 0:
        raise InputError(f"latency budget must be > 0, got {text!r}")
    return value


def sweep(
    models: Sequence[str | os.PathLike[str]],
    data: str | os.PathLike[str],
    sizes: Sequence[int],
    variants: Sequence[str],
    out: str | os.PathLike[str],
    *,
    budget_ms: float,
    min_map: float | None = None,
    calib_images: int = 32,
    on_step: Callable[[str], None] | None = None,
) -> SweepResult:
    """Build (or reuse) one bundle per model and size under `out`, with `variants`; collect every point."""
    from cvdeploy.build import build_bundle
    from cvdeploy.build.variants import ALL_VARIANTS, add_variants
    from cvdeploy.bundle.bundle import Bundle, sha256_file

    step = on_step or (lambda _s: None)
    bad = [v for v in variants if v not in ALL_VARIANTS]
    if bad:
        raise InputError(f"unknown variant(s) {', '.join(bad)}; choose from {', '.join(ALL_VARIANTS)}")
    if not models or not sizes or not variants:
        raise InputError("a sweep needs at least one model, one size and one variant")
    for m in models:
        if not Path(m).is_file():
            raise InputError(f"model not found: {m}")
    for s in sizes:
        if s < 32 or s % 32:
            raise InputError(f"input sizes must be multiples of 32 and at least 32, got {s}")
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    points: list[Point] = []
    refused: list[str] = []
    for model in models:
        stem = Path(model).stem
        digest = sha256_file(model)
        for size in sizes:
            bdir = root / f"{stem}-{size}.cvd"
            reuse = False
            if (bdir / "manifest.json").is_file():
                try:
                    reuse = Bundle.load(bdir).manifest.source.sha256 == digest
                except Exception:  # a broken leftover: rebuild it
                    reuse = False
            if not reuse:
                step(f"{stem}@{size}: export")
                build_bundle(model, bdir, imgsz=size, name=f"{stem}-{size}", force=True)
            step(f"{stem}@{size}: variants")
            outcomes = add_variants(bdir, ["onnx-fp32", *[v for v in variants if v != "onnx-fp32"]], data=data,
                                    calib_images=calib_images, on_step=lambda v, s, tag=f"{stem}@{size}": step(f"{tag}: {v}: {s}"))
            refused += [f"{stem}@{size} {o.name}: {o.reason}" for o in outcomes if not o.written]
            manifest = Bundle.load(bdir).manifest
            for v in variants:
                if v in manifest.variants:
                    mt = manifest.variants[v].metrics
                    points.append(Point(stem, size, v, float(mt["map50_95"]), float(mt["latency_ms_b1"]), str(bdir)))
    return SweepResult(points, refused, budget_ms, min_map)


def write_outputs(result: SweepResult, out: str | os.PathLike[str]) -> tuple[Path, Path | None]:
    """sweep.html (table, Pareto front as inline SVG, recommendation) and sweep.png (if matplotlib is present)."""
    import html

    from cvdeploy.report.html import CSS, scatter_svg

    root = Path(out)
    e = html.escape
    front = {p.label for p in result.front}
    best = result.recommendation
    rows = "".join(
        f"<tr><td>{e(p.label)}</td><td>{p.map50_95:.4f}</td><td>{p.latency_ms:.2f}</td>"
        f"<td>{'yes' if p.label in front else ''}</td><td>{'within' if p.latency_ms <= result.budget_ms else 'over'}</td>"
        f"<td>{'<b>recommended</b>' if best is not None and p == best else ''}</td></tr>"
        for p in sorted(result.points, key=lambda p: p.latency_ms))
    png = None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
        ax.scatter([p.latency_ms for p in result.points], [p.map50_95 for p in result.points], color="#9bb8e8", label="points")
        fr = result.front
        ax.plot([p.latency_ms for p in fr], [p.map50_95 for p in fr], "o-", color="#2a6fdb", label="Pareto front")
        for p in result.points:
            ax.annotate(p.label, (p.latency_ms, p.map50_95), fontsize=7, xytext=(4, 3), textcoords="offset points")
        ax.axvline(result.budget_ms, color="#b00", linestyle="--", label=f"budget {result.budget_ms:g} ms")
        if result.min_map is not None:
            ax.axhline(result.min_map, color="#777", linestyle=":", label=f"mAP floor {result.min_map:g}")
        ax.set_xlabel("median latency, batch 1 (ms)")
        ax.set_ylabel("mAP50-95")
        ax.legend(fontsize=8)
        fig.tight_layout()
        png = root / "sweep.png"
        fig.savefig(png)
        plt.close(fig)
    except ImportError:
        png = None
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>cvdeploy sweep</title><style>{CSS}</style></head><body>
<h1>Sweep: accuracy against latency</h1>
<p><b>{e(result.explanation())}</b></p>
{scatter_svg([(p.label, p.latency_ms, p.map50_95) for p in result.front], width=640)}
<p class=muted>The plot shows the Pareto front; the table lists every point.{' See also sweep.png.' if png else ''}</p>
<table><tr><th>point</th><th>mAP50-95</th><th>latency b1 (ms)</th><th>Pareto front</th><th>budget</th><th></th></tr>{rows}</table>
{'<h2>Refused variants</h2><ul>' + ''.join(f'<li>{e(r)}</li>' for r in result.refused) + '</ul>' if result.refused else ''}
</body></html>
"""
    page_path = root / "sweep.html"
    page_path.write_text(page)
    return page_path, png
