"""Compression plans through the public verbs: prune → recover → quantize, saved and reloaded from disk."""

import pytest
import torch

import slimkit
from slimkit.train import TrainConfig, evaluate, fit
from slimkit.tuning import SearchConfig, load_model, search
from slimkit.tuning._verbs import bit_overrides
from slimkit.tuning.plans import TrialContext, run_params


@pytest.fixture(scope="module")
def trained(digits):
    train, test = digits
    torch.manual_seed(0)
    model = slimkit.models.create("lenet300", in_features=64)
    fit(model, train, test, TrainConfig(epochs=4, lr=0.05, optimizer="sgd", progress=False))
    return model


def test_bit_overrides_per_group_keep_first_and_last_to_the_8bit_rule(trained):
    lowest, overrides, floats = bit_overrides(trained, {"bits": 4, "bits/3": 2})
    # lenet300 = Flatten, Linear(1), ReLU, Linear(3), ReLU, Linear(5): only the middle layer is overridden
    assert lowest == 2 and overrides == {"re:3": {"weight_bits": 2, "scheme": "ternary"}} and floats == []
    assert bit_overrides(trained, {"bits": 32}) == (None, {}, [])
    with pytest.raises(ValueError, match="bits=3"):
        bit_overrides(trained, {"bits": 3})


def test_a_plan_makes_a_smaller_model_and_leaves_the_input_alone(trained, digits):
    train, test = digits
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    ctx = TrialContext(trained, train, test, test[0][0].unsqueeze(0), epochs=1)
    plan = {
        "prune_amount": 0.5,
        "prune_criterion": "l2",
        "prune_allocation": "uniform",
        "bits": 4,
        "distill": True,
        "lr": 1e-3,
    }
    small = run_params(plan, ctx)
    kinds = [step["kind"] for step in small.slimkit_history]
    assert kinds == ["prune", "quantize"]
    assert sum(p.numel() for p in small.parameters()) < 0.7 * sum(p.numel() for p in trained.parameters())
    assert all(torch.equal(before[k], v) for k, v in trained.state_dict().items())
    assert evaluate(small, test).accuracy > 80.0  # recovered, not random


def test_compression_search_saves_a_best_that_reloads_with_its_metrics(tmp_path, trained, digits):
    train, test = digits
    space = {
        "prune_amount": {"type": "float", "low": 0.0, "high": 0.6, "step": 0.3},
        "bits": {"type": "categorical", "choices": [32, 8, 4]},
        "lr": 1e-3,
        "epochs": 1,
    }
    cfg = SearchConfig(
        objectives=("accuracy", "size"),
        max_accuracy_drop=5.0,
        n_trials=4,
        space=space,
        out=str(tmp_path / "run"),
        progress=False,
        seed=1,
    )
    study = search(trained, cfg, train, test)
    assert study.best is not None and study.best.feasible
    assert study.best.metrics["size_bytes"] < study.baseline["size_bytes"]
    assert study.best.metrics["accuracy"] >= study.threshold
    reloaded = load_model(study.best.path)
    assert evaluate(reloaded, test).accuracy == pytest.approx(study.best.metrics["accuracy"], abs=1e-9)
    saved = (study.best.path / "model" / "model.safetensors").stat().st_size
    assert saved == study.best.metrics["size_bytes"]


def test_a_plan_a_verb_rejects_is_pruned_and_the_search_goes_on(tmp_path, trained, digits, monkeypatch):
    import slimkit.tuning._verbs as verbs

    real = verbs.apply_plan

    def picky(plan, params, ctx, hook):
        if plan["prune_amount"] > 0.4:
            raise ValueError("could only reach 12% macs reduction")
        return real(plan, params, ctx, hook)

    monkeypatch.setattr(verbs, "apply_plan", picky)
    train, test = digits
    space = {"prune_amount": {"type": "categorical", "choices": [0.0, 0.6]}, "bits": 32, "epochs": 1}
    cfg = SearchConfig(
        objectives=("accuracy", "size"),
        n_trials=4,
        space=space,
        out=str(tmp_path / "run"),
        progress=False,
        sampler="random",
        seed=3,
    )
    study = search(trained, cfg, train, test)
    rejected = [t for t in study.study.trials if t.params["prune_amount"] == 0.6]
    assert rejected and all(t.state.name == "PRUNED" for t in rejected)
    assert study.finished == 4 - len(rejected) and "could not apply their plan" in study.message
