"""Your metric, your device (issue 12, Deliver 4): ``evaluate=fn(model) -> float`` steers compress / search / the
iterative pruning loop; ``device=`` / ``precision=`` for training and distillation; the pipeline's KD recovery picks
its loss from the model's output. CPU only: "cpu" is tested explicitly, an absent CUDA gives one clear error."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import slimkit
from slimkit.distillation import DistillConfig, distill
from slimkit.errors import UsageError
from slimkit.recipe import Recipe
from slimkit.steps import StepRunner, pick_output_loss
from slimkit.train import TrainConfig, fit, module_device, resolve_device, score, to_device

# --- devices -----------------------------------------------------------------------------------------------------


def test_resolve_device_cpu_auto_and_clear_errors(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(UsageError, match=r"device='cuda': cuda is not available on this machine.*'cpu'"):
        resolve_device("cuda")
    with pytest.raises(UsageError, match=r"device='cuda:1': cuda is not available"):
        resolve_device("cuda:1")
    with pytest.raises(UsageError, match="device='meta' holds no data"):
        resolve_device("meta")
    with pytest.raises(UsageError, match="device='gpu' is not a torch device; use 'auto'"):
        resolve_device("gpu")
    with pytest.raises(UsageError, match="device='tpu0' is not a torch device"):
        TrainConfig(device="tpu0")  # the spelling is checked when the config is made
    for bad in ("cuda", "gpu", "meta", "cuda:x"):
        with pytest.raises(UsageError) as info:
            resolve_device(bad)
        assert "\n" not in str(info.value)  # one line
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")  # chosen, not touched: nothing runs on it here


def test_to_device_moves_nested_batches_and_keeps_their_form():
    batch = ({"input_ids": torch.ones(2, 3, dtype=torch.long), "n": 3}, [torch.zeros(2)], torch.ones(2))
    moved = to_device(batch, "cpu")
    assert isinstance(moved, tuple) and isinstance(moved[0], dict) and isinstance(moved[1], list)
    assert moved[0]["n"] == 3 and torch.equal(moved[0]["input_ids"], batch[0]["input_ids"])
    assert moved[2].device.type == "cpu"


class DictModel(nn.Module):
    """A model called with a dict of token ids and a mask, like a transformers model."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, batch):
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (self.embed(batch["input_ids"]) * mask).sum(1) / mask.sum(1)
        return self.head(pooled)


class DictData(torch.utils.data.Dataset):
    def __init__(self, n=64, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 20, (n, 6), generator=g)
        self.mask = torch.ones(n, 6, dtype=torch.long)
        self.labels = (self.ids[:, 0] % 3).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i]}, self.labels[i]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fit_on_cpu_with_dict_batches_and_mixed_precision(precision):
    torch.manual_seed(0)
    model, data = DictModel(), DictData()
    before = model.head.weight.detach().clone()
    seen = []

    def loss_fn(outputs, targets, inputs):
        seen.append((type(inputs), outputs.dtype, inputs["input_ids"].device.type))
        return nn.functional.cross_entropy(outputs.float(), targets)

    cfg = TrainConfig(epochs=2, lr=0.05, batch_size=16, progress=False, precision=precision)
    history = fit(model, data, None, cfg, loss_fn=loss_fn, device="cpu")
    assert module_device(model).type == "cpu" and model.head.weight.dtype == torch.float32
    assert not torch.equal(before, model.head.weight) and all(math.isfinite(x) for x in history.train_loss)
    assert history.train_loss[-1] < history.train_loss[0]
    assert seen[0][0] is dict and seen[0][2] == "cpu"
    assert seen[0][1] == (torch.bfloat16 if precision == "bf16" else torch.float32)  # autocast ran the forward


