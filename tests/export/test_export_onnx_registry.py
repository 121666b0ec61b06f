"""The handler registry export back ends read layers through: algorithms register, export looks up, and neither
export nor ``measure`` imports an algorithm's private names. One packed size for any model."""

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import slimkit
from slimkit.errors import UsageError
from slimkit.export import registry
from slimkit.export.artifact import weights_size
from slimkit.export.lowering import float_twin, fused_rnns, integer_layers, is_dynamic_model, is_int8_model
from slimkit.export.onnx import export_onnx
from slimkit.measure import profile, size_on_disk
from slimkit.quantization import QuantConfig, quantize
from slimkit.quantization.fake import QuantConv2d, QuantLinear

SRC = Path(slimkit.__file__).parent
ALGORITHMS = ("slimkit.quantization", "slimkit.pruning", "slimkit.distillation", "slimkit.tuning")


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """``(module, names)`` of every import in ``path``, function-level ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found.extend((alias.name, []) for alias in node.names)
    return found


def test_export_imports_no_private_name_of_an_algorithm():
    for path in sorted((SRC / "export").glob("*.py")):
        for module, names in _imports(path):
            if module.startswith(ALGORITHMS):
                private = [n for n in names if n.startswith("_")] + [p for p in module.split(".") if p[:1] == "_"]
                assert not private, f"{path.name} imports private {private} from {module}"


@pytest.mark.parametrize(
    "name",
    [
        "onnx.py",
        "onnx_static.py",
        "onnx_dynamic.py",
        "onnx_graph.py",
        "lowering.py",
        "registry.py",
        "torch_int8.py",
        "runtime.py",
    ],
)
def test_back_ends_import_no_algorithm_at_all(name):
    imported = [module for module, _ in _imports(SRC / "export" / name)]
    assert not [m for m in imported if m.startswith(ALGORITHMS)]


def test_measure_reads_the_packing_through_the_registry():
    imported = [module for module, _ in _imports(SRC / "measure.py")]
    assert "slimkit.export.registry" in imported
    assert not [m for m in imported if m.startswith(ALGORITHMS)]


def test_quantization_registers_its_handlers():
    linear = QuantLinear(4, 3)
    assert registry.find(registry.PACK, linear) is not None
    assert registry.find(registry.FLOAT_TWIN, linear) is registry.find(registry.FLOAT_TWIN, QuantConv2d(1, 2, 3))
    assert registry.find(registry.INTEGER_LAYER, nn.Linear(4, 3)) is None


def test_register_find_unregister_and_subclasses():
    class Doubler(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    class Tripler(Doubler):
        pass

    @registry.register(registry.FLOAT_TWIN, Doubler)
    def as_linear(module):
        plain = nn.Linear(module.in_features, module.out_features)
        with torch.no_grad():
            plain.weight.copy_(2 * module.weight)
            plain.bias.copy_(2 * module.bias)
        return plain

    try:
        assert registry.find(registry.FLOAT_TWIN, Tripler(2, 2)) is as_linear  # nearest registered base class
        model = nn.Sequential(Doubler(3, 4), nn.ReLU(), nn.Sequential(Tripler(4, 2)))
        twin = float_twin(model)
        assert [type(m) for m in twin.modules()] == [nn.Sequential, nn.Linear, nn.ReLU, nn.Sequential, nn.Linear]
        assert type(model[0]) is Doubler  # the caller's model is untouched
        x = torch.randn(5, 3)
        torch.testing.assert_close(twin(x), model(x))
    finally:
        registry.unregister(registry.FLOAT_TWIN, Doubler)
    assert registry.find(registry.FLOAT_TWIN, Doubler(2, 2)) is None


def test_register_refuses_unknown_kinds_and_missing_types():
    with pytest.raises(UsageError, match="unknown handler kind"):
        registry.register("twin", nn.Linear)
    with pytest.raises(UsageError, match="module types"):
        registry.register(registry.PACK)


def test_a_registered_float_twin_is_what_onnx_exports(tmp_path):
    ort = pytest.importorskip("onnxruntime")

    class Scaled(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 0.5

    @registry.register(registry.FLOAT_TWIN, Scaled)
    def halve(module):
        plain = nn.Linear(module.in_features, module.out_features)
        plain.load_state_dict(module.state_dict())
        return nn.Sequential(plain, nn.Identity())

    try:
        model = nn.Sequential(Scaled(6, 3)).eval()
        path = export_onnx(model, torch.zeros(1, 6), tmp_path / "scaled.onnx")
    finally:
        registry.unregister(registry.FLOAT_TWIN, Scaled)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 6)
    plain = nn.Linear(6, 3)
    plain.load_state_dict(model[0].state_dict())
    got = session.run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, plain(x).detach().numpy(), atol=1e-5)  # the handler's module, not the 0.5


def _lenet(built_by_create: bool) -> nn.Module:
    torch.manual_seed(0)
    model = slimkit.models.create("lenet300", in_features=64)
    if not built_by_create:
        plain = nn.Sequential(*model)  # the same layers, no slimkit source
        assert slimkit.history.source_of(plain) is None
        return plain
    return model


@pytest.mark.parametrize(
    "config",
    [
        QuantConfig(weight_bits=8, act_bits=None),
        QuantConfig(weight_bits=2, scheme="ternary", act_bits=None, keep_first_last_8bit=False),
    ],
    ids=["int8", "ternary"],
)
def test_one_packed_size_for_any_model(config):
    sizes = {}
    for built in (True, False):
        model = _lenet(built)
        quantized = quantize(model, config, torch.randn(128, 64)).model
        sizes[built] = size_on_disk(quantized)
        assert profile(quantized, torch.zeros(1, 64)).size_bytes == sizes[built]
        assert weights_size(quantized) == size_on_disk(quantized, metadata={"format": "slimkit-artifact"})
        float_bytes = size_on_disk(model)
        assert sizes[built] < float_bytes / (3 if config.weight_bits == 8 else 8)
    assert sizes[True] == sizes[False]


def test_float_models_keep_their_plain_size():
    model = nn.Linear(10, 10)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert 440 < size_on_disk(model) < weights_size(model) <= size_on_disk(model) + 64  # + the format header
    assert registry.packed_state(model)[1] is None
    assert all(torch.equal(state[k], v) for k, v in registry.packed_state(model)[0].items())


def test_integer_view_and_export_leave_the_model_as_it_was(tmp_path):
    pytest.importorskip("onnx")
    lstm = nn.Sequential()
    lstm.add_module("rnn", nn.LSTM(5, 8, batch_first=True))
    result = quantize(lstm, QuantConfig(method="dynamic"))
    model = result.model.train()
    assert is_dynamic_model(model) and not is_int8_model(model)
    assert list(fused_rnns(model)) == ["rnn"] and fused_rnns(model)["rnn"].input_gates == (("ih_l0",),)
    layers = dict(integer_layers(model))
    assert layers["rnn.ih_l0"].codes is not None and layers["rnn.ih_l0"].input.dynamic
    assert all(m.training for m in model.modules())  # reading the integer view changes no mode
    twin = float_twin(model)
    assert isinstance(twin.rnn, nn.LSTM) and not twin.training
    assert all(m.training for m in model.modules())
