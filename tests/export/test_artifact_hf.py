"""slimkit's artifact rebuilds transformers models from their config (no remote code) after pruning."""

from __future__ import annotations

import json

import pytest
import torch

import slimkit
from slimkit.errors import SlimkitError
from slimkit.export.manifest import DIGEST, MANIFEST, digest_line

transformers = pytest.importorskip("transformers")


def rewrite(folder, edit) -> None:
    """Edit slimkit.json and re-digest it, so only the rebuild's own checks stand between it and load."""
    manifest = json.loads((folder / MANIFEST).read_text())
    edit(manifest)
    data = (json.dumps(manifest, indent=1) + "\n").encode()
    (folder / MANIFEST).write_bytes(data)
    (folder / DIGEST).write_text(digest_line(data))


def _bert():
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def _tokens():
    return {"input_ids": torch.randint(0, 64, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}


def test_pruned_bert_round_trips_through_the_artifact_with_its_config(tmp_path):
    x = _tokens()
    pruned = slimkit.prune(_bert(), slimkit.PruneConfig(amount=0.3, target="macs", round_to=1), example_input=x)
    assert pruned.model.config.intermediate_size < 64  # the FFN was cut and the config says so
    path = slimkit.save(pruned, tmp_path / "bert.slim")
    manifest = json.loads((path / "slimkit.json").read_text())
    assert manifest["source"]["factory"] == "slimkit.models.hf:from_config"
    assert manifest["source"]["kwargs"]["config"]["intermediate_size"] == 64  # the original, replayed on load
    loaded = slimkit.load(path)
    assert type(loaded) is transformers.BertModel
    assert loaded.config.intermediate_size == pruned.model.config.intermediate_size
    with torch.no_grad():
        want, got = pruned.model(**x).last_hidden_state, loaded(**x).last_hidden_state
    torch.testing.assert_close(got, want)


def test_an_unpruned_transformers_model_saves_and_loads_too(tmp_path):
    model, x = _bert(), _tokens()
    loaded = slimkit.load(slimkit.save(model, tmp_path / "plain.slim"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(**x).last_hidden_state, model(**x).last_hidden_state)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"model_class": "AutoModel"}, "not a model class transformers exports"),
        ({"model_class": "os.system"}, "not a model class transformers exports"),
        ({"config": {"model_type": "bert", "auto_map": {"AutoModel": "evil.Model"}}}, "remote code"),
        ({"model_class": "GPT2Model"}, "does not match"),
    ],
)
def test_loading_refuses_anything_but_a_transformers_class_from_its_own_config(tmp_path, edit, message):
    path = slimkit.save(_bert(), tmp_path / "m.slim")

    def change(manifest):
        kwargs = manifest["source"]["kwargs"]
        kwargs.update({k: {**kwargs["config"], **v} if k == "config" else v for k, v in edit.items()})

    rewrite(path, change)
    with pytest.raises(SlimkitError, match=message):
        slimkit.load(path)


def test_llama_with_pruned_query_and_key_value_heads_round_trips(tmp_path):
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
        head_dim=8, intermediate_size=96, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    model, x = transformers.LlamaModel(config).eval(), _tokens()
    pruned = slimkit.prune(model, slimkit.PruneConfig(amount=0.3, overrides={"re:.*q_proj": 0.5}), example_input=x)
    assert pruned.model.config.num_attention_heads < 8
    loaded = slimkit.load(slimkit.save(pruned, tmp_path / "llama.slim"))
    assert loaded.config.num_key_value_heads == pruned.model.config.num_key_value_heads
    with torch.no_grad():
        torch.testing.assert_close(loaded(**x).last_hidden_state, pruned.model(**x).last_hidden_state)
