"""Distillation of models without classes: mse / cosine output losses, dict outputs, token hints, mean pooling."""

from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from slimkit.distillation import DistillConfig, distill, hint_adapter, kd_loss_fn, mean_pool, output_distance
from slimkit.distillation.losses import hint_loss

QUIET = {"progress": False, "restore_best": False}


@dataclass
class Output:
    """A stand-in for a transformers ModelOutput (a dataclass read through its fields as a mapping)."""

    last_hidden_state: torch.Tensor


class TokenEncoder(nn.Module):
    """Embedding -> Linear -> GELU -> Linear over tokens; returns a dict like a transformers encoder."""

    def __init__(self, width: int, seed: int, vocab: int = 50, out: int = 16) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, width)
        self.layer = nn.Linear(width, width)
        self.head = nn.Linear(width, out)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict:
        hidden = torch.nn.functional.gelu(self.layer(self.embed(input_ids)))
        return {"last_hidden_state": self.head(hidden), "hidden": hidden}


def _token_batches(n: int = 64, length: int = 6, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (n, length), generator=generator)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[::2, length // 2 :] = 0  # every other sentence is padded
    return [{"input_ids": ids[i], "attention_mask": mask[i]} for i in range(n)]


def _regression(n: int = 256, seed: int = 0) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    teacher = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 6))
    student = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 6))
    return teacher, student, torch.randn(n, 8)


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_output_losses_need_no_labels_and_bring_the_student_closer(kind):
    teacher, student, inputs = _regression()
    cfg = DistillConfig(output_loss=kind, epochs=8, lr=1e-2, batch_size=32, **QUIET)
    result = distill(student, teacher, cfg, TensorDataset(inputs), inputs[:64])  # inputs only, no labels
    losses = result.record["loss_terms"][kind]
    assert losses[-1] < 0.5 * losses[0], losses
    with torch.no_grad():
        before = float(output_distance(student(inputs), teacher(inputs), kind))
        after = float(output_distance(result.model(inputs), teacher(inputs), kind))
    assert after < 0.5 * before, (before, after)
    assert result.record["labelled"] is False and result.record["student_accuracy"] is None
    assert 0.0 < result.record["student_cosine"] <= 1.0
    assert len(result.record["val_output_loss"]) == 8


