"""PyTorch-native int8 on x86: torchao's PT2E flow lowered to oneDNN integer kernels (VNNI / AMX).

``to_torch_int8(model, calib, example_input)`` captures the model with ``torch.export``, annotates it with the
``X86InductorQuantizer`` (uint8 activations, int8 per-channel weights, conv + add + ReLU fused the way oneDNN runs
them), calibrates on ``calib`` and lowers the quantized graph to ``onednn.qconv*`` / ``qlinear*`` ops with
``lower_pt2e_quantized_to_x86``. The result runs in eager mode: no ``torch.compile`` and no C++ compiler needed.

For a slimkit fake-quant model the flow runs on its float twin (dequantized weights ``W_hat``, simulated bias), and
the weight observers use slimkit's narrow symmetric range ``[-127, 127]``, so every weight re-quantizes to exactly
slimkit's integer codes and scale; activation observers are min-max like slimkit's default, so the input scale of
each conv equals slimkit's calibrated one. The extra tensors oneDNN fuses (residual ``Add`` outputs) are calibrated
by the flow on the same data. Agreement with the fake-quant model is measured with ``runtime.parity``.

The lowered graph has a fixed batch size: ``TorchInt8Model`` lowers once per input shape (about 2 s each) and caches.

Example:
    >>> int8 = to_torch_int8(result.model, calib_batches, torch.zeros(64, 3, 32, 32))   # doctest: +SKIP
    >>> int8(x).argmax(1)                                                               # doctest: +SKIP
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from slimkit.errors import DependencyError, UsageError
from slimkit.export.lowering import float_twin

__all__ = ["TorchInt8Model", "to_torch_int8"]


class _Relu(nn.Module):
    """A ReLU whose every call is its own traced op (a shared ``nn.ReLU`` module called twice confuses the
    quantizer's source partitions: 'Input partition has more than one output node')."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x)


class _Flatten(nn.Flatten):
    """oneDNN returns channels-last activations, which ``view`` cannot flatten: make them contiguous first."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(x.clone(memory_format=torch.contiguous_format), self.start_dim, self.end_dim)


def _adapt(model: nn.Module) -> None:
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(module, name, _Relu())
            elif type(child) is nn.Flatten:
                setattr(module, name, _Flatten(child.start_dim, child.end_dim))


def _quantizer():
    from torchao.quantization.pt2e.observer import MinMaxObserver, PerChannelMinMaxObserver
    from torchao.quantization.pt2e.quantizer import QuantizationSpec
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        QuantizationConfig,
        X86InductorQuantizer,
    )

    extra = {"eps": 2**-12}
    act = QuantizationSpec(
        dtype=torch.uint8,
        quant_min=0,
        quant_max=255,
        qscheme=torch.per_tensor_affine,
        is_dynamic=False,
        observer_or_fake_quant_ctr=MinMaxObserver.with_args(**extra),
    )
    weight = QuantizationSpec(
        dtype=torch.int8,
        quant_min=-127,
        quant_max=127,
        qscheme=torch.per_channel_symmetric,
        ch_axis=0,
        is_dynamic=False,
        observer_or_fake_quant_ctr=PerChannelMinMaxObserver.with_args(**extra),
    )
    quantizer = X86InductorQuantizer()
    quantizer.set_global(QuantizationConfig(act, act, weight, None, False))
    return quantizer


class TorchInt8Model:
    """Callable int8 model (tensor in, fp32 logits out); lowers the quantized graph once per input shape."""

    def __init__(self, converted: torch.fx.GraphModule) -> None:
        self.converted = converted
        self._lowered: dict[tuple[int, ...], torch.fx.GraphModule] = {}

    def lowered(self, shape: tuple[int, ...]) -> torch.fx.GraphModule:
        if shape not in self._lowered:
            from torchao.quantization.pt2e.lowering import lower_pt2e_quantized_to_x86

            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._lowered[shape] = lower_pt2e_quantized_to_x86(self.converted, (torch.zeros(shape),))
        return self._lowered[shape]

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.lowered(tuple(x.shape))(x.contiguous())

    def __repr__(self) -> str:
        return f"TorchInt8Model(x86 oneDNN, lowered shapes={sorted(self._lowered)})"


def to_torch_int8(
    model: nn.Module, calib: list[torch.Tensor] | torch.Tensor, example_input: torch.Tensor
) -> TorchInt8Model:
    """Quantize ``model`` (float, or a slimkit fake-quant model) to int8 oneDNN kernels; ``model`` is untouched.

    Args:
        calib: calibration input batches (a tensor is split into batches of 64).
        example_input: an input batch; its shape is lowered first (others are lowered on first use).
    """
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    except ImportError as exc:
        raise DependencyError("to_torch_int8 needs torchao: pip install 'slimkit[x86]' (torchao)") from exc
    batches = list(calib.split(64)) if isinstance(calib, torch.Tensor) else list(calib)
    if not batches:
        raise UsageError("to_torch_int8: the calibration data is empty")
    twin = float_twin(model)
    _adapt(twin)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = torch.export.Dim("batch", min=1)
        captured = torch.export.export(twin, (example_input,), dynamic_shapes=({0: batch},)).module()
        prepared = prepare_pt2e(captured, _quantizer())
        for x in batches:
            prepared(x)
        converted = convert_pt2e(prepared)
    result = TorchInt8Model(converted)
    result.lowered(tuple(example_input.shape))
    return result
