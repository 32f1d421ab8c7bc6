"""Specification of repa.sit.transport: paths, time sampling and the velocity loss.

Every number is checked against a closed form written here, not against the library.
"""

import math

import pytest
import torch
from scipy import stats

from repa.errors import ShapeMismatchError, UnknownNameError
from repa.sit.transport import CosinePath, LinearPath, get_path, sample_time, velocity_loss

PI = math.pi


# ------------------------------------------------------------------------------------ coefficients


def test_linear_path_coefficients_at_t_0_3():
    p = LinearPath()
    t = torch.tensor(0.3, dtype=torch.float64)
    assert p.alpha(t).item() == pytest.approx(0.7)
    assert p.sigma(t).item() == pytest.approx(0.3)
    assert p.d_alpha(t).item() == -1.0
    assert p.d_sigma(t).item() == 1.0


def test_cosine_path_coefficients_at_t_one_third():
    p = CosinePath()
    t = torch.tensor(1 / 3, dtype=torch.float64)  # pi t / 2 = pi / 6
    assert p.alpha(t).item() == pytest.approx(math.sqrt(3) / 2)
    assert p.sigma(t).item() == pytest.approx(0.5)
    assert p.d_alpha(t).item() == pytest.approx(-PI / 4)  # -(pi/2) sin(pi/6)
    assert p.d_sigma(t).item() == pytest.approx(PI * math.sqrt(3) / 4)  # (pi/2) cos(pi/6)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_endpoints_are_data_and_noise(name):
    p = get_path(name)
    zero, one = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    assert p.alpha(zero).item() == pytest.approx(1) and p.sigma(zero).item() == pytest.approx(0)
    assert p.alpha(one).item() == pytest.approx(0, abs=1e-12) and p.sigma(one).item() == pytest.approx(1)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_derivatives_match_finite_differences(name):
    p = get_path(name)
    t = torch.linspace(0.05, 0.95, 7, dtype=torch.float64)
    h = 1e-6
    assert torch.allclose(p.d_alpha(t), (p.alpha(t + h) - p.alpha(t - h)) / (2 * h), atol=1e-6)
    assert torch.allclose(p.d_sigma(t), (p.sigma(t + h) - p.sigma(t - h)) / (2 * h), atol=1e-6)


# ------------------------------------------------------------------------------------ interpolate


def test_linear_interpolate_by_hand():
    # x = 2, eps = -1, t = 0.3: x_t = 0.7 * 2 + 0.3 * (-1) = 1.1; v = eps - x = -3.
    x = torch.full((1, 1, 2, 2), 2.0, dtype=torch.float64)
    eps = torch.full((1, 1, 2, 2), -1.0, dtype=torch.float64)
    x_t, v = LinearPath().interpolate(x, eps, torch.tensor([0.3], dtype=torch.float64))
    assert torch.allclose(x_t, torch.full_like(x, 1.1))
    assert torch.allclose(v, torch.full_like(x, -3.0))


def test_cosine_interpolate_by_hand():
    # t = 1/3: x_t = (sqrt3/2) x + (1/2) eps; v = -(pi/4) x + (pi sqrt3 / 4) eps.
    x = torch.tensor([[2.0, 0.0]], dtype=torch.float64)
    eps = torch.tensor([[-1.0, 1.0]], dtype=torch.float64)
    x_t, v = CosinePath().interpolate(x, eps, torch.tensor([1 / 3], dtype=torch.float64))
    r3 = math.sqrt(3)
    assert torch.allclose(x_t, torch.tensor([[r3 - 0.5, 0.5]], dtype=torch.float64))
    assert torch.allclose(v, torch.tensor([[-PI / 2 - PI * r3 / 4, PI * r3 / 4]], dtype=torch.float64))


def test_interpolate_uses_one_time_per_sample():
    x = torch.ones(3, 2, 4, 4)
    eps = torch.zeros(3, 2, 4, 4)
    t = torch.tensor([0.0, 0.5, 1.0])
    x_t, v = LinearPath().interpolate(x, eps, t)
    assert torch.allclose(x_t[:, 0, 0, 0], torch.tensor([1.0, 0.5, 0.0]))
    assert torch.allclose(v, -torch.ones_like(x))


def test_interpolate_shape_mismatch():
    with pytest.raises(ShapeMismatchError, match=r"randn_like"):
        LinearPath().interpolate(torch.ones(2, 3), torch.ones(2, 4), torch.rand(2))


# ------------------------------------------------------------------------------------ conversions


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_x0_and_eps_are_recovered_exactly_from_x_t_and_the_velocity(name):
    # For a single (x, eps) pair, x_t and v determine x and eps (the 2x2 system is invertible).
    p = get_path(name)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([0.0, 0.2, 0.7, 1.0], dtype=torch.float64)
    x_t, v = p.interpolate(x, eps, t)
    assert torch.allclose(p.velocity_to_x0(v, x_t, t), x, atol=1e-12)
    assert torch.allclose(p.velocity_to_eps(v, x_t, t), eps, atol=1e-12)


