"""Drift tests: a field data profile against a baseline, statistic by statistic (KS, PSI or Wasserstein, whichever fits
it, with thresholds widened for small samples), one `Drift` finding each, worst first. See docs/drift.md."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from cvdeploy.diagnose.profile_format import PROFILE_VERSION, DataProfile
from cvdeploy.diagnose.profile_stats import Sketch, sig
from cvdeploy.errors import InputError

__all__ = ["MIN_SAMPLES", "SMALL_SAMPLE", "Drift", "Severity", "TestKind", "compare", "ks_p_value", "ks_statistic"]

MIN_SAMPLES = 5  # fewer on either side: the statistic is not tested
SMALL_SAMPLE = 30  # fewer on either side: the finding says its thresholds were widened for the sample size

Severity = Literal["ok", "warning", "serious"]
_RANK = {"ok": 0, "warning": 1, "serious": 2}


# -- the tests -----------------------------------------------------------------------------------------

TestKind = Literal["ks", "psi", "wasserstein"]


@dataclass(frozen=True)
class _Spec:
    name: str
    label: str
    test: TestKind
    warning: float  # the nominal thresholds; small samples widen them (_test_numeric, _test_categorical)
    serious: float
    up: str  # the finding's opening when the field values are higher
    down: str
    fmt: str = "{:.0f}"
    log2: bool = False  # Wasserstein on log2 values (sizes and ratios: a factor, not a difference, is what matters)
    unit: str = ""  # of the Wasserstein distance, for the message
    prediction: bool = False
    per_box: bool = False  # one value per box: the sample size a test may trust is the number of images with boxes
    # Ranks findings of one severity: summary image statistics (1) before per-channel detail (2), since a change of
    # brightness or contrast moves all three channels with it; prediction statistics (3) last: they are the symptoms,
    # the image statistics the causes one can act on.
    tier: int = 1

    @property
    def short(self) -> str:
        """The label without its definition: "contrast" for "contrast (std/mean of gray)"."""
        return self.label.split(" (")[0].split(" √")[0]


_KS_WARNING, _KS_SERIOUS = 0.15, 0.30  # D floors: with large samples, tiny significant shifts are not worth a finding
_KS_C = {"warning": 1.628, "serious": 1.949}  # c(alpha) of the two-sample KS test: alpha = 0.01, 0.001
_PSI_WARNING, _PSI_SERIOUS = 0.10, 0.25
_CHI2_Z = {"warning": 2.3263, "serious": 3.0902}  # normal quantiles of 0.99, 0.999 (Wilson-Hilferty)
_W_K = {"warning": 2.6, "serious": 3.3}  # null 99 % and 99.9 % points of W1 in units of std·sqrt(1/n + 1/m) (normal)

# The order breaks exact ties within a tier (see _Spec.tier).
_SPECS: tuple[_Spec, ...] = (
    _Spec("brightness", "brightness", "ks", _KS_WARNING, _KS_SERIOUS, "field images are brighter", "field images are darker"),
    _Spec("contrast", "contrast (std/mean of gray)", "ks", _KS_WARNING, _KS_SERIOUS,
          "field images have more contrast", "field images have less contrast", "{:.2f}"),
    _Spec("sharpness", "sharpness (std of Laplacian/std of gray)", "ks", _KS_WARNING, _KS_SERIOUS,
          "field images are sharper (or noisier)", "field images are blurrier (or less noisy)", "{:.3f}"),
    _Spec("size", "size √(w·h)", "wasserstein", 0.5, 1.0, "field images are larger", "field images are smaller",
          "{:.0f} px", log2=True, unit=" octaves"),
    _Spec("aspect", "aspect ratio w/h", "wasserstein", 0.15, 0.4, "field images are wider", "field images are taller",
          "{:.2f}", log2=True, unit=" octaves"),
    _Spec("saturation", "saturation", "ks", _KS_WARNING, _KS_SERIOUS,
          "field images are more saturated", "field images are less saturated (greyer)"),
    _Spec("jpeg_quality", "JPEG quality", "wasserstein", 5.0, 15.0,
          "field JPEGs are less compressed", "field JPEGs are more compressed", unit=" quality points"),
    *(
        _Spec(f"mean_{c}", f"mean {full}", "ks", _KS_WARNING, _KS_SERIOUS,
              f"field images hold more {full}", f"field images hold less {full}", tier=2)
        for c, full in (("b", "blue"), ("g", "green"), ("r", "red"))
    ),
    *(
        _Spec(f"std_{c}", f"std of {full}", "ks", _KS_WARNING, _KS_SERIOUS,
              f"{full} varies more within field images", f"{full} varies less within field images", "{:.1f}", tier=2)
        for c, full in (("b", "blue"), ("g", "green"), ("r", "red"))
    ),
    _Spec("format", "format", "psi", _PSI_WARNING, _PSI_SERIOUS, "", ""),
    _Spec("exif_orientation", "EXIF rotation", "psi", _PSI_WARNING, _PSI_SERIOUS, "", ""),
    _Spec("boxes_per_image", "boxes per image", "psi", _PSI_WARNING, _PSI_SERIOUS,
          "the model finds more objects in field images", "the model finds fewer objects in field images", prediction=True, tier=3),
    _Spec("top_confidence", "top confidence", "wasserstein", 0.05, 0.10,
          "the model is more confident on field images", "the model is less confident on field images", "{:.2f}", prediction=True, tier=3),
    _Spec("confidence", "box confidence", "wasserstein", 0.05, 0.10,
          "field boxes are more confident", "field boxes are less confident", "{:.2f}", prediction=True, per_box=True, tier=3),
    _Spec("box_size", "box size √(box/image area)", "ks", _KS_WARNING, _KS_SERIOUS,
          "field objects look larger", "field objects look smaller", "{:.1%}", prediction=True, per_box=True, tier=3),
    _Spec("class_mix", "class mix", "psi", _PSI_WARNING, _PSI_SERIOUS, "", "", prediction=True, per_box=True, tier=3),
)


@dataclass(frozen=True)
class Drift:
    """One statistic's verdict: the test, its value against the (sample-size-aware) thresholds, and a one-line message."""

    statistic: str
    test: str  # "ks", "psi", "wasserstein"; "none" when not tested (too few samples) or a settings check
    value: float
    warning_threshold: float
    serious_threshold: float
    severity: Severity
    message: str
    p_value: float | None = None
    baseline_n: int = 0
    field_n: int = 0

    @property
    def threshold(self) -> float:
        """The line that matters for this severity: the serious one once crossed, else the warning one."""
        return self.serious_threshold if self.severity == "serious" else self.warning_threshold

    @property
    def score(self) -> float:
        """How far past the serious line (1.0 = on it); ranks findings of one severity."""
        return self.value / self.serious_threshold if self.serious_threshold > 0 and math.isfinite(self.value) else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "statistic": self.statistic, "test": self.test, "value": sig(self.value), "threshold": sig(self.threshold),
            "warning_threshold": sig(self.warning_threshold), "serious_threshold": sig(self.serious_threshold),
            "severity": self.severity, "message": self.message,
            "p_value": None if self.p_value is None else sig(self.p_value), "baseline_n": self.baseline_n, "field_n": self.field_n,
        }  # fmt: skip

    def __str__(self) -> str:
        return f"[{self.severity}] {self.statistic}: {self.message}"


