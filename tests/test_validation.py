"""Inputs are validated at the edge: typed configs, safe YAML, checked data; every failure is one SlimkitError line."""

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from typer.testing import CliRunner

from slimkit.cli import app
from slimkit.config import check_range
from slimkit.distillation import DistillConfig
from slimkit.errors import SlimkitError, TrainingDiverged, UsageError
from slimkit.pruning import PruneConfig
from slimkit.pruning.sparse import SparsityConfig
from slimkit.quantization import QuantConfig
from slimkit.recipe import (
    MAX_YAML_CHARS,
    ExportConfig,
    Recipe,
    StepKind,
    config_class,
    load_yaml,
    read_yaml,
    shipped_recipes,
)
from slimkit.train import TrainConfig, evaluate, fit
from slimkit.tuning.config import SearchConfig

NAN, INF = float("nan"), float("inf")
BOMB = (
    "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
    + "".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
    + "name: *i\nsteps: [{export: {}}]\n"
)


def one_line_error(call, *args, **kwargs) -> str:
    with pytest.raises(SlimkitError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message
    return message


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (lambda: TrainConfig(epochs=2.7), "TrainConfig.epochs=2.7: expected int"),
        (lambda: TrainConfig(epochs=True), "TrainConfig.epochs=True: expected int"),
        (lambda: TrainConfig(epochs=0), "epochs=0 must be >= 1"),
        (lambda: TrainConfig(lr=NAN), "TrainConfig.lr=nan: expected finite float"),
        (lambda: TrainConfig(progress="no"), "TrainConfig.progress='no': expected bool"),
        (lambda: PruneConfig(amount=NAN), "PruneConfig.amount=nan: expected finite float"),
        (lambda: PruneConfig(max_sparsity=INF), "PruneConfig.max_sparsity=inf"),
        (lambda: PruneConfig(amount="half"), "PruneConfig.amount='half': expected finite float"),
        (lambda: PruneConfig(ignore=5), "PruneConfig.ignore=5: expected list of str"),
        (lambda: PruneConfig(ignore=["fc1", 3]), "PruneConfig.ignore=\\['fc1', 3\\]: expected list of str"),
        (lambda: PruneConfig(ignore=["re:("]), "PruneConfig.ignore: 're:\\(' is not a valid regular expression"),
        (lambda: PruneConfig(overrides={"re:[a": 0.5}), "PruneConfig.overrides: 're:\\[a' is not a valid regular"),
        (lambda: PruneConfig(overrides={"fc1": NAN}), "PruneConfig.overrides=.*expected mapping of str to finite"),
        (lambda: PruneConfig(finetune={"epochs": 2.7}), "PruneConfig.finetune: TrainConfig.epochs=2.7: expected int"),
        (lambda: PruneConfig(finetune=-1), "finetune=-1"),
        (lambda: QuantConfig(ignore=["re:*"]), "QuantConfig.ignore: 're:\\*' is not a valid regular expression"),
        (lambda: QuantConfig(weight_bits=4.0), "QuantConfig.weight_bits=4.0: expected int"),
        (lambda: QuantConfig(overrides={"fc1": {"weight_bits": "4"}}), "overrides\\['fc1'\\].weight_bits='4'"),
        (lambda: QuantConfig(overrides={"fc1": {"scheme": "nope"}}), "overrides\\['fc1'\\].scheme='nope'"),
        (lambda: QuantConfig(method="qat", epochs=0), "epochs=0 must be >= 1"),
        (lambda: SparsityConfig(ignore="re:("), "SparsityConfig.ignore: 're:\\('"),
        (lambda: DistillConfig(alpha=NAN), "DistillConfig.alpha=nan"),
        (lambda: DistillConfig(temperature="4"), "DistillConfig.temperature='4'"),
        (lambda: DistillConfig(hints=[["a"]]), "hints: each entry must be a \\(student_layer, teacher_layer\\) pair"),
        (
            lambda: DistillConfig(attention=5),
            "attention=5: expected a list of \\(student_layer, teacher_layer\\) pairs",
        ),
        (lambda: DistillConfig(epochs=0), "epochs=0 must be >= 1"),
        (lambda: SearchConfig(timeout=NAN), "SearchConfig.timeout=nan: expected finite float or null"),
        (lambda: SearchConfig(study_name=5), "SearchConfig.study_name=5: expected str"),
        (lambda: ExportConfig(parity="yes"), "ExportConfig.parity='yes': expected bool"),
        (lambda: Recipe.from_dict({"max_accuracy_drop": NAN, "steps": [{"export": {}}]}), "max_accuracy_drop=nan"),
        (lambda: Recipe.from_dict({"recovery_epochs": 1.5, "steps": [{"export": {}}]}), "recovery_epochs=1.5"),
        (lambda: Recipe.from_dict({"name": ["x"], "steps": [{"export": {}}]}), "Recipe.name=\\['x'\\]: expected str"),
        (lambda: Recipe.from_dict({"steps": 5}), "steps=5: expected a list of steps"),
        (lambda: Recipe.from_dict({1: 2}), "keys are field names"),
        (lambda: check_range("lr", NAN, 0.0, 1.0), "lr=nan is not a number"),
    ],
)
def test_a_bad_field_is_one_usage_error_naming_it(build, expected):
    with pytest.raises(UsageError, match=expected) as info:
        build()
    assert "\n" not in str(info.value)


