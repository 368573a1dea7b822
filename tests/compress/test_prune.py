"""Structured pruning of the demo YOLO11n: the C2f rewrite is exact, the MACs (or parameter) target is reached with the
detect head's outputs unchanged, Taylor importance reads real gradients, and the pipeline fine-tunes with the
Ultralytics trainer, resumes an interrupted run and adds the result as a verified variant. Tiny sizes (64 px, 16
images, 2 epochs): behaviour, not accuracy (benchmarks/compress_prune.py measures that)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("ultralytics")
pytest.importorskip("torch_pruning")

from cvdeploy.build.compress.common import load_torch_model  # noqa: E402
from cvdeploy.build.compress.prune import (  # noqa: E402
    C2fSplit,
    head_channels,
    prune,
    split_c2f,
    taylor_batch,
)
from cvdeploy.errors import InputError  # noqa: E402


@pytest.fixture(scope="module")
def net(demo_pt: Path):
    return load_torch_model(demo_pt)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, demo_pt: Path) -> tuple[Path, Path]:
    from cvdeploy.build import build_bundle
    from cvdeploy.demo.shapes import generate_shapes

    root = tmp_path_factory.mktemp("prune")
    data = generate_shapes(root / "data", n_train=16, n_val=8, seed=5)
    return build_bundle(demo_pt, root / "tiny.cvd", imgsz=64, n_golden=1).root, data


def test_the_c2f_rewrite_computes_the_same_outputs(net) -> None:
    x = torch.rand(1, 3, 64, 64)
    split = copy.deepcopy(net)
    assert split_c2f(split) == 8  # YOLO11n's C3k2 blocks
    assert sum(isinstance(m, C2fSplit) for m in split.modules()) == 8
    with torch.inference_mode():
        assert torch.allclose(net(x)[0], split(x)[0], atol=1e-5)


def test_pruning_reaches_the_macs_target_and_keeps_the_head(net) -> None:
    r = prune(net, imgsz=64, macs_ratio=0.85, steps=30)
    assert 0.7 < r.macs_ratio <= 0.85
    assert r.params_after < r.params_before
    assert head_channels(r.model) == head_channels(net) == [64, 64, 64, 6, 6, 6]  # 4 x reg_max 16, 6 classes
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        assert r.model(x)[0].shape == net(x)[0].shape == (2, 4 + 6, 84)
    assert any(isinstance(m, C2fSplit) for m in net.modules()) is False  # the source is left untouched
    rec = r.record()
    assert rec["macs_ratio"] == round(r.macs_ratio, 4) and rec["importance"] == "magnitude"


def test_round_to_keeps_every_pruned_channel_count_a_multiple(net) -> None:
    """--round-to 16: the pruned convolutions keep whole 16-float blocks (what makes fewer MACs run faster on AVX-512),
    and the unrounded pruning leaves counts that are not."""
    def pruned_counts(model) -> list[int]:
        before = {n: m.out_channels for n, m in net.named_modules() if isinstance(m, torch.nn.Conv2d)}
        return [m.out_channels for n, m in model.named_modules()
                if isinstance(m, torch.nn.Conv2d) and n in before and m.out_channels != before[n]]

    rounded = prune(net, imgsz=64, macs_ratio=0.7, round_to=16, steps=30)
    counts = pruned_counts(rounded.model)
    assert counts and all(c % 16 == 0 for c in counts), counts
    assert rounded.macs_ratio <= 0.7 and rounded.record()["round_to"] == 16
    assert any(c % 16 for c in pruned_counts(prune(net, imgsz=64, macs_ratio=0.7, steps=30).model))


def test_a_parameter_target_and_taylor_importance(net, tiny: tuple[Path, Path]) -> None:
    _, data = tiny
    by_params = prune(net, imgsz=64, params_ratio=0.85)
    assert by_params.params_ratio <= 0.85
    batch = taylor_batch(str(data), 64, n=8)
    assert batch["img"].shape == (8, 3, 64, 64) and len(batch["cls"]) == len(batch["bboxes"]) > 0
    taylor = prune(net, imgsz=64, params_ratio=0.85, importance="taylor", taylor_batch=batch)
    assert taylor.params_ratio <= 0.85 and taylor.importance == "taylor"
    # Same per-layer budget, other channels kept: the gradients, not the weights' norms, chose them.
    a = by_params.model.model[0].conv.weight
    b = taylor.model.model[0].conv.weight
    assert a.shape == b.shape and not torch.equal(a, b)


@pytest.mark.parametrize("kwargs", [{}, {"macs_ratio": 0.5, "params_ratio": 0.5}, {"macs_ratio": 1.2},
                                    {"macs_ratio": 0.5, "importance": "random"}, {"macs_ratio": 0.5, "importance": "taylor"}])
def test_bad_targets_fail_early(net, kwargs: dict) -> None:
    with pytest.raises(InputError):
        prune(net, imgsz=64, **kwargs)


def test_prune_finetune_resume_and_variant(tiny: tuple[Path, Path], demo_pt: Path, tmp_path: Path) -> None:
    import shutil

    from cvdeploy.build.compress.common import training_record
    from cvdeploy.build.compress.pipeline import prune_to_variant
    from cvdeploy.bundle.bundle import Bundle

    src, data = tiny
    b = tmp_path / "b.cvd"
    shutil.copytree(src, b)
    out = tmp_path / "run"

    def interrupt(row: dict) -> None:
        raise KeyboardInterrupt  # as a user's Ctrl-C after the first epoch (its checkpoint is already written)

    opts = dict(model=demo_pt, data=data, out=out, macs_ratio=0.8, epochs=2, imgsz=64, batch=8, workers=0,
                max_map_drop=100.0)
    with pytest.raises(KeyboardInterrupt):
        prune_to_variant(b, **opts, progress=interrupt)
    assert [json.loads(x)["epoch"] for x in (out / "finetune" / "progress.jsonl").read_text().splitlines()] == [1]
    seen: list[int] = []
    outcome, record = prune_to_variant(b, **opts, resume=True, progress=lambda r: seen.append(r["epoch"]))
    assert seen == [2]  # resumed after epoch 1, not started again
    assert [json.loads(x)["epoch"] for x in (out / "finetune" / "progress.jsonl").read_text().splitlines()] == [1, 2]
    assert outcome.written, outcome.reason
    assert outcome.name == f"onnx-pruned{round(100 * (1 - record['macs_ratio']))}-fp32"
    bundle = Bundle.load(b)
    stored = training_record(bundle, outcome.name)
    assert stored is not None and stored["resumed"] is True and stored["epochs"] == 2 and stored["macs_ratio"] <= 0.8
    assert stored["method"] == "prune + fine-tune" and stored["data"] == str(Path(data).resolve())
    assert [h["epoch"] for h in stored["history"]] == [2] and "map50_95" in stored["history"][0]
    # The fine-tuned checkpoint kept the pruned shapes (the trainer did not rebuild the full model from the YAML).
    assert head_channels(load_torch_model(out / "finetune" / "weights" / "best.pt")) == head_channels(load_torch_model(demo_pt))
    pruned_params = sum(p.numel() for p in load_torch_model(out / "finetune" / "weights" / "best.pt").parameters())
    assert pruned_params == stored["params_after"]
    with pytest.raises(InputError, match="already finished"):
        prune_to_variant(b, **opts, resume=True)
