"""Property tests of the pure quantization math."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slimkit.quantization import lowbit
from slimkit.quantization.math import (
    Observer,
    dequantize,
    fake_quantize,
    group_view,
    kl_range,
    mse_range,
    percentile_range,
    qparams,
    qrange,
    quantize,
    quantize_weight,
    ungroup,
)

floats = st.floats(-100, 100, allow_nan=False, width=32)
tensors = st.lists(floats, min_size=2, max_size=64).map(lambda v: torch.tensor(v, dtype=torch.float32))


@settings(max_examples=60, deadline=None)
@given(tensors, st.integers(2, 8), st.booleans())
def test_error_bounded_by_half_step_and_codes_in_range(x, bits, symmetric):
    scale, zp = qparams(x.min(), x.max(), bits, symmetric)
    qmin, qmax = qrange(bits, symmetric)
    q = quantize(x, scale, zp, qmin, qmax)
    assert torch.equal(q, q.round())
    assert q.min() >= qmin and q.max() <= qmax
    err = (dequantize(q, scale, zp) - x).abs()
    assert err.max() <= scale / 2 * (1 + 1e-4) + 1e-6


@settings(max_examples=60, deadline=None)
@given(tensors, st.integers(2, 8), st.booleans())
def test_fake_quantize_is_idempotent(x, bits, symmetric):
    scale, zp = qparams(x.min(), x.max(), bits, symmetric)
    qmin, qmax = qrange(bits, symmetric)
    once = fake_quantize(x, scale, zp, qmin, qmax)
    assert torch.equal(fake_quantize(once, scale, zp, qmin, qmax), once)


@pytest.mark.parametrize("bits", range(2, 9))
def test_exact_integer_ranges(bits):
    assert qrange(bits, True) == (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1)
    assert qrange(bits, False) == (0, 2**bits - 1)
    x = torch.linspace(-3, 5, 1000)
    for symmetric in (True, False):
        scale, zp = qparams(x.min(), x.max(), bits, symmetric)
        q = quantize(x, scale, zp, *qrange(bits, symmetric))
        assert set(q.unique().tolist()) <= set(range(qrange(bits, symmetric)[0], qrange(bits, symmetric)[1] + 1))
        if not symmetric:  # the minimum maps to the lowest code; symmetric puts |max| on the top code
            assert int(q.min()) == 0
        assert int(q.max()) == qrange(bits, symmetric)[1]
        # zero is exactly representable
        assert dequantize(quantize(torch.zeros(1), scale, zp, *qrange(bits, symmetric)), scale, zp).item() == 0.0


def test_bits_out_of_range():
    with pytest.raises(ValueError, match="bits=1"):
        qrange(1, True)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 9),
    st.integers(1, 40),
    st.sampled_from(["per_tensor", "per_channel", "per_group"]),
    st.integers(1, 8),
    st.integers(2, 8),
    st.booleans(),
)
def test_weight_grids_bound_error_by_half_step_and_are_idempotent(
    channels, k, granularity, group_size, bits, symmetric
):
    """Per tensor, per channel and per group, 2-8 bits, symmetric and affine: codes in range, error <= s/2 per
    element, and quantizing the dequantized weight again changes nothing."""
    w = torch.randn(channels, k)
    g = group_view(w, granularity, group_size)
    assert torch.equal(ungroup(g, w.shape), w)
    codes, scale, zp = quantize_weight(w, bits, symmetric, granularity, group_size)
    qmin, qmax = qrange(bits, symmetric)
    assert torch.equal(codes, codes.round()) and codes.min() >= qmin and codes.max() <= qmax
    w_hat = ungroup(dequantize(codes, scale, zp), w.shape)
    step = ungroup((scale.expand_as(codes)), w.shape)
    assert ((w_hat - w).abs() <= step / 2 * (1 + 1e-4) + 1e-7).all()
    again, scale2, zp2 = quantize_weight(w_hat, bits, symmetric, granularity, group_size)
    torch.testing.assert_close(ungroup(dequantize(again, scale2, zp2), w.shape), w_hat, atol=1e-6, rtol=1e-5)


def test_finer_granularity_is_more_accurate():
    torch.manual_seed(0)
    w = torch.randn(16, 64) * torch.logspace(-2, 1, 16).unsqueeze(1)
    errors = {}
    for gran in ("per_tensor", "per_channel", "per_group"):
        codes, scale, zp = quantize_weight(w, 4, True, gran, 8)
        errors[gran] = (ungroup(dequantize(codes, scale, zp), w.shape) - w).pow(2).mean()
    assert errors["per_group"] < errors["per_channel"] < errors["per_tensor"]


def test_observers_clip_outliers_but_minmax_does_not():
    torch.manual_seed(0)
    x = torch.randn(50_000)
    x[0] = 60.0
    assert mse_range(x, 4, True)[1] < 20
    assert percentile_range(x, 99.9)[1] < 5
    assert kl_range(x, 8)[1] < 60
    obs = Observer("minmax")
    obs.update(x)
    assert obs.range()[1] == 60.0


@pytest.mark.parametrize("tail", ["lognormal", "exponential", "pareto"])
def test_kl_keeps_the_tail_of_a_relu_like_distribution(tail):
    torch.manual_seed(0)
    n = 200_000
    values = {
        "lognormal": torch.distributions.LogNormal(0.0, 1.0).sample((n,)),
        "exponential": torch.distributions.Exponential(1.0).sample((n,)),
        "pareto": torch.distributions.Pareto(1.0, 3.0).sample((n,)) - 1,
    }[tail]
    x = torch.where(torch.rand(n) < 0.6, torch.zeros(n), values)  # 60 % exact zeros, as after a ReLU
    lo, hi = kl_range(x, 8)
    assert lo == 0.0
    assert hi >= float(torch.quantile(x[:100_000], 0.999))
    assert hi < float(x.max())  # still an entropy clip, not min-max


def test_kl_covers_dominant_values_like_mnist_background():
    torch.manual_seed(0)
    n = 100_000
    background, saturated = -0.4242, 2.8215
    x = torch.full((n,), background)
    strokes = torch.rand(n) < 0.2
    x[strokes] = background + torch.rand(int(strokes.sum())) * (saturated - background)
    x[torch.rand(n) < 0.05] = saturated
    lo, hi = kl_range(x, 8)
    assert (lo, hi) == (pytest.approx(background), pytest.approx(saturated))


def test_moving_average_observer_tracks_ema():
    obs = Observer("moving_average", momentum=0.5)
    obs.update(torch.tensor([0.0, 1.0]))
    obs.update(torch.tensor([0.0, 3.0]))
    assert obs.range() == (0.0, 2.0)


@pytest.mark.parametrize("kind", ["minmax", "moving_average", "percentile", "mse", "histogram"])
def test_observers_reject_bad_input(kind):
    obs = Observer(kind)
    with pytest.raises(ValueError, match="no data"):
        obs.range()
    with pytest.raises(ValueError, match="NaN"):
        obs.update(torch.tensor([1.0, float("nan")]))
    obs.update(torch.randn(1000))
    lo, hi = obs.range()
    assert lo < 0 < hi


def test_ternary_follows_twn():
    w = torch.tensor([[0.1, -0.5, 1.0, -2.0], [0.0, 0.0, 0.0, 0.0]])
    alpha, delta = lowbit.ternary_params(w)
    assert delta[0].item() == pytest.approx(0.7 * 0.9)
    assert alpha[0].item() == pytest.approx((1.0 + 2.0) / 2)
    assert lowbit.ternary_codes(w, delta)[0].tolist() == [0, 0, 1, -1]
    assert alpha[1].item() == 0.0
    # the stored W_hat re-derives the same codes (alpha > delta)
    w_hat = lowbit.ternary_codes(w, delta) * alpha
    assert torch.equal(lowbit.ternary_codes(w_hat, delta), lowbit.ternary_codes(w, delta))


def test_binary_is_scaled_sign():
    w = torch.tensor([[0.5, -1.5, 0.0, 2.0]])
    assert lowbit.binary_params(w).item() == pytest.approx(1.0)
    assert lowbit.binary_codes(w).tolist() == [[1, -1, 1, 1]]
