import subprocess
import sys


def test_import_stays_lean():
    code = ("import sys, slimkit; slimkit.models; slimkit.data; slimkit.PruneConfig; slimkit.QuantConfig; "
            "heavy = [m for m in ('onnxruntime', 'optuna', 'matplotlib', 'torchvision', 'onnx') if m in sys.modules]; "
            "print(heavy)")
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
        name: module for name, (module, _) in slimkit._LAZY.items()}
    assert {name for name, module in imported.items() if module == "slimkit"} == slimkit._SUBMODULES
    assert slimkit.__all__ == sorted([*slimkit._LAZY, *slimkit._SUBMODULES, "__version__"])
