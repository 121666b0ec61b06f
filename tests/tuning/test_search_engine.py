"""The search engine on training hyperparameters: saving, reloading, resuming, bad input."""

import json

import pytest
import torch

import slimkit
from slimkit.train import evaluate
from slimkit.tuning import SearchConfig, load_model, search

SPACE = {
    "lr": {"type": "float", "low": 1e-3, "high": 0.3, "log": True},
    "optimizer": {"type": "categorical", "choices": ["sgd", "adam"]},
    "batch_size": 64,
}


def tiny_model():
    torch.manual_seed(0)
    return slimkit.models.create("mlp", in_features=64, hidden=16)


def config(tmp_path, **kw):
    base = dict(n_trials=4, epochs=1, space=SPACE, out=str(tmp_path / "run"), progress=False)
    return SearchConfig(**{**base, **kw})


def test_search_saves_a_best_that_reloads_and_reproduces_its_metrics(tmp_path, digits):
    train, test = digits
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    study = search(model, config(tmp_path, objectives=("accuracy", "size")), train, test)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the input is never trained
    assert study.finished + study.pruned == 4
    best = study.best
    assert best.path == tmp_path / "run" / "best" and best.feasible
    assert best.metrics["accuracy"] == max(t.values[0] for t in study.study.trials if t.values)
    reloaded = load_model(best.path)
    assert evaluate(reloaded, test).accuracy == pytest.approx(best.metrics["accuracy"], abs=1e-9)
    assert slimkit.measure.size_on_disk(reloaded) == pytest.approx(best.metrics["size_bytes"], rel=0.01)
    assert json.loads((best.path / "result.json").read_text())["plan"] == best.plan
    assert slimkit.load(best.path / "model") is not None  # the pickle-free artifact
    for member in study.pareto:
        assert evaluate(member.model, test).accuracy == pytest.approx(member.metrics["accuracy"], abs=1e-9)
    report = (tmp_path / "run" / "report.md").read_text()
    assert "best" in report and (tmp_path / "run" / "pareto.png").is_file()
    # the study itself is savable: its best model, with the trial, plan and metrics in slimkit.json
    saved = slimkit.save(study, tmp_path / "best.slim")
    again = slimkit.load(saved)
    x = torch.randn(5, 1, 8, 8)
    assert torch.equal(again(x), best.model(x))
    assert again.slimkit_metrics["trial"] == best.trial and again.slimkit_metrics["plan"] == best.plan
    assert again.slimkit_metrics["accuracy"] == best.metrics["accuracy"]


def test_a_study_without_a_finished_trial_says_what_cannot_be_saved(tmp_path):
    from slimkit.tuning.results import SearchStudy

    empty = SearchStudy(None, [], None, ("accuracy",), {}, None, tmp_path, 0, 2, 0)
    with pytest.raises(ValueError, match="no trial finished, so there is no best model to save"):
        slimkit.save(empty, tmp_path / "x.slim")


def test_rerun_continues_the_same_study(tmp_path, digits):
    train, test = digits
    first = search(tiny_model(), config(tmp_path, n_trials=3), train, test)
    numbers = {t.number: t.values for t in first.study.trials if t.values}
    again = search(tiny_model(), config(tmp_path, n_trials=3), train, test)  # already done: no new trial
    assert len(again.study.trials) == len(first.study.trials)
    more = search(tiny_model(), config(tmp_path, n_trials=5), train, test)
    finished = [t for t in more.study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 5
    assert all(more.study.trials[n].values == v for n, v in numbers.items())
    with pytest.raises(ValueError, match="was created with objectives"):
        search(tiny_model(), config(tmp_path, objectives=("accuracy", "macs")), train, test)


def test_unsatisfiable_budget_keeps_the_closest_result(tmp_path, digits):
    train, test = digits
    model = tiny_model()
    slimkit.train.fit(model, train, test, slimkit.TrainConfig(epochs=10, lr=0.02, progress=False))
    # one epoch at a far too high learning rate cannot keep the trained model's accuracy
    study = search(
        model,
        config(
            tmp_path,
            n_trials=2,
            max_accuracy_drop=0.0,
            space={"lr": {"type": "float", "low": 0.5, "high": 0.9}, "optimizer": "adam"},
        ),
        train,
        test,
    )
    assert not study.feasible and study.best is not None
    assert "no trial satisfied" in study.message and study.best.path.is_dir()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"objectives": ("accuracy", "speed")}, "unknown objective 'speed'"),
        ({"objectives": ()}, "objectives is empty"),
        ({"space": {}}, "search space is empty"),
        ({"space": {"lr": 0.01, "epochs": 1}}, "search space is empty"),
        ({"space": {"weight_dekay": {"type": "float", "low": 0.1, "high": 1}}}, "did you mean 'weight_decay'"),
        ({"space": {"lr": {"type": "float", "low": 0.1}}}, "needs 'low' and 'high'"),
        ({"space": {"lr": {"type": "float", "low": 0, "high": 1, "log": True}}}, "log=True needs low > 0"),
        ({"space": {"optimizer": {"type": "categorical", "choices": []}}}, "non-empty list"),
        ({"space": "bogus"}, "unknown search space preset 'bogus'"),
        ({"space": {"temperature": {"type": "float", "low": 1, "high": 4}}}, "no teacher was given"),
        ({"storage": "postgresql://me:secret@127.0.0.1:9/nodb"}, "storage postgresql://me:\\*\\*\\*@127.0.0.1:9/nodb"),
        ({"storage": "not a url"}, "is not a URL"),
    ],
)
def test_bad_input_is_a_clear_error(tmp_path, digits, kwargs, match):
    train, test = digits
    with pytest.raises(ValueError, match=match):
        search(tiny_model(), config(tmp_path, **kwargs), train, test)
    assert not (tmp_path / "run" / "best").exists()


