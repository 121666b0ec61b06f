"""``DistillConfig``: the settings of ``slimkit.distill`` and of the recovery loss ``kd_loss_fn``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from slimkit.config import Config, check_range, short_repr
from slimkit.errors import UsageError
from slimkit.train import Optimizer, Schedule, TrainConfig

LayerPairs = tuple[tuple[str, str], ...]


def _layer_pairs(name: str, value) -> LayerPairs:
    pairs = []
    example = "e.g. [['features.3', 'features.3']]"
    if value is not None and not isinstance(value, (list, tuple)):
        raise UsageError(f"{name}={short_repr(value)}: expected a list of (student_layer, teacher_layer) pairs, "
                         f"{example}")
    for item in value or ():
        if not isinstance(item, (list, tuple)) or len(item) != 2 or not all(isinstance(n, str) for n in item):
            raise UsageError(f"{name}: each entry must be a (student_layer, teacher_layer) pair of module names, "
                             f"{example}; got {short_repr(item)}")
        pairs.append((item[0], item[1]))
    return tuple(pairs)


@dataclass
class DistillConfig(Config):
    """Settings of knowledge distillation.

    The loss is ``alpha · T² · KL(teacher_T ‖ student_T) + (1 - alpha) · hard`` (``hard`` is cross-entropy, or
    focal loss when ``focal_gamma > 0``) ``+ hint_weight · Σ hint MSE + attention_weight · Σ attention loss``.

    Args:
        temperature: softmax temperature T (> 0) of both models in the soft term.
        alpha: weight of the soft KD term in [0, 1]; ``1 - alpha`` weighs the hard-label term.
        hints: FitNets pairs ``(student_layer, teacher_layer)`` of module names (see ``model.named_modules()``);
            a learned linear / 1x1-conv adapter is added where the widths differ.
        attention: attention-transfer pairs ``(student_layer, teacher_layer)`` of convolutional feature maps.
        attention_weight: β/2 of Zagoruyko & Komodakis (they use β = 1000).
        cache_teacher: compute the teacher's logits on the training set once (only for data without augmentation;
            not with hints or attention, which need the teacher's features of every batch).
        epochs, lr, optimizer, momentum, weight_decay, batch_size, schedule, seed, max_batches, restore_best,
            progress: the
            training run, as in ``slimkit.train.TrainConfig``.

    Example:
        >>> DistillConfig(temperature=4.0, alpha=0.9, epochs=10).train_config().epochs
        10
    """

    temperature: float = 4.0
    alpha: float = 0.9
    focal_gamma: float = 0.0
    hints: LayerPairs = ()
    hint_weight: float = 1.0
    attention: LayerPairs = ()
    attention_weight: float = 500.0
    cache_teacher: bool = False
    epochs: int = 10
    lr: float = 1e-3
    optimizer: Optimizer = Optimizer.ADAM
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 128
    schedule: Schedule = Schedule.COSINE
    seed: int = 0
    max_batches: int | None = None
    restore_best: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        self.hints = _layer_pairs("hints", self.hints)  # before the type check: its message shows the shape
        self.attention = _layer_pairs("attention", self.attention)
        super().__post_init__()
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not self.temperature > 0:
            raise UsageError(f"temperature={self.temperature!r} must be a number > 0 (typical values: 1 to 20)")
        check_range("alpha", self.alpha, 0.0, 1.0)
        if self.focal_gamma < 0:
            raise UsageError(f"focal_gamma={self.focal_gamma!r} must be >= 0 (0: plain cross-entropy)")
        if self.hint_weight < 0 or self.attention_weight < 0:
            raise UsageError(f"hint_weight={self.hint_weight!r} and attention_weight={self.attention_weight!r} "
                             "must be >= 0")
        if self.cache_teacher and (self.hints or self.attention):
            raise UsageError("cache_teacher=True caches the teacher's logits only; hints and attention transfer "
                             "need its features on every batch: set cache_teacher=False or drop hints/attention")
        self.train_config()  # validates epochs, lr, batch size, weight decay with TrainConfig's messages

    def train_config(self) -> TrainConfig:
        """The ``slimkit.train.TrainConfig`` of the training run (the fields the two configs share)."""
        shared = {f.name for f in dataclasses.fields(TrainConfig)}
        return TrainConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name in shared})
