"""Mixed precision from measured sensitivity under a size budget."""

import pytest
import torch

from slimkit import models
from slimkit.quantization import QuantConfig, pack_state_dict, quantize
from slimkit.quantization.mixed import mixed_precision
from slimkit.train import TrainConfig, evaluate, fit


def test_mixed_precision_meets_budget_and_beats_uniform(digits):
    train, test = digits
    torch.manual_seed(0)
    model = models.create("lenet300", in_features=64)
    fit(model, train, None, TrainConfig(epochs=5, lr=0.05, optimizer="sgd", progress=False))
    plan = mixed_precision(model, train, size_ratio=10.0, candidates=(8, 4, 2))
    assert plan.size_bytes <= plan.budget_bytes
    assert set(plan.bits.values()) <= {8, 4, 2} and len(set(plan.bits.values())) > 1
    for layer in plan.sensitivity.values():  # fewer bits never hurt less here
        assert layer[2] >= layer[8]
    cfg = dict(act_bits=None, keep_first_last_8bit=False, bias_correction=False)
    mixed = quantize(model, QuantConfig(**cfg, overrides=plan.overrides), train)
    assert [layer["weight_bits"] for layer in mixed.record["layers"]] == list(plan.bits.values())
    tensors, _ = pack_state_dict(mixed.model)
    packed = sum(t.numel() * t.element_size() for t in tensors.values())
    fp32 = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert fp32 / packed >= 10.0  # the budget holds for the real packed tensors, scales and biases included
    uniform = quantize(model, QuantConfig(weight_bits=2, **cfg), train)  # uniform bits under the same budget
    assert evaluate(mixed.model, test).loss < evaluate(uniform.model, test).loss


def test_mixed_precision_errors(digits):
    model = models.create("lenet300", in_features=64)
    with pytest.raises(ValueError, match="size_ratio"):
        mixed_precision(model, digits[0], size_ratio=0.5)
    with pytest.raises(ValueError, match="budget"):
        mixed_precision(model, digits[0], size_ratio=20.0, candidates=(8, 4))