def test_linear_score_by_hand_at_t_0_3():
    # score = -(x_t + (1 - t) v) / t: x_t = 1.1, v = -3 -> -(1.1 - 2.1) / 0.3 = 10/3.
    x_t = torch.tensor([[1.1]], dtype=torch.float64)
    v = torch.tensor([[-3.0]], dtype=torch.float64)
    s = LinearPath().velocity_to_score(v, x_t, torch.tensor([0.3], dtype=torch.float64))
    assert s.item() == pytest.approx(10 / 3)


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("t", [0.1, 0.3, 0.8, 1.0])
def test_score_from_the_exact_velocity_of_gaussian_data_is_the_gaussian_score(name, t):
    # Data x ~ N(0, s2) in 1D: x_t ~ N(0, c) with c = a^2 s2 + sigma^2, so the true score is -x_t / c.
    # The exact velocity is E[v | x_t] = (a' a s2 + sigma' sigma) x_t / c (Gaussian conditioning).
    s2 = 4.0
    if name == "linear":
        a, sg, da, ds = 1 - t, t, -1.0, 1.0
    else:
        a, sg = math.cos(PI * t / 2), math.sin(PI * t / 2)
        da, ds = -PI / 2 * sg, PI / 2 * a
    c = a * a * s2 + sg * sg
    x_t = torch.linspace(-3, 3, 7, dtype=torch.float64)[:, None]
    v = (da * a * s2 + ds * sg) * x_t / c
    tt = torch.full((7,), t, dtype=torch.float64)
    assert torch.allclose(get_path(name).velocity_to_score(v, x_t, tt), -x_t / c, atol=1e-10)


# ------------------------------------------------------------------------------------ time sampling


def test_uniform_time_is_uniform_on_0_1():
    g = torch.Generator().manual_seed(0)
    t = sample_time(50_000, "uniform", generator=g)
    assert t.shape == (50_000,) and t.dtype == torch.float32
    assert t.min() >= 0 and t.max() < 1
    # Kolmogorov-Smirnov against U(0, 1); with a fixed seed the statistic is deterministic.
    # The 1% critical value for n = 50,000 is 1.63 / sqrt(n) = 0.0073.
    assert stats.kstest(t.numpy(), "uniform").statistic < 0.0073


def test_lognormal_time_on_the_linear_path_has_standard_normal_logit():
    # s = exp(n), n ~ N(0, 1), t = s / (1 + s)  <=>  logit(t) = n.
    g = torch.Generator().manual_seed(0)
    t = sample_time(50_000, "lognormal", generator=g).double()
    assert t.min() > 0 and t.max() < 1
    logit = torch.log(t / (1 - t)).numpy()
    # Median of t is sigmoid(0) = 0.5. The sample median of n has std sqrt(pi/2)/sqrt(n) = 0.0056,
    # times sigmoid'(0) = 1/4 for t: 0.0014, so 0.01 is a 7-sigma tolerance.
    assert abs(float(t.median()) - 0.5) < 0.01
    assert abs(logit.mean()) < 0.02  # std error 1/sqrt(n) = 0.0045
    assert abs(logit.std() - 1) < 0.02  # std error 1/sqrt(2n) = 0.0032
    assert stats.kstest(logit, "norm").statistic < 0.0073  # 1% critical value


def test_lognormal_time_on_the_cosine_path_has_lognormal_noise_to_signal_ratio():
    # tan(pi t / 2) = sigma / alpha = exp(n), n ~ N(0, 1).
    g = torch.Generator().manual_seed(1)
    t = sample_time(50_000, "lognormal", path="cosine", generator=g).double()
    log_ratio = torch.log(torch.tan(PI * t / 2)).numpy()
    assert abs(float(t.median()) - 0.5) < 0.01
    assert stats.kstest(log_ratio, "norm").statistic < 0.0073


def test_time_sampling_is_reproducible_with_a_generator():
    a = sample_time(8, "lognormal", generator=torch.Generator().manual_seed(3))
    b = sample_time(8, "lognormal", generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_unknown_time_sampling_and_path_names():
    with pytest.raises(UnknownNameError, match="'logit'.*uniform, lognormal"):
        sample_time(4, "logit")
    with pytest.raises(UnknownNameError, match="'vp'.*linear, cosine"):
        get_path("vp")


# ------------------------------------------------------------------------------------ loss


def test_velocity_loss_is_the_per_sample_mean_squared_error():
    pred = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 0.0]]])
    target = torch.tensor([[[1.0, 0.0], [3.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]]])
    # sample 0: (0 + 4 + 0 + 16) / 4 = 5; sample 1: 4 * 1 / 4 = 1.
    assert torch.allclose(velocity_loss(pred, target), torch.tensor([5.0, 1.0]))


def test_velocity_loss_is_float32_under_half_inputs():
    pred = torch.ones(2, 3, dtype=torch.float16)
    assert velocity_loss(pred, torch.zeros_like(pred)).dtype == torch.float32


def test_velocity_loss_shape_mismatch():
    with pytest.raises(ShapeMismatchError, match=r"\(2, 3\) != target shape \(2, 4\)"):
        velocity_loss(torch.ones(2, 3), torch.ones(2, 4))
