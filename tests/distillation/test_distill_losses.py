"""The pure distillation losses: exact numerics against hand-computed forms, shapes of the hint adapters."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from slimkit.distillation import (
    attention_map,
    attention_transfer_loss,
    focal_loss,
    hint_adapter,
    hint_loss,
    hinton_loss,
    kd_loss,
)


def hand_kd(student: np.ndarray, teacher: np.ndarray, temperature: float) -> float:
    """T² · mean over the batch of Σ_c p_t (log p_t - log p_s), written out in float64."""

    def softmax(z):
        e = np.exp(z / temperature - (z / temperature).max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    p_t, p_s = softmax(teacher), softmax(student)
    kl = (p_t * (np.log(p_t) - np.log(p_s))).sum(axis=1).mean()
    return temperature**2 * kl


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.5, 4.0, 20.0])
def test_kd_loss_equals_hand_computed_kl(temperature):
    gen = torch.Generator().manual_seed(int(temperature * 10))
    student, teacher = torch.randn(16, 10, generator=gen) * 3, torch.randn(16, 10, generator=gen) * 3
    expected = hand_kd(student.double().numpy(), teacher.double().numpy(), temperature)
    assert kd_loss(student, teacher, temperature).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 4.0, 20.0])
def test_kd_loss_is_zero_for_identical_and_shifted_logits(temperature):
    logits = torch.randn(8, 10, generator=torch.Generator().manual_seed(0)) * 5
    assert kd_loss(logits, logits.clone(), temperature).item() == 0.0
    # softmax ignores a per-row constant: the same distribution, so no loss either (float64: no rounding noise)
    shifted = kd_loss(logits.double() + 7.0, logits.double(), temperature).item()
    assert shifted == pytest.approx(0.0, abs=1e-10)


def test_kd_loss_is_a_kl_not_a_sum_of_log_differences():
    student, teacher = torch.tensor([[3.0, 0.5, -1.0]]), torch.tensor([[0.0, 1.0, -2.0]])
    loss = kd_loss(student, teacher, 1.0).item()
    p_t, log_p_s = F.softmax(teacher, 1), F.log_softmax(student, 1)
    assert loss == pytest.approx((p_t * (p_t.log() - log_p_s)).sum().item(), rel=1e-6)
    # the common mistake: an unweighted sum of log-probability differences (not a divergence at all)
    wrong = (p_t.log() - log_p_s).sum().item()
    assert loss > 0 and loss != pytest.approx(wrong, rel=0.05)
    # the direction matters: KL(teacher ‖ student), not KL(student ‖ teacher)
    assert kd_loss(teacher, student, 1.0).item() != pytest.approx(loss, rel=0.05)


def _grad(student: torch.Tensor, teacher: torch.Tensor, temperature: float, t_squared: bool = True) -> torch.Tensor:
    student = student.clone().requires_grad_(True)
    loss = kd_loss(student, teacher, temperature)
    if not t_squared:
        loss = loss / temperature**2
    loss.backward()
    return student.grad


def test_kd_gradient_is_the_analytic_form_at_every_temperature():
    student, teacher = torch.randn(4, 10, dtype=torch.float64), torch.randn(4, 10, dtype=torch.float64)
    for temperature in (1.0, 2.5, 4.0, 20.0):
        expected = temperature * (F.softmax(student / temperature, 1) - F.softmax(teacher / temperature, 1)) / 4
        torch.testing.assert_close(_grad(student, teacher, temperature), expected, rtol=1e-9, atol=1e-12)


def test_kd_gradient_scale_is_temperature_independent():
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(32, 10, generator=gen), torch.randn(32, 10, generator=gen)
    temperatures = (5.0, 10.0, 20.0, 40.0)
    norms = [_grad(student, teacher, t).norm().item() for t in temperatures]
    assert max(norms) / min(norms) < 1.25
    # the high-temperature limit is T-free: (s - t) centred per row, divided by classes and batch
    student, teacher = student.double(), teacher.double()
    diff = student - teacher
    limit = (diff - diff.mean(1, keepdim=True)) / (10 * 32)
    torch.testing.assert_close(_grad(student, teacher, 200.0), limit, rtol=0.05, atol=5e-5)
    # without the T² factor the gradient would shrink like 1/T²
    raw = [_grad(student, teacher, t, t_squared=False).norm().item() for t in temperatures]
    assert raw[0] / raw[-1] == pytest.approx((temperatures[-1] / temperatures[0]) ** 2, rel=0.25)


@settings(max_examples=50, deadline=None)
@given(st.floats(0.1, 50.0), st.floats(1.0, 1e4))
def test_kd_loss_is_finite_and_non_negative_for_extreme_logits(temperature, scale):
    gen = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(4, 10, generator=gen) * scale, torch.randn(4, 10, generator=gen) * scale
    loss = kd_loss(student, teacher, temperature)
    assert torch.isfinite(loss) and loss.item() >= -1e-4


def test_kd_loss_rejects_bad_input():
    with pytest.raises(ValueError, match="temperature=0"):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 3), 0)
    with pytest.raises(ValueError, match="one output space"):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 4), 1.0)


def test_hinton_loss_mixes_soft_and_hard_terms():
    student, teacher, targets = torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,))
    soft, hard = kd_loss(student, teacher, 3.0), F.cross_entropy(student, targets)
    assert hinton_loss(student, teacher, targets, 3.0, 1.0).item() == pytest.approx(soft.item(), rel=1e-6)
    assert hinton_loss(student, teacher, targets, 3.0, 0.0).item() == pytest.approx(hard.item(), rel=1e-6)
    mixed = hinton_loss(student, teacher, targets, 3.0, 0.7).item()
    assert mixed == pytest.approx(0.7 * soft.item() + 0.3 * hard.item(), rel=1e-6)
    with pytest.raises(ValueError, match=r"alpha=1.5 .*\[0, 1\]"):
        hinton_loss(student, teacher, targets, 3.0, 1.5)


def test_focal_loss_matches_its_formula():
    logits, targets = torch.randn(16, 5), torch.randint(0, 5, (16,))
    assert focal_loss(logits, targets, 0.0).item() == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-6)
    p_t = F.softmax(logits, 1).gather(1, targets[:, None]).squeeze(1)
    expected = (-((1 - p_t) ** 2) * p_t.log()).mean().item()
    assert focal_loss(logits, targets, 2.0).item() == pytest.approx(expected, rel=1e-5)
    assert focal_loss(logits, targets, 2.0) < focal_loss(logits, targets, 0.0)
    with pytest.raises(ValueError, match="gamma"):
        focal_loss(logits, targets, -1.0)


@pytest.mark.parametrize(
    ("student_shape", "teacher_shape", "kind", "weight_shape"),
    [
        ((32, 30), (32, 200), nn.Linear, (200, 30)),
        ((32, 4, 7, 7), (32, 16, 7, 7), nn.Conv2d, (16, 4, 1, 1)),
        ((32, 16, 7, 7), (32, 6, 7, 7), nn.Conv2d, (6, 16, 1, 1)),
        ((32, 200), (32, 200), nn.Identity, None),
    ],
)
def test_hint_adapter_shapes(student_shape, teacher_shape, kind, weight_shape):
    adapter = hint_adapter(student_shape, teacher_shape)
    assert isinstance(adapter, kind)
    if weight_shape is not None:
        assert tuple(adapter.weight.shape) == weight_shape
    assert adapter(torch.randn(student_shape)).shape == teacher_shape


def test_hint_adapter_rejects_mixed_ranks():
    with pytest.raises(ValueError, match=r"both be \(N, C\) or both \(N, C, H, W\)"):
        hint_adapter((8, 30), (8, 16, 7, 7))


def test_hint_loss_is_mse_after_the_adapter():
    student, teacher = torch.randn(4, 8, 5, 5), torch.randn(4, 8, 5, 5)
    assert hint_loss(teacher, teacher).item() == 0.0
    assert hint_loss(student, teacher).item() == pytest.approx(F.mse_loss(student, teacher).item())
    adapter = hint_adapter((4, 3, 5, 5), (4, 8, 5, 5))
    narrow = torch.randn(4, 3, 5, 5)
    assert hint_loss(narrow, teacher, adapter).item() == pytest.approx(F.mse_loss(adapter(narrow), teacher).item())
    with pytest.raises(ValueError, match="hint_adapter"):
        hint_loss(narrow, teacher)


def test_attention_map_is_normalized_channel_mean_of_squares():
    features = torch.randn(2, 6, 4, 4)
    att = attention_map(features)
    assert att.shape == (2, 16)
    torch.testing.assert_close(att.norm(dim=1), torch.ones(2))
    expected = features.pow(2).mean(1).flatten(1)
    torch.testing.assert_close(att, expected / expected.norm(dim=1, keepdim=True))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        attention_map(torch.randn(2, 6))


def test_attention_transfer_ignores_channel_count_and_scale_but_not_layout():
    teacher = torch.randn(2, 8, 6, 6)
    # a student with half the channels but the same spatial energy (and another scale) matches exactly
    student = 3.0 * teacher.reshape(2, 4, 2, 6, 6).pow(2).mean(2).sqrt()
    assert attention_transfer_loss(student, teacher).item() == pytest.approx(0.0, abs=1e-7)
    moved = torch.roll(teacher, shifts=3, dims=3)
    assert attention_transfer_loss(moved, teacher).item() > 1e-4
    # another spatial size is pooled to the teacher's
    assert math.isfinite(attention_transfer_loss(torch.randn(2, 4, 12, 12), teacher).item())
