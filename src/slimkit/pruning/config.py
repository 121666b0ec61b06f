"""``PruneConfig``: every knob of structured pruning and of the iterative prune -> fine-tune loop."""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from slimkit.config import Config, check_range, to_enum
from slimkit.errors import InputTypeError, UsageError
from slimkit.pruning.importance import CRITERIA
from slimkit.train import TrainConfig

__all__ = ["BLOCK", "Allocation", "Importance", "PruneConfig", "Target"]

BLOCK = 16  # channels per NCHWc block of ONNX Runtime / oneDNN convolutions on AVX-512 (two AVX2 blocks)


class Target(str, enum.Enum):
    CHANNELS = "channels"
    MACS = "macs"
    PARAMS = "params"
    LATENCY = "latency"


class Importance(str, enum.Enum):
    L1 = "l1"
    L2 = "l2"
    FPGM = "fpgm"
    BN_SCALE = "bn_scale"
    TAYLOR = "taylor"
    ACTIVATION = "activation"
    RANDOM = "random"


class Allocation(str, enum.Enum):
    UNIFORM = "uniform"
    GLOBAL = "global"
    PROPORTIONAL = "proportional"
    SENSITIVITY = "sensitivity"


@dataclass
class PruneConfig(Config):
    """Structured pruning settings.

    Args:
        amount: fraction in [0, 1) of ``target`` to remove (0.5 MACs = a 2x MAC reduction).
        target: ``channels`` (fraction of prunable channels), ``macs`` or ``params`` (of the whole model), or
            ``latency``: measured latency on ``runtime`` at ``latency_batch`` (0.5 = 2x faster; see
            ``slimkit.pruning.latency``: a per-layer latency table cached per machine, then the whole model is
            timed and the cut corrected until it lands within the tolerance).
        importance: ``l1``, ``l2``, ``fpgm``, ``bn_scale``, ``taylor``, ``activation`` (the output energy a unit
            feeds its consumers, measured on ``train_data``), ``random``, the name of a criterion
            registered with ``@slimkit.pruning.register_importance("name")``, or a callable ``(group) -> scores``
            (a registered callable saves as its name; an unregistered one cannot be saved to a recipe).
        allocation: ``uniform`` (same ratio everywhere), ``global`` (one ranking of normalized scores),
            ``proportional`` (ratio proportional to the group's parameter share, capped by ``max_sparsity``),
            ``sensitivity`` (largest ratio per group whose measured accuracy drop stays under a shared threshold;
            ``sensitivity=`` the result of ``slimkit.pruning.sensitivity`` or ``{group: [[ratio, accuracy], ...]}``
            including the ``[0, baseline]`` point).
        ignore: module names or ``re:`` patterns whose output channels are never pruned.
        overrides: ``{name or re:pattern: ratio}`` fixing the ratio of the groups those modules produce.
        round_to: kept channel counts are multiples of this. Default (None): 16 for channel groups of 16 or
            more - the block of ONNX Runtime's and oneDNN's NCHWc convolutions on AVX-512 (two blocks on AVX2), so
            pruned layers stay on the fast kernels; smaller groups run on the plain kernels at any width and keep
            a step of 1; attention heads are cut one head at a time. ``round_to=1`` lets every count through.
        runtime, latency_batch, latency_threads: where ``target="latency"`` measures (``onnxruntime`` fp32 or
            ``eager`` PyTorch fp32, BatchNorm folded, channels-last), at which batch size and thread count.
        reconstruct: after the cut, refit every Linear / Conv2d that lost input channels by least squares so it
            reproduces the original layer's output on ``calibration_batches`` batches of ``train_data``, layer
            after layer (``slimkit.pruning.calibrate``; labels are not needed). Recovers much of the loss before
            any training. ``"all"``: also every Linear / Conv2d after the first cut (their inputs drift too; wants
            more calibration data).
        calibration_batches: batches of ``train_data`` read by ``activation`` and ``reconstruct``.
        max_sparsity: cap on the fraction of any one group that may be removed.
        leaf_modules: module names or class names the tracer must not enter (kept intact).
        hf_config: transformers models only. True (default): the pruned model stays describable by its
            ``config`` (one count per layer family; heads only where the config states the head size), which slimkit
            updates, so ``save_pretrained`` / ``from_pretrained`` round-trip it. False: heads wherever the forward
            follows them (BERT, GPT-2) and per-layer counts as ``allocation`` chooses; ``config`` keeps the original
            counts plus ``slimkit_pruned`` (transformers' ``from_pretrained`` then refuses the weights), and the model
            is saved with ``slimkit.save`` (``load`` replays the pruning) or exported to ONNX.
        steps, finetune, max_accuracy_drop: the iterative loop (see ``slimkit.pruning.schedule``); ``finetune``
            is a ``TrainConfig``, a dict of its fields or a number of epochs (0: prune step by step untrained).
        checkpoint_dir: per-step checkpoints of the loop; a rerun with the same folder resumes.
    """

    amount: float = 0.5
    target: Target = Target.MACS
    importance: Any = Importance.L2
    allocation: Allocation = Allocation.UNIFORM
    ignore: tuple[str, ...] = ()
    overrides: dict[str, float] = field(default_factory=dict)
    round_to: int | None = None
    max_sparsity: float = 0.9
    leaf_modules: tuple[str, ...] = ()
    hf_config: bool = True
    tolerance: float = 0.02
    taylor_batches: int = 4
    reconstruct: bool | str = False
    calibration_batches: int = 8
    sensitivity: dict[str, list] | None = None
    seed: int = 0
    steps: int = 1
    finetune: TrainConfig | None = None
    max_accuracy_drop: float | None = None
    checkpoint_dir: str | None = None
    runtime: str = "onnxruntime"
    latency_batch: int = 64
    latency_threads: int = 2

    def __post_init__(self) -> None:
        if self.sensitivity is not None and not isinstance(self.sensitivity, dict):
            curves = getattr(self.sensitivity, "curves", None)
            if not isinstance(curves, dict):
                raise InputTypeError(
                    f"sensitivity={type(self.sensitivity).__name__}: give the result of "
                    "slimkit.pruning.sensitivity(...) or {group: [[ratio, accuracy], ...]}"
                )
            self.sensitivity = curves
        if isinstance(self.finetune, int) and not isinstance(self.finetune, bool):
            if self.finetune < 0:
                raise UsageError(
                    f"finetune={self.finetune} epochs must be >= 0 (0: prune step by step without training)"
                )
            self.finetune = TrainConfig(epochs=self.finetune) if self.finetune else _no_training()
        elif self.finetune is not None and not isinstance(self.finetune, (TrainConfig, dict)):
            raise InputTypeError(
                f"finetune={self.finetune!r}: give a slimkit.train.TrainConfig, a dict of its fields "
                "or a number of epochs"
            )
        super().__post_init__()
        check_range("amount", self.amount, 0.0, 0.999)
        check_range("max_sparsity", self.max_sparsity, 0.0, 1.0)
        check_range("tolerance", self.tolerance, 0.0, 0.5)
        if not callable(self.importance) and not _registered_name(self.importance):
            self.importance = to_enum(Importance, self.importance, "importance")
        for name, ratio in self.overrides.items():
            check_range(f"overrides[{name!r}]", ratio, 0.0, 0.999)
        if self.round_to is not None and self.round_to < 1:
            raise UsageError(f"round_to={self.round_to} must be >= 1 (or None: multiples of 16 where a group has 16+)")
        if self.runtime not in ("onnxruntime", "eager"):
            raise UsageError(f"runtime={self.runtime!r}: use 'onnxruntime' or 'eager' (where latency is measured)")
        if self.latency_batch < 1 or self.latency_threads < 1:
            raise UsageError(
                f"latency_batch={self.latency_batch} and latency_threads={self.latency_threads} must be >= 1"
            )
        if self.steps < 1:
            raise UsageError(f"steps={self.steps} must be >= 1")
        if self.reconstruct not in (False, True, "all"):
            raise UsageError(
                f"reconstruct={self.reconstruct!r}: use True (the layers that lost inputs), 'all' or False"
            )
        if self.calibration_batches < 1:
            raise UsageError(f"calibration_batches={self.calibration_batches} must be >= 1")
        if self.taylor_batches < 1:
            raise UsageError(f"taylor_batches={self.taylor_batches} must be >= 1")
        if self.max_accuracy_drop is not None and self.max_accuracy_drop < 0:
            raise UsageError(f"max_accuracy_drop={self.max_accuracy_drop} must be >= 0 (accuracy points)")

    def step_of(self, units: int, unit: int, block: int = 16) -> int:
        """Units kept per step for a group of ``units`` units of ``unit`` channels (see ``round_to``; ``block``
        stands in for ``BLOCK`` when the default cannot reach the target)."""
        round_to = self.round_to if self.round_to is not None else block if unit == 1 and units >= block else 1
        return math.lcm(unit, round_to) // unit

    @property
    def importance_name(self) -> str:
        """The criterion's name: an ``Importance`` value, a registered name, or a callable's ``__name__``."""
        imp = self.importance
        if isinstance(imp, Importance):
            return imp.value
        if isinstance(imp, str):
            return imp
        return _name_of(imp) or str(getattr(imp, "__name__", type(imp).__name__))

    def to_dict(self, *, strict: bool = True) -> dict[str, Any]:
        """A JSON-safe dict; ``importance`` is saved by name. A callable not registered as a criterion has no
        name a recipe could load back: ``UsageError`` (``strict=False``: its ``__name__``, for records)."""
        data = super().to_dict()
        if strict and callable(self.importance) and _name_of(self.importance) is None:
            raise UsageError(
                f"PruneConfig.importance={self.importance_name!r} is a callable that is not registered, "
                "so the config cannot be saved; register it with "
                "@slimkit.pruning.register_importance('name') and pass the name"
            )
        data["importance"] = self.importance_name
        if self.finetune is not None and self.finetune.epochs == 0:
            data["finetune"] = 0
        return data


def _registered_name(value: object) -> bool:
    """``value`` names a criterion registered with ``register_importance`` (beyond the built-in ones)."""
    return isinstance(value, str) and value not in Importance._value2member_map_ and value in CRITERIA


def _name_of(criterion: object) -> str | None:
    """The name ``criterion`` is registered under (the built-ins included), or None."""
    return next((name for name, fn in CRITERIA.items() if fn is criterion), None)


def _no_training() -> TrainConfig:
    """``finetune=0``: the iterative loop prunes step by step without training (``TrainConfig`` needs epochs >= 1,
    and the loop never calls ``fit`` with it)."""
    config = TrainConfig()
    object.__setattr__(config, "epochs", 0)
    return config


ImportanceSpec = str | Importance | Callable
