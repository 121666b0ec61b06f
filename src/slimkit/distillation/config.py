"""``DistillConfig``: the settings of ``slimkit.distill`` and of the recovery loss ``kd_loss_fn``."""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any

from slimkit.config import Config, FlatField, check_range, nested_config, short_repr
from slimkit.errors import UsageError
from slimkit.train import Optimizer, Precision, Schedule, TrainConfig

__all__ = ["DistillConfig", "LayerPairs", "OutputLoss", "Pooling"]

LayerPairs = tuple[tuple[str, str], ...]

#: ``TrainConfig`` field names that ``DistillConfig`` also takes flat (``DistillConfig(epochs=4)``, recipe keys)
TRAIN_KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(TrainConfig))
DEFAULT_EPOCHS = 10  # a distillation run defaults to more epochs than TrainConfig's 5
# A distillation run defaults to Adam at 1e-2, not TrainConfig's 1e-3: the students distillation is for (small
# models, 10 epochs) are under-trained at 1e-3 (benchmarks/distill.py section 3: 784-32-10 on the labels 90.8 /
# 92.2 / 92.9% at 1e-3 / 3e-3 / 1e-2 on a validation split), and soft targets allow "a much higher learning rate"
# (Hinton et al. 2015, section 1). Measured: labels trained with the same settings gain as much, so this default
# is a training setting, not something KD adds (docs/distillation.md, "Defaults"). Fine-tuning a pretrained model
# wants a smaller lr (pass lr=).
DEFAULT_LR = 1e-2
# T=1, alpha=0.5: the best (T, alpha) of (1, 0.5), (2, 0.5), (1, 1), (4, 1), (4, 0.9) at lr 1e-2 on that validation
# split (within noise of each other and of the labels); Hinton's T=4 / alpha=0.9 lost 0.6-1.6 points to the labels
# at each of 1e-3, 3e-3, 1e-2
DEFAULT_TEMPERATURE = 1.0
DEFAULT_ALPHA = 0.5


class OutputLoss(str, enum.Enum):
    """How the student's output is compared with the teacher's."""

    KL = "kl"  # Hinton KD on logits (temperature, alpha with labels)
    MSE = "mse"  # mean squared error between the outputs (embeddings, hidden states); no labels
    COSINE = "cosine"  # 1 - cosine similarity along the last dimension; no labels


class Pooling(str, enum.Enum):
    """What is done to a token output ``(N, T, C)`` before the output loss."""

    NONE = "none"  # compare token by token (padding tokens left out when the inputs hold an attention mask)
    MEAN = "mean"  # mean over the tokens the attention mask keeps: a sentence embedding (sentence-transformers)


def _layer_pairs(name: str, value: Any) -> LayerPairs:
    pairs = []
    example = "e.g. [['features.3', 'features.3']]"
    if value is not None and not isinstance(value, (list, tuple)):
        raise UsageError(
            f"{name}={short_repr(value)}: expected a list of (student_layer, teacher_layer) pairs, {example}"
        )
    for item in value or ():
        if not isinstance(item, (list, tuple)) or len(item) != 2 or not all(isinstance(n, str) for n in item):
            raise UsageError(
                f"{name}: each entry must be a (student_layer, teacher_layer) pair of module names, "
                f"{example}; got {short_repr(item)}"
            )
        pairs.append((item[0], item[1]))
    return tuple(pairs)