def test_valid_values_are_accepted_and_normalised(tmp_path):
    for cls in (TrainConfig, PruneConfig, QuantConfig, DistillConfig, SearchConfig, ExportConfig, SparsityConfig):
        cls()  # every default is valid
    assert PruneConfig(amount=0).amount == 0 and PruneConfig(ignore="fc1").ignore == ("fc1",)
    assert QuantConfig(ignore="fc1").ignore == ("fc1",)  # one name, not its characters
    epochs = TrainConfig(epochs=np.int64(3)).epochs
    assert epochs == 3 and type(epochs) is int
    assert PruneConfig(checkpoint_dir=tmp_path).checkpoint_dir == str(tmp_path)
    assert PruneConfig(ignore=["re:fc[12]"], overrides={"re:conv.*": 0.3}).overrides == {"re:conv.*": 0.3}
    assert DistillConfig(hints=[["a", "b"]]).hints == (("a", "b"),)
    assert QuantConfig(overrides={"fc1": {"scheme": "affine", "act_bits": None}}).overrides["fc1"] == {
        "scheme": "affine",
        "act_bits": None,
    }
    # finetune=0 keeps its meaning (prune step by step without training) and round-trips
    cfg = PruneConfig(steps=2, finetune=0)
    assert cfg.finetune.epochs == 0 and PruneConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()


@pytest.mark.parametrize("name", shipped_recipes())
def test_shipped_recipes_load_and_round_trip(name):
    recipe = Recipe.load(name)
    assert Recipe.from_yaml(recipe.to_yaml()).to_dict() == recipe.to_dict()


# --- safe YAML ---------------------------------------------------------------------------------------------------


def test_alias_bomb_is_refused_at_the_first_alias():
    message = one_line_error(Recipe.from_yaml, BOMB, "bomb.yaml")
    assert message.startswith("bomb.yaml: refused YAML at line 2") and "aliases (*a)" in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name: a\nsteps: [{export: {}}]\nname: b\n", "line 3, column 1: duplicate key 'name'"),
        ("steps:\n  - prune: {amount: 0.5, amount: 0.6}\n", "line 2, column 26: duplicate key 'amount'"),
        ("steps: [{export: {}}]\nx: !!binary aGk=\n", "YAML tag 'tag:yaml.org,2002:binary' is not allowed"),
        ("steps: [{export: {}}]\nx: !!set {a}\n", "YAML tag 'tag:yaml.org,2002:set' is not allowed"),
        ("steps: !!python/object:os.system {}\n", "malformed YAML at line 1"),
        ("steps: " + "[" * 200 + "]" * 200, "nested deeper than"),
        ("max_accuracy_drop: 1" + "0" * 5000 + "\nsteps: [{export: {}}]\n", "not valid YAML"),
        ("name: x\x00\n", "not valid YAML"),
        ("steps: [{export: {}}]\n" + "#" * MAX_YAML_CHARS, "slimkit reads YAML files of at most"),
    ],
)
def test_unsafe_or_ambiguous_yaml_is_refused(text, expected):
    assert expected in one_line_error(Recipe.from_yaml, text, "r.yaml")