def _severity(value: float, warning: float, serious: float) -> Severity:
    return "serious" if value > serious else "warning" if value > warning else "ok"


def ks_statistic(a: Sketch, b: Sketch) -> float:
    """Two-sample KS D between two sketches: each CDF read as the step function of its quantiles (right-continuous),
    compared at every quantile of either, from the right and from the left."""
    qa, qb = np.asarray(a.quantiles), np.asarray(b.quantiles)
    grid = np.union1d(qa, qb)

    def cdf(q: np.ndarray, side: Literal["left", "right"]) -> np.ndarray:
        k = np.searchsorted(q, grid, side=side)
        return np.where(k > 0, (k - 1) / (len(q) - 1), 0.0)

    return float(max(np.abs(cdf(qa, "right") - cdf(qb, "right")).max(), np.abs(cdf(qa, "left") - cdf(qb, "left")).max()))


def ks_p_value(d: float, n_eff: float) -> float:
    """Asymptotic two-sample KS p-value (Kolmogorov distribution, Stephens' small-sample correction)."""
    s = math.sqrt(n_eff)
    lam = (s + 0.12 + 0.11 / s) * d
    if lam < 0.2:
        return 1.0
    p = 2.0 * sum((-1) ** (k - 1) * math.exp(-2.0 * k * k * lam * lam) for k in range(1, 101))
    return min(1.0, max(0.0, p))


