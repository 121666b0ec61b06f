"""One rule for selecting modules by name in every config, and one submodule replacement."""

import pytest
import torch
from torch import nn

from slimkit._modules import matches, set_module
from slimkit.models import create
from slimkit.pruning import PruneConfig, prune
from slimkit.quantization.config import QuantConfig, plan_layers


@pytest.mark.parametrize(
    ("name", "pattern", "expected"),
    [
        ("layer1", "layer1", True),
        ("layer1.0.conv1", "layer1", True),  # a module covers the modules inside it
        ("layer1.0.conv1", "layer1.0", True),
        ("layer10", "layer1", False),  # a name, not a string prefix
        ("layer1.0.conv1", "conv1", False),  # qualified names only
        ("layer1", "layer1.0", False),
        ("layer1.0.conv1", "re:layer1\\.0\\.conv\\d", True),
        ("layer1.0.conv1", "re:conv1", False),  # full match
        ("layer1.0.conv1", "re:layer\\d", True),  # a regex selecting a container covers it too
        ("layer1.0.conv1", "re:.*conv1", True),
        ("fc", "re:f", False),
    ],
)
def test_one_rule(name, pattern, expected):
    assert matches(name, pattern) is expected
    assert matches(name, [pattern]) is expected
    assert matches(name, ["nothing", pattern]) is expected
    assert matches(name, []) is False


def test_prune_and_quantize_select_the_same_layers():
    """``ignore=("layer1",)`` skips all of layer1 in prune and in quantize (it was an error in quantize)."""
    model = create("resnet20")
    x = torch.zeros(1, 3, 32, 32)
    result = prune(model, PruneConfig(amount=0.3, target="channels", ignore=("layer1",)), x)
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and name.startswith("layer1."):
            assert result.model.get_submodule(name).out_channels == module.out_channels
    assert any(
        result.model.get_submodule(n).out_channels < m.out_channels
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and n.startswith("layer2.")
    )
    specs, skipped = plan_layers(model, QuantConfig(ignore=("layer1",)))
    layer1 = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n.startswith("layer1.")]
    assert layer1 and all(skipped[n] == "ignored by config" for n in layer1)
    assert not any(s.name.startswith("layer1.") for s in specs)
    assert any(s.name.startswith("layer2.") for s in specs)


def test_set_module_replaces_by_qualified_name():
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.ReLU(), nn.Linear(2, 3)))
    new = nn.Linear(2, 5)
    set_module(model, "1.1", new)
    assert model[1][1] is new and model(torch.zeros(1, 2)).shape == (1, 5)
    set_module(model, "0", nn.Identity())
    assert isinstance(model[0], nn.Identity)
    with pytest.raises(AttributeError):
        set_module(model, "7.0", nn.Identity())