def test_fit_refuses_fp16_off_cuda_a_meta_model_and_an_absent_cuda(monkeypatch):
    data = TensorDataset(torch.randn(8, 4), torch.zeros(8, dtype=torch.long))
    model = nn.Linear(4, 2)
    with pytest.raises(UsageError, match="precision='fp16' needs CUDA"):
        fit(model, data, None, TrainConfig(epochs=1, progress=False, precision="fp16"), device="cpu")
    with pytest.raises(UsageError, match="'weight' is on the meta device"):
        fit(nn.Linear(4, 2, device="meta"), data, None, TrainConfig(epochs=1, progress=False), device="cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    before = model.weight.detach().clone()
    with pytest.raises(UsageError, match="device='cuda': cuda is not available"):
        fit(model, data, None, TrainConfig(epochs=1, progress=False, device="cuda"))
    assert torch.equal(before, model.weight)  # nothing trained
    with pytest.raises(UsageError, match="device='cuda': cuda is not available"):
        distill(nn.Linear(4, 2), model, DistillConfig(epochs=1, progress=False), data, device="cuda")


def test_distill_on_cpu_with_token_outputs_returns_models_where_they_were():
    class Tokens(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.embed = nn.Embedding(20, 8)
            self.mlp = nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, 8))

        def forward(self, input_ids, attention_mask):
            return {"last_hidden_state": self.mlp(self.embed(input_ids))}

    torch.manual_seed(0)
    teacher, student = Tokens(32), Tokens(8)
    data = [{"input_ids": x["input_ids"], "attention_mask": x["attention_mask"]} for x, _ in DictData(48)]
    cfg = DistillConfig(output_loss="cosine", epochs=3, lr=0.01, batch_size=16, progress=False)
    result = distill(student, teacher, cfg, data, data[:16], device="cpu")
    assert module_device(result.model).type == "cpu" and module_device(teacher).type == "cpu"
    losses = result.record["loss_terms"]["cosine"]
    assert losses[-1] < losses[0] and result.record["student_cosine"] > 0


# --- the user metric ---------------------------------------------------------------------------------------------


def test_score_takes_numbers_and_names_the_function_on_bad_values():
    model = nn.Linear(2, 2).train()

    def tensor_metric(m):
        assert not m.training and not torch.is_grad_enabled()  # eval mode, no gradients
        return torch.tensor(0.5)

    assert score(tensor_metric, model) == 0.5 and model.training  # the mode is given back
    assert score(lambda m: np.float32(0.25), model) == 0.25 and score(lambda m: 3, model) == 3.0

    def embedding_cosine(m):
        return float("nan")

    def returns_dict(m):
        return {"cosine": 0.9}

    with pytest.raises(UsageError, match=r"^evaluate=.*embedding_cosine returned nan.*finite float") as info:
        score(embedding_cosine, model)
    assert "\n" not in str(info.value)
    with pytest.raises(UsageError, match=r"evaluate=.*returns_dict returned dict \{'cosine': 0.9\}; it must return"):
        score(returns_dict, model)
    with pytest.raises(UsageError, match="returned bool"):
        score(lambda m: True, model)


def test_iterative_prune_checks_its_budget_on_the_user_metric():
    torch.manual_seed(0)
    model = slimkit.models.create("mlp", in_features=64, hidden=48)
    x = torch.zeros(1, 1, 8, 8)
    reference = torch.randn(32, 1, 8, 8)
    with torch.no_grad():
        target = model(reference)

    @torch.no_grad()
    def output_cosine(m):
        return float(nn.functional.cosine_similarity(m(reference), target, dim=1).mean())

    cfg = slimkit.PruneConfig(amount=0.6, target="params", steps=3, max_accuracy_drop=1e-6)
    result = slimkit.prune(model, cfg, x, val_data=None, evaluate=output_cosine)
    record = result.record
    assert record["metric"].endswith("output_cosine") and record["baseline_accuracy"] == pytest.approx(1.0)
    first = record["steps"][0]
    assert first["accuracy"] < 1.0 and record["stopped_early"]  # any pruning moves the outputs: stop at step 1
    assert result.model[1].out_features == 48  # nothing inside a 1e-6 budget: the unpruned copy
    loose = slimkit.prune(model, dataclasses.replace(cfg, max_accuracy_drop=1.0), x, evaluate=output_cosine)
    assert len(loose.record["steps"]) == 3 and not loose.record["stopped_early"]
    assert loose.record["steps"][-1]["accuracy"] == pytest.approx(output_cosine(loose.model), abs=1e-6)
    with pytest.raises(TypeError, match="evaluate must be a function"):
        slimkit.prune(model, cfg, x, evaluate=0.5)


# --- the pipeline ------------------------------------------------------------------------------------------------


