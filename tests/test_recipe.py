import pytest

from slimkit.recipe import ExportConfig, ExportFormat, Recipe, StepKind


def test_yaml_round_trip(tmp_path):
    recipe = Recipe.from_yaml("name: ship\nmax_accuracy_drop: 0.5\nsteps:\n  - export: {format: onnx}\n")
    assert recipe.steps[0].kind is StepKind.EXPORT and recipe.steps[0].config.format is ExportFormat.ONNX
    path = recipe.save(tmp_path / "r.yaml")
    again = Recipe.load(path)
    assert again.to_dict() == recipe.to_dict()
    assert Recipe.load(recipe.to_dict()).to_dict() == recipe.to_dict()


def test_malformed_yaml_names_line_and_column(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nsteps:\n  - export: {format: onnx\n")
    with pytest.raises(ValueError, match=r"bad.yaml: malformed YAML at line \d+, column \d+"):
        Recipe.load(path)


def test_unknown_keys_suggest_the_nearest():
    with pytest.raises(ValueError, match="did you mean 'max_accuracy_drop'"):
        Recipe.from_dict({"max_acuracy_drop": 1, "steps": [{"export": {}}]})
    with pytest.raises(ValueError, match=r"steps\[0\]: unknown step 'prun'; did you mean 'prune'"):
        Recipe.from_dict({"steps": [{"prun": {}}]})
    with pytest.raises(ValueError, match="export.*did you mean 'format'"):
        Recipe.from_dict({"steps": [{"export": {"formt": "onnx"}}]})
    with pytest.raises(ValueError, match="format='tflite'"):
        ExportConfig(format="tflite")


def test_impossible_orders_and_empty():
    with pytest.raises(ValueError, match="'export' must be the last step"):
        Recipe.from_dict({"steps": [{"export": {}}, {"export": {}}]})
    with pytest.raises(ValueError, match="at least one step"):
        Recipe.from_dict({"steps": []})
    with pytest.raises(ValueError, match="neither a file nor a shipped recipe"):
        Recipe.load("no-such-recipe")


def test_export_config_lives_in_export_and_recipe_re_exports_it():
    from slimkit.export import config

    assert ExportConfig is config.ExportConfig and ExportFormat is config.ExportFormat
    step = Recipe.from_dict({"steps": [{"finetune": {"epochs": 1, "lr": 0.01}}, {"export": {}}]}).steps
    assert step[0].kind is StepKind.FINETUNE and type(step[1].config) is config.ExportConfig
    assert Recipe.load(Recipe(steps=step).to_dict()).to_dict() == Recipe(steps=step).to_dict()


def test_history_replay_leaves_its_input_alone():
    import torch

    import slimkit
    from slimkit.history import history_of, replay, replay_

    model = slimkit.models.create("lenet5")
    pruned = slimkit.prune(model, slimkit.PruneConfig(amount=0.5), torch.zeros(1, 1, 28, 28)).model
    fresh = slimkit.models.create("lenet5")
    widths = [m.out_channels for m in fresh.modules() if isinstance(m, torch.nn.Conv2d)]
    copy = replay(fresh, history_of(pruned))
    assert [m.out_channels for m in fresh.modules() if isinstance(m, torch.nn.Conv2d)] == widths
    assert [m.out_channels for m in copy.modules() if isinstance(m, torch.nn.Conv2d)] == [
        m.out_channels for m in pruned.modules() if isinstance(m, torch.nn.Conv2d)
    ]
    assert replay_(fresh, history_of(pruned)) is fresh  # the in-place form edits its argument
    assert [m.out_channels for m in fresh.modules() if isinstance(m, torch.nn.Conv2d)] != widths