def test_yaml_gives_plain_values_only(tmp_path):
    assert load_yaml("when: 2024-01-01\nn: 3\nx: [1.5, null, true]") == {
        "when": "2024-01-01",
        "n": 3,
        "x": [1.5, None, True],
    }
    assert Recipe.from_yaml("name: 2024-01-01\nsteps: [{export: {}}]").name == "2024-01-01"
    big = tmp_path / "big.yaml"
    big.write_text("#" * (MAX_YAML_CHARS + 1))
    assert "at most" in one_line_error(read_yaml, big)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"name: caf\xe9\n")
    assert "not UTF-8" in one_line_error(Recipe.load, latin)
    assert "does not exist" in one_line_error(read_yaml, tmp_path / "none.yaml")


def test_search_space_files_use_the_same_loader(tmp_path):
    from slimkit.commands.search import read_space

    space = tmp_path / "space.yaml"
    space.write_text("lr: &x {type: float, low: 0.001, high: 0.1}\nmomentum: *x\n")
    assert "aliases" in one_line_error(read_space, str(space))
    space.write_text('{"lr": 1, "lr": 2}')
    assert "duplicate key 'lr'" in one_line_error(read_space, str(space))


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        ("prune: {amount: .nan}", "steps[0] (prune): PruneConfig.amount=nan: expected finite float"),
        ("prune: {ignore: 5}", "steps[0] (prune): PruneConfig.ignore=5: expected list of str"),
        ("prune: {ignore: ['re:(']}", "steps[0] (prune): PruneConfig.ignore: 're:(' is not a valid regular"),
        ("distill: {epochs: 2.7}", "steps[0] (distill): DistillConfig.epochs=2.7: expected int"),
        (
            "distill: {hints: [[a, 1]]}",
            "steps[0] (distill): hints: each entry must be a (student_layer, teacher_layer)",
        ),
        ("quantize: {weight_bits: [8]}", "steps[0] (quantize): QuantConfig.weight_bits=[8]: expected int"),
        ("quantize: {overrides: {fc1: 4}}", "steps[0] (quantize): QuantConfig.overrides={'fc1': 4}: expected"),
        ("export: {auto_batch_size: .inf}", "steps[0] (export): ExportConfig.auto_batch_size=inf: expected int"),
        ("{1: {}}", "steps[0]: unknown step 1"),
    ],
)
def test_wrong_types_in_a_recipe_name_the_step_and_field(step, expected):
    message = one_line_error(Recipe.from_yaml, f"steps:\n  - {step}\n", "r.yaml")
    assert message.startswith("r.yaml: ") and expected in message


# --- the CLI: exit code 2 and one error line ---------------------------------------------------------------------

RECIPES = {
    "bomb": BOMB,
    "nan": "steps:\n  - prune: {amount: .nan}\n",
    "budget-nan": "max_accuracy_drop: .nan\nsteps:\n  - quantize: {method: ptq}\n",
    "duplicate": "steps:\n  - prune: {amount: 0.5}\nsteps:\n  - export: {}\n",
    "float-epochs": "steps:\n  - distill: {epochs: 2.7}\n",
    "ignore-int": "steps:\n  - prune: {ignore: 5}\n",
    "bad-regex": "steps:\n  - quantize: {ignore: ['re:(']}\n",
}


def cli_error(args: list[str]) -> str:
    result = CliRunner().invoke(app, args)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("bomb", "aliases"),
        ("nan", "amount=nan"),
        ("budget-nan", "max_accuracy_drop=nan"),
        ("duplicate", "duplicate key 'steps'"),
        ("float-epochs", "epochs=2.7"),
        ("ignore-int", "ignore=5"),
        ("bad-regex", "'re:(' is not a valid regular expression"),
    ],
)
def test_compress_refuses_a_bad_recipe_with_one_line(tmp_path, name, expected):
    path = tmp_path / f"{name}.yaml"
    path.write_text(RECIPES[name])
    line = cli_error(
        ["compress", "--model", "mlp", "--data", "digits", "--recipe", str(path), "--out", str(tmp_path / "out")]
    )
    assert expected in line and f"{name}.yaml" in line
    assert not list((tmp_path / "out").glob("*.slim"))


def test_compress_validates_the_budget_override(tmp_path):
    line = cli_error(
        ["compress", "--model", "mlp", "--data", "digits", "--max-accuracy-drop", "nan", "--out", str(tmp_path / "out")]
    )
    assert "max_accuracy_drop=nan" in line and not (tmp_path / "out").exists()


def test_train_refuses_zero_epochs(tmp_path):
    line = cli_error(
        ["train", "--model", "mlp", "--data", "digits", "--epochs", "0", "--out", str(tmp_path / "w.safetensors")]
    )
    assert "epochs=0 must be >= 1" in line and not (tmp_path / "w.safetensors").exists()


