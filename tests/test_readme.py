"""The README's quickstart holds exactly two set-up commands, and CI runs the test one."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _quickstart_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [line for b in blocks for line in b.splitlines() if line.strip() and not line.startswith("#")]


def test_two_commands_demo_then_tests() -> None:
    demo, tests = _quickstart_commands()
    assert demo.endswith("cvdeploy demo") and "pip install" in demo
    assert tests.endswith("pytest") and "[test]" in tests


def test_ci_runs_the_readme_test_command() -> None:
    _, tests = _quickstart_commands()
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci.splitlines()


def test_the_readme_python_snippet_runs_as_written(demo_bundle: Path, shapes_data: Path, tmp_path: Path,
                                                   monkeypatch) -> None:
    """The README's Python block (Predictor, the Ultralytics-style lines, stream, supervision) runs as printed, on files
    named as it names them."""
    import shutil

    import cv2
    import supervision as sv

    text = (ROOT / "README.md").read_text()
    code = next(b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "Predictor(" in b)
    shutil.copytree(demo_bundle, tmp_path / "cvdeploy-demo" / "yolo11n-shapes.cvd")
    images = sorted((shapes_data / "images" / "val").glob("*.jpg"))
    shutil.copy(images[0], tmp_path / "image.jpg")
    shutil.copy(images[1], tmp_path / "a.jpg")
    cv2.imwrite(str(tmp_path / "b.png"), cv2.imread(str(images[2])))
    frame = cv2.imread(str(images[3]))
    video = cv2.VideoWriter(str(tmp_path / "clip.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 10, (frame.shape[1], frame.shape[0]))
    for _ in range(5):
        video.write(frame)
    video.release()
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    r, detections = scope["r"], scope["detections"]
    assert isinstance(detections, sv.Detections) and len(detections) == len(r.detections) > 0
    assert len(sv.Detections.from_ultralytics(r)) == len(detections)
    assert r.source.startswith("clip.mp4") and len(scope["results"]) == 2
