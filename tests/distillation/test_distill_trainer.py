"""distill() and kd_loss_fn(): KD beats hard labels on real digits, the teacher stays frozen, bad input fails early."""

import copy
import json

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from slimkit import models
from slimkit.distillation import DistillConfig, distill, hinton_loss, kd_loss_fn
from slimkit.history import history_of
from slimkit.train import TrainConfig, evaluate, fit

QUIET = {"progress": False}


@pytest.fixture(scope="module")
def mnist_teacher(mnist):
    """An MLP 784-200-10 trained on all 8,000 MNIST-10k training digits (a few seconds)."""
    train, _ = mnist
    teacher = models.create("mlp")
    fit(teacher, train, None, TrainConfig(epochs=3, lr=1e-3, seed=0, **QUIET))
    return teacher


def test_distilled_student_beats_the_same_student_on_labels(mnist, mnist_teacher):
    """300 labelled digits: soft targets of a teacher that saw more data beat the labels alone, for every seed."""
    train, test = mnist
    small, val = train.subset(300), test.subset(1000)
    teacher_accuracy = evaluate(mnist_teacher, val).accuracy
    settings = {"epochs": 30, "lr": 3e-3, "batch_size": 32, "restore_best": False, **QUIET}
    for seed in (0, 1):
        torch.manual_seed(seed)
        student = models.create("mlp", hidden=30)
        on_labels = copy.deepcopy(student)
        fit(on_labels, small, None, TrainConfig(seed=seed, **settings))
        result = distill(
            student,
            mnist_teacher,
            DistillConfig(temperature=4.0, alpha=0.9, seed=seed, cache_teacher=True, **settings),
            small,
            val,
        )
        labels_accuracy, kd_accuracy = evaluate(on_labels, val).accuracy, result.record["student_accuracy"]
        assert kd_accuracy == pytest.approx(evaluate(result.model, val).accuracy)
        assert kd_accuracy >= labels_accuracy + 2.0, (seed, labels_accuracy, kd_accuracy, teacher_accuracy)
        assert result.record["teacher_accuracy"] == pytest.approx(teacher_accuracy)


def _tiny(digits):
    train, test = digits
    return train.subset(128), test.subset(64)


def _digit_mlp(hidden=16, num_classes=10, seed=0):
    torch.manual_seed(seed)
    return models.create("mlp", hidden=hidden, in_features=64, num_classes=num_classes)


def test_distill_returns_a_new_model_and_leaves_teacher_and_student_alone(digits):
    train, val = _tiny(digits)
    student, teacher = _digit_mlp(16), _digit_mlp(64, seed=1)
    teacher.train()
    student_state = copy.deepcopy(student.state_dict())
    teacher_state = copy.deepcopy(teacher.state_dict())
    result = distill(student, teacher, DistillConfig(epochs=2, **QUIET), train, val)
    assert result.model is not student
    for name, tensor in student.state_dict().items():
        assert torch.equal(tensor, student_state[name]), name
    for name, tensor in teacher.state_dict().items():
        assert torch.equal(tensor, teacher_state[name]), name
    assert teacher.training  # its mode is restored
    assert not all(torch.equal(a, b) for a, b in zip(result.model.state_dict().values(), student_state.values()))
    record = result.record
    assert len(record["train_loss"]) == 2 and set(record["loss_terms"]) == {"kd", "hard"}
    assert len(record["loss_terms"]["kd"]) == 2
    json.dumps(record)  # JSON-safe: it goes into the artifact's history
    step = history_of(result.model)[-1]
    assert step["kind"] == "distill" and step["record"]["config"] == DistillConfig(epochs=2, **QUIET).to_dict()
    assert step["record"]["config"]["temperature"] == 1.0 and step["record"]["config"]["alpha"] == 0.5
    assert history_of(result.model)[0] == {"kind": "distill", "record": record}
    assert result.model.slimkit_source == student.slimkit_source


class _CountingData(Dataset):
    def __init__(self, data):
        self.data, self.reads = data, 0

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        self.reads += 1
        return self.data[i]


def test_mismatched_outputs_fail_before_training(digits):
    train, val = _tiny(digits)
    counting = _CountingData(train)
    with pytest.raises(ValueError, match="student predicts 5 classes, the teacher 10"):
        distill(_digit_mlp(num_classes=5), _digit_mlp(), DistillConfig(epochs=50, **QUIET), counting, val)
    assert counting.reads <= 8  # only the probe batch was read


