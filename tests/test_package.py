import subprocess
import sys


def test_import_stays_lean():
    code = ("import sys, slimkit; slimkit.models; slimkit.data; slimkit.PruneConfig; slimkit.QuantConfig; "
            "heavy = [m for m in ('onnxruntime', 'optuna', 'matplotlib', 'torchvision', 'onnx') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_public_api_resolves():
    import slimkit

    for name in ("profile", "prune", "PruneConfig", "quantize", "QuantConfig", "distill", "DistillConfig", "search",
                 "SearchConfig", "compress", "Recipe", "save", "load"):
        assert callable(getattr(slimkit, name)), name