def test_config_round_trips_and_validates():
    cfg = SearchConfig(objectives=["accuracy", "latency"], max_accuracy_drop=0.5, space="compression")
    assert SearchConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.directions == ("maximize", "minimize")
    with pytest.raises(ValueError, match="sampler='cmaes' is not valid"):
        SearchConfig(sampler="cmaes")
    with pytest.raises(ValueError, match="n_trials=0"):
        SearchConfig(n_trials=0)


def test_a_model_without_factory_is_saved_as_weights_and_reloads_with_a_template(tmp_path, digits):
    train, test = digits
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))  # not from slimkit.models.create
    study = search(model, config(tmp_path, n_trials=2), train, test)
    with pytest.raises(ValueError, match="pass the original model as template"):
        load_model(study.best.path)
    reloaded = load_model(study.best.path, template=model)
    assert evaluate(reloaded, test).accuracy == pytest.approx(study.best.metrics["accuracy"], abs=1e-9)
    assert evaluate(study.best.model, test).accuracy == pytest.approx(study.best.metrics["accuracy"], abs=1e-9)


def test_training_preset_with_a_teacher_searches_distillation(tmp_path, digits):
    train, test = digits
    teacher = tiny_model()
    slimkit.train.fit(teacher, train, test, slimkit.TrainConfig(epochs=2, lr=0.02, progress=False))
    study = search(tiny_model(), config(tmp_path, n_trials=1, space="training"), train, test, teacher=teacher)
    plan = study.best.plan
    assert {"lr", "weight_decay", "batch_size", "optimizer", "temperature", "alpha"} <= set(plan)
    assert 1.0 <= plan["temperature"] <= 8.0 and 0.1 <= plan["alpha"] <= 0.9


@pytest.mark.slow
def test_workers_argument_spawns_processes_that_share_the_study(tmp_path, digits):
    train, test = digits
    # enough trials that the spawned worker (a fresh interpreter importing torch) joins before they run out: with
    # 30 the in-process worker sometimes finished them all first
    study = search(
        tiny_model(),
        config(tmp_path, n_trials=80, epochs=3, workers=2, storage=f"journal:{tmp_path / 'j.log'}"),
        train,
        test,
    )
    numbers = [t.number for t in study.study.trials]
    assert len(numbers) == len(set(numbers))
    assert len({t.user_attrs["worker"].split(":")[0] for t in study.study.trials}) == 2


def test_median_pruner_stops_hopeless_trials_early(tmp_path, digits):
    train, test = digits
    space = {"lr": {"type": "categorical", "choices": [1e-6, 0.05]}, "optimizer": "adam"}
    study = search(tiny_model(), config(tmp_path, n_trials=8, epochs=3, space=space, sampler="random"), train, test)
    pruned = [t for t in study.study.trials if t.state.name == "PRUNED"]
    assert pruned and all(t.params["lr"] == 1e-6 for t in pruned)
    assert all("stopped by the pruner" in t.user_attrs["pruned_reason"] for t in pruned)
    assert all(len(t.intermediate_values) < 3 for t in pruned)  # stopped before the last epoch
    assert study.best.plan["lr"] == 0.05
