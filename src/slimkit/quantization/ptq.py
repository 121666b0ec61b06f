"""Model surgery and post-training quantization: conv-BN folding, swapping layers for fake-quant layers,
calibration of activation observers, and bias correction."""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from slimkit._inputs import call, named_outputs, tensors_of
from slimkit._modules import set_module
from slimkit.errors import UsageError
from slimkit.quantization.config import LayerSpec
from slimkit.quantization.fake import ActQuantizer, QuantConv2d, QuantLinear, WeightQuantizer, make_quant_layer
from slimkit.quantization.math import qparams, qrange

__all__ = [
    "activation_feeders",
    "attach_output_quant",
    "calibrate",
    "correct_bias",
    "find_conv_bn",
    "fold_bn",
    "prepare",
    "quant_layers",
    "residual_feeders",
    "share_output_scales",
]


def find_conv_bn(model: nn.Module) -> list[tuple[str, str]]:
    """``(conv, bn)`` name pairs where the conv's only consumer is the BatchNorm (traced with torch.fx; falls
    back to adjacent children of ``nn.Sequential`` when the model cannot be traced)."""
    pairs: list[tuple[str, str]] = []
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:
        for seq_name, seq in model.named_modules():
            if isinstance(seq, nn.Sequential):
                children = list(seq.named_children())
                for (a, ma), (b, mb) in itertools.pairwise(children):
                    if isinstance(ma, nn.Conv2d) and isinstance(mb, nn.BatchNorm2d):
                        prefix = f"{seq_name}." if seq_name else ""
                        pairs.append((prefix + a, prefix + b))
        return pairs
    modules = dict(model.named_modules())
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        src = node.args[0] if node.args else None
        if (
            isinstance(src, torch.fx.Node)
            and src.op == "call_module"
            and isinstance(modules.get(src.target), nn.Conv2d)
            and len(src.users) == 1
        ):
            pairs.append((str(src.target), str(node.target)))
    return pairs


def fold_bn(model: nn.Module, pairs: Iterable[tuple[str, str]]) -> None:
    """Fold each BatchNorm into its conv in place (the BN becomes ``nn.Identity``, the conv gains a bias).

    ``w' = w * g / sqrt(v + eps)``, ``b' = (b - m) * g / sqrt(v + eps) + beta``.
    """
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d):
            raise UsageError(
                f"fold_bn: {conv_name!r} -> {bn_name!r} is not a Conv2d followed by a BatchNorm2d "
                f"(got {type(conv).__name__} -> {type(bn).__name__})"
            )
        mean, var = bn.running_mean, bn.running_var
        if mean is None or var is None:
            raise UsageError(
                f"fold_bn: {bn_name!r} keeps no running statistics (track_running_stats=False), so it "
                "cannot be folded; quantize with fold_bn=False"
            )
        with torch.no_grad():
            # affine=False: gamma = 1, beta = 0
            gamma = bn.weight if bn.weight is not None else torch.ones_like(var)
            beta = bn.bias if bn.bias is not None else torch.zeros_like(mean)
            k = gamma / torch.sqrt(var + bn.eps)
            bias = conv.bias if conv.bias is not None else torch.zeros_like(mean)
            new_bias = (bias - mean) * k + beta
            if conv.bias is None:
                conv.bias = nn.Parameter(torch.zeros_like(new_bias))
            conv.weight.mul_(k.reshape(-1, *([1] * (conv.weight.ndim - 1))))
            conv.bias.copy_(new_bias)
            if isinstance(conv, QuantConv2d):
                wq = conv.weight_quant
                if wq.learnable:
                    _fold_learned_scale(wq, k)
                else:
                    wq.refresh(conv.weight)
        set_module(model, bn_name, nn.Identity())


def _fold_learned_scale(wq: WeightQuantizer, k: torch.Tensor) -> None:
    """Carry a learned (LSQ) weight grid through ``w' = k w`` exactly: per-channel scales ``|k| s``; where ``k < 0``
    the codes mirror, so an affine zero point becomes ``qmin + qmax - z``. A per-tensor grid becomes per-channel
    (each channel has its own ``k``)."""
    from slimkit.quantization.math import Granularity

    channels = k.numel()
    if wq.scale.numel() == 1 and channels > 1:
        shape = (channels, *wq.scale.shape[1:])
        wq.scale = nn.Parameter(wq.scale.detach().expand(shape).clone())
        wq.zero_point = nn.Buffer(wq.zero_point.expand(shape).clone())
        wq.granularity = Granularity.PER_CHANNEL.value
    view = (-1, *([1] * (wq.scale.ndim - 1)))
    wq.scale.mul_(k.abs().reshape(view))
    qmin, qmax = wq.int_range()
    flip = (k < 0).reshape(view).expand_as(wq.zero_point)
    wq.zero_point.copy_(torch.where(flip, qmin + qmax - wq.zero_point, wq.zero_point))


