"""Distillation losses as pure functions: Hinton KD, output distances (MSE, cosine, mean-pooled sentence
embeddings), FitNets hints, attention transfer, focal loss.

Everything here is stateless math on tensors (the adapters of ``hint_loss`` are passed in, built by
``hint_adapter``). The trainer in ``trainer.py`` wires these into ``slimkit.train.fit`` through its ``loss_fn`` hook.

Example:
    >>> s, t = torch.randn(8, 10), torch.randn(8, 10)
    >>> float(kd_loss(t, t, temperature=4.0))
    0.0
    >>> bool(kd_loss(s, t, temperature=4.0) > 0)
    True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.errors import UsageError

__all__ = [
    "attention_map",
    "attention_transfer_loss",
    "focal_loss",
    "hint_adapter",
    "hint_loss",
    "hinton_loss",
    "kd_loss",
    "mean_pool",
    "output_distance",
]


def _check_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise UsageError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape: the two models must share one output space"
        )


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise UsageError(f"temperature={temperature!r} must be > 0 (typical values: 1 to 20)")


def _spatial(features: torch.Tensor) -> tuple[int, int]:
    """``(H, W)`` of an ``(N, C, H, W)`` feature map (the output size when pooling another map to match it)."""
    return int(features.shape[2]), int(features.shape[3])


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al. 2015 soft-target loss: ``T² · KL(softmax(t/T) ‖ softmax(s/T))``, averaged over the batch.

    Both distributions are computed with ``log_softmax`` (no ``log(softmax)`` underflow). The gradient of the KL
    with respect to the student logits scales as ``1/T²``; the ``T²`` factor restores it, so changing the
    temperature does not change the effective learning rate of the soft term (nor its balance with the
    hard-label term).
    """
    _check_logits(student_logits, teacher_logits)
    _check_temperature(temperature)
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # half precision logits are summed in fp32
    log_p_student = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.detach().to(dtype) / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


