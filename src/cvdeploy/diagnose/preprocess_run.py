"""Running the preprocessing audit's pipelines: a candidate mistake's tensors through the bundle's own engine and
postprocessing, and every candidate over the images a window at a time (an image a mistake leaves unchanged is not run
again)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from cvdeploy.diagnose.preprocess_mistakes import CORRECT, Mistake, resolve_mistakes
from cvdeploy.diagnose.preprocess_samples import Sample, check_images, windows
from cvdeploy.errors import CvdeployError
from cvdeploy.predict import Prepared
from cvdeploy.vision.image import ImageSource
from cvdeploy.vision.letterbox import LetterboxParams
from cvdeploy.vision.postprocess import DetectOptions
from cvdeploy.vision.result import Result

if TYPE_CHECKING:
    from cvdeploy.predict import Predictor

__all__ = ["run_all", "run_candidate", "runnable_candidates", "simulate_deployment"]

# -- running a candidate ---------------------------------------------------------------------------


def _dynamic(predictor: Predictor) -> bool:
    shape = predictor.engine.inputs[0].shape
    return not (isinstance(shape[2], int) and isinstance(shape[3], int))


def _infer(predictor: Predictor, prepared: Sequence[tuple[np.ndarray, LetterboxParams]], names: Sequence[str | None],
           options: DetectOptions) -> list[Result]:
    """The engine and the bundle's postprocessing on prepared (1, 3, H, W) tensors; tensors of one shape are batched."""
    results: list[Result | None] = [None] * len(prepared)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (tensor, _) in enumerate(prepared):
        groups.setdefault(tensor.shape, []).append(i)
    for idx in groups.values():
        for b in range(0, len(idx), predictor.max_batch):
            chunk = idx[b : b + predictor.max_batch]
            tensor = np.concatenate([prepared[i][0] for i in chunk])
            params = [prepared[i][1] for i in chunk]
            out = predictor.finish(Prepared(tensor, params, [p.orig_shape for p in params]), predictor.infer_all(tensor),
                                   options=options, sources=[names[i] for i in chunk])
            for i, r in zip(chunk, out, strict=True):
                results[i] = r
    return [r for r in results if r is not None]


def run_candidate(predictor: Predictor, samples: Sequence[Sample], mistake: Mistake, options: DetectOptions) -> list[Result]:
    """Predict `samples` as a deployment making `mistake` would: its tensors, the bundle's engine and postprocessing.

    One Result per sample, with boxes in the frame that deployment reports them in.
    """
    return _infer(predictor, [mistake.prepare(s, predictor.spec) for s in samples], [s.name for s in samples], options)


def simulate_deployment(predictor: Predictor, images: Sequence[ImageSource], mistake: str | Mistake = "correct",
                        **overrides: Any) -> list[dict[str, Any]]:
    """What a deployment making `mistake` ("correct": none) answers for each image, in the image API's JSON shape.

    Useful to see a mistake's effect on your own images, and to rehearse the audit (the tests do).
    Overrides: conf, iou, max_det, classes.
    """
    m = CORRECT if mistake in ("correct", CORRECT) else resolve_mistakes([mistake])[0]
    check_images(images)
    options = predictor.detect_options(**overrides)
    return [{"model_name": predictor.bundle.name, **r.to_dict()}
            for _, window in windows(predictor, images) for r in run_candidate(predictor, window, m, options)]


# -- every candidate --------------------------------------------------------------------------------


def runnable_candidates(predictor: Predictor, mistakes: Iterable[str | Mistake]) -> tuple[list[Mistake], dict[str, str]]:
    """The mistakes that can run on this model, and {name: why not} for those needing another input size than a fixed one."""
    chosen = resolve_mistakes(mistakes)
    dynamic = _dynamic(predictor)
    skipped: dict[str, str] = {}
    runnable = []
    for m in chosen:
        if m.needs_dynamic and not dynamic:
            h, w = predictor.spec.imgsz
            skipped[m.name] = f"the model's input is fixed at {w}x{h}: a deployment cannot feed it another size"
        else:
            runnable.append(m)
    return runnable, skipped


def run_all(predictor: Predictor, images: Sequence[ImageSource], mistakes: list[Mistake], options: DetectOptions,
             skipped: dict[str, str], on_progress: Callable[[str, int, int], None] | None,
             check: Callable[[int, list[Sample]], None] | None = None,
             ) -> tuple[list[Result], dict[str, tuple[list[Result], int]]]:
    """The correct pipeline and every candidate, a window of images at a time; (correct results, {name: (results,
    images changed)}). An image whose engine input a mistake leaves unchanged gets the correct pipeline's result
    (same input, same output) without a run; a mistake that changes no image at all is skipped, with its reason."""
    total = len(images) * (1 + len(mistakes))
    done = 0
    spec = predictor.spec
    base: list[Result] = []
    runs: dict[str, list[Result]] = {m.name: [] for m in mistakes}
    changed = dict.fromkeys(runs, 0)
    failed: dict[str, str] = {}

    def advance(label: str, k: int) -> None:
        nonlocal done
        done += k
        if on_progress:
            on_progress(label, done, total)

    for offset, window in windows(predictor, images):
        if check:
            check(offset, window)
        names = [s.name for s in window]
        ref = [CORRECT.prepare(s, spec) for s in window]
        ref_results = _infer(predictor, ref, names, options)
        base += ref_results
        advance(CORRECT.name, len(window))
        for m in mistakes:
            if m.name in failed:
                advance(m.name, len(window))
                continue
            try:
                prepared = [m.prepare(s, spec) for s in window]
                diff = [i for i, (t, _) in enumerate(prepared) if t.shape != ref[i][0].shape or not np.array_equal(t, ref[i][0])]
                out = list(ref_results)
                for i, r in zip(diff, _infer(predictor, [prepared[i] for i in diff], [names[i] for i in diff], options),
                                strict=True):
                    out[i] = r
            except CvdeployError as e:  # e.g. an engine that refuses the size this mistake feeds it
                failed[m.name] = f"could not be reproduced: {e}"
            else:
                runs[m.name] += out
                changed[m.name] += len(diff)
            advance(m.name, len(window))
    skipped.update(failed)
    for m in mistakes:
        if m.name not in failed and changed[m.name] == 0:
            skipped[m.name] = m.same_reason
    return base, {n: (r, changed[n]) for n, r in runs.items() if n not in skipped}
