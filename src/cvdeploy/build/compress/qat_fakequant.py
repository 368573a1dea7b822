"""Fake quantization in torch that mirrors one ONNX Runtime static QDQ recipe, node for node where it matters.

QAT is only worth its time if the quantization the network trains under is the one it is deployed with. The deployed
graph is made by `cvdeploy.build.quantize.quantize_int8` (ONNX Runtime, QDQ), so the torch side copies its arithmetic:
weights symmetric max-abs (per channel or per tensor, 7-bit with `reduce_range`), activations min/max-calibrated
(asymmetric unless the recipe says otherwise) with ONNX Runtime's own qmin/qmax and zero-point rule. It covers the
quantized convolutions (input, weight, output), their SiLU (sigmoid output, product), the residual Adds (Bottleneck,
PSABlock) and the attention block's scaled query, both MatMuls, Softmax and Add: every tensor ONNX Runtime gives a scale
of its own. Ops that keep their input's scale in a QDQ graph (Split, Reshape, Transpose, MaxPool, Resize) need nothing,
and a Concat's output scale is its consuming convolution's input quantizer. `FakeQuant.unsimulated` names what the
plan quantizes and the torch side does not. The head's decoding stays float, as in the PTQ graph.

There is one quantizer per ONNX tensor (`QuantPlan.input_tensors`/`output_tensors`): a convolution that reads a Split's
output shares the quantizer of the tensor before the Split, as the graph shares its scale. So the ranges can train
(`FakeQuant.learn_ranges`) and still be one scale per tensor, and `FakeQuant.ranges` hands them to ONNX Runtime's
quantizer as `rmin`/`rmax` overrides (`qat_export.scale_mismatches` checks the graph took them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from cvdeploy.build.quantize import Int8Recipe


def _qrange(qtype: str, *, reduce_range: bool = False, symmetric: bool = False) -> tuple[int, int]:
    """ONNX Runtime's integer range for a type (`get_qmin_qmax_for_qType`): the same table, so the same grid."""
    from onnx import TensorProto
    from onnxruntime.quantization.quant_utils import get_qmin_qmax_for_qType

    proto = {"uint8": TensorProto.UINT8, "int8": TensorProto.INT8}[qtype]
    lo, hi = get_qmin_qmax_for_qType(proto, reduce_range=reduce_range, symmetric=symmetric)
    return int(lo), int(hi)