def test_output_distance_values():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[0.0, 1.0], [0.0, 4.0]])
    assert float(output_distance(a, b, "cosine")) == pytest.approx(0.5)  # 1 - cos: 1 and 0
    assert float(output_distance(a, b, "mse")) == pytest.approx((1 + 1 + 0 + 4) / 4)
    tokens = torch.randn(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    other = tokens.clone()
    other[0, 2], other[1, 1:] = -tokens[0, 2], 5.0  # differs only where the mask drops tokens
    assert float(output_distance(tokens, other, "cosine", mask)) == pytest.approx(0.0, abs=1e-6)
    assert float(output_distance(tokens, other, "mse", mask)) == pytest.approx(0.0, abs=1e-6)


def test_mean_pooling_respects_the_mask():
    tokens = torch.arange(12.0).reshape(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    pooled = mean_pool(tokens, mask)
    assert torch.equal(pooled, torch.stack([tokens[0, :2].mean(0), tokens[1, 0]]))
    changed = tokens.clone()
    changed[0, 2], changed[1, 1:] = 1e6, -1e6  # padding tokens change, the pooled embedding does not
    assert torch.equal(mean_pool(changed, mask), pooled)
    assert torch.equal(mean_pool(tokens), tokens.mean(1))
    with pytest.raises(ValueError, match=r"attention_mask \(2, 2\) does not match"):
        mean_pool(tokens, mask[:, :2])


def test_dict_output_teacher_with_output_key_and_mean_pooling():
    """Sentence-transformers style: dict inputs with a mask, dict outputs, mean-pooled cosine, no labels."""
    teacher, student = TokenEncoder(32, seed=0), TokenEncoder(8, seed=1)
    data = _token_batches()
    cfg = DistillConfig(
        output_loss="cosine", pooling="mean", output_key="last_hidden_state", epochs=6, lr=1e-2, batch_size=16, **QUIET
    )
    result = distill(student, teacher, cfg, data, data)
    losses = result.record["loss_terms"]["cosine"]
    assert losses[-1] < losses[0], losses
    batch = {
        "input_ids": torch.stack([d["input_ids"] for d in data]),
        "attention_mask": torch.stack([d["attention_mask"] for d in data]),
    }

    def sentence(model):
        with torch.no_grad():
            return mean_pool(model(**batch)["last_hidden_state"], batch["attention_mask"])

    before = nn.functional.cosine_similarity(sentence(student), sentence(teacher)).mean()
    after = nn.functional.cosine_similarity(sentence(result.model), sentence(teacher)).mean()
    assert after > before + 0.05, (before, after)
    assert result.record["student_cosine"] == pytest.approx(float(after), abs=0.02)


class DataclassEncoder(nn.Module):
    """Returns a dataclass output with ``last_hidden_state`` (as transformers' output classes do)."""

    def __init__(self, width: int, seed: int) -> None:
        super().__init__()
        self.encoder = TokenEncoder(width, seed)

    def forward(self, input_ids, attention_mask=None):
        return Output(self.encoder(input_ids)["last_hidden_state"])


def test_dataclass_output_and_a_loader_of_dict_batches():
    teacher, student = DataclassEncoder(32, seed=0), DataclassEncoder(8, seed=1)
    loader = DataLoader(_token_batches(32), batch_size=8)
    cfg = DistillConfig(output_loss="mse", pooling="mean", epochs=4, lr=1e-2, **QUIET)
    result = distill(student, teacher, cfg, loader, loader)
    losses = result.record["loss_terms"]["mse"]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    assert len(result.record["val_output_loss"]) == 4


def test_token_hints_learn_a_projection():
    teacher, student = TokenEncoder(32, seed=0), TokenEncoder(8, seed=1)
    data = _token_batches()
    cfg = DistillConfig(
        output_loss="mse", hints=[("layer", "layer")], hint_weight=1.0, epochs=6, lr=1e-2, batch_size=16, **QUIET
    )
    result = distill(student, teacher, cfg, data)
    assert result.record["adapters"]["hint0"] == {"type": "Linear", "weight_shape": [32, 8]}
    hint = result.record["loss_terms"]["hint:layer"]
    assert hint[-1] < hint[0], hint
    adapter = hint_adapter((4, 6, 8), (4, 6, 32))
    assert isinstance(adapter, nn.Linear) and adapter(torch.randn(4, 6, 8)).shape == (4, 6, 32)
    assert float(hint_loss(torch.zeros(2, 3, 4), torch.ones(2, 3, 4))) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="both"):
        hint_adapter((4, 6, 8), (4, 32))


def _pad_garbage(teacher: TokenEncoder) -> TokenEncoder:
    """``teacher`` whose hinted layer outputs 1000 more at every padding token (what a real encoder computes there
    is never read either)."""
    mask: dict[str, torch.Tensor] = {}

    def keep_mask(_module, _args, kwargs):
        mask["now"] = kwargs["attention_mask"]

    teacher.register_forward_pre_hook(keep_mask, with_kwargs=True)
    teacher.layer.register_forward_hook(lambda _m, _a, out: out + 1e3 * (1 - mask["now"]).unsqueeze(-1))
    return teacher


def test_token_hints_leave_padding_tokens_out():
    data = _token_batches()
    cfg = DistillConfig(output_loss="mse", hints=[("layer", "layer")], epochs=2, lr=1e-2, batch_size=16, **QUIET)
    clean = distill(TokenEncoder(8, seed=1), TokenEncoder(32, seed=0), cfg, data)
    padded = distill(TokenEncoder(8, seed=1), _pad_garbage(TokenEncoder(32, seed=0)), cfg, data)
    assert padded.record["loss_terms"]["hint:layer"] == pytest.approx(clean.record["loss_terms"]["hint:layer"])
    assert clean.record["loss_terms"]["hint:layer"][0] < 10  # without the mask the padding alone would add ~5e5


def test_kd_loss_fn_with_cosine_and_dict_outputs():
    teacher, student = TokenEncoder(16, seed=0), TokenEncoder(16, seed=1)
    batch = {"input_ids": torch.randint(0, 50, (4, 5)), "attention_mask": torch.ones(4, 5, dtype=torch.long)}
    loss_fn = kd_loss_fn(teacher, DistillConfig(output_loss="cosine", pooling="mean"))
    loss = loss_fn(student(**batch), torch.zeros(4), batch)
    assert loss.ndim == 0 and 0 < float(loss.detach()) < 2
    assert float(loss_fn(teacher(**batch), torch.zeros(4), batch)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"output_loss": "l1"}, "output_loss"),
        ({"pooling": "max"}, "pooling"),
        ({"pooling": "mean"}, "pooling"),  # mean pooling of logits under 'kl'
        ({"output_loss": "cosine", "cache_teacher": True}, "cache_teacher"),
        ({"output_key": ""}, "output_key"),
        ({"output_key": 3}, "output_key"),
    ],
)
def test_config_errors_name_the_field(settings, field):
    with pytest.raises(ValueError, match=field):
        DistillConfig(**settings)