def _chi2_quantile(z: float, df: int) -> float:
    """Wilson-Hilferty: the chi-square quantile whose normal score is z (within about 2 % for df >= 1 at these tails)."""
    c = 2.0 / (9.0 * df)
    return df * (1.0 - c + z * math.sqrt(c)) ** 3


def _chi2_sf(x: float, df: int) -> float:
    c = 2.0 / (9.0 * df)
    z = ((x / df) ** (1.0 / 3.0) - (1.0 - c)) / math.sqrt(c)
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def _q(values: Sketch, log2: bool) -> np.ndarray:
    q = np.asarray(values.quantiles, dtype=np.float64)
    return np.log2(np.clip(q, 1e-12, None)) if log2 else q


def _verdict(statistic: str, severity: Severity, warning: float, serious: float, p_value: float | None) -> str:
    """E.g. "KS D=0.92 > 0.45 serious; p<0.001" or "PSI 0.03, warning above 0.10"."""
    text = f"{statistic} > {serious:.2f} serious" if severity == "serious" else (
        f"{statistic} > {warning:.2f} warning" if severity == "warning" else f"{statistic}, warning above {warning:.2f}")
    if p_value is None:
        return text
    return f"{text}; " + ("p<0.001" if p_value < 0.001 else f"p={p_value:.3f}" if p_value < 0.1 else f"p={p_value:.2f}")


def _test_numeric(spec: _Spec, base: Sketch, fld: Sketch, n_b: int, n_f: int) -> Drift:
    n_eff = n_b * n_f / (n_b + n_f)
    qb, qf = _q(base, spec.log2), _q(fld, spec.log2)
    shift = float(np.mean(qf - qb))  # the direction: how the whole quantile function moved
    p_value: float | None = None
    if spec.test == "ks":
        value = ks_statistic(base, fld)
        root = math.sqrt(n_eff)
        scale = root + 0.12 + 0.11 / root
        warning = max(spec.warning, _KS_C["warning"] / scale)
        serious = max(spec.serious, _KS_C["serious"] / scale)
        p_value = ks_p_value(value, n_eff)
        detail = f"KS D={value:.2f}"
    else:
        d = np.abs(qf - qb)
        value = float(((d[:-1] + d[1:]) / 2).mean())  # W1 = integral of |Qf - Qb| over p
        noise = float(np.std(qb)) * math.sqrt(1 / n_b + 1 / n_f)  # W1 of two samples of one distribution is of this order
        warning = max(spec.warning, _W_K["warning"] * noise)
        serious = max(spec.serious, _W_K["serious"] * noise)
        detail = f"Wasserstein {value:.2f}{spec.unit}"
    severity = _severity(value, warning, serious)
    detail = _verdict(detail, severity, warning, serious, p_value)
    medians = f"median {spec.label} {spec.fmt.format(fld.median)} vs {spec.fmt.format(base.median)}"
    if severity == "ok":
        message = f"{spec.short} holds: {medians} ({detail})"
    else:
        message = f"{spec.up if shift > 0 else spec.down}: {medians} ({detail})"
    return Drift(spec.name, spec.test, value, warning, serious, severity, message + _small(n_b, n_f), p_value, base.count, fld.count)


_BOX_BINS = ((0, 0), (1, 1), (2, 2), (3, 4), (5, 8), (9, 16), (17, 10**9))