def mean_pool(tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Sentence embeddings ``(N, C)`` from token embeddings ``(N, T, C)``: the mean over the tokens ``mask``
    ``(N, T)`` keeps (sentence-transformers' mean pooling); every token without a mask. A row whose mask keeps no
    token gives zeros.

    Example:
        >>> tokens = torch.tensor([[[1.0], [3.0], [100.0]]])
        >>> mean_pool(tokens, torch.tensor([[1, 1, 0]])).tolist()
        [[2.0]]
    """
    if tokens.ndim != 3:
        raise UsageError(f"mean pooling needs token embeddings (N, T, C); got {tuple(tokens.shape)}")
    if mask is None:
        return tokens.mean(dim=1)
    if tuple(mask.shape) != tuple(tokens.shape[:2]):
        raise UsageError(
            f"attention_mask {tuple(mask.shape)} does not match the tokens {tuple(tokens.shape[:2])} (N, T) "
            "of the output being pooled"
        )
    weights = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def output_distance(
    student: torch.Tensor, teacher: torch.Tensor, kind: str = "cosine", mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The distance between two outputs of the same shape: ``"mse"`` (mean squared error) or ``"cosine"``
    (``1 - cos`` along the last dimension, averaged over the rest). For token outputs ``(N, T, C)`` a ``mask``
    ``(N, T)`` leaves padding tokens out of the average. No labels, no temperature.

    Example:
        >>> x = torch.randn(4, 8)
        >>> float(output_distance(x, 3 * x, "cosine")) < 1e-6, float(output_distance(x, x, "mse"))
        (True, 0.0)
    """
    if student.shape != teacher.shape:
        raise UsageError(
            f"student output {tuple(student.shape)} and teacher output {tuple(teacher.shape)} differ in shape: "
            "output_loss='mse'/'cosine' compares them element by element (name another output with "
            "output_key=, or compare inner layers through hints, which learn a projection)"
        )
    dtype = torch.promote_types(student.dtype, torch.float32)
    s, t = student.to(dtype), teacher.detach().to(dtype)
    if kind == "mse":
        per_item = (s - t).pow(2).mean(dim=-1)
    elif kind == "cosine":
        per_item = 1 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)
    else:
        raise UsageError(f"output distance {kind!r} is not known; choose 'mse' or 'cosine'")
    return _token_mean(per_item, mask)


def _token_mean(per_token: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The mean of per-token values ``(N, T)`` over the tokens ``mask`` ``(N, T)`` keeps; the plain mean when there
    is no mask of that shape (the values are not per token)."""
    if mask is not None and per_token.ndim == 2 and tuple(mask.shape) == tuple(per_token.shape):
        weights = mask.to(per_token.dtype)
        return (per_token * weights).sum() / weights.sum().clamp_min(1.0)
    return per_token.mean()


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Lin et al. 2017 focal loss ``-(1 - p_t)^γ · log p_t``, averaged; ``gamma=0`` is plain cross-entropy."""
    if gamma < 0:
        raise UsageError(f"focal gamma={gamma!r} must be >= 0 (0 is plain cross-entropy)")
    log_p = F.log_softmax(logits.float(), dim=-1).gather(1, targets.long().unsqueeze(1)).squeeze(1)
    if gamma == 0:
        return -log_p.mean()
    return -((1 - log_p.exp()).clamp_min(0) ** gamma * log_p).mean()


def hinton_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    alpha: float,
    focal_gamma: float = 0.0,
    terms: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``alpha · kd_loss + (1 - alpha) · CE(student, targets)`` (focal loss for the hard term when ``focal_gamma``).

    A term whose weight is 0 is not computed. ``terms``, when given, receives the unweighted terms that were
    computed (``"kd"``, ``"hard"``), for logging.

    Example:
        >>> logits, labels = torch.tensor([[2.0, 0.0]]), torch.tensor([0])
        >>> parts = {}
        >>> round(float(hinton_loss(logits, logits, labels, 4.0, 0.5, terms=parts)), 4), sorted(parts)
        (0.0635, ['hard', 'kd'])
    """
    if not 0.0 <= alpha <= 1.0:
        raise UsageError(f"alpha={alpha!r} is out of range; allowed [0, 1] (weight of the soft KD term)")
    parts = {} if terms is None else terms
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    loss = torch.zeros((), dtype=dtype, device=student_logits.device)
    if alpha > 0:
        parts["kd"] = kd_loss(student_logits, teacher_logits, temperature)
        loss = loss + alpha * parts["kd"]
    if alpha < 1:
        parts["hard"] = focal_loss(student_logits, targets, focal_gamma)
        loss = loss + (1 - alpha) * parts["hard"]
    return loss


def hint_adapter(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> nn.Module:
    """The learned regressor mapping a student feature to the teacher's width (FitNets, Romero et al. 2015).

    ``(N, Cs)`` features and ``(N, T, Cs)`` token features (transformer hidden states) get ``Linear(Cs, Ct)`` (on
    the last dimension); ``(N, Cs, H, W)`` maps get a 1x1 ``Conv2d(Cs, Ct)``. Equal widths get ``Identity``
    (nothing to learn). Shapes include the batch dimension; only the channel dimension is compared.

    Example:
        >>> hint_adapter((8, 10, 32), (8, 10, 64))
        Linear(in_features=32, out_features=64, bias=True)
    """
    s_dims, t_dims = len(student_shape), len(teacher_shape)
    if s_dims != t_dims or s_dims not in (2, 3, 4):
        raise UsageError(
            f"hint features must both be (N, C) or both (N, C, H, W) (or both (N, T, C) tokens); got student "
            f"{tuple(student_shape)} and teacher {tuple(teacher_shape)}"
        )
    channel = -1 if s_dims == 3 else 1
    c_student, c_teacher = student_shape[channel], teacher_shape[channel]
    if c_student == c_teacher:
        return nn.Identity()
    if s_dims in (2, 3):
        return nn.Linear(c_student, c_teacher)
    return nn.Conv2d(c_student, c_teacher, kernel_size=1, bias=False)


def hint_loss(
    student_features: torch.Tensor,
    teacher_features: torch.Tensor,
    adapter: nn.Module | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """FitNets hint: mean squared error between ``adapter(student_features)`` and the teacher's features.

    Feature maps of different spatial size are matched by adaptive average pooling of the student's map; token
    features ``(N, T, C)`` must have the same number of tokens, and a ``mask`` ``(N, T)`` (the inputs' attention
    mask) leaves padding tokens out of the mean: their states are computed but never read.

    Example:
        >>> s, t = torch.zeros(1, 3, 2), torch.tensor([[[1.0, 1.0], [1.0, 1.0], [9.0, 9.0]]])
        >>> round(float(hint_loss(s, t)), 2), float(hint_loss(s, t, mask=torch.tensor([[1, 1, 0]])))
        (27.67, 1.0)
    """
    projected = adapter(student_features) if adapter is not None else student_features
    teacher_features = teacher_features.detach()
    if projected.ndim == teacher_features.ndim == 4 and projected.shape[2:] != teacher_features.shape[2:]:
        projected = F.adaptive_avg_pool2d(projected, _spatial(teacher_features))
    if projected.shape != teacher_features.shape:
        raise UsageError(
            f"hint: student features {tuple(student_features.shape)} (after the adapter "
            f"{tuple(projected.shape)}) do not match teacher features {tuple(teacher_features.shape)}; "
            "build the adapter with hint_adapter(student_shape, teacher_shape)"
        )
    if mask is not None and projected.ndim == 3:
        return _token_mean((projected.float() - teacher_features.float()).pow(2).mean(dim=-1), mask)
    return F.mse_loss(projected.float(), teacher_features.float())


def attention_map(features: torch.Tensor, p: int = 2) -> torch.Tensor:
    """Zagoruyko & Komodakis 2017 spatial attention: ``mean_c |A_c|^p`` flattened and L2-normalized, ``(N, H·W)``."""
    if features.ndim != 4:
        raise UsageError(
            f"attention transfer needs convolutional feature maps (N, C, H, W); got {tuple(features.shape)}"
        )
    return F.normalize(features.float().abs().pow(p).mean(dim=1).flatten(1), dim=1)


def attention_transfer_loss(student_features: torch.Tensor, teacher_features: torch.Tensor, p: int = 2) -> torch.Tensor:
    """Mean squared distance between normalized attention maps (the authors' reference form, their β/2 not applied).

    Channel counts may differ (the maps average over channels); a student map of another spatial size is pooled
    to the teacher's.
    """
    teacher_features = teacher_features.detach()
    if (
        student_features.ndim == 4
        and teacher_features.ndim == 4
        and student_features.shape[2:] != teacher_features.shape[2:]
    ):
        student_features = F.adaptive_avg_pool2d(student_features, _spatial(teacher_features))
    return (attention_map(student_features, p) - attention_map(teacher_features, p)).pow(2).mean()
