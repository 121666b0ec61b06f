import math
import types

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

import slimkit.train
from slimkit import DistillConfig, models
from slimkit.train import TrainConfig, evaluate, fit


def test_training_improves_accuracy_on_real_digits(mnist, tmp_path):
    train, test = mnist
    torch.manual_seed(0)  # the result must not depend on which tests ran before in this worker
    model = models.create("mlp")
    before = evaluate(model, test).accuracy
    ckpt = tmp_path / "best.safetensors"
    history = fit(model, train.subset(3000), test, TrainConfig(epochs=2, lr=0.05, optimizer="sgd"), checkpoint=ckpt)
    after = evaluate(model, test).accuracy
    assert before < 20 and after > 88
    assert history.best_accuracy == pytest.approx(after)
    reloaded = models.create("mlp", weights=ckpt)
    assert evaluate(reloaded, test).accuracy == pytest.approx(after)


def test_seeded_runs_are_identical(digits):
    train, _ = digits
    results = []
    for _ in range(2):
        torch.manual_seed(123)
        model = models.create("mlp", in_features=64, hidden=32)
        fit(model, train, None, TrainConfig(epochs=1, seed=3, optimizer="adamw", schedule="constant"))
        results.append(torch.cat([p.flatten() for p in model.parameters()]))
    torch.testing.assert_close(results[0], results[1])


def test_custom_loss_hook_and_early_stop(digits):
    train, test = digits
    calls = []

    def loss_fn(outputs, targets, inputs):
        calls.append(inputs.shape[0])
        return torch.nn.functional.cross_entropy(outputs, targets)

    model = models.create("mlp", in_features=64, hidden=16)
    history = fit(model, train, test, TrainConfig(epochs=30, lr=1e-9, patience=1, max_batches=2), loss_fn=loss_fn)
    assert history.stopped_early and len(history.val_accuracy) < 30
    assert calls and all(n <= 128 for n in calls)


def test_max_seconds_ends_the_run_on_the_clock_with_the_rate_decayed(digits, monkeypatch):
    now = [0.0]  # a clock that moves 1 s per training step, so the cut does not depend on this machine's speed
    monkeypatch.setattr(slimkit.train, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    rates = []
    hook = register_optimizer_step_pre_hook(lambda opt, args, kwargs: rates.append(opt.param_groups[0]["lr"]))

    def loss_fn(outputs, targets, inputs):
        now[0] += 1.0
        return torch.nn.functional.cross_entropy(outputs, targets)

    train, test = digits
    model = models.create("mlp", in_features=64, hidden=16)
    cfg = TrainConfig(epochs=2, lr=0.1, batch_size=64, max_seconds=4)
    try:
        history = fit(model, train, test, cfg, loss_fn=loss_fn)
    finally:
        hook.remove()
    # 4 of 2 x 23 steps: the cosine runs on the clock (1/4, 2/4, 3/4 of it gone), so the last step is the smallest
    assert history.steps == 4 and history.out_of_time and len(history.val_accuracy) == 1
    expected = [0.1 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert rates == pytest.approx(expected)
    now[0] = 0.0
    history = fit(model, train, None, TrainConfig(epochs=1, batch_size=64, max_seconds=1000), loss_fn=loss_fn)
    assert history.steps == len(train) // 64 + 1 and not history.out_of_time  # the clock never ran out
    assert DistillConfig(max_seconds=600).train.max_seconds == 600
    with pytest.raises(ValueError, match="max_seconds=0 must be > 0"):
        TrainConfig(max_seconds=0)


def test_bad_config_and_nan():
    with pytest.raises(ValueError, match="optimizer='rmsprop'.*'sgd'"):
        TrainConfig(optimizer="rmsprop")
    with pytest.raises(ValueError, match="lr=0"):
        TrainConfig(lr=0)
    model = models.create("mlp", in_features=4, hidden=4)
    data = torch.utils.data.TensorDataset(torch.full((8, 4), float("nan")), torch.zeros(8, dtype=torch.long))
    with pytest.raises(FloatingPointError, match="the input batch holds NaN or infinity"):  # not the learning rate
        fit(model, data, None, TrainConfig(epochs=1))


def test_config_json_round_trip_rejects_typos():
    cfg = TrainConfig(epochs=3, optimizer="sgd")
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="did you mean 'epochs'"):
        TrainConfig.from_dict({"epoch": 3})


@pytest.mark.parametrize(("name", "cls"), [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)])
def test_adam_steps_use_the_fused_kernel_with_the_same_result(digits, name, cls):
    train, _ = digits
    results = []
    for fused in (True, False):
        torch.manual_seed(0)
        model = models.create("mlp", in_features=64, hidden=32)
        used: list = []
        hook = register_optimizer_step_pre_hook(lambda opt, args, kwargs, used=used: used.append(opt.defaults["fused"]))
        try:
            with pytest.MonkeyPatch.context() as patch:
                if not fused:  # the reference: torch's default (unfused) implementation of the same update
                    patch.setattr(torch.optim, cls.__name__, lambda *a, **k: cls(*a, **{**k, "fused": None}))
                fit(model, train, None, TrainConfig(epochs=1, optimizer=name, lr=1e-3, max_batches=5))
        finally:
            hook.remove()
        assert used == [fused or None] * 5
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)
