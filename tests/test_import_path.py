"""The inference path (bundle, vision, runtime, predict, the predict command) never imports torch or ultralytics."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

SCRIPT = r"""
import sys
import cvdeploy
from cvdeploy import Bundle, Predictor
from cvdeploy.cli import app, main  # the CLI, with every command module registered
from cvdeploy.cli import bench, build, data, demo, info, predict  # noqa
import cvdeploy.bench, cvdeploy.bench.tune, cvdeploy.bench.profile  # noqa
import cvdeploy.bundle, cvdeploy.vision, cvdeploy.runtime, cvdeploy.predict
p = Predictor(sys.argv[1])
r = p.predict(sys.argv[2])
# The whole path ran (decode, engine, postprocess), not just the imports: the shapes image has objects to find.
h, w = map(int, sys.argv[3:5])
assert r.orig_shape == (h, w), r.orig_shape
assert len(r.detections) > 0, "no detections: the inference path did not really run"
assert set(r.detections.class_id.tolist()) <= set(p.names), r.detections.class_id
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {"torch", "ultralytics", "torchvision"})
print("HEAVY:" + ",".join(heavy))
"""


def test_inference_path_leaves_torch_out(demo_bundle: Path, shapes_data: Path) -> None:
    image = sorted((shapes_data / "images" / "val").glob("*.jpg"))[0]
    with Image.open(image) as im:
        w, h = im.size
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(demo_bundle), str(image), str(h), str(w)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "HEAVY:\n" in out.stdout, out.stdout


def test_predict_command_leaves_torch_out(demo_bundle: Path, shapes_data: Path) -> None:
    image = sorted((shapes_data / "images" / "val").glob("*.jpg"))[0]
    code = (
        "import sys, runpy\n"
        "sys.argv = ['cvdeploy', 'predict', sys.argv[1], sys.argv[2], '--json']\n"
        "try:\n    runpy.run_module('cvdeploy', run_name='__main__')\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
        "print('HEAVY:' + ','.join(sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'ultralytics'})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(demo_bundle), str(image)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.rstrip().endswith("HEAVY:"), out.stdout[-500:]
    (result,) = json.loads(out.stdout.rstrip().rsplit("\n", 1)[0])  # the command really predicted: its JSON, then HEAVY:
    assert result["source"] == str(image) and len(result["detections"]) > 0
