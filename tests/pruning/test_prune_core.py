"""Core structured-pruning behaviour on the zoo: exactness, removal of the right channels, record round trips."""

import json

import pytest
import torch
from torch import nn

import slimkit
from slimkit.models import create, input_shape
from slimkit.pruning import PruneConfig, apply_record, build_graph, prune, replay

ZOO = ["mlp", "lenet300", "lenet5", "alexnet_cifar", "vgg11_cifar", "resnet20", "mobilenetv2_cifar"]


def _input(name, batch=2):
    return torch.randn(batch, *input_shape(name), generator=torch.Generator().manual_seed(1))


def _randomize_bn(model):
    """Non-trivial BN statistics so that removing channels is observable."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


@pytest.mark.parametrize("name", ZOO)
def test_zero_amount_is_bit_identical(name):
    model = create(name)
    x = _input(name)
    result = prune(model, PruneConfig(amount=0.0), x)
    assert result.model is not model
    assert torch.equal(result.model(x), model(x))
    assert result.record["modules"] == {}


@pytest.mark.parametrize("name", ["lenet5", "resnet20", "mobilenetv2_cifar", "vgg11_cifar"])
@pytest.mark.parametrize("amount", [0.3, 0.6])
def test_macs_target_reached_and_record_round_trip(name, amount):
    torch.manual_seed(0)
    model = create(name)
    x = _input(name)
    before = [p.clone() for p in model.parameters()]
    result = prune(model, PruneConfig(amount=amount, target="macs"), x)
    # the caller's model is untouched
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    after = slimkit.profile(result.model, x[:1])
    reduction = 1 - after.macs / slimkit.profile(model, x[:1]).macs
    assert abs(reduction - amount) <= 0.02
    assert abs(result.record["reduction"]["macs"] - reduction) < 1e-6
    # JSON round trip of the record, then replay on a fresh model: same shapes, weights reload bit-exactly
    record = json.loads(json.dumps(result.record))
    fresh = replay(create(name), record)
    assert apply_record is replay
    fresh.load_state_dict(result.model.state_dict())
    assert torch.equal(fresh(x), result.model(x))
    assert slimkit.history.history_of(result.model)[-1]["kind"] == "prune"


def _zero_lowest_channels(model, x, fraction=0.5):
    """Zero the weights of a fraction of every prunable group's channels (producers, norms) and return them."""
    graph = build_graph(model, x)
    zeroed = {}
    with torch.no_grad():
        for group in graph.groups:
            count = int(group.units * fraction)
            units = torch.arange(count) * 2  # every other unit, not a prefix
            chans = (units[:, None] * group.unit + torch.arange(group.unit)).flatten()
            zeroed[group.id] = set(chans.tolist())
            for member in group.members:
                module = group.modules[member.module]
                if member.role == "out":
                    module.weight[chans] = 0
                    if module.bias is not None:
                        module.bias[chans] = 0
                elif member.role == "through" and isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):
                    idx = chans + member.offset
                    module.weight[idx] = 0
                    module.bias[idx] = 0
                elif member.role == "through" and isinstance(module, nn.Conv2d):
                    module.weight[chans + member.offset] = 0
    return zeroed


@pytest.mark.parametrize("name", ["lenet5", "lenet300", "alexnet_cifar", "resnet20", "mobilenetv2_cifar"])
@pytest.mark.parametrize("importance", ["l1", "l2"])
def test_zeroed_channels_are_the_ones_removed(name, importance):
    torch.manual_seed(0)
    model = _randomize_bn(create(name))
    x = _input(name)
    zeroed = _zero_lowest_channels(model, x)
    reference = model(x)
    result = prune(
        model, PruneConfig(amount=0.5, target="channels", importance=importance, max_sparsity=0.5, round_to=1), x
    )
    for group in result.record["groups"]:
        kept = set(torch.cat([torch.arange(a, b) for a, b in group["keep"]]).tolist())
        assert kept.isdisjoint(zeroed[group["id"]]), group["id"]
        assert len(kept) == group["size"] - len(zeroed[group["id"]])
    assert torch.allclose(result.model(x), reference, atol=1e-5, rtol=1e-5)


def test_residual_members_share_kept_indices():
    model = create("resnet20")
    result = prune(model, PruneConfig(amount=0.5, target="macs"), _input("resnet20"))
    stage1 = next(g for g in result.record["groups"] if "layer1.0.bn2" in g["members"])
    assert {"conv1", "bn1", "layer1.1.conv2", "layer1.2.conv1", "layer2.0.conv1"} <= set(stage1["members"])
    widths = {result.model.get_submodule(n).weight.shape[0] for n in ("conv1", "layer1.0.conv2", "layer1.2.conv2")}
    assert widths == {stage1["kept"]}


def test_depthwise_keeps_groups_equal_to_channels():
    result = prune(create("mobilenetv2_cifar"), PruneConfig(amount=0.5), _input("mobilenetv2_cifar"))
    for m in result.model.modules():
        if isinstance(m, nn.Conv2d) and m.groups > 1:
            assert m.groups == m.in_channels == m.out_channels == m.weight.shape[0]


def test_flatten_to_linear_blocks():
    model = create("lenet5")
    result = prune(model, PruneConfig(amount=0.5, target="channels"), _input("lenet5"))
    conv2 = result.model.features[3]
    fc1 = result.model.classifier[1]
    assert fc1.in_features == conv2.out_channels * 25
    assert result.model(_input("lenet5")).shape == (2, 10)


@pytest.mark.parametrize("allocation", ["uniform", "global", "proportional"])
@pytest.mark.parametrize("target", ["macs", "params"])
def test_allocations_reach_targets(allocation, target):
    model = create("resnet20")
    x = _input("resnet20")
    result = prune(model, PruneConfig(amount=0.5, target=target, allocation=allocation), x)
    assert abs(result.record["reduction"][target] - 0.5) <= 0.02
    assert result.model(x).shape == (2, 10)


def test_classifier_and_input_never_pruned():
    result = prune(create("vgg11_cifar"), PruneConfig(amount=0.6), _input("vgg11_cifar"))
    assert result.model.features[0].in_channels == 3
    assert result.model.classifier[1].out_features == 10
