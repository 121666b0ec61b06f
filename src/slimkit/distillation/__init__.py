"""Knowledge distillation: a frozen teacher trains a smaller student, or helps a compressed model recover.

- ``distill(student, teacher, DistillConfig(...), train, val)`` trains a copy of the student (Hinton KD, plus
  FitNets hints and attention transfer between named layers) and returns ``DistillResult(model, record)``.
- ``kd_loss_fn(teacher, config)`` is the ``slimkit.train`` loss hook that pruning, QAT and the pipeline use for
  recovery (teacher = the uncompressed model).
- ``losses`` holds the pure loss functions (``kd_loss``, ``hinton_loss``, ``hint_loss``, ``attention_transfer_loss``,
  ``focal_loss``).

Example:
    >>> cfg = DistillConfig(temperature=4.0, alpha=0.9)                       # doctest: +SKIP
    >>> result = slimkit.distill(student, teacher, cfg, train, test)          # doctest: +SKIP
    >>> result.model, result.record["student_accuracy"]                       # doctest: +SKIP
"""

from __future__ import annotations

from slimkit.distillation.config import DistillConfig
from slimkit.distillation.losses import (
    attention_map,
    attention_transfer_loss,
    focal_loss,
    hint_adapter,
    hint_loss,
    hinton_loss,
    kd_loss,
)
from slimkit.distillation.trainer import DistillResult, distill, kd_loss_fn

__all__ = ["DistillConfig", "DistillResult", "attention_map", "attention_transfer_loss", "distill", "focal_loss",
           "hint_adapter", "hint_loss", "hinton_loss", "kd_loss", "kd_loss_fn"]
