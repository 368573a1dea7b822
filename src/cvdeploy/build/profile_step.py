"""The build's data profile: the controlled set's image statistics and the source variant's predictions, as profile.json.

Drift is only measurable against a baseline, and the one baseline every deployment can carry is the set the bundle
was validated on. With a controlled set (`cvdeploy build --data`), the build profiles the images of its val split (the
images whose mAP the manifest records; evenly sampled down to MAX_PROFILE_IMAGES) with the source variant (onnx-fp32,
at the bundle's own postprocessing thresholds, one image at a time as a lone request is served), writes the
`DataProfile` to `profile.json` and lists it in the manifest with its sha256 (`Manifest.profile`), so `Bundle.load`
and `cvdeploy verify` check it like every other file. Without a controlled set no profile is written and
`Manifest.profile` stays None: the doctor then needs a baseline given to it (`--baseline`, `--data`).

Every box task is profiled (detect, segment, pose, obb: the profile reads their detections' boxes and confidences;
the split's images are listed whatever the labels). A classify bundle gets no profile (`profile_note`): the profile's
prediction statistics are those of boxes, and a classifier has none.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cvdeploy.bundle.bundle import Bundle, sha256_file
from cvdeploy.bundle.manifest import ProfileInfo
from cvdeploy.diagnose.profile import DataProfile, profile_images, read_profile  # noqa: F401  (read_profile: re-exported)
from cvdeploy.errors import InputError

PROFILE_FILE = "profile.json"
PROFILE_VARIANT = "onnx-fp32"  # the source: what the .pt computes, within the build's parity tolerance
# Enough for every sketch's 101 quantiles and the drift tests' power (thresholds widen below 30 images a side); more
# only lengthens the build (one prediction each).
MAX_PROFILE_IMAGES = 500


def profile_note(task: str) -> str | None:
    """Why a bundle of `task` gets no data profile, or None when it gets one."""
    if task == "classify":
        return ("a classifier's predictions are class probabilities, and the data profile's prediction statistics are "
                "those of boxes (count, confidence, size, class mix); profile its traffic with `cvdeploy doctor` and a "
                "baseline given to it")
    return None


def profile_sources(data: str | os.PathLike[str], split: str = "val", max_images: int = MAX_PROFILE_IMAGES) -> tuple[list[Path], int]:
    """The images of `split` to profile (all of them, or `max_images` evenly spaced over the sorted split), and how many
    the split holds. Only the images are read, so any task's labels (boxes, polygons, keypoints, corners) will do."""
    from cvdeploy.evaluate.labels import split_images

    if max_images < 1:
        raise InputError(f"the data profile needs at least 1 image, got max_images={max_images}")
    images = split_images(data, split)
    picked = np.unique(np.linspace(0, len(images) - 1, min(max_images, len(images))).round().astype(int))
    return [images[i] for i in picked], len(images)


def write_profile(
    bundle: Bundle,
    data: str | os.PathLike[str],
    *,
    split: str = "val",
    variant: str = PROFILE_VARIANT,
    max_images: int = MAX_PROFILE_IMAGES,
    on_progress: Callable[[int], None] | None = None,
) -> ProfileInfo:
    """Profile the `split` of the data.yaml `data` with `variant`'s predictions, write `profile.json` into the bundle
    directory and set `bundle.manifest.profile` (the caller saves the manifest, as the build does after each step)."""
    from cvdeploy.predict import Predictor

    if bundle.root is None:
        raise InputError(f"{bundle.name}: a plain .onnx file has no bundle directory to hold a data profile")
    if (note := profile_note(bundle.manifest.task)) is not None:
        raise InputError(f"{bundle.name}: no data profile for a classify bundle: {note}")
    paths, total = profile_sources(data, split, max_images)
    with Predictor(bundle, variant) as predictor:
        profile = profile_images(paths, predictor, on_progress=on_progress)
    out = bundle.root / PROFILE_FILE
    tmp = out.with_name(f".{PROFILE_FILE}.tmp")
    profile.save(tmp)
    os.replace(tmp, out)  # a rebuild never leaves half a profile under the name the manifest lists
    sampled = f"{len(paths)} of {total} images, evenly spaced" if len(paths) < total else f"all {total} images"
    info = ProfileInfo(file=PROFILE_FILE, sha256=sha256_file(out), images=profile.images, variant=variant,
                       source=f"{split} split of {data} ({sampled})")
    bundle.manifest.profile = info
    return info