def test_bad_use_fails_before_training_with_the_field_named():
    teacher, student, inputs = _regression()
    with pytest.raises(ValueError, match=r"alpha=.*inputs only"):
        distill(student, teacher, DistillConfig(epochs=1, **QUIET), TensorDataset(inputs))
    wide = nn.Linear(8, 7)
    with pytest.raises(ValueError, match=r"output_loss='cosine'.*differ in shape"):
        distill(wide, teacher, DistillConfig(output_loss="cosine", epochs=1, **QUIET), TensorDataset(inputs))
    with pytest.raises(ValueError, match=r"pooling='mean' needs token outputs"):
        distill(student, teacher, DistillConfig(output_loss="cosine", pooling="mean", epochs=1, **QUIET), inputs)
    with pytest.raises(ValueError, match=r"no 'pooled'"):
        distill(student, teacher, DistillConfig(output_loss="mse", output_key="pooled", epochs=1, **QUIET), inputs)


def test_soft_targets_alone_train_on_unlabelled_data():
    teacher, student, inputs = _regression()
    result = distill(student, teacher, DistillConfig(alpha=1.0, epochs=3, lr=1e-2, **QUIET), inputs)
    assert set(result.record["loss_terms"]) == {"kd"}
    assert result.record["loss_terms"]["kd"][-1] < result.record["loss_terms"]["kd"][0]


def test_default_kd_runs_on_a_tiny_synthetic_problem():
    torch.manual_seed(0)
    inputs = torch.randn(200, 10)
    labels = (inputs[:, :3].sum(1) > 0).long() + (inputs[:, 3] > 1).long()
    teacher = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
    student = nn.Sequential(nn.Linear(10, 4), nn.ReLU(), nn.Linear(4, 3))
    data = TensorDataset(inputs, labels)
    result = distill(student, teacher, DistillConfig(progress=False), data, data)
    assert len(result.record["train_loss"]) == DistillConfig().epochs
    assert set(result.record["loss_terms"]) == {"kd", "hard"}
    assert result.record["student_accuracy"] is not None


@pytest.mark.parametrize(("student_dropout", "changes"), [(None, False), (True, True)])
def test_student_dropout_is_off_by_default_for_output_distances(student_dropout, changes):
    """A student equal to its teacher matches it exactly once its dropout is off (nothing to learn); with dropout on
    it does not, so it trains. The returned student keeps its dropout rate either way."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 4))
    data = TensorDataset(torch.randn(64, 8))
    cfg = DistillConfig(output_loss="mse", student_dropout=student_dropout, epochs=1, batch_size=16, **QUIET)
    result = distill(teacher, teacher, cfg, data)
    moved = any(not torch.equal(a, b) for a, b in zip(result.model.parameters(), teacher.parameters()))
    assert moved is changes and result.model[2].p == 0.5
    assert DistillConfig().dropout_active and not DistillConfig(output_loss="cosine").dropout_active
