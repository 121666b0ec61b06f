"""PTQ on layers whose inputs are not (N, C, ...): Linear layers on token sequences (N, T, C), as in transformers."""

import torch
from torch import nn

import slimkit


class TokenMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(16, 48), nn.Linear(48, 10)

    def forward(self, x):  # (N, T, 16) -> (N, 10)
        return self.down(torch.relu(self.up(x))).mean(1)


def test_bias_correction_follows_the_linear_channel_axis_on_token_inputs():
    """Bias correction reads a Linear's channels on the last dim: it used to reshape by dim 1 (T) and crash, or,
    where T happened to equal C, subtract a wrong correction."""
    torch.manual_seed(0)
    model = TokenMLP().eval()
    data = torch.utils.data.TensorDataset(torch.randn(256, 8, 16) + 0.5, torch.randint(0, 10, (256,)))
    x = torch.randn(64, 8, 16) + 0.5
    shift = {}
    for corrected in (False, True):
        cfg = slimkit.QuantConfig(weight_bits=4, act_bits=None, bias_correction=corrected)
        quantized = slimkit.quantize(model, cfg, data).model
        with torch.no_grad():
            shift[corrected] = float((quantized(x) - model(x)).mean(0).abs().mean())
    assert shift[True] < shift[False] / 2, shift  # the mean output shift of 4-bit rounding is mostly removed


def test_bias_correction_on_tokens_whose_length_equals_the_width():
    """T == C: the old dim-1 reading would silently correct with per-position means; the result must match the
    correction computed from per-channel means by hand."""
    torch.manual_seed(1)
    layer = nn.Sequential(nn.Linear(8, 4)).eval()
    x = torch.randn(128, 8, 8) + torch.arange(8.0)  # channel c has mean c; position means are all ~3.5
    data = torch.utils.data.TensorDataset(x, torch.zeros(128, dtype=torch.long))
    cfg = slimkit.QuantConfig(weight_bits=3, act_bits=None, bias_correction=True, keep_first_last_8bit=False)
    quantized = slimkit.quantize(layer, cfg, data).model[0]
    plain = slimkit.quantize(
        layer,
        slimkit.QuantConfig(weight_bits=3, act_bits=None, bias_correction=False, keep_first_last_8bit=False),
        data,
    ).model[0]
    delta_w = quantized.weight_quant(quantized.weight) - quantized.weight
    expected = plain.bias - delta_w.detach() @ x.reshape(-1, 8).mean(0)
    assert torch.allclose(quantized.bias, expected, atol=1e-5)
