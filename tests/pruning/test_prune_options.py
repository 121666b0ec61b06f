"""Criteria, allocation options, bad input, and the iterative prune -> fine-tune loop."""

import pytest
import torch
from torch import nn

from slimkit.models import create
from slimkit.pruning import PruneConfig, prune, replay
from slimkit.train import TrainConfig, evaluate, fit

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("importance", ["l1", "l2", "fpgm", "bn_scale", "random"])
def test_every_criterion_prunes_resnet(importance):
    result = prune(create("resnet20"), PruneConfig(amount=0.5, importance=importance), X)
    assert abs(result.record["reduction"]["macs"] - 0.5) <= 0.02
    assert result.model(X).shape == (2, 10)


def test_taylor_needs_data_and_uses_it(digits):
    train, _ = digits
    model = create("mlp", in_features=64)
    x = torch.zeros(2, 1, 8, 8)
    with pytest.raises(ValueError, match="train_data"):
        prune(model, PruneConfig(amount=0.5, importance="taylor"), x)
    result = prune(model, PruneConfig(amount=0.5, importance="taylor"), x, train_data=train.subset(256))
    assert result.model[1].out_features == 100


def test_custom_criterion_keeps_the_highest_scores():
    def by_index(group):
        return torch.arange(group.units, dtype=torch.float32)

    model = create("mlp")
    result = prune(
        model, PruneConfig(amount=0.25, target="channels", importance=by_index, round_to=1), torch.zeros(1, 1, 28, 28)
    )
    assert result.record["groups"][0]["keep"] == [[50, 200]]
    assert torch.equal(result.model[1].weight, model[1].weight[50:])


def test_ignore_overrides_round_to_and_cap():
    model = create("vgg11_cifar")
    cfg = PruneConfig(
        amount=0.4, ignore=["features.0"], overrides={"re:features\\.4": 0.75}, round_to=8, max_sparsity=0.6
    )
    result = prune(model, cfg, X)
    assert result.model.features[0].out_channels == 64
    assert result.model.features[4].out_channels == 32
    convs = [m for m in result.model.features if isinstance(m, nn.Conv2d)]
    originals = [m for m in model.features if isinstance(m, nn.Conv2d)]
    for new, old in zip(convs, originals):
        assert new.out_channels % 8 == 0
        if new is not result.model.features[4]:  # the override may go beyond the cap
            assert new.out_channels >= 0.4 * old.out_channels - 1e-9
    assert any(k["reasons"] == ["ignored by config"] for k in result.record["kept_intact"])


def test_bad_input_errors():
    model = create("resnet20")
    with pytest.raises(ValueError, match="amount"):
        PruneConfig(amount=1.5)
    with pytest.raises(ValueError, match="allocation"):
        PruneConfig(allocation="greedy")
    with pytest.raises(ValueError, match="importance"):
        PruneConfig(importance="l3")
    with pytest.raises(ValueError, match="example input of shape"):
        prune(model, PruneConfig(), torch.zeros(1, 1, 28, 28))
    with pytest.raises(TypeError, match="example_input"):
        prune(model, PruneConfig(), [1, 2, 3])
    with pytest.raises(ValueError, match="cannot remove 99%"):
        prune(model, PruneConfig(amount=0.99, ignore=["re:.*"]), X)


class Dynamic(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: untraceable
            return self.conv(x)
        return x


def test_untraceable_model_names_the_problem():
    with pytest.raises(ValueError, match="cannot trace Dynamic"):
        prune(Dynamic(), PruneConfig(), X)


class Unknown(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        y = torch.roll(self.a(x), 1, dims=1)  # an op the graph does not know: its channels stay intact
        return self.head(self.b(y).mean((2, 3)))


def test_unknown_op_is_kept_intact_and_listed():
    result = prune(Unknown(), PruneConfig(amount=0.4, target="channels"), X)
    assert result.model.a.out_channels == 8
    assert result.model.b.out_channels < 8
    assert any("roll" in r for k in result.record["kept_intact"] for r in k["reasons"])
    assert result.model(X).shape == (2, 2)


def test_iterative_loop_finetunes_through_the_loss_hook_and_resumes(digits, tmp_path):
    train, test = digits
    model = create("lenet300", in_features=64)
    fit(model, train, test, TrainConfig(epochs=3, lr=3e-3, progress=False))
    baseline = evaluate(model, test).accuracy
    calls = []

    def loss_fn(outputs, targets, inputs):
        calls.append(1)
        return nn.functional.cross_entropy(outputs, targets)

    cfg = PruneConfig(
        amount=0.6,
        target="params",
        steps=3,
        finetune=TrainConfig(epochs=1, lr=1e-3, progress=False),
        max_accuracy_drop=5.0,
        checkpoint_dir=str(tmp_path / "ckpt"),
    )
    x = torch.zeros(1, 1, 8, 8)
    result = prune(model, cfg, x, train_data=train, val_data=test, loss_fn=loss_fn)
    assert calls, "fine-tuning must go through loss_fn"
    assert len(result.steps) == 3
    assert [round(s["target"], 2) for s in result.steps] == [0.2, 0.4, 0.6]
    assert abs(result.record["reduction"]["params"] - 0.6) <= 0.02
    assert baseline - evaluate(result.model, test).accuracy <= 5.0
    fresh = replay(create("lenet300", in_features=64), result.record)
    fresh.load_state_dict(result.model.state_dict())
    assert torch.equal(fresh(x), result.model(x))
    # a rerun with the same checkpoint folder resumes after the last step: nothing is trained again
    calls.clear()
    again = prune(model, cfg, x, train_data=train, val_data=test, loss_fn=loss_fn)
    assert not calls
    assert torch.equal(again.model(x), result.model(x))


def test_loop_stops_at_the_accuracy_budget(digits):
    train, test = digits
    model = create("lenet300", in_features=64)
    fit(model, train, test, TrainConfig(epochs=3, lr=3e-3, progress=False))
    cfg = PruneConfig(amount=0.98, target="params", steps=2, max_sparsity=0.99, finetune=0, max_accuracy_drop=0.0)
    result = prune(model, cfg, torch.zeros(1, 1, 8, 8), train_data=train, val_data=test)
    assert result.record["stopped_early"]
    assert evaluate(result.model, test).accuracy >= evaluate(model, test).accuracy