class TokenNet(nn.Module):
    """A tiny encoder: (N, T, 8) token features in, a ModelOutput-like dict with a (N, T, 8) last_hidden_state out."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 64)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(64, 8)

    def forward(self, x):
        return {"last_hidden_state": self.fc2(self.act(self.fc1(x)))}


def test_pick_output_loss_follows_the_output_and_the_labels():
    labelled = [(torch.zeros(8), 1)] * 4
    unlabelled = [torch.zeros(5, 8)] * 4
    logits = nn.Linear(8, 3)
    assert pick_output_loss(logits, torch.zeros(1, 8), labelled) == "kl"
    assert pick_output_loss(logits, torch.zeros(1, 8), [torch.zeros(8)] * 4) == "cosine"  # no labels
    assert pick_output_loss(TokenNet(), torch.zeros(1, 5, 8), unlabelled) == "cosine"  # dict, 3-D
    assert pick_output_loss(logits, torch.zeros(1, 5, 8), [(torch.zeros(5, 8), 1)] * 4) == "cosine"  # 3-D
    runner = StepRunner(TokenNet(), unlabelled, unlabelled, torch.zeros(1, 5, 8), kd="default")
    recipe = Recipe.load({"name": "r", "recovery_epochs": 2, "steps": [{"prune": {"amount": 0.5}}]})
    assert runner.recovery_config(recipe).output_loss.value == "cosine"


def test_compress_with_a_user_metric_and_token_outputs_recovers_with_cosine(tmp_path, monkeypatch):
    import slimkit.pipeline

    monkeypatch.setattr(slimkit.pipeline, "FINAL_MAX_SECONDS", 0.2)  # the final table's timing is not tested here
    torch.manual_seed(0)
    model = TokenNet()
    g = torch.Generator().manual_seed(1)
    train = [torch.randn(5, 8, generator=g) for _ in range(256)]  # inputs only: no labels anywhere
    val = [torch.randn(5, 8, generator=g) for _ in range(64)]
    reference = torch.stack(val)
    with torch.no_grad():
        target = model(reference)["last_hidden_state"]

    @torch.no_grad()
    def token_cosine(m):
        out = m(reference)["last_hidden_state"]
        return float(nn.functional.cosine_similarity(out, target, dim=-1).mean())

    recipe = {
        "name": "tokens",
        "max_accuracy_drop": 0.001,  # in token_cosine's units: pruning half the FFN breaks it, recovery is tried
        "recovery_epochs": 2,
        "recovery_lr": 0.05,
        "max_backoffs": 0,
        "steps": [{"prune": {"amount": 0.5, "target": "params"}}],
    }
    result = slimkit.compress(
        model, recipe, train, val, evaluate=token_cosine, judge_speed=False, latency_batch_sizes=(1,)
    )
    assert result.baseline["metric"].endswith("token_cosine") and result.baseline["accuracy"] == pytest.approx(1.0)
    (step,) = result.steps
    assert step.metric.endswith("token_cosine")
    assert any("KD recovery (2 epochs, output loss cosine)" in n for n in step.notes), step.notes
    assert any("token_cosine" in n and "< budget" in n for n in step.notes), step.notes
    assert result.final["metric"] == result.baseline["metric"]
    assert result.final["accuracy"] == pytest.approx(token_cosine(result.model), abs=1e-6)
    assert result.metrics["steps"][0]["metric"] == step.metric

    def broken(m):
        return "high"

    with pytest.raises(UsageError, match="evaluate=.*broken returned str 'high'"):
        slimkit.compress(model, recipe, train, val, evaluate=broken, judge_speed=False)


def test_search_scores_trials_on_the_user_metric(tmp_path, digits):
    from slimkit.tuning import SearchConfig

    train, test = digits
    torch.manual_seed(0)
    model = slimkit.models.create("mlp", in_features=64, hidden=16)
    calls = []

    def negative_weight_norm(m):
        calls.append(1)
        return -float(sum(p.detach().norm() for p in m.parameters()))

    space = {"lr": {"type": "float", "low": 1e-3, "high": 0.3, "log": True}, "batch_size": 64}
    cfg = SearchConfig(n_trials=2, epochs=1, space=space, out=str(tmp_path / "run"), progress=False)
    study = slimkit.search(model, cfg, train, test, evaluate=negative_weight_norm)
    assert study.baseline["metric"].endswith("negative_weight_norm")
    assert study.baseline["accuracy"] == pytest.approx(negative_weight_norm(model))
    best = study.best
    assert best.metrics["metric"].endswith("negative_weight_norm") and best.metrics["accuracy"] < 0
    assert best.metrics["accuracy"] == max(t.values[0] for t in study.study.trials if t.values)
    assert len(calls) >= 3  # the baseline and each trial