def test_a_student_that_cannot_read_the_data_fails_clearly(digits):
    train, val = _tiny(digits)
    with pytest.raises(ValueError, match=r"student cannot run on the training data \(inputs of shape \(8, 1, 8, 8\)"):
        distill(models.create("mlp"), _digit_mlp(), DistillConfig(**QUIET), train, val)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"temperature": 0}, r"temperature=0 must be a number > 0"),
        ({"temperature": -2.0}, r"temperature=-2.0"),
        ({"alpha": 1.2}, r"alpha=1.2 is out of range; allowed \[0.0, 1.0\]"),
        ({"alpha": -0.1}, r"alpha=-0.1"),
        ({"focal_gamma": -1}, "focal_gamma"),
        ({"hints": [["1"]]}, "pair of module names"),
        ({"epochs": -1}, "epochs=-1"),
        ({"optimizer": "lbfgs"}, "'sgd', 'adam', 'adamw'"),
        ({"cache_teacher": True, "hints": [["1", "1"]]}, "cache_teacher=True caches the teacher's logits only"),
    ],
)
def test_config_rejects_bad_values(settings, message):
    with pytest.raises(ValueError, match=message):
        DistillConfig(**settings)


def test_config_round_trips_and_rejects_unknown_keys():
    cfg = DistillConfig(temperature=2.5, alpha=0.5, hints=[["1", "3"]], attention=(("a", "b"),), optimizer="sgd")
    assert cfg.hints == (("1", "3"),)
    assert DistillConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="did you mean 'temperature'"):
        DistillConfig.from_dict({"temprature": 3})


def test_unknown_hint_layer_names_the_nearest_ones(digits):
    train, val = _tiny(digits)
    counting = _CountingData(train)
    cfg = DistillConfig(hints=[["l", "1"]], epochs=50, **QUIET)
    with pytest.raises(ValueError, match=r"student has no layer 'l'; valid names: 0, 1, 2, 3"):
        distill(_digit_mlp(), _digit_mlp(), cfg, counting, val)
    cfg = DistillConfig(attention=[["1", "classifier.1"]], epochs=50, **QUIET)
    with pytest.raises(ValueError, match=r"teacher has no layer 'classifier.1'"):
        distill(_digit_mlp(), _digit_mlp(), cfg, counting, val)
    conv_teacher = models.create("lenet5")
    cfg = DistillConfig(hints=[["1", "features.3"]], **QUIET)
    with pytest.raises(ValueError, match=r"teacher has no layer 'features.3'"):
        distill(_digit_mlp(), _digit_mlp(), cfg, counting, val)
    with pytest.raises(ValueError, match=r"did you mean 'features.3'"):
        distill(
            models.create("lenet5"),
            conv_teacher,
            DistillConfig(hints=[["features.3", "feature.3"]], **QUIET),
            _CountingData(_mnist_like(16)),
            None,
        )
    assert counting.reads <= 8 * 4


def _mnist_like(n):
    gen = torch.Generator().manual_seed(0)
    return torch.utils.data.TensorDataset(
        torch.randn(n, 1, 28, 28, generator=gen), torch.randint(0, 10, (n,), generator=gen)
    )


def test_hints_train_linear_adapters_of_the_right_shape(digits):
    """A narrower (e.g. pruned) student: Linear(16 -> 64) learns to map its hidden layer onto the teacher's."""
    train, val = _tiny(digits)
    cfg = DistillConfig(hints=[["1", "1"]], hint_weight=1.0, epochs=4, lr=3e-3, **QUIET)
    result = distill(_digit_mlp(16), _digit_mlp(64, seed=1), cfg, train, val)
    adapter = result.adapters["hint0"]
    assert isinstance(adapter, nn.Linear) and tuple(adapter.weight.shape) == (64, 16)
    assert result.record["adapters"] == {"hint0": {"type": "Linear", "weight_shape": [64, 16]}}
    hint = result.record["loss_terms"]["hint:1"]
    assert len(hint) == 4 and hint[-1] < hint[0]


class _ConvNet(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))

    def forward(self, x):
        return self.head(self.features(x))