# --- training on bad data ---------------------------------------------------------------------------------------


def tiny_model(classes: int = 3) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(16, classes))


def test_nan_inputs_are_blamed_not_the_learning_rate():
    x = torch.randn(8, 1, 4, 4)
    x[5, 0, 1, 2] = NAN
    train = torch.utils.data.TensorDataset(x, torch.zeros(8, dtype=torch.int64))
    with pytest.raises(TrainingDiverged, match="input batch holds NaN or infinity") as info:
        fit(tiny_model(), train, None, TrainConfig(epochs=1, batch_size=8, progress=False))
    assert "learning rate" not in str(info.value)
    x = torch.randn(8, 1, 4, 4)
    train = torch.utils.data.TensorDataset(x, torch.zeros(8, dtype=torch.int64))
    with pytest.raises(TrainingDiverged, match="lower the learning rate"):  # finite inputs: the optimiser diverged
        fit(
            tiny_model(),
            train,
            None,
            TrainConfig(epochs=1, lr=10.0, batch_size=8, progress=False),
            loss_fn=lambda out, y, _: out.sum() * INF,
        )


def test_labels_beyond_the_model_outputs_are_named():
    x, y = torch.randn(8, 1, 4, 4), torch.tensor([0, 1, 2, 7, 0, 1, 2, 0])
    train = torch.utils.data.TensorDataset(x, y)
    message = one_line_error(fit, tiny_model(), train, None, TrainConfig(epochs=1, progress=False))
    assert "label 7 is outside the model's 3 output classes" in message and "num_classes=8" in message
    assert "label 7" in one_line_error(evaluate, tiny_model(), train)
    negative = torch.utils.data.TensorDataset(x, torch.tensor([0, -1, 2, 0, 0, 1, 2, 0]))
    assert "label -1 is negative" in one_line_error(evaluate, tiny_model(), negative)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(alphabet=st.sampled_from(list("abc:-[]{},&*!|>'\"#%@ \n\t.0123456789enanifstrueaml")), max_size=200))
def test_fuzzed_yaml_texts_give_a_recipe_or_a_slimkit_error(text):
    try:
        assert isinstance(Recipe.from_yaml(text), Recipe)
    except SlimkitError as exc:
        assert "\n" not in str(exc)


SHIPPED_TEXTS = [
    (Path(__file__).parents[1] / "src/slimkit/recipes" / f"{n}.yaml").read_text() for n in shipped_recipes()
]


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(SHIPPED_TEXTS), st.integers(0, 10_000), st.integers(0, 12), st.text(max_size=12))
def test_mutated_shipped_recipes_give_a_recipe_or_a_slimkit_error(text, at, cut, insert):
    at %= len(text) + 1
    try:
        Recipe.from_yaml(text[:at] + insert + text[at + cut :])
    except SlimkitError:
        pass


PLAIN = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-3, 300)
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
    | st.sampled_from(["re:(", "re:fc.*", "fc1", "macs", "ptq", "sgd", "onnx"]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=6,
)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(shipped_recipes()), st.data())
def test_fields_of_shipped_recipes_set_to_any_plain_value_give_a_recipe_or_a_slimkit_error(name, draw):
    spec = yaml.safe_load((Path(__file__).parents[1] / "src/slimkit/recipes" / f"{name}.yaml").read_text())
    if draw.draw(st.booleans()):
        spec[draw.draw(st.sampled_from(sorted(spec)))] = draw.draw(PLAIN)
    else:
        step = draw.draw(st.sampled_from(spec["steps"]))
        ((kind, body),) = step.items()
        field = draw.draw(st.sampled_from([f.name for f in dataclasses.fields(config_class(StepKind(kind)))]))
        body[field] = draw.draw(PLAIN)
    try:
        recipe = Recipe.from_dict(spec)
    except SlimkitError as exc:
        assert "\n" not in str(exc)
        return
    assert all(not isinstance(v, float) or math.isfinite(v) for v in recipe.to_dict().values())


def test_model_args_the_factory_does_not_take_are_one_line(tmp_path):
    line = cli_error(
        ["eval", "--model", "mlp", "--model-args", '{"in_features": 64, "in_channels": 3}', "--data", "digits"]
    )
    assert "model 'mlp' takes no argument 'in_channels'" in line and "in_features" in line