def _bins(spec: _Spec, counts: Mapping[str, int]) -> dict[str, int]:
    if spec.name == "exif_orientation":
        # No tag and tag 1 both mean upright: a pipeline that strips EXIF is not a rotation drift.
        out: dict[str, int] = {}
        for k, n in counts.items():
            label = "upright" if k in ("none", "1") else k
            out[label] = out.get(label, 0) + n
        return out
    if spec.name != "boxes_per_image":
        return dict(counts)
    # Merged ranges: a bin per exact count would leave most bins nearly empty and the test without power.
    out = {f"{lo}" if lo == hi else f"{lo}+" if hi > 10**8 else f"{lo}-{hi}": 0 for lo, hi in _BOX_BINS}
    for k, n in counts.items():
        label = next(lab for lab, (lo, hi) in zip(out, _BOX_BINS, strict=True) if lo <= int(k) <= hi)
        out[label] += n
    return out


def _mean_boxes(counts: Mapping[str, int]) -> float:
    total = sum(counts.values())
    return sum(int(k) * n for k, n in counts.items()) / total if total else 0.0


def _test_categorical(spec: _Spec, base_counts: Mapping[str, int], field_counts: Mapping[str, int], n_b: int, n_f: int) -> Drift:
    b, f = _bins(spec, base_counts), _bins(spec, field_counts)
    keys = [k for k in dict.fromkeys([*b, *f]) if b.get(k, 0) + f.get(k, 0) > 0]
    tb, tf = sum(b.values()), sum(f.values())
    cb = np.array([b.get(k, 0) for k in keys], dtype=np.float64)
    cf = np.array([f.get(k, 0) for k in keys], dtype=np.float64)
    # Half a count per category (Jeffreys): a category absent on one side gives a large, finite PSI.
    pb, pf = (cb + 0.5) / (tb + 0.5 * len(keys)), (cf + 0.5) / (tf + 0.5 * len(keys))
    value = float(np.sum((pf - pb) * np.log(pf / pb))) if len(keys) > 1 else 0.0
    df = max(len(keys) - 1, 1)
    n_eff = n_b * n_f / (n_b + n_f)
    # n_eff·PSI is close to a chi-square with k-1 degrees of freedom when nothing drifted: below ~100 samples a side its
    # 99 % / 99.9 % points exceed the usual 0.1 / 0.25, and those points become the thresholds.
    warning = max(spec.warning, _chi2_quantile(_CHI2_Z["warning"], df) / n_eff)
    serious = max(spec.serious, _chi2_quantile(_CHI2_Z["serious"], df) / n_eff)
    p_value = _chi2_sf(n_eff * value, df) if len(keys) > 1 else 1.0
    severity = _severity(value, warning, serious)
    detail = _verdict(f"PSI {value:.2f}", severity, warning, serious, p_value)
    sb, sf = cb / max(tb, 1), cf / max(tf, 1)
    if spec.name == "boxes_per_image":
        mb, mf = _mean_boxes(base_counts), _mean_boxes(field_counts)
        e_b, e_f = base_counts.get("0", 0) / max(tb, 1), field_counts.get("0", 0) / max(tf, 1)
        what = f"{mf:.1f} vs {mb:.1f} boxes per image, {e_f:.0%} vs {e_b:.0%} of images without a box"
        opening = "boxes per image hold" if severity == "ok" else spec.up if mf > mb else spec.down
    elif spec.name == "exif_orientation":
        rb, rf = 1.0 - b.get("upright", 0) / max(tb, 1), 1.0 - f.get("upright", 0) / max(tf, 1)
        what = f"{rf:.0%} vs {rb:.0%} of images carry an EXIF rotation"
        opening = "EXIF rotation share holds" if severity == "ok" else "more field images are EXIF-rotated" if rf > rb else "fewer field images are EXIF-rotated"
    else:
        i = int(np.argmax(np.abs(sf - sb)))
        what = f"largest change {keys[i]} {sf[i]:.0%} vs {sb[i]:.0%}" if keys else "no values"
        opening = f"{spec.label} holds" if severity == "ok" else f"the {spec.label} changed"
    message = f"{opening}: {what} ({detail})" + _small(n_b, n_f)
    return Drift(spec.name, "psi", value, warning, serious, severity, message, p_value, tb, tf)


