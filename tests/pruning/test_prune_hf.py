"""Models as they come: transformers BERT, GPT-2, Llama (grouped-query attention), ViT, and torchvision's swin_t /
convnext_tiny (shrunk through their own builders: smaller depths and width). Random-init tiny configs, no download.

Each prunes 30% of its MACs within 3 points and runs; pruning 0% is bit-identical; a transformers model stays its
class with ``config`` updated, so transformers' own ``save_pretrained`` / ``from_pretrained`` round-trips it."""

import pytest
import torch

from slimkit.errors import UsageError
from slimkit.pruning import PruneConfig, prune

transformers = pytest.importorskip("transformers")

VOCAB, T = 100, 8


def _text_input():
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, T))
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, -2:] = 0  # a padded row: the mask is real
    return {"input_ids": ids, "attention_mask": mask}


def _bert():
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=32,
    )
    return transformers.BertModel(config), _text_input()


def _gpt2():
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2Model(config), _text_input()


def _llama():
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=8,
        intermediate_size=96,
        max_position_embeddings=32,
    )
    return transformers.LlamaModel(config), _text_input()


def _vit():
    config = transformers.ViTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32, patch_size=8
    )
    return transformers.ViTModel(config), torch.randn(2, 3, 32, 32)


HF = {"bert": _bert, "gpt2": _gpt2, "llama": _llama, "vit": _vit}


def _out(model, x):
    with torch.no_grad():
        y = model(**x) if isinstance(x, dict) else model(x)
    return y[0]


def _build(name):
    torch.manual_seed(0)
    model, x = HF[name]()
    return model.eval(), x


@pytest.mark.parametrize("name", list(HF))
def test_transformers_prune_30_runs_and_round_trips(name, tmp_path):
    model, x = _build(name)
    original_config = model.config.to_dict()
    result = prune(model, PruneConfig(amount=0.3, target="macs"), x)
    pruned = result.model
    assert abs(result.record["reduction"]["macs"] - 0.3) <= 0.03
    assert type(pruned) is type(model)
    assert _out(pruned, x).shape == _out(model, x).shape
    changed = result.record["hf_config"]
    assert changed and all(getattr(pruned.config, k) == v for k, v in changed.items())
    assert model.config.to_dict() == original_config  # the caller's model and config are untouched
    pruned.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    assert torch.equal(_out(loaded, x), _out(pruned, x))


@pytest.mark.parametrize("name", list(HF))
def test_transformers_prune_0_is_bit_identical(name):
    model, x = _build(name)
    result = prune(model, PruneConfig(amount=0.0, target="macs"), x)
    assert torch.equal(_out(result.model, x), _out(model, x))


def test_llama_query_heads_go_with_their_key_value_head():
    model, x = _build("llama")
    # hidden_size 64 must stay a multiple of the head count (LlamaConfig checks it): ask for half the heads
    result = prune(model, PruneConfig(amount=0.3, target="macs", overrides={"re:.*q_proj": 0.5}), x)
    config = result.model.config
    assert config.num_attention_heads < 8 and config.head_dim == 8  # rotary dims (head_dim) kept
    assert config.num_attention_heads // config.num_key_value_heads == 2  # whole groups: n_rep stays 2
    for layer in result.model.layers:
        attention = layer.self_attn
        assert attention.q_proj.out_features == config.num_attention_heads * 8
        assert attention.k_proj.out_features == attention.v_proj.out_features == config.num_key_value_heads * 8
        assert attention.o_proj.in_features == attention.q_proj.out_features
    heads = [g for g in result.record["groups"] if "q_proj" in g["id"]]
    assert heads and all(g["unit"] == 16 and "layers.0.self_attn.k_proj" in str(heads[0]["members"]) for g in heads)


def test_vit_heads_are_pruned_and_bert_heads_are_named_kept():
    vit, x = _build("vit")
    result = prune(vit, PruneConfig(amount=0.3, target="macs", allocation="uniform"), x)
    assert result.model.config.num_attention_heads < 4
    bert, x = _build("bert")
    result = prune(bert, PruneConfig(amount=0.3, target="macs"), x)
    kept = [k for k in result.record["kept_intact"] if k["group"] and "attention.self.query" in k["group"]]
    assert len(kept) == 2 and "head size" in kept[0]["reasons"][0]
    assert result.model.config.intermediate_size < 128


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_hf_config_false_prunes_heads_per_layer_and_loads_through_the_artifact(name, tmp_path):
    """BERT / GPT-2 heads (their config cannot say fewer) and per-layer counts when the config may go stale: the
    pruning is exact (the artifact replays it), the config is marked, transformers' loader refuses the weights."""
    import slimkit

    model, x = _build(name)
    config = PruneConfig(amount=0.3, target="macs", allocation="global", round_to=1, hf_config=False)
    result = prune(model, config, x)
    pruned = result.model
    assert abs(result.record["reduction"]["macs"] - 0.3) <= 0.03
    heads = [g for g in result.record["groups"] if g["unit"] > 1]
    assert heads and any(g["kept"] < g["size"] for g in heads)  # attention heads were cut
    assert len({g["kept"] for g in result.record["groups"] if g["unit"] == 1}) > 1  # FFN counts differ per layer
    assert "slimkit.load" in pruned.config.slimkit_pruned and pruned.config.to_dict() != model.config.to_dict()
    assert not hasattr(model.config, "slimkit_pruned")
    assert _out(pruned, x).shape == _out(model, x).shape
    slimkit.save(pruned, tmp_path / "artifact")
    assert torch.equal(_out(slimkit.load(tmp_path / "artifact"), x), _out(pruned, x))
    pruned.save_pretrained(tmp_path / "hf")
    with pytest.raises(RuntimeError, match="mismatched"):
        type(model).from_pretrained(tmp_path / "hf")
    with pytest.raises(UsageError, match="hf_config=False"):  # its config cannot say the counts any more
        prune(pruned, PruneConfig(amount=0.1, target="macs"), x)
    again = prune(pruned, PruneConfig(amount=0.1, target="macs", round_to=1, hf_config=False), x).model
    assert torch.equal(_out(slimkit.load(slimkit.save(again, tmp_path / "twice")), x), _out(again, x))


tvm = pytest.importorskip("torchvision.models")


def _swin():
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer(
        patch_size=[4, 4],
        embed_dim=32,
        depths=[2, 2, 2, 2],
        num_heads=[2, 4, 4, 8],
        window_size=[4, 4],
        stochastic_depth_prob=0.0,
        num_classes=10,
    )


def _convnext():
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    stages = [
        CNBlockConfig(32, 64, 2),
        CNBlockConfig(64, 128, 2),
        CNBlockConfig(128, 256, 2),
        CNBlockConfig(256, None, 2),
    ]
    return ConvNeXt(stages, stochastic_depth_prob=0.0, num_classes=10)


@pytest.mark.parametrize("build", [_swin, _convnext], ids=["swin_t-small", "convnext_tiny-small"])
def test_torchvision_swin_convnext(build):
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(2, 3, 64, 64)
    result = prune(model, PruneConfig(amount=0.3, target="macs"), x)
    assert abs(result.record["reduction"]["macs"] - 0.3) <= 0.03
    assert result.model(x).shape == (2, 10)
    same = prune(model, PruneConfig(amount=0.0, target="macs"), x)
    assert torch.equal(same.model(x), model(x))
