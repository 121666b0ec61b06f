"""Attention-head pruning for ``nn.MultiheadAttention``.

PyTorch's ``MultiheadAttention`` ties the inner q/k/v width to ``embed_dim`` (``head_dim = embed_dim //
num_heads``), so removing heads while keeping the residual width needs a layer whose inner width is
``heads * head_dim``. ``PrunedMultiheadAttention`` is that layer: same forward signature, same state-dict keys
(``in_proj_weight``, ``in_proj_bias``, ``out_proj.*``), computed with ``scaled_dot_product_attention`` (so it exports
to ONNX and torch.export).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.errors import UsageError

__all__ = ["PrunedMultiheadAttention", "as_attention", "prune_heads"]


class PrunedMultiheadAttention(nn.Module):
    """Self/cross attention with ``num_heads`` heads of ``head_dim`` over an ``embed_dim`` residual stream."""

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        head_dim: int,
        dropout: float = 0.0,
        bias: bool = True,
        batch_first: bool = False,
    ) -> None:
        super().__init__()
        inner = num_heads * head_dim
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.dropout, self.batch_first = dropout, batch_first
        self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * inner)) if bias else None
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias)

    def forward(
        self,
        query,
        key,
        value,
        key_padding_mask=None,
        need_weights=True,
        attn_mask=None,
        average_attn_weights=True,
        is_causal=False,
    ):
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        batch, q_len, _ = query.shape
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)

        def heads(x, w, b):
            return F.linear(x, w, b).view(batch, x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(query, w_q, b_q), heads(key, w_k, b_k), heads(value, w_v, b_v)
        mask = _additive_mask(attn_mask, key_padding_mask, q, batch, self.num_heads)
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = q @ k.transpose(-2, -1) / self.head_dim**0.5
            if mask is not None:
                scores = scores + mask
            elif is_causal:
                scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
            probs = F.dropout(scores.softmax(-1), dropout, self.training)
            out = probs @ v
            weights = probs.mean(1) if average_attn_weights else probs
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal and mask is None
            )
        out = self.out_proj(out.transpose(1, 2).reshape(batch, q_len, -1))
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights


def _additive_mask(attn_mask, key_padding_mask, q, batch, heads):
    mask = None
    if attn_mask is not None:
        mask = (
            attn_mask
            if attn_mask.dtype != torch.bool
            else torch.zeros_like(attn_mask, dtype=q.dtype).masked_fill(attn_mask, float("-inf"))
        )
        if mask.dim() == 3:
            mask = mask.view(batch, heads, *mask.shape[-2:])
    if key_padding_mask is not None:
        pad = key_padding_mask
        if pad.dtype == torch.bool:
            pad = torch.zeros_like(pad, dtype=q.dtype).masked_fill(pad, float("-inf"))
        pad = pad.view(batch, 1, 1, -1)
        mask = pad if mask is None else mask + pad
    return mask


def as_attention(module: nn.Module) -> nn.MultiheadAttention | PrunedMultiheadAttention:
    """``module`` as an attention layer whose heads slimkit can prune, or a ``UsageError`` naming its type."""
    if not isinstance(module, (nn.MultiheadAttention, PrunedMultiheadAttention)):
        raise UsageError(
            f"cannot prune the attention heads of {type(module).__name__}: only nn.MultiheadAttention "
            "and PrunedMultiheadAttention are supported; name it in PruneConfig.ignore"
        )
    return module


def prune_heads(module: nn.Module, keep: torch.Tensor | None) -> nn.Module:
    """Keep the inner channels ``keep`` (whole heads, indices into the original ``heads * head_dim`` width)."""
    if keep is None:
        return module
    attention = as_attention(module)
    head_dim = attention.head_dim
    if len(keep) % head_dim:
        raise UsageError(
            f"attention heads are pruned whole: {len(keep)} kept channels is not a multiple of head_dim={head_dim}"
        )
    inner = attention.in_proj_weight.shape[0] // 3
    rows = torch.cat([keep + i * inner for i in range(3)])
    in_bias, out_bias = attention.in_proj_bias, attention.out_proj.bias
    new = PrunedMultiheadAttention(
        attention.embed_dim,
        len(keep) // head_dim,
        head_dim,
        attention.dropout,
        in_bias is not None,
        attention.batch_first,
    )
    with torch.no_grad():
        new.in_proj_weight.copy_(attention.in_proj_weight[rows])
        new.out_proj.weight.copy_(attention.out_proj.weight[:, keep])
        if in_bias is not None and new.in_proj_bias is not None:
            new.in_proj_bias.copy_(in_bias[rows])
        if out_bias is not None and new.out_proj.bias is not None:
            new.out_proj.bias.copy_(out_bias)
    return new.train(attention.training)
