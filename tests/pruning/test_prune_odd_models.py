"""Odd models: shared / tied weights, a module called twice, per-channel parameters used in forward, float64
models and a wrong example input. Pruning nothing changes nothing; pruning half keeps the math consistent."""

import copy

import pytest
import torch
from torch import nn

import slimkit
from slimkit import PruneConfig, QuantConfig
from slimkit.errors import UsageError
from slimkit.pruning import apply_record
from slimkit.pruning.surgery import decode_indices


class SharedConv(nn.Module):
    """``b`` reuses ``a``'s weight (a Parameter shared by two Conv2d of equal shape)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.b.weight = self.a.weight
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.a(x))
        x = torch.relu(self.b(x))
        return self.head(x.mean((2, 3)))


class TiedLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(12, 16)
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)
        self.b.weight = self.a.weight
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))))


class Reused(nn.Module):
    """The same Conv2d called twice: one weight, so both calls keep the same channels."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.a(torch.relu(self.a(torch.relu(self.stem(x))))))
        return self.head(x.mean((2, 3)))


class TiedEmbedding(nn.Module):
    """A language-model head tied to the embedding (the tied tensor cannot be cut consistently)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.fc = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)
        self.out = nn.Linear(16, 20, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids)
        h = self.fc2(torch.relu(self.fc(h))) + h
        return self.out(h)


class ChannelScale(nn.Module):
    """A per-channel ``nn.Parameter`` broadcast onto a conv output (and one onto Linear features)."""

    def __init__(self, how: str = "view") -> None:
        super().__init__()
        self.how = how
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.s = nn.Parameter(torch.rand(8) + 0.5)
        self.c2 = nn.Conv2d(8, 8, 3)
        self.fc = nn.Linear(8, 16)
        self.g = nn.Parameter(torch.rand(16) + 0.5)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        y = self.c1(x)
        if self.how == "view":
            y = y * self.s.view(1, -1, 1, 1)
        elif self.how == "index":
            y = y * self.s[None, :, None, None]
        elif self.how == "unsqueeze":
            y = y * self.s.unsqueeze(-1).unsqueeze(-1)
        else:  # a literal channel count: cannot follow pruning, so kept intact
            y = y * self.s.view(1, 8, 1, 1)
        z = self.c2(torch.relu(y)).mean((2, 3))
        return self.head(torch.relu(self.fc(z)) * self.g)


def _prune(model, x, amount):
    return slimkit.prune(model, PruneConfig(amount=amount, target="channels", round_to=1), x)


def _group(result, group_id):
    return next(g for g in result.record["groups"] if g["id"] == group_id)


def _dropped(group) -> torch.Tensor:
    keep = set(decode_indices(group["keep"]).tolist())
    return torch.tensor([i for i in range(group["size"]) if i not in keep])


def _inputs_zeroed(model, group, *layers):
    """A copy of ``model`` whose named layers read zeros from the group's dropped channels (what pruning must equal)."""
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name in layers:
            reference.get_submodule(name).weight[:, _dropped(group)] = 0
    return reference


def _check_replay(model, result, x):
    clone = apply_record(copy.deepcopy(model), result.record)
    clone.load_state_dict(result.model.state_dict())
    assert torch.equal(clone(x), result.model(x))


ODD = [(SharedConv, (2, 3, 8, 8)), (TiedLinear, (2, 12)), (Reused, (2, 3, 8, 8)), (ChannelScale, (2, 3, 8, 8))]


@pytest.mark.parametrize("make, shape", ODD)
def test_amount_zero_is_bit_identical(make, shape):
    torch.manual_seed(0)
    model, x = make().eval(), torch.randn(*shape)
    result = _prune(model, x, 0.0)
    assert torch.equal(result.model(x), model(x))


def test_shared_conv_weight_is_cut_once_and_stays_shared():
    torch.manual_seed(0)
    model, x = SharedConv().eval(), torch.randn(2, 3, 8, 8)
    result = _prune(model, x, 0.5)
    pruned = result.model
    assert pruned.a.weight is pruned.b.weight
    group = _group(result, "stem:out")  # stem, a and b are coupled through the shared weight
    assert {"stem", "a", "b", "head"} <= set(group["members"]) and group["kept"] == 4
    keep = decode_indices(group["keep"])
    assert torch.equal(pruned.a.weight, model.a.weight[keep][:, keep])
    # the same as the original with the dropped channels' inputs zeroed everywhere they are read
    torch.testing.assert_close(pruned(x), _inputs_zeroed(model, group, "a", "head")(x), rtol=1e-5, atol=1e-6)
    _check_replay(model, result, x)


def test_tied_linear_weight_is_cut_once_and_stays_shared():
    torch.manual_seed(0)
    model, x = TiedLinear().eval(), torch.randn(5, 12)
    result = _prune(model, x, 0.5)
    pruned = result.model
    assert pruned.a.weight is pruned.b.weight and pruned.a.weight.shape == (8, 8)
    group = _group(result, "stem:out")
    torch.testing.assert_close(pruned(x), _inputs_zeroed(model, group, "a", "head")(x), rtol=1e-5, atol=1e-6)
    _check_replay(model, result, x)