def fold_structure(model: nn.Module, pairs: Iterable[tuple[str, str]]) -> None:
    """The structural part of ``fold_bn`` (for replay on a fresh model): biases added, BNs removed."""
    for conv_name, bn_name in pairs:
        conv = model.get_submodule(conv_name)
        if conv.bias is None:
            conv.bias = nn.Parameter(torch.zeros(conv.out_channels, dtype=conv.weight.dtype, device=conv.weight.device))
        set_module(model, bn_name, nn.Identity())


def prepare(model: nn.Module, specs: list[LayerSpec], observer: str = "minmax", learnable: bool = False) -> None:
    """Swap each planned layer for its fake-quant version in place."""
    for spec in specs:
        layer = model.get_submodule(spec.name)
        input_quant = None
        if spec.act_bits is not None:
            input_quant = ActQuantizer(
                spec.act_bits,
                symmetric=False,
                observer=observer,
                dynamic=spec.dynamic,
                learnable=learnable and not spec.dynamic,
            )
        set_module(
            model,
            spec.name,
            make_quant_layer(
                layer, spec.weight_bits, spec.scheme, spec.granularity, spec.group_size, learnable, input_quant
            ),
        )
    attach_output_quant(model, [s.name for s in specs if s.output_act_bits], observer)


_ADDS = {operator.add, operator.iadd, torch.add}


def trace_with_leaves(model: nn.Module, names: Iterable[str]) -> torch.fx.Graph | None:
    """``model``'s torch.fx graph with the modules ``names`` kept as single calls; None when it cannot be traced."""
    wanted = set(names)

    class Tracer(torch.fx.Tracer):
        def is_leaf_module(self, module: nn.Module, qualname: str) -> bool:
            return qualname in wanted or super().is_leaf_module(module, qualname)

    try:
        return Tracer().trace(model)
    except Exception:  # an untraceable forward: callers fall back to what they can do without the graph
        return None


def _passes_through(module: nn.Module | None) -> bool:
    """Modules that are the identity (or a per-channel affine map folded away) at inference: Identity, BatchNorm,
    Dropout and stochastic depth (torchvision's ``StochasticDepth`` in EfficientNet / ConvNeXt blocks)."""
    return isinstance(module, nn.Identity | nn.BatchNorm2d | nn.BatchNorm1d | nn.Dropout) or (
        module is not None and type(module).__name__ == "StochasticDepth"
    )


def _pass_through_names(model: nn.Module) -> set[str]:
    return {name for name, module in model.named_modules() if name and _passes_through(module)}


def residual_feeders(model: nn.Module, names: Iterable[str]) -> list[str]:
    """The layers among ``names`` whose output feeds a residual ``add`` (through ``Identity`` / ``BatchNorm`` /
    ``Dropout`` modules, and for convolutions stochastic depth: EfficientNet's blocks), traced with torch.fx; ``[]``
    when the model cannot be traced."""
    wanted = set(names)
    graph = trace_with_leaves(model, wanted | _pass_through_names(model))
    if graph is None:
        return []
    modules = dict(model.named_modules())

    def reaches_add(node, depth_ok: bool) -> bool:
        for user in node.users:
            is_add = (user.op == "call_function" and user.target in _ADDS) or (
                user.op == "call_method" and user.target == "add"
            )
            module = modules.get(user.target) if user.op == "call_module" else None
            # a transformer's Linear -> stochastic depth -> add stays unquantized, as before (its MatMul's bias Add
            # comes after the layer's ONNX node)
            crossing = _passes_through(module) and (depth_ok or type(module).__name__ != "StochasticDepth")
            if is_add or (crossing and reaches_add(user, depth_ok)):
                return True
        return False

    return [
        str(n.target)
        for n in graph.nodes
        if n.op == "call_module"
        and n.target in wanted
        and reaches_add(n, isinstance(modules.get(str(n.target)), nn.Conv2d))
    ]


