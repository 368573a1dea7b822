"""QAT into onnx-qat-int8: the fake quantization mirrors ONNX Runtime's arithmetic, the result is a QDQ graph that ONNX
Runtime runs with the PTQ variant's INT8 kernels, it enters the bundle verified with its training record, and an
interrupted run resumes from its last epoch. Tiny data (16 training images at 96 px, a few steps): behaviour, not mAP."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("ultralytics")
pytest.importorskip("onnxruntime")

from cvdeploy.build.compress.qat_fakequant import ActivationFQ, WeightFQ, torch_key  # noqa: E402
from cvdeploy.build.compress.qat_train import QatConfig  # noqa: E402
from cvdeploy.build.quantize import int8_recipe  # noqa: E402
from cvdeploy.errors import InputError  # noqa: E402

TINY = {"train_images": 16, "calib_images": 4, "batch": 8, "val_images": 0, "lr": 1e-4}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, demo_pt: Path) -> tuple[Path, Path, Path]:
    """16 train and 8 val shapes images, and the demo model built at 96 px: (bundle, data.yaml, workdir)."""
    from cvdeploy.build import build_bundle
    from cvdeploy.demo.shapes import generate_shapes

    root = tmp_path_factory.mktemp("qat")
    data = generate_shapes(root / "data", n_train=16, n_val=8, seed=5)
    bundle = build_bundle(demo_pt, root / "tiny.cvd", imgsz=96, n_golden=1)
    return bundle.root, data, root


def test_onnx_node_names_map_to_torch_modules() -> None:
    assert torch_key("/model.23/cv2.0/cv2.0.0/conv/Conv") == ("model.23.cv2.0.0.conv", "Conv")
    assert torch_key("/model.10/m/m.0/attn/pe/conv/Conv") == ("model.10.m.0.attn.pe.conv", "Conv")
    assert torch_key("/model.2/m.0/cv1/act/Sigmoid") == ("model.2.m.0.cv1.act", "Sigmoid")


def test_activation_ranges_follow_onnxruntime() -> None:
    from onnxruntime.quantization.quant_utils import compute_scale_zp

    for recipe in ("u8s8-w7", "s8s8-asym"):
        r = int8_recipe(recipe)
        fq = ActivationFQ(r.activation_type, r.activation_symmetric)
        x = torch.tensor([-0.37, 0.0, 5.2])
        with torch.no_grad():
            fq.observing = True
            fq(x)
            fq.observing = False
        zp, scale = compute_scale_zp(np.float32(-0.37), np.float32(5.2), np.asarray(fq.qmin, np.int32),
                                     np.asarray(fq.qmax, np.int32), symmetric=r.activation_symmetric)
        got_scale, got_zp = fq.scale_zero_point()
        assert got_scale == pytest.approx(float(scale), rel=1e-6)
        assert got_zp == int(zp)


@pytest.mark.parametrize("recipe,per_channel", [("u8s8-w7", False), ("u8s8-w8", True)])
def test_weight_grid_is_onnxruntimes(recipe: str, per_channel: bool) -> None:
    """The fake-quantized weight equals ONNX Runtime's dequantized weight for the same recipe."""
    from onnx import TensorProto
    from onnxruntime.quantization.quant_utils import quantize_data

    r = int8_recipe(recipe, per_channel=per_channel)
    w = torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(0)) * torch.tensor([0.1, 1.0, 3.0, 0.01])[:, None, None, None]
    got = WeightFQ(r)(w).numpy()
    rows = [w[i].numpy() for i in range(4)] if per_channel else [w.numpy()]
    want = []
    for row in rows:
        zp, scale, q = quantize_data(row.ravel(), TensorProto.INT8, symmetric=True, reduce_range=r.reduce_range)
        want.append(((q.astype(np.float32) - float(zp)) * float(scale)).reshape(row.shape))
    np.testing.assert_allclose(got, np.stack(want) if per_channel else want[0], rtol=1e-5, atol=1e-7)
    assert not np.allclose(got, w.numpy())  # it did quantize