def test_a_module_called_twice_keeps_the_same_channels_for_both_calls():
    torch.manual_seed(0)
    model, x = Reused().eval(), torch.randn(2, 3, 8, 8)
    result = _prune(model, x, 0.5)
    group = _group(result, "stem:out")
    assert [g["id"] for g in result.record["groups"]] == ["stem:out"]
    torch.testing.assert_close(result.model(x), _inputs_zeroed(model, group, "a", "head")(x), rtol=1e-5, atol=1e-6)


def test_tied_embedding_is_kept_intact_and_named():
    torch.manual_seed(0)
    model, ids = TiedEmbedding().eval(), torch.randint(0, 20, (2, 5))
    assert torch.equal(_prune(model, ids, 0.0).model(ids), model(ids))
    result = _prune(model, ids, 0.5)
    pruned = result.model
    assert pruned.out.weight is pruned.emb.weight and pruned.emb.weight.shape == (20, 16)
    assert pruned.fc.out_features == 16 and result.model(ids).shape == (2, 5, 20)
    reasons = [r for k in result.record["kept_intact"] for r in k["reasons"]]
    assert any("emb.weight" in r and "out.weight" in r for r in reasons)


@pytest.mark.parametrize("how", ["view", "index", "unsqueeze"])
def test_channel_scale_parameter_is_cut_with_its_channels(how):
    torch.manual_seed(0)
    model, x = ChannelScale(how).eval(), torch.randn(2, 3, 8, 8)
    result = _prune(model, x, 0.5)
    pruned = result.model
    conv, feats = _group(result, "c1:out"), _group(result, "fc:out")
    assert conv["params"] == ["s"] and feats["params"] == ["g"]
    assert torch.equal(pruned.s, model.s[decode_indices(conv["keep"])])
    assert torch.equal(pruned.g, model.g[decode_indices(feats["keep"])])
    assert isinstance(pruned.s, nn.Parameter) and pruned.s.shape == (4,)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference.c2.weight[:, _dropped(conv)] = 0
        reference.head.weight[:, _dropped(feats)] = 0
        reference.c2.weight[_dropped(_group(result, "c2:out"))] = 0
        reference.c2.bias[_dropped(_group(result, "c2:out"))] = 0
        reference.fc.weight[:, _dropped(_group(result, "c2:out"))] = 0
    torch.testing.assert_close(pruned(x), reference(x), rtol=1e-5, atol=1e-6)
    _check_replay(model, result, x)


def test_channel_scale_with_a_literal_width_is_kept_intact_and_named():
    torch.manual_seed(0)
    model, x = ChannelScale("literal").eval(), torch.randn(2, 3, 8, 8)
    assert torch.equal(_prune(model, x, 0.0).model(x), model(x))
    result = _prune(model, x, 0.5)
    assert result.model.s.shape == (8,) and result.model.c1.out_channels == 8
    conv = next(k for k in result.record["kept_intact"] if k["group"] == "c1:out")
    scale = next(k for k in result.record["kept_intact"] if "s" in k.get("params", []))
    for kept in (conv, scale):
        assert any("literal channel count 8" in r for r in kept["reasons"])
    assert result.model(x).shape == (2, 4)


def test_a_layer_weight_also_read_in_forward_is_cut_once():
    class NormGain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.c, self.head = nn.Conv2d(8, 8, 3), nn.Linear(8, 4)

        def forward(self, x):
            x = self.bn(self.stem(x)) * self.bn.weight.view(1, -1, 1, 1)
            return self.head(self.c(torch.relu(x)).mean((2, 3)))

    torch.manual_seed(0)
    model, x = NormGain().eval(), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        model.bn.weight.uniform_(0.5, 1.5)
    result = _prune(model, x, 0.5)
    keep = decode_indices(_group(result, "stem:out")["keep"])
    assert torch.equal(result.model.bn.weight, model.bn.weight[keep])
    _check_replay(model, result, x)


@pytest.mark.parametrize("name, shape", [("lenet5", (4, 1, 28, 28)), ("resnet20", (4, 3, 32, 32))])
def test_float64_models_stay_float64(name, shape):
    torch.manual_seed(0)
    model = slimkit.models.create(name).double().eval()
    x = torch.randn(*shape, dtype=torch.float64)
    assert torch.equal(slimkit.prune(model, PruneConfig(amount=0.0), x[:1]).model(x), model(x))
    pruned = slimkit.prune(model, PruneConfig(amount=0.5), x[:1]).model
    assert {p.dtype for p in pruned.state_dict().values() if p.is_floating_point()} == {torch.float64}
    assert pruned(x).dtype == torch.float64
    quantized = slimkit.quantize(model, QuantConfig(), x)
    layers = [m for m in quantized.model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    assert layers and all(m.weight.dtype == m.bias.dtype == torch.float64 for m in layers)
    assert quantized.model(x).dtype == torch.float64
    fresh = slimkit.quantization.replay(slimkit.models.create(name).double(), quantized.record)
    fresh.load_state_dict(quantized.model.state_dict())
    assert torch.equal(fresh(x), quantized.model(x))


def test_wrong_example_shape_is_one_line_naming_model_shape_and_layer():
    model = slimkit.models.create("lenet5")
    with pytest.raises(UsageError) as info:
        slimkit.prune(model, PruneConfig(amount=0.5), torch.zeros(1, 3, 28, 28))
    message = str(info.value)
    assert "\n" not in message
    assert "LeNet5" in message and "(1, 3, 28, 28)" in message and "'features.0' (Conv2d)" in message
    assert "expected input[1, 3, 28, 28] to have 1 channels" in message