class ActivationFQ(nn.Module):
    """One activation tensor: observes its min/max during calibration, then fake-quantizes with ONNX Runtime's
    `compute_scale_zp` (range widened to hold 0; symmetric when the recipe says so).

    With `learn(True)` the range trains too (a learned step size and zero point, as LSQ): `log_range` scales the
    calibrated min and max by exp(.), so the gradient reaches the clipping points, and the result is exported as the ONNX
    tensor's `rmin`/`rmax` override (`tensor`), which ONNX Runtime turns into the same scale and zero point."""

    def __init__(self, qtype: str, symmetric: bool, tensor: str | None = None) -> None:
        super().__init__()
        self.qmin, self.qmax = _qrange(qtype, symmetric=symmetric)
        self.symmetric = symmetric
        self.tensor = tensor  # the ONNX tensor this quantizer stands for (shared by every torch site of that tensor)
        self.aliases: list[str] = []  # other tensors the graph gives the same scale to (QuantPlan.aliases)
        self.register_buffer("lo", torch.tensor(float("inf")))
        self.register_buffer("hi", torch.tensor(float("-inf")))
        self.log_range = nn.Parameter(torch.zeros(2), requires_grad=False)
        self.observing = False
        self.fixed: tuple[float, float] | None = None  # a range ONNX Runtime sets whatever the data (Softmax: 0-1)
        self.enabled = True  # False: values pass through (to measure what the activations' quantization costs)

    def learn(self, on: bool = True) -> None:
        self.log_range.requires_grad_(on)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            lo, hi = (x.detach().min(), x.detach().max()) if self.fixed is None else map(torch.tensor, self.fixed)
            self.lo, self.hi = torch.minimum(self.lo, lo), torch.maximum(self.hi, hi)
            return x
        if not self.enabled or not torch.isfinite(self.lo):
            return x  # switched off, or never calibrated: this tensor saw no data (an unused branch)
        if self.log_range.requires_grad and torch.is_grad_enabled():
            scale, zp = self._learnable_scale_zero_point()
            return torch._fake_quantize_learnable_per_tensor_affine(x, scale, zp, self.qmin, self.qmax, 1.0)
        scale, zp = self.scale_zero_point()
        return torch.fake_quantize_per_tensor_affine(x, scale, zp, self.qmin, self.qmax)

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The calibrated min and max, times the learned factors (1 unless the range was trained)."""
        factors = torch.exp(self.log_range)
        return self.lo * factors[0], self.hi * factors[1]

    def _learnable_scale_zero_point(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self.range()
        lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
        if self.symmetric:
            hi = torch.maximum(-lo, hi)
            lo = -hi
        scale = ((hi - lo) / (self.qmax - self.qmin)).clamp_min(torch.finfo(torch.float32).tiny)
        zp = torch.full_like(scale, round((self.qmin + self.qmax) / 2)) if self.symmetric else self.qmin - lo / scale
        return scale.reshape(1), zp.reshape(1)

    def scale_zero_point(self) -> tuple[float, int]:
        lo_t, hi_t = self.range()
        lo, hi = min(float(lo_t), 0.0), max(float(hi_t), 0.0)
        if self.symmetric:
            hi = max(abs(lo), abs(hi))
            lo = -hi
        scale = (hi - lo) / (self.qmax - self.qmin)
        if scale <= torch.finfo(torch.float32).tiny:
            return 1.0, 0
        zp = round((self.qmin + self.qmax) / 2) if self.symmetric else round(self.qmin - lo / scale)
        return scale, int(zp)


class WeightFQ(nn.Module):
    """A conv weight, fake-quantized at every step from its current values (symmetric max-abs, as ONNX Runtime's
    `WeightSymmetric`), with a straight-through gradient. Used as a parametrization: the float weight trains."""

    def __init__(self, recipe: Int8Recipe) -> None:
        super().__init__()
        self.per_channel = recipe.per_channel
        self.qmin, self.qmax = _qrange(recipe.weight_type, reduce_range=recipe.reduce_range, symmetric=True)
        self.enabled = True

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        dims = tuple(range(1, w.dim())) if self.per_channel else tuple(range(w.dim()))
        absmax = w.detach().abs().amax(dim=dims) if dims else w.detach().abs()
        scale = (2 * absmax / (self.qmax - self.qmin)).clamp_min(torch.finfo(torch.float32).tiny)
        zp = round((self.qmin + self.qmax) / 2)
        if self.per_channel:
            zeros = torch.full_like(scale, zp, dtype=torch.int32)
            return torch.fake_quantize_per_channel_affine(w, scale, zeros, 0, self.qmin, self.qmax)
        return torch.fake_quantize_per_tensor_affine(w, float(scale), zp, self.qmin, self.qmax)


class QuantSiLU(nn.Module):
    """SiLU as ONNX exports it (Sigmoid, then Mul), with the two outputs ONNX Runtime quantizes fake-quantized."""

    def __init__(self, sigmoid_fq: nn.Module, out_fq: nn.Module) -> None:
        super().__init__()
        self.sigmoid_fq = sigmoid_fq
        self.out_fq = out_fq

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_fq(x * self.sigmoid_fq(torch.sigmoid(x)))


def _attention_forward(attn: nn.Module, x: torch.Tensor, fq: dict[str, nn.Module]) -> torch.Tensor:
    """Ultralytics' `Attention.forward` with the tensors ONNX Runtime requantizes fake-quantized (`fq` by ONNX op name:
    `Mul_1` the scaled query, `MatMul` the scores, `Softmax`, `MatMul_1` the weighted values, `Add` the sum with `pe`)."""
    b, c, h, w = x.shape
    q, k, v = attn.qkv(x).view(b, attn.num_heads, attn.key_dim * 2 + attn.head_dim, h * w).split(
        [attn.key_dim, attn.key_dim, attn.head_dim], dim=2)
    scores = fq["MatMul"](fq["Mul_1"](q * attn.scale).transpose(-2, -1) @ k)
    weights = fq["Softmax"](scores.softmax(dim=-1))
    y = fq["MatMul_1"](v @ weights.transpose(-2, -1)).view(b, c, h, w) + attn.pe(v.reshape(b, c, h, w))
    return attn.proj(fq["Add"](y))


def _psablock_forward(block: nn.Module, x: torch.Tensor, fq: dict[str, nn.Module]) -> torch.Tensor:
    """Ultralytics' `PSABlock.forward` with its two residual Adds fake-quantized."""
    x = fq["Add"](x + block.attn(x)) if block.add else block.attn(x)
    return fq["Add_1"](x + block.ffn(x)) if block.add else block.ffn(x)


