"""The doctor against seeded faults (issue 13): for each injected cause its top finding names that cause, and on clean
field data it reports nothing serious. Faults are made by the tests from the demo model and generated shapes data.

The faults of the other steps (an FP16 overflow in a copy of the graph, a wrong-version environment record) are in
test_doctor_integrity.py and test_doctor_environment.py, beside the modules that find them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

from cvdeploy.diagnose.doctor import STEPS, DoctorReport, Finding, diagnose, rank


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from cvdeploy.demo.shapes import generate_shapes

    root = tmp_path_factory.mktemp("faults")
    base = generate_shapes(root / "base", n_train=0, n_val=30, seed=11).parent / "images" / "val"
    field = generate_shapes(root / "field", n_train=0, n_val=30, seed=12).parent / "images" / "val"
    return base, field


def _top(report: DoctorReport) -> Finding:
    assert report.top is not None
    return report.top


def test_clean_field_data_gives_no_serious_finding(demo_bundle: Path, sets: tuple[Path, Path]) -> None:
    from cvdeploy import Predictor
    from cvdeploy.diagnose.preprocess_audit import simulate_deployment

    base, field = sets
    answers = simulate_deployment(Predictor(demo_bundle), sorted(field.glob("*.jpg")), "correct")
    report = diagnose(demo_bundle, field_dir=field, answers=answers, baseline=base)
    assert not report.serious, [f.to_dict() for f in report.serious]
    assert report.steps_run == ["environment", "speed", "data", "preprocessing"]
    json.dumps(report.to_dict())  # the --json output is plain JSON


@pytest.mark.parametrize("mistake", ["bgr_rgb_swap", "stretch_resize", "missing_normalization", "wrong_imgsz_large"])
def test_a_preprocessing_mistake_in_the_deployment_is_the_top_finding(demo_bundle: Path, sets: tuple[Path, Path],
                                                                      mistake: str) -> None:
    from cvdeploy import Predictor
    from cvdeploy.diagnose.preprocess_audit import simulate_deployment

    _, field = sets
    answers = simulate_deployment(Predictor(demo_bundle), sorted(field.glob("*.jpg")), mistake)  # the field's answers
    top = _top(diagnose(demo_bundle, field_dir=field, answers=answers, speed=False))
    assert (top.severity, top.step) == ("serious", "preprocessing")
    assert top.message.startswith(mistake) and top.evidence["cause"][0] == mistake and top.fix


def _darker(im: np.ndarray) -> np.ndarray:
    return cv2.convertScaleAbs(im, alpha=0.45)


def _flat(im: np.ndarray) -> np.ndarray:
    return cv2.convertScaleAbs(im, alpha=0.5, beta=64)  # half the contrast, about the same brightness


def _blurred(im: np.ndarray) -> np.ndarray:
    return cv2.GaussianBlur(im, (0, 0), 3)


@pytest.mark.parametrize(("fault", "change", "words"), [
    ("brightness drift", _darker, ("darker",)),
    ("contrast drift", _flat, ("less contrast",)),
    ("blurred field", _blurred, ("blurrier",)),
])
def test_a_drifted_field_is_named_by_the_statistic_that_moved(demo_bundle: Path, sets: tuple[Path, Path], tmp_path: Path,
                                                              fault: str, change: Callable[[np.ndarray], np.ndarray],
                                                              words: tuple[str, ...]) -> None:
    base, field = sets
    for p in sorted(field.glob("*.jpg")):
        cv2.imwrite(str(tmp_path / p.name), change(cv2.imread(str(p))))
    report = diagnose(demo_bundle, field_dir=tmp_path, baseline=base, speed=False)
    top = _top(report)
    assert (top.severity, top.step) == ("serious", "data"), fault
    assert any(w in top.message for w in words), top.message


def test_ranking_puts_causes_before_symptoms() -> None:
    found = [Finding("warning", "speed", "s"), Finding("serious", "environment", "e"), Finding("serious", "integrity", "i"),
             Finding("ok", "data", "d"), Finding("serious", "data", "d2"), Finding("serious", "preprocessing", "p")]
    assert [f.message for f in rank(found)] == ["i", "p", "d2", "e", "s", "d"]
    assert set(STEPS) >= {f.step for f in found}


def test_bad_inputs_are_refused_in_one_line(demo_bundle: Path, tmp_path: Path) -> None:
    from cvdeploy.errors import InputError

    with pytest.raises(InputError, match="field"):
        diagnose(demo_bundle, field_dir=tmp_path / "missing")
    with pytest.raises(InputError, match="answers need"):
        diagnose(demo_bundle, answers=[])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no image files"):
        diagnose(demo_bundle, field_dir=empty)


def test_a_wrong_version_environment_record_is_the_top_finding(demo_bundle: Path, tmp_path: Path) -> None:
    """The bundle says it was built and verified with onnxruntime 1.14.1; this machine runs another version."""
    import shutil

    import onnxruntime

    from cvdeploy.bundle.bundle import Bundle

    copy = tmp_path / "old.cvd"
    shutil.copytree(demo_bundle, copy)
    b = Bundle.load(copy)
    b.manifest.environment["packages"]["onnxruntime"] = "1.14.1"  # type: ignore[index]
    b.save_manifest()
    top = _top(diagnose(copy, speed=False))
    assert (top.severity, top.step) == ("warning", "environment")  # golden parity still holds here: a warning
    assert "onnxruntime 1.14.1" in top.message and onnxruntime.__version__ in top.message and top.fix
    clean = diagnose(demo_bundle, speed=False)
    assert not [f for f in clean.findings if f.severity in ("serious", "warning")]
