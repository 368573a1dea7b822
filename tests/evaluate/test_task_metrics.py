"""The numpy copy of Ultralytics' validation protocol, held to Ultralytics' own functions on the same inputs, and the
label readers held to its dataset code on generated data."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from cvdeploy.errors import InputError
from cvdeploy.evaluate import metrics as M
from cvdeploy.evaluate.labels import load_classify_split, load_task_split, split_images

os.environ.setdefault("YOLO_OFFLINE", "1")
torch = pytest.importorskip("torch")


def _boxes(rng: np.random.Generator, n: int, size: float = 200.0) -> np.ndarray:
    xy = rng.uniform(0, size, (n, 2))
    wh = rng.uniform(5, 60, (n, 2))
    return np.concatenate([xy, xy + wh], 1)


def test_match_predictions_and_ap_are_ultralytics() -> None:
    from ultralytics.engine.validator import BaseValidator
    from ultralytics.utils.metrics import ap_per_class

    rng = np.random.default_rng(0)
    tps, confs, pcls, tcls = [], [], [], []
    stub = SimpleNamespace(iouv=torch.linspace(0.5, 0.95, 10))
    for _ in range(20):
        gt = _boxes(rng, int(rng.integers(1, 8)))
        g_cls = rng.integers(0, 3, len(gt))
        # predictions near the labels (some right, some off, some of another class) and some noise
        src = rng.integers(0, len(gt), 12)
        near = gt[src] + rng.normal(0, 6, (12, 4))
        pred = np.concatenate([near, _boxes(rng, 5)])
        p_cls = np.concatenate([np.where(rng.random(12) < 0.8, g_cls[src], rng.integers(0, 3, 12)), rng.integers(0, 3, 5)])
        conf = rng.uniform(0.001, 1, len(pred))
        order = np.argsort(-conf)
        pred, conf, p_cls = pred[order], conf[order], p_cls[order]
        iou = M.box_iou(gt, pred)
        ours = M.match_predictions(p_cls, g_cls, iou)
        theirs = BaseValidator.match_predictions(stub, torch.from_numpy(p_cls), torch.from_numpy(g_cls), torch.from_numpy(iou))
        assert (ours == theirs.numpy()).all()
        tps.append(ours), confs.append(conf), pcls.append(p_cls), tcls.append(g_cls)
    tp, conf, p_cls, t_cls = (np.concatenate(x) for x in (tps, confs, pcls, tcls))
    assert 0.1 < tp[:, 0].mean() < 0.9  # a mix of hits and misses: the comparison means something
    ap_theirs = ap_per_class(tp, conf, p_cls, t_cls)[5]
    np.testing.assert_allclose(M.average_precision(tp, conf, p_cls, t_cls), ap_theirs, atol=1e-12)


def test_similarities_are_ultralytics() -> None:
    from ultralytics.utils.metrics import batch_probiou, box_iou, kpt_iou, mask_iou

    rng = np.random.default_rng(1)
    a, b = _boxes(rng, 6), _boxes(rng, 9)
    np.testing.assert_allclose(M.box_iou(a, b), box_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy(), atol=1e-6)
    gm, pm = rng.random((4, 30, 40)) > 0.5, rng.random((7, 30, 40)) > 0.6
    theirs = mask_iou(torch.from_numpy(gm.reshape(4, -1)).float(), torch.from_numpy(pm.reshape(7, -1)).float()).numpy()
    np.testing.assert_allclose(M.mask_iou(gm, pm, chunk=3), theirs, atol=1e-6)
    gk = np.concatenate([rng.uniform(0, 100, (5, 4, 2)), rng.integers(0, 3, (5, 4, 1))], 2)
    pk = np.concatenate([gk[rng.integers(0, 5, 8), :, :2] + rng.normal(0, 3, (8, 4, 2)), rng.random((8, 4, 1))], 2)
    area, sigma = rng.uniform(100, 2000, 5), M.oks_sigmas((4, 3))
    assert sigma.tolist() == [0.25] * 4 and np.allclose(M.oks_sigmas((17, 3)) * 10, [0.26, 0.25, 0.25, 0.35, 0.35, 0.79, 0.79, 0.72,
                                                                                   0.72, 0.62, 0.62, 1.07, 1.07, 0.87, 0.87, 0.89, 0.89])
    theirs = kpt_iou(torch.from_numpy(gk), torch.from_numpy(pk), torch.from_numpy(area), sigma.tolist()).numpy()
    np.testing.assert_allclose(M.kpt_iou(gk, pk, area, sigma), theirs, atol=1e-6)
    ra = np.concatenate([rng.uniform(20, 200, (6, 2)), rng.uniform(5, 60, (6, 2)), rng.uniform(-1, 2.5, (6, 1))], 1)
    rb = np.concatenate([ra[:, :2] + rng.normal(0, 4, (6, 2)), ra[:, 2:4] * rng.uniform(0.8, 1.2, (6, 2)), ra[:, 4:] + 0.1], 1)
    np.testing.assert_allclose(M.batch_probiou(ra, rb), batch_probiou(ra, rb).numpy(), atol=1e-5)


def test_mask_iou_where_is_mask_iou_on_the_pairs_it_is_given() -> None:
    rng = np.random.default_rng(2)
    gt = np.zeros((3, 50, 60), bool)
    pred = np.zeros((5, 50, 60), bool)
    boxes = np.zeros((5, 4))
    for i in range(3):
        gt[i, 5 + 10 * i : 25 + 10 * i, 8:40] = rng.random((20, 32)) > 0.2
    for j in range(5):
        x1, y1 = rng.integers(0, 30), rng.integers(0, 25)
        x2, y2 = x1 + rng.integers(5, 30), y1 + rng.integers(5, 25)
        pred[j, y1:y2, x1:x2] = rng.random((y2 - y1, x2 - x1)) > 0.3  # inside its box, as a cropped mask is
        boxes[j] = [x1, y1, x2, y2]
    pairs = rng.random((3, 5)) > 0.3
    full = M.mask_iou(gt, pred)
    np.testing.assert_allclose(M.mask_iou_where(gt, pred, boxes, pairs), np.where(pairs, full, 0), atol=1e-9)
    assert full[pairs].max() > 0


@pytest.fixture(scope="module")
def task_sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from cvdeploy.demo.shapes import generate_shapes

    root = tmp_path_factory.mktemp("labels")
    return {t: generate_shapes(root / t, n_train=0, n_val=6 if t != "classify" else 12, seed=3, task=t)
            for t in ("segment", "pose", "obb", "classify")}


def test_segment_labels_and_masks_are_ultralytics(task_sets: dict[str, Path]) -> None:
    from ultralytics.data.utils import polygons2masks_overlap

    from cvdeploy.vision.letterbox import LetterboxSpec, letterbox_params

    items, info = load_task_split(task_sets["segment"], "segment")
    assert len(items) == 6 and info.names[0] == "circle"
    for it in items:
        assert it.polygons is not None and len(it.polygons) == len(it.class_id) == len(it.xyxy) > 0
        for p, b in zip(it.polygons, it.xyxy, strict=True):
            assert len(p) >= 3 and np.allclose(b, [*p.min(0), *p.max(0)])
        params, _, _ = letterbox_params((it.height, it.width), LetterboxSpec(imgsz=(256, 256)), auto=False)
        ours = it.overlap_masks(params)
        gx, gy = params.gain_xy
        segs = [p * [gx, gy] + [params.left, params.top] for p in it.polygons]
        index_map, order = polygons2masks_overlap((256, 256), segs, downsample_ratio=4)
        for rank, i in enumerate(order):  # the same object claims the same pixels at the labels' resolution
            up = torch.nn.functional.interpolate(torch.from_numpy((index_map == rank + 1).astype(np.float32))[None, None],
                                                 (256, 256), mode="bilinear", align_corners=False)[0, 0].numpy() > 0.5
            assert (up != ours[i]).sum() <= 2, (it.path.name, i)


def test_pose_obb_and_classify_labels(task_sets: dict[str, Path]) -> None:
    from ultralytics.utils.ops import xyxyxyxy2xywhr

    items, info = load_task_split(task_sets["pose"], "pose")
    assert info.kpt_shape == (4, 3) and items[0].keypoints is not None and items[0].keypoints.shape[1:] == (4, 3)
    assert set(np.unique(np.concatenate([it.keypoints[..., 2].ravel() for it in items]))) <= {1.0, 2.0}  # type: ignore[index]
    for it in items:  # the keypoints are the shape's extreme points: inside its box
        k = it.keypoints
        assert (k[..., 0] >= it.xyxy[:, None, 0] - 1).all() and (k[..., 0] <= it.xyxy[:, None, 2] + 1).all()  # type: ignore[index]
    with pytest.raises(InputError, match="kpt_shape"):
        load_task_split(task_sets["pose"], "pose", kpt_shape=(17, 3))
    items, _ = load_task_split(task_sets["obb"], "obb")
    for it in items:
        corners = np.loadtxt(it.path.parent.parent.parent / "labels" / "val" / f"{it.path.stem}.txt", ndmin=2)[:, 1:]
        corners = corners.reshape(-1, 4, 2) * [it.width, it.height]
        theirs = xyxyxyxy2xywhr(corners.reshape(-1, 8).astype(np.float32))
        np.testing.assert_allclose(it.xywhr, theirs, atol=1e-3)  # type: ignore[arg-type]
    names = {0: "circle", 1: "cross", 2: "hexagon", 3: "square", 4: "star", 5: "triangle"}  # the classifier's order
    crops = load_classify_split(task_sets["classify"], names)
    assert len(crops) == 12 and {c for _, c in crops} == set(names)
    assert all(names[c] == p.parent.name for p, c in crops)
    assert len(split_images(task_sets["classify"] / "data.yaml")) == 12  # the directory or its data.yaml
    with pytest.raises(InputError, match="not among the model's classes"):
        load_classify_split(task_sets["classify"], {0: "circle", 1: "cross"})
    with pytest.raises(InputError, match="a segment label"):
        bad = task_sets["segment"].parent / "labels" / "val"
        first = sorted(bad.glob("*.txt"))[0]
        first.write_text("0 0.5 0.5\n")
        load_task_split(task_sets["segment"], "segment")