# Ops whose output a QDQ graph quantizes with their input's scale (ONNX Runtime's "direct 8-bit" ops): nothing to
# simulate. A Concat's output is the input of the convolution that consumes it, quantized there.
_SAME_SCALE_OPS = {"Split", "Reshape", "Transpose", "MaxPool", "Resize", "Concat", "Squeeze", "Unsqueeze", "Flatten"}
_ATTENTION_OPS = ("Mul_1", "MatMul", "Softmax", "MatMul_1", "Add")


@dataclass
class FakeQuant:
    """The fake-quantizers inserted into a model (for good: the trained float weights come out with `float_state`)."""

    activations: nn.ModuleDict  # every ActivationFQ, keyed by where it sits (its state is part of a checkpoint)
    convs: list[str]  # quantized conv modules, by name
    weights: list[WeightFQ]
    unsimulated: list[str] = field(default_factory=list)  # ONNX nodes whose output the plan quantizes and torch does not

    def modules(self) -> Iterator[ActivationFQ]:
        for m in self.activations.modules():
            if isinstance(m, ActivationFQ):
                yield m

    @contextmanager
    def observing(self) -> Iterator[None]:
        """Calibration as ONNX Runtime does it, on the float model: every quantizer passes values through and the
        activation quantizers record min/max (from scratch)."""
        for m in self.modules():
            m.observing = True
            m.lo.fill_(float("inf"))
            m.hi.fill_(float("-inf"))
            with torch.no_grad():
                m.log_range.zero_()  # a calibration starts from min/max, as ONNX Runtime's
        for w in self.weights:
            w.enabled = False
        try:
            yield
        finally:
            for m in self.modules():
                m.observing = False
            for w in self.weights:
                w.enabled = True

    def calibrate(self, model: nn.Module, tensors: Iterable[Any]) -> None:
        """Set every activation range from `tensors` (NCHW float32 arrays), like ONNX Runtime's MinMax calibration."""
        was_training = model.training
        model.eval()
        with self.observing(), torch.no_grad():  # not inference_mode: the ranges are reset in place on the next call
            for t in tensors:
                model(torch.from_numpy(t))
        model.train(was_training)

    def set_scales(self, scales: dict[str, tuple[float, int]]) -> None:
        """Start from a QDQ graph's (scale, zero point) per tensor: the range that ONNX Runtime's rule maps back to
        them, [(qmin - zp) * scale, (qmax - zp) * scale]. Tensors not in `scales` keep their calibration."""
        for m in self.modules():
            if m.tensor in scales:
                scale, zp = scales[m.tensor]
                m.lo = torch.tensor((m.qmin - zp) * scale, dtype=torch.float32)
                m.hi = torch.tensor((m.qmax - zp) * scale, dtype=torch.float32)
                with torch.no_grad():
                    m.log_range.zero_()

    def learn_ranges(self) -> list[nn.Parameter]:
        """Make every activation range trainable; returns the parameters (one pair per ONNX tensor)."""
        for m in self.modules():
            m.learn(True)
        return [m.log_range for m in self.modules()]

    def freeze_ranges(self) -> None:
        for m in self.modules():
            m.learn(False)

    def ranges(self) -> dict[str, tuple[float, float]]:
        """Every quantized tensor's (min, max) by ONNX tensor name (learned, or calibrated): passed to ONNX Runtime's
        quantizer as overrides, they give the graph the scales and zero points the torch model trained under."""
        out: dict[str, tuple[float, float]] = {}
        for m in self.modules():
            if m.tensor is not None and torch.isfinite(m.lo):
                lo, hi = m.range()
                out.update(dict.fromkeys([m.tensor, *m.aliases], (float(lo), float(hi))))
        return out


