"""Knowledge distillation: a frozen teacher trains a smaller student, or helps a compressed model recover.

- ``distill(student, teacher, DistillConfig(...), train, val)`` trains a copy of the student (Hinton KD on logits,
  or ``output_loss="mse"`` / ``"cosine"`` on any output without labels, plus FitNets hints - token features too -
  and attention transfer between named layers) and returns ``DistillResult(model, record)``.
- ``kd_loss_fn(teacher, config)`` is the ``slimkit.train`` loss hook that pruning, QAT and the pipeline use for
  recovery (teacher = the uncompressed model).
- ``losses`` holds the pure loss functions (``kd_loss``, ``hinton_loss``, ``hint_loss``, ``attention_transfer_loss``,
  ``focal_loss``).

Example:
    >>> import torch
    >>> from torch.utils.data import TensorDataset
    >>> data = TensorDataset(torch.randn(64, 8), torch.randint(0, 3, (64,)))
    >>> teacher, student = torch.nn.Linear(8, 3), torch.nn.Linear(8, 3)
    >>> cfg = DistillConfig(temperature=4.0, alpha=0.9, epochs=2, batch_size=16, progress=False)
    >>> result = distill(student, teacher, cfg, data, data)
    >>> len(result.record["train_loss"]), result.record["student_accuracy"] is not None
    (2, True)
"""

from __future__ import annotations

from slimkit.distillation.config import DistillConfig, OutputLoss, Pooling
from slimkit.distillation.losses import (
    attention_map,
    attention_transfer_loss,
    focal_loss,
    hint_adapter,
    hint_loss,
    hinton_loss,
    kd_loss,
    mean_pool,
    output_distance,
)
from slimkit.distillation.trainer import DistillResult, distill, kd_loss_fn

__all__ = [
    "DistillConfig",
    "DistillResult",
    "OutputLoss",
    "Pooling",
    "attention_map",
    "attention_transfer_loss",
    "distill",
    "focal_loss",
    "hint_adapter",
    "hint_loss",
    "hinton_loss",
    "kd_loss",
    "kd_loss_fn",
    "mean_pool",
    "output_distance",
]