@dataclass(init=False)
class DistillConfig(Config):
    """Settings of knowledge distillation: the KD terms, plus the training run as an embedded ``TrainConfig``.

    With ``output_loss="kl"`` the loss is ``alpha · T² · KL(teacher_T ‖ student_T) + (1 - alpha) · hard``
    (``hard`` is cross-entropy, or focal loss when ``focal_gamma > 0``) ``+ hint_weight · Σ hint MSE +
    attention_weight · Σ attention loss``. With ``"mse"`` / ``"cosine"`` the first term is the distance between the
    two models' outputs (no labels, no temperature); hints and attention are added the same way.

    Args:
        output_loss: ``"kl"`` (Hinton KD on logits), ``"mse"`` or ``"cosine"`` (``1 - cos``) between the outputs
            themselves: embeddings, hidden states, any tensor; these need no labels.
        output_key: the key of a dict / ``ModelOutput`` output to compare (``"pooler_output"``,
            ``"sentence_embedding"``); ``None``: the output's first tensor (``logits``, ``last_hidden_state``).
        pooling: ``"mean"`` averages a token output ``(N, T, C)`` over the tokens the input dict's
            ``attention_mask`` keeps (all tokens without one) before the loss: the sentence embedding of a
            sentence-transformers model. ``"none"`` compares token by token (mse / cosine leave masked tokens out).
        student_dropout: whether the student's Dropout modules stay active while it trains. ``None`` (default):
            off for ``"mse"`` / ``"cosine"`` (the student regresses the teacher's exact outputs; on all-MiniLM-L6-v2
            pruned by 30% dropout off lifts the recovered cosine from 0.939 to 0.946), on for ``"kl"``. Their rates
            are restored on the returned student.
        temperature: softmax temperature T (> 0) of both models in the soft term (default 1; Hinton et al. used
            up to 20 for students trained long enough to overfit the labels).
        alpha: weight of the soft KD term in [0, 1] (default 0.5); ``1 - alpha`` weighs the hard-label term. Data
            without labels needs ``alpha=1`` (or ``output_loss="mse"`` / ``"cosine"``).
        focal_gamma: focal-loss γ of the hard term (0: plain cross-entropy).
        hints: FitNets pairs ``(student_layer, teacher_layer)`` of module names (see ``model.named_modules()``);
            features ``(N, C)``, token features ``(N, T, C)`` or maps ``(N, C, H, W)``; a learned ``Linear`` /
            1x1-conv adapter is added where the widths differ. Token hints leave out the tokens the inputs'
            ``attention_mask`` drops (padding).
        hint_weight: weight of each hint term.
        attention: attention-transfer pairs ``(student_layer, teacher_layer)`` of convolutional feature maps.
        attention_weight: β/2 of Zagoruyko & Komodakis (they use β = 1000).
        cache_teacher: compute the teacher's logits on the training set once (only for labelled data without
            augmentation and ``output_loss="kl"``; not with hints or attention, which need the teacher's features of
            every batch).
        train: the training run, a ``slimkit.train.TrainConfig`` (or a mapping of its fields); by default
            ``TrainConfig(epochs=10, lr=1e-2)`` (Adam, batch 128, cosine; see ``DEFAULT_LR`` for why not 1e-3).
        epochs, lr, optimizer, momentum, weight_decay, batch_size, schedule, seed, patience, max_batches,
            max_seconds, restore_best, progress, precision: flat spellings of the ``train`` fields (keyword only, as in
            recipes); they are applied on top of ``train``. ``config.epochs`` reads and writes
            ``config.train.epochs``. ``precision="bf16"`` runs the student's and the teacher's forward in bfloat16
            (``torch.autocast``): on CPUs with bf16 kernels (AVX512-BF16, AMX) about 1.7x the steps per second.

    ``to_dict`` writes the nested form (``{"temperature": ..., "train": {"epochs": ...}}``); ``from_dict`` reads it
    and the flat one (``{"temperature": 4.0, "epochs": 4, "lr": 0.01}``). A ``train`` given whole (a ``TrainConfig``
    or a mapping) is taken as it is: the fields it leaves out are ``TrainConfig``'s defaults (lr 1e-3, 5 epochs), not
    the distiller's.

    Example:
        >>> cfg = DistillConfig(temperature=4.0, alpha=0.9, epochs=3)
        >>> cfg.train.epochs, cfg.epochs, cfg.lr
        (3, 3, 0.01)
        >>> cfg == DistillConfig(temperature=4.0, alpha=0.9, train=TrainConfig(epochs=3, lr=0.01))
        True
        >>> flat = {"temperature": 4.0, "alpha": 0.9, "epochs": 3}
        >>> DistillConfig.from_dict(cfg.to_dict()) == cfg == DistillConfig.from_dict(flat)
        True
    """

    temperature: float = DEFAULT_TEMPERATURE
    alpha: float = DEFAULT_ALPHA
    focal_gamma: float = 0.0
    hints: LayerPairs = ()
    hint_weight: float = 1.0
    attention: LayerPairs = ()
    attention_weight: float = 500.0
    cache_teacher: bool = False
    output_loss: OutputLoss = OutputLoss.KL
    output_key: str | None = None
    pooling: Pooling = Pooling.NONE
    student_dropout: bool | None = None
    train: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(epochs=DEFAULT_EPOCHS, lr=DEFAULT_LR))

    # the flat spellings of the training fields (not dataclass fields: no annotation)
    epochs = FlatField[int]("train")
    lr = FlatField[float]("train")
    optimizer = FlatField[Optimizer]("train")
    momentum = FlatField[float]("train")
    weight_decay = FlatField[float]("train")
    batch_size = FlatField[int]("train")
    schedule = FlatField[Schedule]("train")
    seed = FlatField[int]("train")
    patience = FlatField[int]("train")
    max_batches = FlatField["int | None"]("train")
    max_seconds = FlatField["float | None"]("train")
    restore_best = FlatField[bool]("train")
    precision = FlatField[Precision]("train")
    progress = FlatField[bool]("train")

    def __init__(
        self,
        temperature: float = DEFAULT_TEMPERATURE,
        alpha: float = DEFAULT_ALPHA,
        focal_gamma: float = 0.0,
        hints: LayerPairs | list[Any] = (),
        hint_weight: float = 1.0,
        attention: LayerPairs | list[Any] = (),
        attention_weight: float = 500.0,
        cache_teacher: bool = False,
        train: TrainConfig | dict[str, Any] | None = None,
        *,
        output_loss: OutputLoss | str = OutputLoss.KL,
        output_key: str | None = None,
        pooling: Pooling | str = Pooling.NONE,
        student_dropout: bool | None = None,
        epochs: int | None = None,
        lr: float | None = None,
        optimizer: Optimizer | str | None = None,
        momentum: float | None = None,
        weight_decay: float | None = None,
        batch_size: int | None = None,
        schedule: Schedule | str | None = None,
        seed: int | None = None,
        patience: int | None = None,
        max_batches: int | None = None,
        max_seconds: float | None = None,
        restore_best: bool | None = None,
        progress: bool | None = None,
        precision: Precision | str | None = None,
    ) -> None:
        given = {
            "epochs": epochs,
            "lr": lr,
            "optimizer": optimizer,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "batch_size": batch_size,
            "schedule": schedule,
            "seed": seed,
            "patience": patience,
            "max_batches": max_batches,
            "max_seconds": max_seconds,
            "restore_best": restore_best,
            "progress": progress,
            "precision": precision,
        }
        flat = {key: value for key, value in given.items() if value is not None}
        self.temperature = temperature
        self.alpha = alpha
        self.focal_gamma = focal_gamma
        self.hints = _layer_pairs("hints", hints)
        self.hint_weight = hint_weight
        self.attention = _layer_pairs("attention", attention)
        self.attention_weight = attention_weight
        self.cache_teacher = cache_teacher
        self.output_loss = output_loss  # type: ignore[assignment]  # a str is turned into the enum by __post_init__
        self.output_key = output_key
        self.pooling = pooling  # type: ignore[assignment]
        self.student_dropout = student_dropout
        self.train = nested_config(
            TrainConfig, "DistillConfig", "train", train, flat, {"epochs": DEFAULT_EPOCHS, "lr": DEFAULT_LR}
        )
        self.__post_init__()

    @property
    def dropout_active(self) -> bool:
        """Whether the student's Dropout modules stay active during distillation (see ``student_dropout``)."""
        if self.student_dropout is not None:
            return self.student_dropout
        return self.output_loss is OutputLoss.KL

    def __post_init__(self) -> None:
        self.hints = _layer_pairs("hints", self.hints)  # before the type check: its message shows the shape
        self.attention = _layer_pairs("attention", self.attention)
        super().__post_init__()
        if (
            isinstance(self.temperature, bool)
            or not isinstance(self.temperature, (int, float))
            or not self.temperature > 0
        ):
            raise UsageError(f"temperature={self.temperature!r} must be a number > 0 (typical values: 1 to 20)")
        check_range("alpha", self.alpha, 0.0, 1.0)
        if self.focal_gamma < 0:
            raise UsageError(f"focal_gamma={self.focal_gamma!r} must be >= 0 (0: plain cross-entropy)")
        if self.hint_weight < 0 or self.attention_weight < 0:
            raise UsageError(
                f"hint_weight={self.hint_weight!r} and attention_weight={self.attention_weight!r} must be >= 0"
            )
        if self.output_key is not None and not self.output_key:
            raise UsageError("output_key='' must name a key of the model's output (or be None: its first tensor)")
        if self.student_dropout not in (None, True, False):
            raise UsageError(f"student_dropout={self.student_dropout!r}: use True, False or None (automatic)")
        if self.pooling is Pooling.MEAN and self.output_loss is OutputLoss.KL:
            raise UsageError(
                "pooling='mean' averages token embeddings, which output_loss='kl' (logits) does not compare: "
                "set output_loss='cosine' or 'mse', or pooling='none'"
            )
        if self.cache_teacher and self.output_loss is not OutputLoss.KL:
            raise UsageError(
                f"cache_teacher=True caches logits for output_loss='kl' only, not {self.output_loss.value!r}: "
                "set cache_teacher=False"
            )
        if self.cache_teacher and (self.hints or self.attention):
            raise UsageError(
                "cache_teacher=True caches the teacher's logits only; hints and attention transfer "
                "need its features on every batch: set cache_teacher=False or drop hints/attention"
            )

    def train_config(self) -> TrainConfig:
        """The ``slimkit.train.TrainConfig`` of the training run (``self.train``; kept for older callers)."""
        return self.train
