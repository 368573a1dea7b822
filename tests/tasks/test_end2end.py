"""End-to-end (NMS-free) heads, YOLO26: `cvdeploy build` exports the one-to-one head and checks it against the torch
model run in the same mode (it used to compare (1, 300, 6) with the one-to-many (1, 84, anchors) and refuse); on the
same ONNX the Predictor's results match `ultralytics.YOLO(onnx).predict` for detect, segment, pose and obb."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from cvdeploy import Bundle, Predictor
from cvdeploy.evaluate.verify import verify_bundle

pytestmark = pytest.mark.slow
CONF = 0.5
CFGS = {"detect": "yolo26n.yaml", "segment": "yolo26n-seg.yaml", "pose": "yolo26n-pose.yaml", "obb": "yolo26n-obb.yaml"}
EXTRA = {"detect": 0, "segment": 32, "pose": 51, "obb": 1}


@pytest.mark.parametrize("task", list(CFGS))
def test_end2end_build_parity_and_verify(build_task_bundle: Callable[..., Path], task: str) -> None:
    path = build_task_bundle(CFGS[task])
    m = Bundle.load(path).manifest
    assert m.task == task and m.postprocess.end2end
    assert m.outputs[0].shape[1] in (300, None) and m.outputs[0].shape[2] == 6 + EXTRA[task]  # rows: the top 300
    parity = m.variants["onnx-fp32"].parity
    assert parity is not None and parity.passed and parity.outputs["output0"].max_abs_scores <= 1e-3
    (check,) = verify_bundle(path)
    assert check.ok, check.problems
    assert check.box_agreement == 1.0


@pytest.mark.parametrize("task", list(CFGS))
def test_end2end_matches_ultralytics_on_the_same_onnx(build_task_bundle: Callable[..., Path], task_images: list[Path],
                                                      task: str) -> None:
    """No NMS: both keep the rows above the threshold in the graph's order, so results compare row by row (untrained
    heads give flat and duplicate boxes, which IoU matching cannot pair)."""
    from ultralytics import YOLO

    path = build_task_bundle(CFGS[task])
    ours = Predictor(path, conf=CONF)
    theirs = YOLO(str(Bundle.load(path).variant_path()), task=task)
    total, worst = 0, {"box": 0.0, "conf": 0.0, "extra": 0.0}
    for image in task_images:
        r = ours.predict(image)
        u = theirs.predict(str(image), imgsz=256, conf=CONF, verbose=False)[0]
        a, b = (r.obb.data, u.obb.data.numpy()) if task == "obb" else (r.boxes.data, u.boxes.data.numpy())
        assert a.shape == b.shape, f"{image.name}: {len(a)} detections, ultralytics {len(b)}"
        if not len(a):
            continue
        total += len(a)
        assert (a[:, -1] == b[:, -1]).all()  # classes
        worst["box"] = max(worst["box"], float(np.abs(a[:, :-2] - b[:, :-2]).max()))
        worst["conf"] = max(worst["conf"], float(np.abs(a[:, -2] - b[:, -2]).max()))
        if task == "segment":
            m, um = r.masks.data.astype(bool), u.masks.data.numpy().astype(bool)
            iou = (m & um).sum((1, 2)) / np.maximum((m | um).sum((1, 2)), 1)
            worst["extra"] = max(worst["extra"], 1 - float(iou.min()))
        if task == "pose":
            worst["extra"] = max(worst["extra"], float(np.abs(r.keypoints.data - u.keypoints.data.numpy()).max()))
    print(f"\nend-to-end {task} parity: {total} detections on {len(task_images)} images, worst |dbox| {worst['box']:.2e}, "
          f"worst |dconf| {worst['conf']:.2e}"
          + {"segment": f", worst 1 - mask IoU {worst['extra']:.2e}", "pose": f", worst keypoint {worst['extra']:.2e} px"}.get(task, ""))
    assert total >= 40
    assert worst["box"] <= 0.01 and worst["conf"] <= 1e-3
    assert worst["extra"] <= (0.02 if task == "segment" else 0.5)