def _small(n_b: int, n_f: int) -> str:
    return f"; small sample ({n_f} field vs {n_b} baseline): thresholds widened, only large drifts show" if min(n_b, n_f) < SMALL_SAMPLE else ""


def _untested(spec: _Spec, n_b: int, n_f: int, why: str) -> Drift:
    return Drift(spec.name, "none", 0.0, spec.warning, spec.serious, "ok", f"{spec.short} not tested: {why}", None, n_b, n_f)


def _sizes(spec: _Spec, profile: DataProfile) -> tuple[int, int]:
    """(values in the sample, sample size the test may trust)."""
    if spec.test == "psi":
        count = sum(profile.categorical.get(spec.name, {}).values())
    else:
        count = profile.numeric.get(spec.name, Sketch(0)).count
    if not spec.per_box:
        return count, count
    with_boxes = profile.images - profile.categorical.get("boxes_per_image", {}).get("0", 0)
    return count, min(count, with_boxes)


def compare(baseline: DataProfile, field: DataProfile) -> list[Drift]:
    """One finding per statistic, worst first (severity, then how far past the serious line). Prediction statistics are
    compared when both profiles have them; a statistic with fewer than MIN_SAMPLES values on a side is reported as not
    tested rather than raising."""
    for which, p in (("baseline", baseline), ("field", field)):
        if p.version != PROFILE_VERSION:
            raise InputError(f"the {which} profile is version {p.version}, this cvdeploy compares version {PROFILE_VERSION}: profile it again")
    findings: list[Drift] = []
    both = baseline.has_predictions and field.has_predictions
    for spec in _SPECS:
        if spec.prediction and not both:
            continue
        (count_b, n_b), (count_f, n_f) = _sizes(spec, baseline), _sizes(spec, field)
        if min(n_b, n_f) < MIN_SAMPLES:
            unit = {"jpeg_quality": "JPEG images", "format": "encoded images", "exif_orientation": "encoded images"}.get(
                spec.name, "images with boxes" if spec.per_box else "images")
            findings.append(_untested(spec, count_b, count_f, f"{n_f} field vs {n_b} baseline {unit} (needs {MIN_SAMPLES} a side)"))
        elif spec.test == "psi":
            findings.append(_test_categorical(spec, baseline.categorical[spec.name], field.categorical[spec.name], n_b, n_f))
        else:
            findings.append(_test_numeric(spec, baseline.numeric[spec.name], field.numeric[spec.name], n_b, n_f))
    findings += _settings_findings(baseline, field)
    order = {s.name: i for i, s in enumerate(_SPECS)}
    tier = {s.name: s.tier for s in _SPECS}  # the settings finding (tier 0) comes first: it qualifies the others
    findings.sort(key=lambda d: (-_RANK[d.severity], tier.get(d.statistic, 0), -round(d.score, 9), order.get(d.statistic, len(order))))
    return findings


def _settings_findings(baseline: DataProfile, field: DataProfile) -> list[Drift]:
    if baseline.has_predictions != field.has_predictions:
        which = "field" if baseline.has_predictions else "baseline"
        return [Drift("predictions", "none", 0.0, 0.0, 0.0, "ok",
                      f"prediction statistics not compared: the {which} profile was made without a model", None,
                      baseline.images, field.images)]  # fmt: skip
    if not baseline.has_predictions:
        return []
    keys = ("bundle", "variant", "conf", "iou", "max_det")
    diff = [f"{k} {field.model.get(k)!r} vs {baseline.model.get(k)!r}" for k in keys if field.model.get(k) != baseline.model.get(k)]  # type: ignore[union-attr]
    if not diff:
        return []
    # Not a drift of the data, but it moves every prediction statistic: say so before anyone reads them.
    return [Drift("model", "none", 1.0, 0.5, 2.0, "warning",
                  f"the profiles were predicted with different settings ({', '.join(diff)}): prediction statistics may differ for that reason",
                  None, baseline.images, field.images)]  # fmt: skip
