"""Distillation: the logit + DFL term is zero-gradient for the teacher, grows as the student departs from it, refuses
a student whose head cannot be compared, and runs inside the Ultralytics trainer (the kd loss is logged per epoch; the
baseline run has none). A narrower YOLO11 YAML student is narrower with the same head. Tiny sizes: behaviour only
(benchmarks/compress_distill.py measures the mAP gain)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("ultralytics")

from cvdeploy.build.compress.distill import DistillLoss, distill, load_teacher, scaled_yaml  # noqa: E402
from cvdeploy.errors import InputError  # noqa: E402


def _with_hyp(net):
    from ultralytics.cfg import get_cfg

    net.args = get_cfg()  # the trainer's hyperparameters (box, cls, dfl gains), as the trainer sets them
    return net


def test_the_distillation_term_measures_the_distance_to_the_teacher(demo_pt: Path) -> None:
    teacher = load_teacher(demo_pt)
    student = _with_hyp(copy.deepcopy(teacher))
    for p in student.parameters():
        p.requires_grad_(True)
    student.train()
    img = torch.rand(2, 3, 64, 64)
    loss = DistillLoss(student, teacher)
    same = loss.kd(student(img), img)
    with torch.no_grad():  # the student departs from the teacher: its head's last class convolutions are perturbed
        for seq in student.model[-1].cv3:
            seq[-1].weight.add_(0.5 * torch.randn_like(seq[-1].weight))
    student.zero_grad()
    moved = loss.kd(student(img), img)
    assert moved > same
    moved.backward()
    assert student.model[-1].cv3[0][-1].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())  # the teacher is frozen


def test_the_loss_adds_a_kd_item_to_ultralytics_loss(demo_pt: Path) -> None:
    teacher = load_teacher(demo_pt)
    student = _with_hyp(copy.deepcopy(teacher)).train()
    img = torch.rand(2, 3, 64, 64)
    batch = {"img": img, "batch_idx": torch.tensor([0.0, 1.0]), "cls": torch.tensor([[0.0], [2.0]]),
             "bboxes": torch.tensor([[0.5, 0.5, 0.3, 0.3], [0.4, 0.6, 0.2, 0.4]])}
    total, items = DistillLoss(student, teacher)(student(img), batch)
    assert total.shape == (4,) and list(items) == ["box_loss", "cls_loss", "dfl_loss", "kd_loss"]
    assert torch.isclose(total[3], items["kd_loss"] * 2)  # scaled by the batch size like the other terms


def test_a_student_with_another_head_is_refused(demo_pt: Path, tmp_path: Path) -> None:
    from ultralytics.nn.tasks import DetectionModel

    other = _with_hyp(DetectionModel(str(scaled_yaml(tmp_path / "yolo11n.yaml", width=0.125, nc=3)), verbose=False))
    with pytest.raises(InputError, match="heads differ"):
        DistillLoss(other, load_teacher(demo_pt))


def test_a_narrower_yaml_student_keeps_the_head(tmp_path: Path) -> None:
    from ultralytics.nn.tasks import DetectionModel

    full = DetectionModel("yolo11n.yaml", nc=6, verbose=False)
    narrow = DetectionModel(str(scaled_yaml(tmp_path / "yolo11n.yaml", width=0.125, nc=6)), verbose=False)
    assert sum(p.numel() for p in narrow.parameters()) < 0.5 * sum(p.numel() for p in full.parameters())
    x = torch.rand(1, 3, 64, 64)
    narrow.eval(), full.eval()
    with torch.inference_mode():
        assert narrow(x)[0].shape == full(x)[0].shape
    with pytest.raises(InputError):
        scaled_yaml(tmp_path / "bad.yaml", width=5.0)


def test_distillation_and_its_baseline_train_in_the_ultralytics_trainer(demo_pt: Path, tmp_path: Path) -> None:
    from cvdeploy.demo.shapes import generate_shapes

    data = generate_shapes(tmp_path / "data", n_train=8, n_val=4, seed=5)
    opts = dict(teacher=demo_pt, student="yolo11n.yaml", width=0.125, project=tmp_path, epochs=1, imgsz=64, batch=8,
                workers=0)
    kd = distill(data, name="kd", **opts)
    assert kd.record["method"] == "distill" and kd.record["teacher"] == str(demo_pt)
    assert kd.record["distillation"]["logit_weight"] == 1.0 and "width 0.125" in kd.record["student"]
    assert kd.history[0]["kd_loss"] > 0 and kd.best.is_file()
    base = distill(data, name="base", teach=False, **opts)
    assert base.record["method"].startswith("baseline") and "kd_loss" not in base.history[0]
    with pytest.raises(InputError, match="teacher model not found"):
        distill(data, name="x", **{**opts, "teacher": tmp_path / "none.pt"})


def test_the_cli_refuses_a_bad_variant_name_before_training(demo_pt: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "cvdeploy", "compress", "distill", str(tmp_path / "b.cvd"), "--teacher",
                        str(demo_pt), "--student", "yolo11n.yaml", "--data", str(tmp_path / "d.yaml"), "-o",
                        str(tmp_path / "run"), "--name", "onnx-distilled"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.startswith("error:") and "onnx-<what>-fp32" in p.stderr
    assert not (tmp_path / "run").exists()
