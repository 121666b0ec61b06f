"""Dynamic int8 for recurrent and attention layers.

``nn.LSTM``, ``nn.GRU`` and ``nn.MultiheadAttention`` keep their weights in fused parameters that no ``nn.Linear``
owns. ``decompose`` rebuilds each as the same computation over ``nn.Linear`` pieces (equal in float to the original
up to rounding), so every gate matrix and every attention projection becomes an ordinary Linear layer that
``method="dynamic"`` quantizes like any other: int8 per-channel weights, and the input of each matrix product
quantized per call from its own min/max. That is how integer runtimes execute them (ONNX Runtime's
``DynamicQuantizeLinear -> MatMulInteger``; PyTorch's dynamic int8 LSTM quantizes ``x`` and ``h`` per step too). The
attention scores and softmax stay float, as in those runtimes.

Example:
    >>> rnn = nn.LSTM(28, 64, batch_first=True)
    >>> linear = LinearRNN(rnn)
    >>> x = torch.randn(2, 5, 28)
    >>> torch.allclose(linear(x)[0], rnn(x)[0], atol=1e-5)
    True
"""

from __future__ import annotations

import copy
import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from slimkit.errors import InputTypeError, UsageError
from slimkit.export.registry import FLOAT_TWIN, FUSED_RNN, FusedRNN, register
from slimkit.quantization.config import unsupported  # what decompose covers; config plans with it too
from slimkit.quantization.fake import QuantLinear, float_layer

__all__ = ["LinearMultiheadAttention", "LinearRNN", "decompose", "float_rnn", "fused_rnn", "unsupported"]


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