def test_conv_hints_and_attention_transfer(mnist):
    train, test = mnist
    torch.manual_seed(0)
    student, teacher = _ConvNet(4), _ConvNet(12)
    cfg = DistillConfig(
        hints=[["features.3", "features.3"]],
        attention=[["features.4", "features.4"]],
        epochs=2,
        max_batches=6,
        batch_size=32,
        **QUIET,
    )
    result = distill(student, teacher, cfg, train.subset(256), test.subset(64))
    adapter = result.adapters["hint0"]
    assert isinstance(adapter, nn.Conv2d) and tuple(adapter.weight.shape) == (12, 4, 1, 1)
    terms = result.record["loss_terms"]
    assert set(terms) == {"kd", "hard", "hint:features.3", "attention:features.4"}
    assert all(v >= 0 for values in terms.values() for v in values)
    # no hooks are left on the returned model or on the teacher
    for module in [*result.model.modules(), *teacher.modules()]:
        assert not module._forward_hooks


def test_attention_on_a_flat_layer_fails_before_training(digits):
    train, val = _tiny(digits)
    counting = _CountingData(train)
    with pytest.raises(ValueError, match=r"attention \('1', '1'\): student layer '1'.*\(N, C, H, W\)"):
        distill(_digit_mlp(), _digit_mlp(), DistillConfig(attention=[["1", "1"]], epochs=9, **QUIET), counting, val)
    assert counting.reads <= 8


def test_cached_teacher_logits_give_the_same_training(digits):
    train, val = _tiny(digits)
    teacher = _digit_mlp(64, seed=3)
    runs = [
        distill(_digit_mlp(seed=4), teacher, DistillConfig(epochs=2, cache_teacher=cache, **QUIET), train, val)
        for cache in (False, True)
    ]
    assert [r.record["teacher_cached"] for r in runs] == [False, True]
    assert runs[0].record["train_loss"] == pytest.approx(runs[1].record["train_loss"], rel=1e-5)
    for a, b in zip(runs[0].model.parameters(), runs[1].model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


class _Jittered(Dataset):
    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        x, y = self.data[i]
        return x + 0.1 * torch.randn_like(x), y


def test_cache_teacher_refuses_augmented_data(digits):
    train, val = _tiny(digits)
    with pytest.raises(ValueError, match="without augmentation"):
        distill(_digit_mlp(), _digit_mlp(), DistillConfig(cache_teacher=True, **QUIET), _Jittered(train), val)


def test_kd_loss_fn_runs_a_frozen_teacher(digits):
    train, val = _tiny(digits)
    teacher = _digit_mlp(64, seed=2)
    teacher.train()
    loss_fn = kd_loss_fn(teacher, 3.0, alpha=0.8)
    assert teacher.training  # the caller's teacher is not modified
    inputs, targets = train.images[:16], train.labels[:16]
    outputs = _digit_mlp()(inputs)
    loss = loss_fn(outputs, targets, inputs)  # the teacher in training mode still runs in eval mode
    assert teacher.training  # ... and gets its mode back
    with torch.no_grad():
        expected = hinton_loss(outputs, teacher.eval()(inputs), targets, 3.0, 0.8)
    assert loss.item() == pytest.approx(expected.item())
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    same = kd_loss_fn(teacher, DistillConfig(temperature=3.0, alpha=0.8))(outputs, targets, inputs)
    assert same.item() == pytest.approx(loss.item())
    # the recovery hook plugs straight into slimkit.train.fit
    student = _digit_mlp()
    history = fit(student, train, val, TrainConfig(epochs=2, **QUIET), loss_fn=loss_fn)
    assert len(history.train_loss) == 2


def test_kd_loss_fn_rejects_bad_input():
    with pytest.raises(ValueError, match="temperature"):
        kd_loss_fn(_digit_mlp(), 0.0)
    with pytest.raises(ValueError, match="alpha"):
        kd_loss_fn(_digit_mlp(), 2.0, alpha=3.0)
    with pytest.raises(TypeError, match="nn.Module"):
        kd_loss_fn("teacher.safetensors", 2.0)
    loss_fn = kd_loss_fn(_digit_mlp(num_classes=5), 2.0)
    inputs = torch.zeros(4, 64)
    with pytest.raises(ValueError, match="one output space"):
        loss_fn(_digit_mlp()(inputs), torch.zeros(4, dtype=torch.long), inputs)


def test_teacher_modes_are_restored_module_by_module(digits):
    """A teacher with parts in different modes (a frozen batch-norm in a training model) comes back exactly as it was,
    from kd_loss_fn and from distill, while it always runs in eval mode (dropout off: the same loss twice)."""
    train, val = _tiny(digits)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.Dropout(0.5), nn.Linear(32, 10))
    teacher.train()[2].eval()
    modes = [m.training for m in teacher.modules()]
    stats = teacher[2].running_mean.clone()
    loss_fn = kd_loss_fn(teacher, 2.0, alpha=1.0)
    inputs, targets = train.images[:16], train.labels[:16]
    outputs = _digit_mlp()(inputs)
    first, second = loss_fn(outputs, targets, inputs), loss_fn(outputs, targets, inputs)
    assert first.item() == second.item()  # dropout off
    assert [m.training for m in teacher.modules()] == modes
    distill(_digit_mlp(), teacher, DistillConfig(epochs=1, **QUIET), train, val)
    assert [m.training for m in teacher.modules()] == modes
    assert torch.equal(teacher[2].running_mean, stats)  # never updated