# Activations ONNX Runtime runs on integers only when the layer before them ends in a QuantizeLinear (QLinearConv
# -> QLinearSigmoid -> QLinearMul for SiLU), or that it runs in float between integer layers (Hardswish): without a
# calibrated output scale the layer itself stays a float Conv with dequantized weights.
_GATES = (nn.SiLU, nn.Sigmoid, nn.Hardswish, nn.Hardsigmoid)
_GATE_FUNCTIONS = {torch.sigmoid, torch.nn.functional.silu, torch.nn.functional.hardswish}
_GATE_FUNCTIONS |= {torch.nn.functional.sigmoid, torch.nn.functional.hardsigmoid}
_RELUS = (nn.ReLU, nn.ReLU6)
_RELU_FUNCTIONS = {torch.relu, torch.nn.functional.relu, torch.nn.functional.relu6}
_POOL_OR_SCALE = (nn.AdaptiveAvgPool2d, nn.AvgPool2d)  # squeeze-excitation after a ReLU: pool, then rescale
_SCALE_FUNCTIONS = {operator.mul, torch.mul}


def activation_feeders(model: nn.Module, names: Iterable[str]) -> list[str]:
    """The layers among ``names`` whose output feeds a SiLU / Sigmoid / Hardswish / Hardsigmoid (module or function,
    through ``Identity`` / ``BatchNorm`` / ``Dropout`` / stochastic depth), or a ReLU whose output is pooled or
    multiplied (a squeeze-excitation block after a ReLU), traced with torch.fx; ``[]`` when the model cannot be
    traced. Their outputs get a quantizer so the exported layer is an integer kernel (``QLinearConv``) and the gate
    runs between quantized tensors, as in EfficientNet / MobileNetV3 blocks and their squeeze-excitation."""
    wanted = set(names)
    graph = trace_with_leaves(model, wanted | _pass_through_names(model))
    if graph is None:
        return []
    modules = dict(model.named_modules())

    def reaches_gate(node, after_relu: bool = False) -> bool:
        for user in node.users:
            module = modules.get(user.target) if user.op == "call_module" else None
            function = user.target if user.op == "call_function" else None
            relu = isinstance(module, _RELUS) or function in _RELU_FUNCTIONS
            if (
                isinstance(module, _GATES)
                or function in _GATE_FUNCTIONS
                or (user.op == "call_method" and user.target == "sigmoid")
                or (after_relu and (isinstance(module, _POOL_OR_SCALE) or function in _SCALE_FUNCTIONS))
                or (_passes_through(module) and reaches_gate(user, after_relu))
                or (relu and reaches_gate(user, True))
            ):
                return True
        return False

    return [str(n.target) for n in graph.nodes if n.op == "call_module" and n.target in wanted and reaches_gate(n)]


def attach_output_quant(model: nn.Module, names: Iterable[str], observer: str = "minmax") -> list[ActQuantizer]:
    """Give each named quantized layer an 8-bit output quantizer (the residual ``Add`` then runs on integers in
    the runtime: ``QLinearConv -> QLinearAdd``). Returns the new quantizers (not yet calibrated)."""
    added = []
    for name in names:
        layer = model.get_submodule(name)
        layer.output_quant = ActQuantizer(8, symmetric=False, observer=observer)
        added.append(layer.output_quant)
    return added


def quant_layers(model: nn.Module) -> list[tuple[str, QuantLinear | QuantConv2d]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear | QuantConv2d)]


def calibration_batches(
    data: Dataset | DataLoader | torch.Tensor | Mapping[str, torch.Tensor], batch_size: int, batches: int
) -> list[Any]:
    """Up to ``batches`` input batches from a dataset, loader, tensor or dict of tensors; errors on empty or
    non-finite data.

    A batch is a model input as ``slimkit._inputs.call`` takes it: a tensor, a tuple of positional tensors or a dict
    of keyword tensors (``{"input_ids": ..., "attention_mask": ...}``). A tensor or a dict of tensors is split along
    dim 0; a dataset may yield dicts (collated into a dict of batches), and a dataset's / loader's ``(inputs,
    labels)`` pairs give their inputs.

    Example:
        >>> ids = torch.zeros(10, 8, dtype=torch.long)
        >>> [b["input_ids"].shape[0] for b in calibration_batches({"input_ids": ids}, 4, 8)]
        [4, 4, 2]
    """
    chunks: list[Any]
    if isinstance(data, torch.Tensor):
        chunks = list(data.split(batch_size))[:batches]
    elif isinstance(data, Mapping):
        pieces = {key: value.split(batch_size) for key, value in _tensor_dict(data).items()}
        count = min((len(p) for p in pieces.values()), default=0)
        chunks = [{key: p[i] for key, p in pieces.items()} for i in range(min(count, batches))]
    else:
        if not isinstance(data, DataLoader):
            if len(data) == 0:  # type: ignore[arg-type]
                raise UsageError("quantize: the calibration data is empty")
            data = DataLoader(data, batch_size=batch_size, shuffle=False)
        chunks = []
        for batch in itertools.islice(data, batches):
            chunks.append(batch[0] if isinstance(batch, (list, tuple)) else batch)
    if not chunks or not tensors_of(chunks[0]) or any(t.numel() == 0 for _, t in tensors_of(chunks[0])):
        raise UsageError("quantize: the calibration data is empty")
    for x in chunks:
        if any(t.is_floating_point() and not torch.isfinite(t).all() for _, t in tensors_of(x)):
            raise UsageError("quantize: the calibration data contains NaN or inf")
    return chunks