class LinearRNN(nn.Module):
    """``nn.LSTM`` / ``nn.GRU`` over ``nn.Linear`` gates: ``ih_l{k}[_reverse]`` (applied to the whole input
    sequence) and ``hh_l{k}[_reverse]`` (applied to the hidden state at each step). Same call signature and outputs
    as the module it replaces (padded tensors; a ``PackedSequence`` is refused)."""

    def __init__(self, rnn: nn.LSTM | nn.GRU) -> None:
        super().__init__()
        if unsupported(rnn) or not isinstance(rnn, nn.LSTM | nn.GRU):
            raise UsageError(f"LinearRNN: {unsupported(rnn) or 'expected an LSTM or GRU'}")
        self.mode = "LSTM" if isinstance(rnn, nn.LSTM) else "GRU"
        self.hidden_size, self.num_layers = rnn.hidden_size, rnn.num_layers
        self.batch_first, self.dropout = rnn.batch_first, float(rnn.dropout)
        self.suffixes = ("", "_reverse") if rnn.bidirectional else ("",)
        for layer in range(self.num_layers):
            for sfx in self.suffixes:
                for kind in ("ih", "hh"):
                    bias = getattr(rnn, f"bias_{kind}_l{layer}{sfx}") if rnn.bias else None
                    self.add_module(
                        f"{kind}_l{layer}{sfx}", _linear(getattr(rnn, f"weight_{kind}_l{layer}{sfx}"), bias)
                    )

    def to_rnn(self) -> nn.LSTM | nn.GRU:
        """The fused ``nn.LSTM`` / ``nn.GRU`` with the current gate weights (export uses it for the ONNX LSTM op)."""
        first = cast(nn.Linear, self.ih_l0)  # every gate is a Linear
        rnn = (nn.LSTM if self.mode == "LSTM" else nn.GRU)(
            first.in_features,
            self.hidden_size,
            self.num_layers,
            bias=first.bias is not None,
            batch_first=self.batch_first,
            dropout=self.dropout,
            bidirectional=len(self.suffixes) == 2,
        )
        with torch.no_grad():
            for layer in range(self.num_layers):
                for sfx in self.suffixes:
                    for kind in ("ih", "hh"):
                        gate = getattr(self, f"{kind}_l{layer}{sfx}")
                        getattr(rnn, f"weight_{kind}_l{layer}{sfx}").copy_(gate.weight)
                        if gate.bias is not None:
                            getattr(rnn, f"bias_{kind}_l{layer}{sfx}").copy_(gate.bias)
        return rnn.train(self.training)

    def _run(self, layer: int, sfx: str, seq: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None):
        gates_x = getattr(self, f"ih_l{layer}{sfx}")(seq)  # (T, B, gates * H)
        hh = getattr(self, f"hh_l{layer}{sfx}")
        outputs = []
        for t in range(seq.shape[0]):
            gates_h = hh(h)
            if self.mode == "LSTM":
                i, f, g, o = (gates_x[t] + gates_h).chunk(4, dim=-1)
                c = torch.sigmoid(f) * cast(torch.Tensor, c) + torch.sigmoid(i) * torch.tanh(g)  # LSTMs pass c
                h = torch.sigmoid(o) * torch.tanh(c)
            else:
                x_r, x_z, x_n = gates_x[t].chunk(3, dim=-1)
                h_r, h_z, h_n = gates_h.chunk(3, dim=-1)
                r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
                h = (1 - z) * torch.tanh(x_n + r * h_n) + z * h
            outputs.append(h)
        return torch.stack(outputs), h, c

    def forward(self, input: torch.Tensor, hx=None):
        if isinstance(input, PackedSequence):
            raise InputTypeError(
                f"{self.mode} (slimkit dynamic int8): PackedSequence input is not supported; pass a padded tensor"
            )
        unbatched = input.dim() == 2
        x = input.unsqueeze(1) if unbatched else (input.transpose(0, 1) if self.batch_first else input)
        states = self.num_layers * len(self.suffixes)
        zeros = x.new_zeros(states, x.shape[1], self.hidden_size)
        if hx is None:
            h0, c0 = zeros, zeros
        else:
            if self.mode == "LSTM" and not isinstance(hx, tuple | list):
                raise InputTypeError("LSTM: hx must be a tuple (h_0, c_0)")
            h0, c0 = hx if self.mode == "LSTM" else (hx, zeros)
            if unbatched:
                h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            outs = []
            for d, sfx in enumerate(self.suffixes):
                idx = layer * len(self.suffixes) + d
                seq = x.flip(0) if d else x
                out, h, c = self._run(layer, sfx, seq, h0[idx], c0[idx] if self.mode == "LSTM" else None)
                outs.append(out.flip(0) if d else out)
                h_n.append(h)
                c_n.append(c)
            x = torch.cat(outs, dim=-1)
            if self.dropout and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, training=True)
        output = x.squeeze(1) if unbatched else (x.transpose(0, 1) if self.batch_first else x)
        h_out = torch.stack(h_n).squeeze(1) if unbatched else torch.stack(h_n)
        if self.mode == "GRU":
            return output, h_out
        return output, (h_out, torch.stack(c_n).squeeze(1) if unbatched else torch.stack(c_n))


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True: not allowed to attend) or a float mask as an additive float mask."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


class LinearMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` over ``q_proj`` / ``k_proj`` / ``v_proj`` / ``out_proj`` Linear layers, with the
    same call signature and outputs (masks, ``need_weights``, ``average_attn_weights``, ``is_causal``)."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        if unsupported(mha) or not isinstance(mha, nn.MultiheadAttention):
            raise UsageError(f"LinearMultiheadAttention: {unsupported(mha) or 'expected a MultiheadAttention'}")
        e = mha.embed_dim
        self.num_heads, self.batch_first, self.dropout = mha.num_heads, mha.batch_first, float(mha.dropout)
        bias = mha.in_proj_bias
        if mha.in_proj_weight is not None:
            weights = mha.in_proj_weight.split(e)
        else:
            weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
        biases = bias.split(e) if bias is not None else (None, None, None)
        self.q_proj, self.k_proj, self.v_proj = (_linear(w, b) for w, b in zip(weights, biases))
        self.out_proj = _linear(mha.out_proj.weight, mha.out_proj.bias)
        # what nn.TransformerEncoder(Layer) inspects before its fused fast path; None / False make it take the
        # regular path, which calls this module
        self.embed_dim, self._qkv_same_embed_dim = mha.embed_dim, False
        self.in_proj_weight = self.in_proj_bias = None

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ):
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        (b, lq, _), lk, h = query.shape, key.shape[1], self.num_heads

        def heads(x: torch.Tensor, length: int) -> torch.Tensor:
            return x.reshape(b, length, h, -1).transpose(1, 2)  # (B, heads, L, head_dim)

        q, k, v = heads(self.q_proj(query), lq), heads(self.k_proj(key), lk), heads(self.v_proj(value), lk)
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        if is_causal and attn_mask is None:
            attn_mask = torch.ones(lq, lk, dtype=torch.bool, device=scores.device).triu(1)
        if attn_mask is not None:
            extra = _additive(attn_mask, scores.dtype)
            scores = scores + (extra.reshape(b, h, lq, lk) if extra.dim() == 3 else extra)
        if key_padding_mask is not None:
            scores = scores + _additive(key_padding_mask, scores.dtype).reshape(b, 1, 1, lk)
        weights = torch.softmax(scores, dim=-1)
        dropped = F.dropout(weights, self.dropout, training=True) if self.dropout and self.training else weights
        out = (dropped @ v).transpose(1, 2).reshape(b, lq, -1)
        out = self.out_proj(out)
        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        weights = weights.mean(dim=1) if average_attn_weights else weights
        return out, weights.squeeze(0) if unbatched else weights


def decompose(model: nn.Module, skip: tuple[str, ...] = (), only: list[str] | None = None) -> list[str]:
    """Replace every ``nn.LSTM`` / ``nn.GRU`` / ``nn.MultiheadAttention`` of ``model`` (in place) by its Linear
    form; returns their names. Modules the Linear forms do not cover are left alone (``quantize`` lists them), as
    are those matching a name or ``re:`` pattern in ``skip``; ``only`` limits it to the given names (replay)."""
    from slimkit._modules import matches
    from slimkit.quantization.ptq import set_module

    names = []
    for name, module in list(model.named_modules()):
        if not name or unsupported(module) or any(matches(name, p) for p in skip):
            continue
        if only is not None and name not in only:
            continue
        rebuilt = LinearRNN(module) if isinstance(module, nn.LSTM | nn.GRU) else LinearMultiheadAttention(module)
        set_module(model, name, rebuilt.train(module.training))
        names.append(name)
    return names


def _fusable(rnn: LinearRNN) -> bool:
    """A dynamic int8 LSTM whose every gate is quantized with per-channel scales runs as ONNX Runtime's fused
    ``DynamicQuantizeLSTM``; the others stay unrolled into one matrix product per step."""
    return rnn.mode == "LSTM" and all(
        isinstance(gate, QuantLinear) and gate.weight_quant.granularity == "per_channel"
        for name, gate in rnn.named_children()
        if name.startswith(("ih_", "hh_"))
    )


@register(FUSED_RNN, LinearRNN)
def fused_rnn(rnn: LinearRNN) -> FusedRNN | None:
    """How export recognises a fusable dynamic int8 LSTM (registered handler; None: not fusable)."""
    if not _fusable(rnn):
        return None
    gates = tuple(tuple(f"ih_l{layer}{sfx}" for sfx in rnn.suffixes) for layer in range(rnn.num_layers))
    return FusedRNN(rnn.mode, gates)


@register(FLOAT_TWIN, LinearRNN)
def float_rnn(rnn: LinearRNN) -> nn.LSTM | nn.GRU | None:
    """A fusable dynamic int8 LSTM as one ``nn.LSTM`` with the dequantized gate weights (export writes the ONNX
    ``LSTM`` op from it); None for the others (their gates are exported one by one)."""
    if not _fusable(rnn):
        return None
    twin = copy.deepcopy(rnn)
    for name, gate in list(twin.named_children()):
        if isinstance(gate, QuantLinear):
            setattr(twin, name, float_layer(gate))
    return twin.to_rnn()
