"""Sequence models on images, for the dynamic int8 path (LSTM gates, attention projections): an LSTM reading a
28x28 digit row by row (sequential MNIST) and a small vision transformer (``nn.TransformerEncoder``). They are not
in the zoo (structured pruning does not cover LSTM hidden units or ``nn.TransformerEncoder``); create them by spec.

Example:
    >>> from slimkit import models
    >>> models.create("slimkit.models.sequence:lstm_rows")(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import torch
from torch import nn

from slimkit.errors import UsageError


class RowLSTM(nn.Module):
    """Each image row is one time step; the last hidden state classifies."""

    def __init__(self, hidden: int = 128, layers: int = 1, num_classes: int = 10, width: int = 28) -> None:
        super().__init__()
        self.rnn = nn.LSTM(width, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x.mean(1))  # (B, channels, rows, width) -> (B, rows, width)
        return self.head(out[:, -1])


def lstm_rows(hidden: int = 128, layers: int = 1, num_classes: int = 10) -> RowLSTM:
    """LSTM(28 -> 128) over the 28 rows of a 28x28 digit, last state -> fc10 (82,186 params)."""
    return RowLSTM(hidden, layers, num_classes)


class TinyViT(nn.Module):
    """Patch embedding (a strided conv), class token, learned positions, pre-norm transformer encoder, linear head."""

    def __init__(
        self,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        patch: int = 7,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
    ) -> None:
        super().__init__()
        if image_size % patch:
            raise UsageError(f"TinyViT: image_size={image_size} is not a multiple of patch={patch}")
        self.embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, (image_size // patch) ** 2 + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim, heads, 2 * dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1) + self.pos
        return self.head(self.norm(self.encoder(tokens)[:, 0]))


def vit_tiny(
    dim: int = 64,
    depth: int = 4,
    heads: int = 4,
    patch: int = 7,
    num_classes: int = 10,
    in_channels: int = 1,
    image_size: int = 28,
) -> TinyViT:
    """ViT: 7x7 patches, dim 64, 4 pre-norm blocks of 4 heads (139,018 params on 28x28 digits)."""
    return TinyViT(dim, depth, heads, patch, num_classes, in_channels, image_size)