def _tensor_dict(data: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A dict of calibration inputs: every value a tensor with the same dim 0."""
    if not all(isinstance(v, torch.Tensor) and v.ndim > 0 for v in data.values()):
        kinds = {k: type(v).__name__ for k, v in data.items()}
        raise UsageError(f"quantize: calibration data as a dict needs batched tensors as values, got {kinds}")
    sizes = {k: v.shape[0] for k, v in data.items()}
    if len(set(sizes.values())) > 1:
        raise UsageError(f"quantize: the calibration dict's tensors differ in dim 0 (batch): {sizes}")
    return dict(data)


def _shapes(x: Any) -> str:
    """The shape(s) of one batch, for messages: ``(8, 13)`` or ``input_ids (8, 13), attention_mask (8, 13)``."""
    if isinstance(x, torch.Tensor):
        return str(tuple(x.shape))
    return ", ".join(f"{slot} {tuple(t.shape)}" for slot, t in tensors_of(x))


def run_batches(model: nn.Module, batches: list[Any]) -> None:
    """Run ``model`` on each batch (tensor, tuple or dict, as ``slimkit._inputs.call`` spreads it) without gradients;
    a failing or non-finite batch is a one-line UsageError."""
    with torch.no_grad():
        for i, x in enumerate(batches):
            try:
                out = call(model, x)
            except (RuntimeError, ValueError) as exc:  # ValueError: a transformers forward unpacking a shape
                raise UsageError(
                    f"quantize: the model failed on a calibration batch of shape {_shapes(x)}: {exc}"
                ) from exc
            if any(o.is_floating_point() and not torch.isfinite(o).all() for _, o in named_outputs(out)):
                raise UsageError(
                    f"quantize: the model's output is NaN or inf on calibration batch {i} (shape "
                    f"{_shapes(x)}); check the weights' magnitudes and the input scaling"
                )


def calibrate(model: nn.Module, batches: list[Any], only: list[ActQuantizer] | None = None) -> None:
    """Run the observers of every static activation quantizer (or of ``only``) over ``batches`` and freeze their
    ranges."""
    quantizers = [m for m in model.modules() if isinstance(m, ActQuantizer) and not m.dynamic] if only is None else only
    for q in quantizers:
        q.start_observing()
    was_training = model.training
    model.eval()
    try:
        run_batches(model, batches)
    finally:
        model.train(was_training)
    for q in quantizers:
        q.stop_observing()
    calibrated = {id(q) for q in quantizers}
    producers = [n for n, m in quant_layers(model) if id(getattr(m, "output_quant", None)) in calibrated]
    if producers:
        share_output_scales(model, producers)


def share_output_scales(model: nn.Module, names: Iterable[str]) -> list[str]:
    """One scale per tensor: each named layer's calibrated output quantizer takes the parameters of the static input
    quantizer of the quantized layers reading its output (through ``Identity`` / ``BatchNorm`` / ``Dropout`` /
    stochastic depth), when they agree; an output read only by ReLUs keeps only its non-negative range (zero point 0).
    Returns the layers changed (``[]`` when the model cannot be traced).

    Both ranges describe the same tensor (the input's observed in the float model, the output's in the quantized one,
    so they differ slightly), and with two of them ONNX Runtime requantizes between a block's last conv and the next
    block's first (MobileNetV3: 5 such pairs; a ReLU before a squeeze-excitation pool: 3 more). With one, the reader's
    input quantizer is the identity on its producer's grid, and a ReLU on a zero-point-0 grid is the identity (the ONNX
    export drops it).
    """
    wanted = set(names)
    layers = dict(quant_layers(model))
    graph = trace_with_leaves(model, set(layers) | _pass_through_names(model))
    if graph is None:
        return []
    modules = dict(model.named_modules())
    changed = []
    for node in graph.nodes:
        oq = getattr(layers.get(str(node.target)), "output_quant", None) if node.op == "call_module" else None
        if node.target not in wanted or oq is None or oq.symmetric or oq.dynamic:
            continue
        readers, others, frontier = [], [], [(user, node) for user in node.users]
        while frontier:
            user, source = frontier.pop()
            module = modules.get(str(user.target)) if user.op == "call_module" else None
            iq = getattr(module, "input_quant", None) if str(user.target) in layers else None
            if _passes_through(module):
                frontier.extend((after, user) for after in user.users)
            elif (
                iq is not None
                and not iq.dynamic
                and (iq.bits, iq.symmetric) == (oq.bits, oq.symmetric)
                and user.args
                and user.args[0] is source
            ):
                readers.append(iq)
            else:
                others.append((user, module))
        if readers:
            params = {(float(q.scale), float(q.zero_point)) for q in readers}
            if len(params) != 1:
                continue
            scale, zero_point = readers[0].scale.detach(), readers[0].zero_point
        elif others and all(isinstance(m, nn.ReLU) or _is_relu_call(u) for u, m in others):
            qmin, qmax = qrange(oq.bits, False)
            if float(oq.zero_point) <= qmin:
                continue
            scale, zero_point = qparams(torch.zeros(()), (qmax - oq.zero_point) * oq.scale.detach(), oq.bits, False)
        else:
            continue
        with torch.no_grad():
            oq.scale.copy_(scale)
            oq.zero_point.copy_(zero_point)
        changed.append(str(node.target))
    return changed


def _is_relu_call(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target in (torch.relu, torch.nn.functional.relu)


def correct_bias(model: nn.Module, batches: list[Any]) -> dict[str, float]:
    """Bias correction (Nagel et al. 2019): weight rounding shifts each output channel's mean by
    ``E[(W_q - W) x] = (W_q - W) E[x]`` (for a conv, summed over the kernel with per-channel input means,
    ignoring padding). One calibration pass collects ``E[x]`` per layer; the shift is subtracted from the bias.
    Returns the largest absolute correction per layer."""
    layers = [(n, m, m.bias) for n, m in quant_layers(model) if m.bias is not None and not m.weight_quant.learnable]
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str) -> Callable[[QuantLinear | QuantConv2d, tuple[Any, ...]], None]:
        def collect(module: QuantLinear | QuantConv2d, args: tuple[Any, ...]) -> None:
            x = args[0].detach()
            if module.input_quant is not None:
                x = module.input_quant(x)
            # the layer's input channel axis: the last dim of a Linear (any leading dims, e.g. (N, T, C) tokens),
            # dim 1 of a Conv2d
            rows = x.reshape(-1, x.shape[-1]) if isinstance(module, nn.Linear) else x.transpose(0, 1).flatten(1).T
            sums[name] = sums.get(name, 0) + rows.sum(dim=0)
            counts[name] = counts.get(name, 0) + rows.shape[0]

        return collect

    handles = [m.register_forward_pre_hook(hook(n)) for n, m, _ in layers]
    try:
        run_batches(model.eval(), batches)
    finally:
        for h in handles:
            h.remove()
    corrections: dict[str, float] = {}
    with torch.no_grad():
        for name, layer, bias in layers:
            mean_x = sums[name] / max(counts[name], 1)
            delta_w = layer.weight_quant(layer.weight) - layer.weight
            groups = getattr(layer, "groups", 1)
            if delta_w.ndim > 2:
                delta_w = delta_w.sum(dim=tuple(range(2, delta_w.ndim)))
            out, per_group = delta_w.shape
            shift = torch.einsum(
                "goi,gi->go", delta_w.reshape(groups, out // groups, per_group), mean_x.reshape(groups, per_group)
            ).reshape(out)
            bias.sub_(shift)
            corrections[name] = float(shift.abs().max())
    return corrections


def layer_summary(layer: QuantLinear | QuantConv2d) -> dict[str, Any]:
    """JSON-safe summary of a quantized layer's parameters (for the record)."""
    from slimkit.quantization.math import sqnr

    wq = layer.weight_quant
    scale = wq.scale.detach().flatten()
    out: dict[str, Any] = {
        "weight_scale": {
            "min": float(scale.min()),
            "max": float(scale.max()),
            "mean": float(scale.mean()),
            "count": scale.numel(),
        },
        "weight_zero_point": sorted({int(z) for z in wq.zero_point.flatten().tolist()})[:16],
        "weight_sqnr_db": round(sqnr(layer.weight.detach(), wq.eval()(layer.weight).detach()), 3),
    }
    wq.train(layer.training)
    if layer.input_quant is not None:
        iq = layer.input_quant
        out["act_scale"] = None if iq.dynamic else float(iq.scale.detach())
        out["act_zero_point"] = None if iq.dynamic else int(iq.zero_point)
        out["act_observer"] = "dynamic" if iq.dynamic else iq.observer_kind
    return out