def test_config_embeds_a_train_config_and_takes_flat_keys():
    flat = DistillConfig(temperature=3.0, epochs=4, lr=0.01, optimizer="sgd", batch_size=64, progress=False)
    nested = DistillConfig(
        temperature=3.0, train=TrainConfig(epochs=4, lr=0.01, optimizer="sgd", batch_size=64, progress=False)
    )
    assert flat == nested and flat.train.optimizer.value == "sgd" and flat.epochs == 4 and flat.lr == 0.01
    # the defaults chosen for issue 12 (benchmarks/distill.py section 3): 10 epochs of Adam at 1e-2, T=1, alpha=0.5
    assert DistillConfig().train == TrainConfig(epochs=10, lr=1e-2)
    assert (DistillConfig().temperature, DistillConfig().alpha) == (1.0, 0.5)
    assert DistillConfig(epochs=3).lr == 1e-2 and DistillConfig(lr=1e-3).epochs == 10  # one default, any spelling
    assert DistillConfig.from_dict({"epochs": 3}) == DistillConfig(epochs=3)
    data = nested.to_dict()
    assert data["train"]["epochs"] == 4 and "epochs" not in data  # nested on the way out
    assert DistillConfig.from_dict(data) == nested
    assert (
        DistillConfig.from_dict(
            {"temperature": 3.0, "epochs": 4, "lr": 0.01, "optimizer": "sgd", "batch_size": 64, "progress": False}
        )
        == nested
    )  # flat recipe keys
    # flat keys apply on top of train (a mapping or a TrainConfig)
    assert DistillConfig(train={"epochs": 2, "lr": 0.5}, epochs=7).train == TrainConfig(epochs=7, lr=0.5)
    assert DistillConfig(train=TrainConfig(seed=3), patience=2).train == TrainConfig(seed=3, patience=2)
    flat.epochs = 6  # the flat attribute writes through to train
    assert flat.train.epochs == 6
    assert DistillConfig(precision="bf16").train == TrainConfig(epochs=10, lr=1e-2, precision="bf16")
    assert DistillConfig.from_dict({"precision": "bf16"}).precision.value == "bf16"
    with pytest.raises(ValueError, match=r"DistillConfig.lr='fast': expected finite float"):
        DistillConfig(lr="fast")
    with pytest.raises(ValueError, match=r"DistillConfig.train: TrainConfig.epochs=2.5: expected int"):
        DistillConfig.from_dict({"train": {"epochs": 2.5}})
    with pytest.raises(ValueError, match=r"DistillConfig.train=5: expected TrainConfig"):
        DistillConfig(train=5)
    with pytest.raises(ValueError, match="unknown key 'epoch'; did you mean 'epochs'"):
        DistillConfig.from_dict({"epoch": 3})


def test_shipped_recipe_distill_step_reads_flat_keys():
    from slimkit.recipe import Recipe

    recipe = Recipe.load("fast-cpu")
    step = next(s for s in recipe.steps if s.kind.value == "distill")
    assert step.config.train == TrainConfig(epochs=4, lr=0.01, optimizer="sgd", batch_size=64, progress=False)
    assert Recipe.from_yaml(recipe.to_yaml()).to_dict() == recipe.to_dict()
