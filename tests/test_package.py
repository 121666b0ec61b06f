import subprocess
import sys


def test_import_stays_lean():
    code = (
        "import sys, slimkit; slimkit.models; slimkit.data; slimkit.PruneConfig; slimkit.QuantConfig; "
        "heavy = [m for m in ('onnxruntime', 'optuna', 'matplotlib', 'torchvision', 'onnx') if m in sys.modules]; "
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_public_api_resolves_to_the_implementing_objects():
    import importlib
    import inspect

    import slimkit

    for name, (module, attr) in slimkit._LAZY.items():
        value = getattr(slimkit, name)
        assert value is getattr(importlib.import_module(module), attr), name
        assert inspect.getdoc(value), f"slimkit.{name} has no docstring"
    for verb in ("profile", "prune", "quantize", "distill", "search", "compress", "save"):
        first = next(iter(inspect.signature(getattr(slimkit, verb)).parameters))
        assert first in ("model", "result", "student"), (verb, first)  # model in, config second
    assert set(slimkit.__all__) == {*slimkit._LAZY, *slimkit._SUBMODULES, "__version__"}
    for sub in slimkit._SUBMODULES:
        assert getattr(slimkit, sub).__name__ == f"slimkit.{sub}"


def test_type_checkers_see_every_public_name():
    """The lazy ``__getattr__`` hides names from type checkers; an ``if TYPE_CHECKING:`` block imports each one from
    the module that ``_LAZY`` resolves it to (so ``slimkit.quantize`` has its real signature, not ``Any``)."""
    import ast
    import inspect

    import slimkit

    tree = ast.parse(inspect.getsource(slimkit))
    block = next(node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING")
    imported = {}
    for node in ast.walk(block):
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                imported[alias.asname or alias.name] = node.module
    assert {name: module for name, module in imported.items() if module != "slimkit"} == {
        name: module for name, (module, _) in slimkit._LAZY.items()
    }
    assert {name for name, module in imported.items() if module == "slimkit"} == slimkit._SUBMODULES
    assert slimkit.__all__ == sorted([*slimkit._LAZY, *slimkit._SUBMODULES, "__version__"])


def test_every_verb_takes_data_the_same_way():
    """``verb(model, config, [example_input,] train_data=None, val_data=None, *, options)``: the same names, in the
    same places, positional or keyword, in every verb that trains or calibrates."""
    import inspect

    import slimkit

    expected = {
        "quantize": ["model", "config"],
        "prune": ["model", "config", "example_input"],
        "distill": ["student", "teacher", "config"],
        "search": ["model", "config"],
    }
    for verb, head in expected.items():
        parameters = list(inspect.signature(getattr(slimkit, verb)).parameters.values())
        positional = [p.name for p in parameters if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
        assert positional == [*head, "train_data", "val_data"], (verb, positional)
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in parameters[len(positional) :]), verb


def test_quantize_data_keyword_still_works_with_a_deprecation_warning():
    import pytest
    import torch

    import slimkit
    from slimkit.errors import InputTypeError

    model, batch = torch.nn.Sequential(torch.nn.Linear(4, 4)), torch.randn(16, 4)
    new = slimkit.quantize(model, slimkit.QuantConfig(), train_data=batch).model
    with pytest.warns(DeprecationWarning, match=r"quantize\(data=...\) is deprecated .* call it train_data="):
        old = slimkit.quantize(model, slimkit.QuantConfig(), data=batch).model
    assert torch.equal(new(batch), old(batch))
    with pytest.raises(InputTypeError, match="give train_data= only"):
        slimkit.quantize(model, slimkit.QuantConfig(), data=batch, train_data=batch)
