"""export_onnx takes models as users have them: tensor, tuple or dict inputs named after the forward's arguments,
tensor / tuple / dict outputs, dynamic batch and sequence, the dynamo exporter where TorchScript fails, and quantized
layers the forward never calls."""

import json
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import slimkit
from slimkit._inputs import as_args, call, first_tensor, input_names, named_outputs
from slimkit.errors import InputTypeError, UsageError
from slimkit.export.onnx import export_onnx

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

VOCAB, WIDTH = 50, 16


class TokenModel(nn.Module):
    """A tiny BERT-shaped model: token + position embeddings, a Linear block, a pooler the forward may skip."""

    def __init__(self) -> None:
        super().__init__()
        self.word, self.position = nn.Embedding(VOCAB, WIDTH), nn.Embedding(32, WIDTH)
        self.dense, self.out = nn.Linear(WIDTH, 32), nn.Linear(32, WIDTH)
        self.pooler = nn.Linear(WIDTH, WIDTH)

    def forward(self, input_ids, attention_mask=None, pool=False):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        h = self.word(input_ids) + self.position(positions)
        if attention_mask is not None:
            h = h * attention_mask.unsqueeze(-1).to(h.dtype)
        h = self.out(torch.relu(self.dense(h)))
        result = {"last_hidden_state": h}
        if pool:
            result["pooler_output"] = torch.tanh(self.pooler(h[:, 0]))
        return result


def _tokens(batch: int, length: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, length // 2 :] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _run(path, inputs: dict[str, torch.Tensor]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {k: v.numpy() for k, v in inputs.items()})


def _meta(path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def test_inputs_helpers_normalise_tensor_tuple_dict_and_outputs():
    x = torch.zeros(2, 3)
    assert as_args(x) == ((x,), {}) and as_args((x, x))[0] == (x, x) and as_args({"a": x}) == ((), {"a": x})
    with pytest.raises(InputTypeError, match="tensor, a tuple"):
        as_args([1, 2][0])
    out = {"logits": torch.ones(1), "hidden": (torch.zeros(1), torch.zeros(2))}
    assert [n for n, _ in named_outputs(out)] == ["logits", "hidden.0", "hidden.1"]
    assert [n for n, _ in named_outputs((torch.ones(1), torch.ones(2)))] == ["output", "output_1"]
    assert first_tensor(out).tolist() == [1.0] and first_tensor(out, "logits").shape == (1,)
    with pytest.raises(InputTypeError, match="no 'pooled'"):
        first_tensor(out, "pooled")
    model = TokenModel()
    assert input_names(model, (x, x)) == ["input_ids", "attention_mask"] and input_names(model, x) == ["input"]
    assert set(call(model, _tokens(1, 4))) == {"last_hidden_state"}


def test_dict_inputs_and_dict_outputs_are_named_and_match_onnx_runtime(tmp_path):
    torch.manual_seed(0)
    model = TokenModel().eval()
    path = export_onnx(model, _tokens(2, 8), tmp_path / "tokens.onnx")
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in graph.output] == ["last_hidden_state"]
    assert _meta(path)["slimkit.exporter"] == "torchscript"
    inputs = _tokens(3, 8, seed=1)
    with torch.no_grad():
        expected = model(**inputs)["last_hidden_state"].numpy()
    np.testing.assert_allclose(_run(path, inputs)[0], expected, atol=1e-5)


def test_tuple_inputs_take_the_forward_argument_names_and_tuple_outputs_are_numbered(tmp_path):
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(5, 3)

        def forward(self, image, features):
            joint = self.a(image) + self.b(features)
            return joint, joint.sum(-1)

    torch.manual_seed(0)
    model = TwoInputs().eval()
    path = export_onnx(model, (torch.randn(1, 4), torch.randn(1, 5)), tmp_path / "two.onnx")
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["image", "features"]
    assert [o.name for o in graph.output] == ["output", "output_1"]
    image, features = torch.randn(6, 4), torch.randn(6, 5)  # the batch is dynamic by default
    got = _run(path, {"image": image, "features": features})
    with torch.no_grad():
        expected = model(image, features)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b.numpy(), atol=1e-5)


@pytest.mark.parametrize("method", ["fp32", "dynamic"])
def test_sequence_length_is_dynamic_for_token_inputs(tmp_path, method):
    """Exported at T=8, run at T=13 (and batch 3): ONNX Runtime matches PyTorch."""
    torch.manual_seed(0)
    model = TokenModel().eval()
    if method == "dynamic":
        model = slimkit.quantize(model, slimkit.QuantConfig(method="dynamic")).model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unused pooler's note (tested below)
        path = export_onnx(model, _tokens(2, 8), tmp_path / f"{method}.onnx")
    dims = [d.dim_param for d in onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "sequence"]
    inputs = _tokens(3, 13, seed=2)
    with torch.no_grad():
        expected = model(**inputs)["last_hidden_state"].numpy()
    got = _run(path, inputs)[0]
    assert got.shape == (3, 13, WIDTH)
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_dynamic_shapes_override_the_default_dims(tmp_path):
    model = TokenModel().eval()
    static_sequence = {"input_ids": {0: "n"}, "attention_mask": {0: "n"}}
    path = export_onnx(model, _tokens(2, 8), tmp_path / "static_seq.onnx", dynamic_shapes=static_sequence)
    for value in onnx.load(str(path)).graph.input:
        assert [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim] == ["n", 8]
    with pytest.raises(UsageError, match="names input 'ids'; the inputs are input_ids, attention_mask"):
        export_onnx(model, _tokens(2, 8), tmp_path / "bad.onnx", dynamic_shapes={"ids": {0: "batch"}})


