"""The canary: a new version's prediction statistics on the device's own sample images, against a baseline.

The baseline is the version the device serves now, predicting the same images (the same images on both sides, so only
the model can move the statistics); before the first install, the new bundle's own data profile (`profile.json`, the
build's controlled set); without either, the canary is skipped and says so. The statistics are the prediction ones of
`cvdeploy.diagnose.profile`: boxes per image, top confidence per image, box confidence, box size and class mix, each
judged by `compare`'s test and thresholds (PSI 0.10/0.25, Wasserstein 0.05/0.10 of confidence, KS 0.15/0.30), widened
for small samples. The update fails the canary when one of them reaches `fail_on` ("serious" by default).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cvdeploy.diagnose.profile import MIN_SAMPLES, DataProfile, Drift, compare, profile_images
from cvdeploy.errors import InputError
from cvdeploy.fleet.protocol import CanarySummary
from cvdeploy.vision.image import image_files

PREDICTION_STATISTICS = ("boxes_per_image", "top_confidence", "confidence", "box_size", "class_mix")
FailOn = Literal["warning", "serious"]
_RANK = {"ok": 0, "warning": 1, "serious": 2}


@dataclass
class CanaryResult:
    baseline: str
    images: int
    passed: bool
    fail_on: FailOn
    findings: list[Drift] = field(default_factory=list)
    reason: str = ""

    def summary(self) -> CanarySummary:
        return CanarySummary(baseline=self.baseline, images=self.images, passed=self.passed, fail_on=self.fail_on,
                             findings=[d.to_dict() for d in self.findings])


def sample_images(samples: str | Path | None, limit: int) -> list[Path]:
    """The canary's images: the first `limit` image files of `samples` (sorted, so every run uses the same ones)."""
    if samples is None:
        return []
    root = Path(samples)
    if not root.is_dir():
        raise InputError(f"canary samples: {root} is not a directory of images")
    return sorted(image_files(root))[:limit]


def _profile(bundle: Path, images: Sequence[Path]) -> DataProfile:
    from cvdeploy.predict import Predictor

    with Predictor(bundle) as p:
        return profile_images(list(images), p)


def run_canary(new: Path, previous: Path | None, images: Sequence[Path], *, fail_on: FailOn = "serious") -> CanaryResult:
    """Predict `images` with the bundle `new` and with `previous` (or read `new`'s profile), and judge the prediction
    statistics."""
    from cvdeploy.bundle.bundle import Bundle

    if len(images) < MIN_SAMPLES:
        return CanaryResult("none", len(images), True, fail_on,
                            reason=f"canary skipped: {len(images)} sample image(s), it needs {MIN_SAMPLES} (--samples DIR)")
    if previous is not None:
        baseline, label = _profile(previous, images), "previous version"
    else:
        manifest = Bundle.load(new, check_hashes=False).manifest
        if manifest.profile is None:
            return CanaryResult("none", len(images), True, fail_on,
                                reason="canary skipped: no previous version and no data profile in the bundle")
        baseline, label = DataProfile.load(new / manifest.profile.file), "bundle profile"
    field_profile = _profile(new, images)
    findings = [d for d in compare(baseline, field_profile) if d.statistic in PREDICTION_STATISTICS]
    bad = [d for d in findings if _RANK[d.severity] >= _RANK[fail_on]]
    reason = ("canary failed: " + "; ".join(str(d) for d in bad)) if bad else \
        f"canary passed: {len(images)} images, prediction statistics within the {fail_on} thresholds of the {label}"
    return CanaryResult(label, len(images), not bad, fail_on, findings, reason)
