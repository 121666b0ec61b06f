"""slimkit: make trained PyTorch models smaller and faster, and prove it with measurements.

The public API is one verb per capability (model in, new model out, config second):

    profile, prune, quantize, distill, search, compress, save, load

plus one config dataclass per algorithm. Heavy dependencies (ONNX Runtime, Optuna, matplotlib, torchvision) are
imported only when a verb that needs them is called.

Example:
    >>> import slimkit, torch
    >>> model = slimkit.models.create("lenet5")
    >>> slimkit.profile(model, torch.zeros(1, 1, 28, 28)).macs
    416520
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> (module, attribute); resolved on first use so `import slimkit` stays lean
_LAZY: dict[str, tuple[str, str]] = {
    "profile": ("slimkit.measure", "profile"),
    "prune": ("slimkit.pruning", "prune"),
    "PruneConfig": ("slimkit.pruning", "PruneConfig"),
    "quantize": ("slimkit.quantization", "quantize"),
    "QuantConfig": ("slimkit.quantization", "QuantConfig"),
    "distill": ("slimkit.distillation", "distill"),
    "DistillConfig": ("slimkit.distillation", "DistillConfig"),
    "search": ("slimkit.tuning", "search"),
    "SearchConfig": ("slimkit.tuning", "SearchConfig"),
    "compress": ("slimkit.pipeline", "compress"),
    "Recipe": ("slimkit.recipe", "Recipe"),
    "save": ("slimkit.export.artifact", "save"),
    "load": ("slimkit.export.artifact", "load"),
    "TrainConfig": ("slimkit.train", "TrainConfig"),
}
_SUBMODULES = {"data", "models", "measure", "train", "pruning", "quantization", "distillation", "tuning", "export",
               "report", "recipe", "pipeline"}

__all__ = sorted([*_LAZY, *_SUBMODULES, "__version__"])


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module_name, attr = _LAZY[name]
        value = getattr(importlib.import_module(module_name), attr)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"slimkit.{name}")
    raise AttributeError(f"module 'slimkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