def float_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained float weights of a fake-quantized model, keyed as in the plain model (for export)."""
    return {k.replace(".parametrizations.weight.original", ".weight"): v for k, v in model.state_dict().items()
            if not any(part in k for part in ("sigmoid_fq.", "out_fq."))}


def torch_key(node_name: str) -> tuple[str, str]:
    """ONNX node `/model.23/cv2.0/cv2.0.0/conv/Conv` -> (`model.23.cv2.0.0.conv`, `Conv`).

    The exporter names a module's scope by its path from the nearest module that called it, so a child of a called
    Sequential repeats its parent's name (`cv2.0/cv2.0.0`) while list containers add nothing: a part that extends the
    previous one replaces it.
    """
    *scopes, op = node_name.strip("/").split("/")
    path: list[str] = []
    for part in scopes:
        if path and part.startswith(path[-1] + "."):
            path[-1] = part
        else:
            path.append(part)
    return ".".join(path), op


@dataclass(frozen=True)
class QuantPlan:
    """Which tensors a QDQ graph quantizes, by the name of the float node around them."""

    inputs: frozenset[str]  # nodes whose first input comes out of a DequantizeLinear
    outputs: frozenset[str]  # nodes whose output goes into a QuantizeLinear
    weights: frozenset[str]  # Conv nodes whose weight is quantized
    # The ONNX tensor whose scale each of them uses (node name -> tensor): a node's output, or for an input the tensor
    # whose scale a Split/MaxPool/Resize/Reshape on the way only passes on. Torch sites of one tensor share a quantizer.
    input_tensors: dict[str, str] = field(default_factory=dict)
    output_tensors: dict[str, str] = field(default_factory=dict)
    # Concat outputs calibrated to exactly one of their inputs' scale (that input's range held the others): the PTQ
    # graph's QLinearConcat copies that input instead of requantizing it. QAT keeps them tied (tensor -> such outputs).
    aliases: dict[str, list[str]] = field(default_factory=dict)



def qdq_scales(qdq_model: Any) -> dict[str, tuple[float, int]]:
    """(scale, zero point) of every activation tensor a QDQ graph quantizes, by tensor name."""
    from onnx import numpy_helper

    values = {i.name: numpy_helper.to_array(i) for i in qdq_model.graph.initializer}
    return {n.input[0]: (float(values[n.input[1]]), int(values[n.input[2]]) if len(n.input) > 2 else 0)
            for n in qdq_model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in values}


def quant_plan(qdq_model: Any) -> QuantPlan:
    """Read the plan off an ONNX Runtime QDQ graph (the PTQ variant): QDQ keeps the float nodes' names."""
    producer = {o: n for n in qdq_model.graph.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in qdq_model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    scales = qdq_scales(qdq_model)

    def dq(tensor: str) -> bool:
        p = producer.get(tensor)
        return p is not None and p.op_type == "DequantizeLinear"

    aliases: dict[str, list[str]] = {}

    def upstream_q(tensor: str) -> Any:
        """The QuantizeLinear behind a DequantizeLinear output."""
        return producer.get(producer[tensor].input[0])

    def root(dq_output: str) -> str:
        """The float tensor behind a DequantizeLinear output, followed back through scale-passing ops and through
        Concats whose scale is one of their inputs'."""
        q = upstream_q(dq_output)
        tensor, concats = q.input[0], []
        while (p := producer.get(tensor)) is not None and p.op_type in _SAME_SCALE_OPS:
            candidates = p.input if p.op_type == "Concat" else p.input[:1]
            same = [u for i in candidates if dq(i) and (u := upstream_q(i)) is not None
                    and u.op_type == "QuantizeLinear" and scales.get(u.input[0]) == scales[q.input[0]]]
            if not same:
                break
            if p.op_type == "Concat":
                concats.append(tensor)
            q, tensor = same[0], same[0].input[0]
        for c in concats:
            if c not in aliases.setdefault(tensor, []):
                aliases[tensor].append(c)
        return tensor

    qdq = {"QuantizeLinear", "DequantizeLinear"}
    float_nodes = [n for n in qdq_model.graph.node if n.op_type not in qdq]
    inputs = {n.name: root(n.input[0]) for n in float_nodes if n.input and dq(n.input[0])}
    outputs = {n.name: n.output[0] for n in float_nodes
               if any(c.op_type == "QuantizeLinear" for c in consumers.get(n.output[0], []))}
    return QuantPlan(
        inputs=frozenset(inputs), outputs=frozenset(outputs),
        weights=frozenset(n.name for n in float_nodes if n.op_type == "Conv" and len(n.input) > 1 and dq(n.input[1])),
        input_tensors=inputs, output_tensors=outputs, aliases=aliases,
    )


def insert_fake_quant(model: nn.Module, recipe: Int8Recipe, plan: QuantPlan) -> FakeQuant:
    """Fake-quantize a fused (BatchNorm folded) Ultralytics model where `plan` (the PTQ graph) quantizes: conv inputs,
    weights and outputs, the SiLU's sigmoid and product, residual Adds and the attention block. Returns what was
    inserted, and what the plan quantizes that is not simulated."""
    from torch.nn.utils import parametrize

    qtype, sym = recipe.activation_type, recipe.activation_symmetric
    inputs, outputs, weights = ({torch_key(n) for n in names} for names in (plan.inputs, plan.outputs, plan.weights))
    in_tensor = {torch_key(n): t for n, t in plan.input_tensors.items()}
    out_tensor = {torch_key(n): t for n, t in plan.output_tensors.items()}
    by_tensor: dict[str, ActivationFQ] = {}

    def quantizer(tensor: str | None) -> ActivationFQ:
        """One quantizer per ONNX tensor: every torch site of a tensor uses the scale the graph gives it."""
        if tensor is None:
            return ActivationFQ(qtype, sym)
        if tensor not in by_tensor:
            by_tensor[tensor] = ActivationFQ(qtype, sym, tensor)
            by_tensor[tensor].aliases = list(plan.aliases.get(tensor, []))
        return by_tensor[tensor]

    acts = nn.ModuleDict()
    convs: list[str] = []
    wfqs: list[WeightFQ] = []
    simulated: set[tuple[str, str]] = set()
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Conv2d):
            continue
        node, key = (name, "Conv"), name.replace(".", "_")
        simulated.add(node)
        if node in inputs:
            acts[f"{key}_in"] = quantizer(in_tensor.get(node))
            module.register_forward_pre_hook(lambda _m, args, fq=acts[f"{key}_in"]: (fq(args[0]),))
        if node in outputs:
            acts[f"{key}_out"] = quantizer(out_tensor.get(node))
            module.register_forward_hook(lambda _m, _a, out, fq=acts[f"{key}_out"]: fq(out))
        if node in weights:
            wfqs.append(WeightFQ(recipe))
            parametrize.register_parametrization(module, "weight", wfqs[-1])
            convs.append(name)
        block_name = name.rsplit(".", 1)[0] if "." in name else ""
        block = model.get_submodule(block_name) if block_name else model
        sigmoid, product = (f"{block_name}.act", "Sigmoid"), (f"{block_name}.act", "Mul")
        # Ultralytics' Conv blocks share one nn.SiLU instance (Conv.default_act): each block gets its own quantized one.
        if isinstance(getattr(block, "act", None), nn.SiLU) and getattr(block, "conv", None) is module and (
                sigmoid in outputs or product in outputs):
            block.act = QuantSiLU(quantizer(out_tensor.get(sigmoid)) if sigmoid in outputs else nn.Identity(),
                                  quantizer(out_tensor.get(product)) if product in outputs else nn.Identity())
            acts[f"{key}_silu"] = block.act
            simulated |= {sigmoid, product}
    simulated |= _insert_block_quantizers(model, outputs, acts, lambda node: quantizer(out_tensor.get(node)))
    unsimulated = sorted(f"{mod}/{op}" for mod, op in outputs - simulated if op.split("_")[0] not in _SAME_SCALE_OPS)
    return FakeQuant(acts, convs, wfqs, unsimulated)


