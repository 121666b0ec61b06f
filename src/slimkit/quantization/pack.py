"""Bit packing of quantized weights for a really smaller file: int8 one per byte, 3-4 bit two per byte,
ternary / 2-bit four per byte, binary eight per byte, plus the fp32 per-channel (per-group) scales.

``pack_state_dict(qmodel) -> (tensors, meta)``: every fake-quant weight ``L.weight`` is replaced by
``L.weight.codes`` (uint8, codes offset to be non-negative, little-endian within a byte); all-zero zero-point
buffers are dropped (restored from ``meta``). ``tensors`` goes straight into ``safetensors.torch.save_file`` and
``meta`` is JSON. ``unpack_state_dict`` restores a state_dict whose weights are the dequantized ``W_hat``; a model
built by ``replay`` loads it and reproduces the quantized model's outputs bit-exactly.

Example:
    >>> tensors, meta = pack_state_dict(result.model)                  # doctest: +SKIP
    >>> save_file(tensors, "w.safetensors")                            # doctest: +SKIP
    >>> state = unpack_state_dict(load_file("w.safetensors"), meta)    # doctest: +SKIP
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from slimkit.errors import UsageError
from slimkit.export.registry import PACK, register
from slimkit.quantization.fake import QuantConv2d, QuantEmbedding, QuantLinear
from slimkit.quantization.math import ungroup

__all__ = ["code_layout", "pack_bits", "pack_state_dict", "storage_bits", "unpack_bits", "unpack_state_dict"]

PACK_VERSION = 1


def storage_bits(bits: int) -> int:
    """Bits per stored code: 1, 2, 4 or 8."""
    for width in (1, 2, 4, 8):
        if bits <= width:
            return width
    raise UsageError(f"cannot pack {bits}-bit codes (1..8 supported)")


def pack_bits(codes: torch.Tensor, width: int) -> torch.Tensor:
    """Pack non-negative integer codes ``< 2**width`` into a flat uint8 tensor, ``8 // width`` per byte."""
    flat = codes.flatten().to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**width):
        raise UsageError(f"codes out of range for {width}-bit packing: [{int(flat.min())}, {int(flat.max())}]")
    per_byte = 8 // width
    pad = (-flat.numel()) % per_byte
    flat = torch.nn.functional.pad(flat, (0, pad)).reshape(-1, per_byte)
    shifts = torch.arange(per_byte, dtype=torch.int64) * width
    return (flat << shifts).sum(dim=1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, width: int, count: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: the first ``count`` codes as int64."""
    per_byte = 8 // width
    shifts = torch.arange(per_byte, dtype=torch.int64) * width
    values = (packed.to(torch.int64).unsqueeze(1) >> shifts) & (2**width - 1)
    return values.flatten()[:count]


def code_layout(layer: QuantLinear | QuantConv2d | QuantEmbedding, codes: torch.Tensor | None = None) -> dict[str, Any]:
    """How ``pack_state_dict`` stores a fake-quant layer's weight: its ``meta["layers"]`` entry.

    Example:
        >>> code_layout(qmodel.fc1)["width"]          # doctest: +SKIP
        8
    """
    wq = layer.weight_quant
    if codes is None:
        codes = wq.codes(layer.weight)
    qmin, qmax = wq.int_range()
    step = 2 if wq.scheme == "binary" else 1  # binary codes are -1 / +1: one bit each
    width = storage_bits(max(1, math.ceil(math.log2((qmax - qmin) // step + 1))))
    return {
        "width": width,
        "offset": qmin,
        "step": step,
        "codes_shape": list(codes.shape),
        "weight_shape": list(layer.weight.shape),
        "scheme": wq.scheme,
        "bits": wq.bits,
    }


@register(PACK, QuantLinear, QuantConv2d, QuantEmbedding)
def pack_state_dict(qmodel: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Replace each fake-quant weight by packed integer codes; returns ``(tensors, meta)``. Registered as the
    packing of models holding fake-quant layers (``slimkit.measure.size_on_disk``, ``slimkit.save``)."""
    state = {k: v.detach().contiguous().clone() for k, v in qmodel.state_dict().items()}
    meta: dict[str, Any] = {"version": PACK_VERSION, "layers": {}, "zeros": {}}
    for name, layer in qmodel.named_modules():
        if not isinstance(layer, QuantLinear | QuantConv2d | QuantEmbedding):
            continue
        codes = layer.weight_quant.codes(layer.weight)
        layout = code_layout(layer, codes)
        key = f"{name}.weight"
        del state[key]
        shifted = torch.div(codes - layout["offset"], layout["step"], rounding_mode="floor")
        state[f"{key}.codes"] = pack_bits(shifted, layout["width"])
        meta["layers"][name] = layout
    for key in list(state):
        if key.endswith("zero_point") and not torch.any(state[key]):
            meta["zeros"][key] = list(state.pop(key).shape)
    return state, meta


def unpack_state_dict(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Restore the full state_dict (dequantized weights ``(q - z) * s``) from ``pack_state_dict``'s output."""
    if meta.get("version") != PACK_VERSION:
        raise UsageError(f"packed weights version {meta.get('version')!r} is not supported (expected {PACK_VERSION})")
    state = dict(tensors)
    for key, shape in meta["zeros"].items():
        state[key] = torch.zeros(shape)
    for name, info in meta["layers"].items():
        packed_key = f"{name}.weight.codes"
        if packed_key not in state:
            raise UsageError(f"packed weights: missing tensor {packed_key!r} for layer {name!r}")
        count = math.prod(info["codes_shape"])
        stored = unpack_bits(state.pop(packed_key), info["width"], count).float()
        codes = stored * info.get("step", 1) + info["offset"]
        codes = codes.reshape(info["codes_shape"])
        scale = state[f"{name}.weight_quant.scale"]
        zero_point = state[f"{name}.weight_quant.zero_point"]
        state[f"{name}.weight"] = ungroup((codes - zero_point) * scale, tuple(info["weight_shape"]))
    return state
