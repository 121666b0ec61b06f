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
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # type checkers see the real signatures; at run time `_LAZY` imports on first use
    from slimkit import (
        data,
        distillation,
        export,
        measure,
        models,
        pipeline,
        pruning,
        quantization,
        recipe,
        report,
        train,
        tuning,
    )
    from slimkit.distillation import DistillConfig, distill
    from slimkit.export.artifact import load, save
    from slimkit.measure import profile
    from slimkit.pipeline import compress
    from slimkit.pruning import PruneConfig, prune
    from slimkit.quantization import QuantConfig, quantize
    from slimkit.recipe import Recipe
    from slimkit.train import TrainConfig
    from slimkit.tuning import SearchConfig, search

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
_SUBMODULES = {
    "data",
    "models",
    "measure",
    "train",
    "pruning",
    "quantization",
    "distillation",
    "tuning",
    "export",
    "report",
    "recipe",
    "pipeline",
}

# written out (not computed) so linters and type checkers see the re-exports of the TYPE_CHECKING block
__all__ = [
    "DistillConfig",
    "PruneConfig",
    "QuantConfig",
    "Recipe",
    "SearchConfig",
    "TrainConfig",
    "__version__",
    "compress",
    "data",
    "distill",
    "distillation",
    "export",
    "load",
    "measure",
    "models",
    "pipeline",
    "profile",
    "prune",
    "pruning",
    "quantization",
    "quantize",
    "recipe",
    "report",
    "save",
    "search",
    "train",
    "tuning",
]


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