def _insert_block_quantizers(model: nn.Module, outputs: set[tuple[str, str]], acts: nn.ModuleDict,
                             quantizer: Callable[[tuple[str, str]], ActivationFQ]) -> set[tuple[str, str]]:
    """Residual Adds (Bottleneck, PSABlock) and the attention block's requantized tensors. Returns the plan entries
    covered. The quantizers live in `acts` only, so the model's state dict keeps the plain model's keys."""
    import types

    covered: set[tuple[str, str]] = set()

    def quantizers(name: str, ops: Iterable[str]) -> dict[str, nn.Module]:
        out: dict[str, nn.Module] = {}
        for op in ops:
            if (name, op) in outputs:
                acts[f"{name.replace('.', '_')}_{op}"] = out[op] = fq = quantizer((name, op))
                if op == "Softmax":
                    fq.fixed = (0.0, 1.0)  # ONNX Runtime sets a Softmax output's range to 0-1 (adjust_tensor_ranges)
                covered.add((name, op))
            else:
                out[op] = nn.Identity()
        return out

    for name, module in list(model.named_modules()):
        kind = type(module).__name__
        if kind == "Bottleneck" and getattr(module, "add", False) and (name, "Add") in outputs:
            module.register_forward_hook(lambda _m, _a, out, fq=quantizers(name, ["Add"])["Add"]: fq(out))
        elif kind == "PSABlock" and any((name, op) in outputs for op in ("Add", "Add_1")):
            module.forward = types.MethodType(lambda self, x, fq=quantizers(name, ["Add", "Add_1"]): _psablock_forward(
                self, x, fq), module)
        elif kind == "Attention" and getattr(module, "format", None) != "coreml" and any(
                (name, op) in outputs for op in _ATTENTION_OPS):
            module.forward = types.MethodType(lambda self, x, fq=quantizers(name, _ATTENTION_OPS): _attention_forward(
                self, x, fq), module)
    return covered