def test_a_trace_that_bakes_the_sequence_length_falls_back_to_the_dynamo_exporter(tmp_path):
    """nn.MultiheadAttention's reshapes are constants in the TorchScript trace (ORT rejects T=13): export checks the
    dynamic dims and uses the dynamo exporter, which keeps them symbolic."""
    pytest.importorskip("onnxscript")

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(VOCAB, WIDTH)
            self.attn = nn.MultiheadAttention(WIDTH, 2, batch_first=True)

        def forward(self, input_ids):
            h = self.embed(input_ids)
            return self.attn(h, h, h, need_weights=False)[0]

    torch.manual_seed(0)
    model = Attention().eval()
    path = export_onnx(model, {"input_ids": torch.randint(0, VOCAB, (2, 8))}, tmp_path / "attn.onnx")
    assert _meta(path)["slimkit.exporter"] == "dynamo"
    ids = torch.randint(0, VOCAB, (3, 13))
    with torch.no_grad():
        expected = model(ids).numpy()
    np.testing.assert_allclose(_run(path, {"input_ids": ids})[0], expected, atol=1e-5)


def test_an_op_torchscript_lacks_falls_back_to_the_dynamo_exporter(tmp_path):
    """``aten::diff`` (GPT-2 / Llama masks) has no TorchScript ONNX export at opset 17."""
    pytest.importorskip("onnxscript")

    class Diff(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(7, 3)

        def forward(self, x):
            return self.fc(torch.diff(x, dim=1))

    torch.manual_seed(0)
    model = Diff().eval()
    path = export_onnx(model, torch.randn(2, 8), tmp_path / "diff.onnx")
    assert _meta(path)["slimkit.exporter"] == "dynamo"
    x = torch.randn(5, 8)
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(_run(path, {"input": x})[0], expected, atol=1e-5)


def test_a_quantized_layer_the_forward_never_calls_is_skipped_with_a_note(tmp_path):
    """The pooler is quantized (dynamic int8 needs no data) but the forward does not call it on the example input:
    int8 export used to fail looking for its MatMul; now it warns, names it in the metadata and exports the rest."""
    torch.manual_seed(0)
    model = TokenModel().eval()
    quantized = slimkit.quantize(model, slimkit.QuantConfig(method="dynamic")).model
    with pytest.warns(UserWarning, match="pooler never run on example_input"):
        path = export_onnx(quantized, _tokens(2, 8), tmp_path / "dead.onnx")
    assert json.loads(_meta(path)["slimkit.unused_layers"]) == ["pooler"]
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "MatMulInteger" in ops
    inputs = _tokens(2, 8, seed=3)
    with torch.no_grad():
        expected = quantized(**inputs)["last_hidden_state"].numpy()
    np.testing.assert_allclose(_run(path, inputs)[0], expected, atol=1e-4)


def test_a_batch_of_one_is_traced_as_a_dynamic_batch(tmp_path):
    """An example with one row must not bake batch 1 into the graph (torch.export specialises sizes of 1): a tiny
    Llama (dynamo exporter) exported from 1 x 8 tokens runs at 3 x 13."""
    pytest.importorskip("onnxscript")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        max_position_embeddings=32,
        use_cache=False,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    path = export_onnx(model, {"input_ids": torch.randint(0, VOCAB, (1, 8))}, tmp_path / "llama.onnx")
    ids = torch.randint(0, VOCAB, (3, 13))
    with torch.no_grad():
        expected = model(input_ids=ids).logits.numpy()
    np.testing.assert_allclose(_run(path, {"input_ids": ids})[0], expected, atol=1e-4)


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_transformers_attention_exports_as_matmul_softmax_and_the_model_keeps_sdpa(tmp_path, kind):
    transformers = pytest.importorskip("transformers")
    shape = {"vocab_size": 64, "num_hidden_layers": 2}
    if kind == "bert":
        config = transformers.BertConfig(**shape, hidden_size=32, num_attention_heads=4, intermediate_size=64)
        model_class = transformers.BertModel
    else:
        config = transformers.GPT2Config(**shape, n_embd=32, n_head=4, n_positions=16)
        model_class = transformers.GPT2Model
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = model_class(config).eval()
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0  # a padded row: the mask must still reach the scores
    x = {"input_ids": torch.randint(0, 64, (2, 8)), "attention_mask": mask}
    path = export_onnx(model, x, tmp_path / f"{kind}.onnx")
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    assert ops.count("Softmax") == 2 and "IsNaN" not in ops  # SDPA's export guards the scores with IsNaN + Where
    assert model.config._attn_implementation == "sdpa"  # the export switched a copy
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {k: v.numpy() for k, v in x.items()})[0]
    with torch.no_grad():
        want = model(**x).last_hidden_state
    keep = mask.bool()  # padded positions of BERT are not defined outputs
    np.testing.assert_allclose(got[keep.numpy()], want[keep].numpy(), atol=1e-5)


def test_eager_attention_switches_each_sdpa_config_and_gives_every_value_back():
    transformers = pytest.importorskip("transformers")
    from slimkit.models.hf import eager_attention

    def bert(attention, head=False):
        config = transformers.BertConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64
        )
        config._attn_implementation = attention
        return (transformers.BertForSequenceClassification if head else transformers.BertModel)(config)

    nested, plain = bert("sdpa", head=True), bert("eager")  # the head model's inner BertModel shares its config
    both = nn.ModuleList([nested, plain])
    with pytest.raises(RuntimeError, match="inside"), eager_attention(both):
        assert nested.config._attn_implementation == nested.bert.config._attn_implementation == "eager"
        raise RuntimeError("inside")
    assert nested.bert.config._attn_implementation == "sdpa" and plain.config._attn_implementation == "eager"
