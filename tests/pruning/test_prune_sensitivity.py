"""Sensitivity analysis: per-group accuracy curves, table/plot, and the sensitivity allocation that uses them."""

import pytest
import torch

from slimkit.pruning import PruneConfig, prune, sensitivity
from slimkit.train import TrainConfig, evaluate, fit

X = torch.zeros(2, 1, 8, 8)


@pytest.fixture(scope="module")
def trained(digits):
    train, test = digits
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Flatten(),
        torch.nn.Linear(64, 32),
        torch.nn.ReLU(),
        torch.nn.Linear(32, 24),
        torch.nn.ReLU(),
        torch.nn.Linear(24, 10),
    )
    fit(model, train, None, TrainConfig(epochs=4, lr=3e-3, progress=False))
    return model.eval(), train, test.subset(300)


def test_curves_measure_each_group_alone(trained, tmp_path):
    model, _, val = trained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = sensitivity(model, X, val, ratios=(0.5, 0.97))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # caller's model untouched
    assert set(res.curves) == set(res.units) and len(res.curves) == 2  # the two hidden layers, not the classifier
    baseline = evaluate(model, val).accuracy
    for points in res.curves.values():
        assert [p[0] for p in points] == [0.0, 0.5, 0.97]
        assert points[0][1] == pytest.approx(baseline)
        assert points[2][1] < baseline - 10  # keeping a single unit of a layer wrecks the accuracy
    # one point checked independently: the group pruned alone by 50% through the public prune with an override
    assert set(res.curves) == {"1:out", "3:out"}
    cfg = PruneConfig(amount=0.01, target="channels", overrides={"1": 0.5, "3": 0.0})
    assert evaluate(prune(model, cfg, X).model, val).accuracy == pytest.approx(res.curves["1:out"][1][1])
    text = res.table()
    assert all(g in text for g in res.curves) and "97%" in text
    png = res.plot(tmp_path / "sens.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sensitivity_allocation_uses_the_curves_and_records_them(trained):
    model, _, val = trained
    res = sensitivity(model, X, val, ratios=(0.25, 0.5, 0.75))
    result = prune(model, PruneConfig(amount=0.4, target="params", allocation="sensitivity", sensitivity=res), X)
    assert abs(result.record["reduction"]["params"] - 0.4) <= 0.02
    assert result.record["sensitivity"] == res.curves
    # with val_data and no table, prune runs the analysis itself
    auto = prune(model, PruneConfig(amount=0.4, target="params", allocation="sensitivity"), X, val_data=val)
    assert set(auto.record["sensitivity"]) == set(res.curves)
    with pytest.raises(ValueError, match="needs PruneConfig.sensitivity"):
        prune(model, PruneConfig(amount=0.4, allocation="sensitivity"), X)
    with pytest.raises(ValueError, match="ratios"):
        sensitivity(model, X, val, ratios=(0.5, 1.0))
    with pytest.raises(ValueError, match="unknown or ignored group"):
        sensitivity(model, X, val, groups=["nope"])