def test_bad_settings_fail_early() -> None:
    with pytest.raises(InputError, match="recipe"):
        QatConfig(recipe="u4s4")
    with pytest.raises(InputError, match="epochs"):
        QatConfig(epochs=0)
    with pytest.raises(InputError, match="calibration method"):
        QatConfig(calib_method="kl")
    with pytest.raises(InputError, match="needs a loss"):
        QatConfig(distill=0, labels=0)
    with pytest.raises(InputError, match="range-lr"):
        QatConfig(range_lr=-1e-3)


def test_qat_variant_is_qdq_verified_and_recorded(tiny: tuple[Path, Path, Path], demo_pt: Path) -> None:
    import onnx

    from cvdeploy.build.compress.common import training_record
    from cvdeploy.build.compress.qat import qat_to_variant
    from cvdeploy.build.compress.qat_export import node_types
    from cvdeploy.bundle.bundle import Bundle
    from cvdeploy.predict import Predictor

    bundle, data, root = tiny
    steps: list[str] = []
    outcome, record = qat_to_variant(bundle, model=demo_pt, data=data, out=root / "run", config=QatConfig(epochs=1, **TINY),
                                     max_map_drop=100.0, on_step=lambda _v, s: steps.append(s))
    assert outcome.written, outcome.reason
    graph = onnx.load(str(root / "run" / "qat-int8.onnx"))
    ops = {n.op_type for n in graph.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    # ONNX Runtime runs it with the INT8 kernels of the PTQ graph of the same recipe, op type for op type.
    assert record["node_types"].get("QLinearConv", 0) > 50
    assert record["same_node_types_as_ptq"] is True
    assert record["ranges"]["trained"] is True and record["ranges"]["tensors"] > 200
    assert record["node_types"] == node_types(root / "run" / "ptq-int8.onnx")

    b = Bundle.load(bundle)
    v = b.manifest.variants["onnx-qat-int8"]
    assert v.precision == "int8" and v.parity is not None and v.parity.passed
    assert "its own torch model" in v.parity.reference
    assert {"map50_95", "latency_ms_b1", "box_agreement"} <= set(v.metrics)
    stored = training_record(b, "onnx-qat-int8")
    assert stored is not None
    assert stored["epochs"] == 1 and stored["seed"] == 0 and stored["train_images"] == 16
    assert stored["config"]["recipe"] == "u8s8-w7" and stored["train_seconds"] > 0
    assert len(stored["history"]) == 1 and np.isfinite(stored["history"][0]["loss"])
    assert "onnx-qat-int8" in (b.root / "report.html").read_text()
    # the recorded variant is what the Predictor serves
    with Predictor(b, "onnx-qat-int8") as p:
        img = next(iter(sorted((data.parent / "images" / "val").iterdir())))
        assert p.predict(img).detections is not None
    assert any("fine-tune" in s for s in steps)


def test_resume_continues_from_the_last_epoch(tiny: tuple[Path, Path, Path], demo_pt: Path) -> None:
    import onnx

    from cvdeploy.build.compress.qat import ptq_reference
    from cvdeploy.build.compress.qat_fakequant import quant_plan
    from cvdeploy.build.compress.qat_train import CHECKPOINT, finetune
    from cvdeploy.bundle.bundle import Bundle

    bundle, data, root = tiny
    b = Bundle.load(bundle)
    run_dir = root / "resume"
    run_dir.mkdir()
    cfg1 = QatConfig(epochs=1, **TINY)
    ptq, calib, _ = ptq_reference(b, data, cfg1, run_dir, measure=False)
    plan = quant_plan(onnx.load(str(ptq)))
    first = finetune(b, demo_pt, data, cfg1, plan, calib, run_dir)
    assert (run_dir / CHECKPOINT).is_file() and len(first.history) == 1
    events: list[tuple[str, dict]] = []
    second = finetune(b, demo_pt, data, QatConfig(epochs=2, **TINY), plan, calib, run_dir,
                      progress=lambda e, d: events.append((e, d)))
    assert second.resumed_from_epoch == 1
    assert [h.epoch for h in second.history] == [1, 2]
    assert second.history[0].loss == first.history[0].loss  # epoch 1 came from the checkpoint, not trained again
    assert [d["epoch"] for e, d in events if e == "epoch"] == [2]
    assert json.loads((run_dir / "qat_history.json").read_text())[1]["epoch"] == 2
    # the activation ranges trained (range-lr > 0, the default) and were not re-calibrated away at the end
    assert any(float(m.log_range.abs().max()) > 0 for m in second.fake_quant.modules())
    assert not any(m.log_range.requires_grad for m in second.fake_quant.modules())
    fixed = finetune(b, demo_pt, data, QatConfig(epochs=1, **{**TINY, "range_lr": 0.0}), plan, calib, root / "fixed")
    assert all(float(m.log_range.abs().max()) == 0 for m in fixed.fake_quant.modules())
    with pytest.raises(InputError, match="other QAT settings"):
        finetune(b, demo_pt, data, QatConfig(epochs=3, **{**TINY, "lr": 5e-4}), plan, calib, run_dir)
    # a checkpoint trained under an older simulation (other quantizers) is not resumed
    state = torch.load(run_dir / CHECKPOINT, weights_only=False)
    torch.save({**state, "simulation": 1}, run_dir / CHECKPOINT)
    with pytest.raises(InputError, match="another version of cvdeploy's fake quantization"):
        finetune(b, demo_pt, data, QatConfig(epochs=3, **TINY), plan, calib, run_dir)


def test_fake_quant_covers_every_tensor_the_graph_requantizes(tiny: tuple[Path, Path, Path], demo_pt: Path) -> None:
    """Every tensor the PTQ graph gives a scale of its own has a torch quantizer (residual Adds and the attention block
    included), the rewritten forwards compute exactly what Ultralytics' do, and the simulation is closer to the
    deployed INT8 graph than the float model is."""
    import onnx
    import onnxruntime as ort

    from cvdeploy.build.compress.qat import ptq_reference
    from cvdeploy.build.compress.qat_fakequant import QuantPlan, insert_fake_quant, quant_plan
    from cvdeploy.build.compress.qat_train import load_fused
    from cvdeploy.build.export import torch_outputs
    from cvdeploy.bundle.bundle import Bundle

    bundle, data, root = tiny
    b = Bundle.load(bundle)
    work = root / "coverage"
    work.mkdir()
    cfg = QatConfig(recipe="u8s8-w7", per_channel=False, **{**TINY, "calib_images": 8})
    ptq, calib, _ = ptq_reference(b, data, cfg, work, measure=False)
    plan = quant_plan(onnx.load(str(ptq)))
    plain = load_fused(demo_pt).eval()
    model = load_fused(demo_pt).eval()
    fq = insert_fake_quant(model, cfg.int8_recipe(), plan)
    assert fq.unsimulated == []
    keys = set(fq.activations.keys())
    assert {"model_10_m_0_attn_Softmax", "model_10_m_0_attn_MatMul", "model_10_m_0_Add_1", "model_2_m_0_Add"} <= keys

    x = torch.from_numpy(calib[0])
    with torch.no_grad(), fq.observing():  # quantizers pass values through: the rewritten forwards alone
        torch.testing.assert_close(torch_outputs(model(x))[0], torch_outputs(plain(x))[0], rtol=1e-5, atol=1e-3)
    fq.calibrate(model, calib)
    softmax = fq.activations["model_10_m_0_attn_Softmax"]
    assert (float(softmax.lo), float(softmax.hi)) == (0.0, 1.0)  # as ONNX Runtime sets it, whatever the data

    # The same simulation without the Adds and the attention block (convolutions and SiLU only, cvdeploy 0.x's first)
    convs_only = load_fused(demo_pt).eval()
    blocks = {n for n in plan.outputs if n.rsplit("/", 1)[-1].split("_")[0] in ("Add", "MatMul", "Softmax") or n.endswith("attn/Mul_1")}
    insert_fake_quant(convs_only, cfg.int8_recipe(), QuantPlan(plan.inputs, plan.outputs - blocks, plan.weights)).calibrate(
        convs_only, calib)

    nc = len(b.manifest.names)
    session = ort.InferenceSession(str(ptq), providers=["CPUExecutionProvider"])

    def error(net: torch.nn.Module) -> float:
        """Mean |class score - the INT8 graph's| over the calibration images."""
        with torch.no_grad():
            return float(np.mean([np.abs(torch_outputs(net(torch.from_numpy(t)))[0].numpy()[0, 4:4 + nc]
                                         - session.run(None, {session.get_inputs()[0].name: t})[0][0, 4:4 + nc]).mean()
                                  for t in calib]))

    errors = {"simulated": error(model), "convs and SiLU only": error(convs_only), "float": error(plain)}
    assert errors["simulated"] < errors["convs and SiLU only"] < errors["float"], errors


def test_one_quantizer_per_tensor_and_its_range_reaches_the_graph(tiny: tuple[Path, Path, Path], demo_pt: Path) -> None:
    """A convolution reading a Split's output uses the scale of the tensor before the Split (as the graph does), a
    Concat that had one input's scale keeps it, and the
    ranges the torch model holds (trained or not) become the INT8 graph's scales and zero points through ONNX Runtime's
    overrides; without them the graph quantizes otherwise, and the check says which tensors."""
    import onnx

    from cvdeploy.build.compress.qat import ptq_reference
    from cvdeploy.build.compress.qat_export import graph_scales, quantize_like_ptq, scale_mismatches
    from cvdeploy.build.compress.qat_fakequant import insert_fake_quant, quant_plan
    from cvdeploy.build.compress.qat_train import load_fused
    from cvdeploy.bundle.bundle import Bundle

    bundle, data, root = tiny
    b = Bundle.load(bundle)
    work = root / "ranges"
    work.mkdir()
    cfg = QatConfig(recipe="u8s8-w7", per_channel=False, **TINY)
    ptq, calib, _ = ptq_reference(b, data, cfg, work, measure=False)
    plan = quant_plan(onnx.load(str(ptq)))
    assert plan.input_tensors["/model.2/m.0/cv1/conv/Conv"] == "/model.2/cv1/act/Mul_output_0"  # through the Split
    model = load_fused(demo_pt).eval()
    fq = insert_fake_quant(model, cfg.int8_recipe(), plan)
    fq.calibrate(model, calib)
    assert fq.activations["model_2_m_0_cv1_conv_in"] is fq.activations["model_2_cv1_conv_silu"].out_fq
    # a Concat calibrated to one input's scale (PTQ's QLinearConcat copies that input) stays tied to it
    concat = "/model.2/Concat_output_0"
    assert any(concat in tied for tied in plan.aliases.values())
    assert fq.activations["model_2_cv2_conv_in"].tensor in plan.aliases
    assert scale_mismatches(graph_scales(ptq), fq) == []  # min/max calibrated alike on both sides

    with torch.no_grad():  # ranges as training may leave them: every tensor's min and max scaled differently
        for i, m in enumerate(fq.modules()):
            m.log_range.copy_(torch.tensor([-0.1 - 0.01 * (i % 7), -0.3 + 0.02 * (i % 11)]))
    fp32 = b.variant_path("onnx-fp32")
    graph = graph_scales(quantize_like_ptq(fp32, work / "ranged.onnx", calib, cfg.int8_recipe(), quantize_head=False,
                                           ranges=fq.ranges()))
    assert scale_mismatches(graph, fq) == []
    tensor = "/model.2/cv1/act/Mul_output_0"
    assert graph[tensor] != graph_scales(ptq)[tensor]
    assert graph["/model.2/Split_output_1"] == graph[tensor]  # the Split passes the overridden scale on
    assert graph[concat] == graph[fq.activations["model_2_cv2_conv_in"].tensor] != graph_scales(ptq)[concat]
    plain = graph_scales(quantize_like_ptq(fp32, work / "plain.onnx", calib, cfg.int8_recipe(), quantize_head=False))
    missed = scale_mismatches(plain, fq)
    assert len(missed) > 200 and any(tensor in m for m in missed)

    # A PTQ graph calibrated otherwise (percentile) is a starting point too: its scales become the torch ranges.
    percentile = QatConfig(recipe="u8s8-w7", per_channel=False, calib_method="percentile", **TINY)
    (work / "percentile").mkdir()
    ptq_p, _, _ = ptq_reference(b, data, percentile, work / "percentile", measure=False)
    model_p = load_fused(demo_pt).eval()
    fq_p = insert_fake_quant(model_p, cfg.int8_recipe(), quant_plan(onnx.load(str(ptq_p))))
    fq_p.calibrate(model_p, calib)  # min/max: not the percentile graph's scales
    assert len(scale_mismatches(graph_scales(ptq_p), fq_p)) > 50
    fq_p.set_scales(graph_scales(ptq_p))
    assert scale_mismatches(graph_scales(ptq_p), fq_p) == []
