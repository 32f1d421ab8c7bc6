"""Specification of repa.sit.sampling on an analytic case: Gaussian data.

For data x ~ N(mu, Sigma) and the path x_t = a x + s eps (eps ~ N(0, I)), x_t is Gaussian with
Cov(x_t) = C = a^2 Sigma + s^2 I, and Gaussian conditioning gives

    E[x | x_t]   = mu + a Sigma C^{-1} (x_t - a mu)
    E[eps | x_t] = s C^{-1} (x_t - a mu)
    v(x_t, t)    = a' E[x | x_t] + s' E[eps | x_t]     (the exact velocity field)

Feeding that field to a sampler must turn N(0, I) noise into N(mu, Sigma) up to the
discretization error. The field below is written independently of the library.

The ODE samplers map noise to samples by an affine map (the field is affine in x), so the
noise is whitened to have exactly zero sample mean and identity sample covariance: the sample
moments then equal the moments of the discretized map with no Monte Carlo error, and the
tolerances measure discretization error alone.
"""

import math

import pytest
import torch

from repa.errors import ConfigError, ShapeMismatchError
from repa.sit.sampling import PAPER_FID_SETTING, guided_velocity, sample, sde_time_grid

DIM = 3
MU = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
_L = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [-0.3, 0.5, 0.5]], dtype=torch.float64)
SIGMA = _L @ _L.T  # [[1, .6, -.3], [.6, 1, .22], [-.3, .22, .59]], eigenvalues 0.11, 0.87, 1.60
N = 20_000


def path_coefficients(path: str, t: float):
    """(a, s, a', s') of the path, written out."""
    if path == "linear":
        return 1 - t, t, -1.0, 1.0
    a, s = math.cos(math.pi * t / 2), math.sin(math.pi * t / 2)
    return a, s, -math.pi / 2 * s, math.pi / 2 * a


def gaussian_velocity(means: torch.Tensor, path: str = "linear", calls: list = None):
    """Exact velocity field of N(means[y], SIGMA) data; ``means`` is (num_labels, DIM)."""

    def model_fn(x, t, y):
        assert torch.all(t == t[0]), "samplers evaluate one time per call"
        if calls is not None:
            calls.append((float(t[0]), x.shape[0], None if y is None else y.clone()))
        a, s, da, ds = path_coefficients(path, float(t[0]))
        m = means[y] if y is not None else means[0].expand_as(x)  # (B, DIM)
        cov = a * a * SIGMA + s * s * torch.eye(DIM, dtype=torch.float64)  # (DIM, DIM)
        r = torch.linalg.solve(cov, (x - a * m).T).T  # C^{-1}(x_t - a mu), (B, DIM)
        e_x = m + a * r @ SIGMA  # (B, DIM)
        e_eps = s * r  # (B, DIM)
        return da * e_x + ds * e_eps

    return model_fn


def whitened_noise(n: int, seed: int) -> torch.Tensor:
    """(n, DIM) noise with sample mean exactly 0 and sample covariance (1/n) exactly I."""
    z = torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z = z - z.mean(0)
    chol = torch.linalg.cholesky(z.T @ z / n)
    return z @ torch.linalg.inv(chol).T


def moments(x: torch.Tensor):
    mean = x.mean(0)
    centered = x - mean
    return mean, centered.T @ centered / x.shape[0]


def moment_errors(x: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor):
    mean, cov = moments(x)
    return (mean - mu).abs().max().item(), (cov - sigma).abs().max().item()


# ------------------------------------------------------------------------------------ ODE


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_heun_ode_reproduces_the_gaussian_far_tighter_than_euler(path):
    noise = whitened_noise(N, 0)
    field = gaussian_velocity(MU[None], path)
    euler = sample(field, noise, method="ode", solver="euler", steps=50, path=path)
    heun = sample(field, noise, method="ode", solver="heun", steps=50, path=path)
    e_mean, e_cov = moment_errors(euler, MU, SIGMA)
    h_mean, h_cov = moment_errors(heun, MU, SIGMA)
    # Euler is first order: errors of a few 1e-2 at 50 steps (measured: linear 0 / 0.052,
    # cosine 0.024 / 0.0024). Heun is second order: below 1e-3 (measured 5e-4 / 7e-4).
    assert e_mean < 0.05 and e_cov < 0.08
    assert h_mean < 2e-3 and h_cov < 2e-3
    assert max(h_mean, h_cov) < max(e_mean, e_cov) / 20


def test_euler_ode_converges_at_first_order():
    noise = whitened_noise(2000, 1)
    field = gaussian_velocity(MU[None])
    errors = [moment_errors(sample(field, noise, method="ode", steps=s), MU, SIGMA)[1] for s in (25, 50, 100)]
    # Halving the step halves the error (ratio 2 +- 20%).
    assert 1.6 < errors[0] / errors[1] < 2.4 and 1.6 < errors[1] / errors[2] < 2.4


def test_heun_ode_converges_at_second_order():
    noise = whitened_noise(2000, 1)
    field = gaussian_velocity(MU[None])
    errors = [
        moment_errors(sample(field, noise, method="ode", solver="heun", steps=s), MU, SIGMA)[1] for s in (20, 40)
    ]
    # Halving the step divides the error by about 4 (measured 4.2).
    assert 3.0 < errors[0] / errors[1] < 4.8


def test_ode_model_calls_and_times():
    calls = []
    sample(gaussian_velocity(MU[None], calls=calls), whitened_noise(8, 0), method="ode", solver="euler", steps=4)
    assert [c[0] for c in calls] == pytest.approx([1.0, 0.75, 0.5, 0.25])
    calls.clear()
    sample(gaussian_velocity(MU[None], calls=calls), whitened_noise(8, 0), method="ode", solver="heun", steps=4)
    # Predictor at t_i and corrector at t_{i+1}; the last step is Euler (never evaluates t = 0).
    assert [c[0] for c in calls] == pytest.approx([1.0, 0.75, 0.75, 0.5, 0.5, 0.25, 0.25])


# ------------------------------------------------------------------------------------ SDE


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_euler_maruyama_sde_reproduces_the_gaussian(path):
    noise = whitened_noise(N, 2)
    field = gaussian_velocity(MU[None], path)
    x = sample(field, noise, method="sde", steps=250, path=path, generator=torch.Generator().manual_seed(3))
    mean_err, cov_err = moment_errors(x, MU, SIGMA)
    # The Brownian increments add Monte Carlo error: the sample mean has std sqrt(1/N) = 0.007
    # per coordinate and the sample covariance about sqrt(2/N) = 0.01 per entry. The last
    # deterministic step from t = 0.04 shrinks the smallest variance by ~0.005.
    # Tolerances are 3.5-5 standard errors (measured: linear 0.003 / 0.020, cosine 0.009 / 0.014).
    assert mean_err < 0.035
    assert cov_err < 0.05


def test_sde_without_the_score_correction_would_fail_the_same_check():
    # Guard that the check above has teeth: integrating dx = v dt + sqrt(2t) dW (no score term)
    # adds variance ~1 and must be far outside the tolerance.
    noise = whitened_noise(N, 2)
    field = gaussian_velocity(MU[None])
    g = torch.Generator().manual_seed(3)
    x = noise.clone()
    grid = sde_time_grid(250).tolist()
    for i in range(250):
        t, dt = grid[i], grid[i + 1] - grid[i]
        x = x + field(x, torch.full((N,), t, dtype=torch.float64), None) * dt
        if i < 249:
            x = x + math.sqrt(2 * t * abs(dt)) * torch.randn(x.shape, generator=g, dtype=torch.float64)
    assert moment_errors(x, MU, SIGMA)[1] > 0.3


def test_sde_time_grid_and_calls_follow_the_reference():
    grid = sde_time_grid(5)
    assert torch.allclose(grid, torch.tensor([1.0, 0.76, 0.52, 0.28, 0.04, 0.0], dtype=torch.float64))
    calls = []
    sample(gaussian_velocity(MU[None], calls=calls), whitened_noise(8, 0), method="sde", steps=5)
    assert [c[0] for c in calls] == pytest.approx([1.0, 0.76, 0.52, 0.28, 0.04])


def test_sde_last_step_is_deterministic_and_generator_makes_it_reproducible():
    field = gaussian_velocity(MU[None])
    noise = whitened_noise(16, 0)
    a = sample(field, noise, method="sde", steps=10, generator=torch.Generator().manual_seed(0))
    b = sample(field, noise, method="sde", steps=10, generator=torch.Generator().manual_seed(0))
    c = sample(field, noise, method="sde", steps=10, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    # steps=1: a single deterministic step from t = 1 to 0: x + (v - t score) * (-1) with
    # v(x, 1) = a' mu + x (linear path at t = 1: E[x|x_1] = mu, E[eps|x_1] = x) and score = -x.
    one = sample(field, noise, method="sde", steps=1, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(one, noise - ((noise - MU) - (-noise)))


# ------------------------------------------------------------------------------------ CFG

MU_CLASSES = torch.tensor([[2.0, 0.0, 1.0], [-1.0, 1.0, 0.5], [0.0, 0.5, 0.0]], dtype=torch.float64)
NULL = 2  # labels 0, 1 are classes; 2 is the null (unconditional) label, here N(MU_CLASSES[2], SIGMA)


def class_labels(n: int) -> torch.Tensor:
    return torch.arange(n) % 2


def test_cfg_scale_one_is_the_conditional_path_without_doubling():
    calls = []
    field = gaussian_velocity(MU_CLASSES, calls=calls)
    noise, labels = whitened_noise(64, 0), class_labels(64)
    guided = sample(field, noise, labels, method="ode", steps=10, cfg_scale=1.0, null_label=NULL,
                    guidance_low=0.0, guidance_high=1.0)
    assert all(c[1] == 64 for c in calls)
    plain = sample(gaussian_velocity(MU_CLASSES), noise, labels, method="ode", steps=10)
    assert torch.equal(guided, plain)


@pytest.mark.parametrize("method", ["ode", "sde"])
def test_guidance_interval_excluding_every_step_is_the_conditional_path(method):
    noise, labels = whitened_noise(64, 0), class_labels(64)
    calls = []
    # ODE evaluates t = 1, ..., 0.1; SDE t = 1, ..., 0.04: the interval [0, 0.01] holds none.
    kw = dict(method=method, steps=10, null_label=NULL, guidance_low=0.0, guidance_high=0.01)
    guided = sample(gaussian_velocity(MU_CLASSES, calls=calls), noise, labels, cfg_scale=4.0,
                    generator=torch.Generator().manual_seed(0), **kw)
    plain = sample(gaussian_velocity(MU_CLASSES), noise, labels, cfg_scale=1.0,
                   generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(guided, plain)
    assert all(c[1] == 64 for c in calls)


def test_guided_steps_double_the_batch_with_null_labels_only_inside_the_interval():
    calls = []
    labels = class_labels(4)
    sample(gaussian_velocity(MU_CLASSES, calls=calls), whitened_noise(4, 0), labels, method="ode",
           steps=10, cfg_scale=2.0, null_label=NULL, guidance_low=0.3, guidance_high=0.6)
    for t, batch, y in calls:
        if 0.3 <= t <= 0.6 + 1e-12:
            assert batch == 8
            assert torch.equal(y, torch.cat([labels, torch.full((4,), NULL)]))
        else:
            assert batch == 4 and torch.equal(y, labels)
    assert sorted(round(t, 6) for t, b, _ in calls if b == 8) == [0.3, 0.4, 0.5, 0.6]


def test_guided_velocity_is_the_cfg_formula():
    field = gaussian_velocity(MU_CLASSES)
    x, labels = whitened_noise(6, 0), class_labels(6)
    t = torch.full((6,), 0.4, dtype=torch.float64)
    v_c = field(x, t, labels)
    v_u = field(x, t, torch.full((6,), NULL))
    got = guided_velocity(field, x, 0.4, labels, cfg_scale=3.0, null_label=NULL)
    assert torch.allclose(got, v_u + 3.0 * (v_c - v_u))


@pytest.mark.parametrize("method, solver, tol", [("ode", "heun", 3e-3), ("sde", "euler", 0.06)])
def test_full_interval_cfg_on_shared_covariance_gaussians_has_a_closed_form(method, solver, tol):
    # With a shared covariance the exact field is affine in the mean, v_m(x) = A(t) x + B(t) m, so
    # v_u + w (v_c - v_u) = v_{m*} with m* = mu_u + w (mu_c - mu_u): guided samples are exactly
    # N(m*, SIGMA) for the whole-interval guidance. Heun 50 steps: discretization error only
    # (measured 5e-4); SDE: Monte Carlo error of 10k samples per class (measured 0.016 / 0.024).
    w = 1.8
    # Whiten each class's noise separately so the ODE check has no Monte Carlo error.
    noise = torch.cat([whitened_noise(N // 2, 4), whitened_noise(N // 2, 5)])
    labels = torch.cat([torch.zeros(N // 2, dtype=torch.long), torch.ones(N // 2, dtype=torch.long)])
    steps = 250 if method == "sde" else 50
    x = sample(gaussian_velocity(MU_CLASSES), noise, labels, method=method, solver=solver, steps=steps,
               cfg_scale=w, null_label=NULL, guidance_low=0.0, guidance_high=1.0,
               generator=torch.Generator().manual_seed(5))
    for c in (0, 1):
        target = MU_CLASSES[NULL] + w * (MU_CLASSES[c] - MU_CLASSES[NULL])
        mean_err, cov_err = moment_errors(x[labels == c], target, SIGMA)
        assert mean_err < tol and cov_err < tol, (c, mean_err, cov_err)


def test_guidance_interval_closed_form_on_the_linear_path():
    # Guidance only for t <= tau: from t = 1 to tau the mean follows the conditional path,
    # (1 - t) mu_c; from tau on the field is v_{m*}. The deviation d = m - (1 - t) m* obeys
    # dd/dt = A(t) d, whose flow is C(t)^{1/2} C(tau)^{-1/2} with C(t) = (1 - t)^2 SIGMA + t^2 I
    # (all C(t) commute). So the final mean is m* + SIGMA^{1/2} C(tau)^{-1/2} (1 - tau) (mu_c - m*).
    # With 50 steps and guidance_high = 0.69, the first guided step starts at tau = 0.68.
    w, tau = 1.8, 0.68
    noise, labels = whitened_noise(4000, 6), torch.zeros(4000, dtype=torch.long)
    x = sample(gaussian_velocity(MU_CLASSES), noise, labels, method="ode", solver="heun", steps=50,
               cfg_scale=w, null_label=NULL, guidance_low=0.0, guidance_high=0.69)
    mu_c, mu_u = MU_CLASSES[0], MU_CLASSES[NULL]
    m_star = mu_u + w * (mu_c - mu_u)
    evals, evecs = torch.linalg.eigh(SIGMA)
    c_tau = (1 - tau) ** 2 * evals + tau**2
    flow = evecs @ torch.diag(evals.sqrt() / c_tau.sqrt()) @ evecs.T
    expected = m_star + flow @ ((1 - tau) * (mu_c - m_star))
    mean, cov = moments(x)
    assert torch.allclose(mean, expected, atol=3e-3)
    assert not torch.allclose(mean, m_star, atol=0.1) and not torch.allclose(mean, mu_c, atol=0.1)
    assert torch.allclose(cov, SIGMA, atol=3e-3)  # guidance shifts the mean only


# ------------------------------------------------------------------------------------ API


def test_defaults_are_the_paper_setting_but_the_guidance_scale():
    import inspect

    params = inspect.signature(sample).parameters
    defaults = {k: params[k].default for k in ("method", "steps", "cfg_scale", "guidance_low", "guidance_high")}
    assert defaults == {**PAPER_FID_SETTING, "cfg_scale": 1.0}
    assert PAPER_FID_SETTING == dict(method="sde", steps=250, cfg_scale=1.8, guidance_low=0.0, guidance_high=0.7)


def test_null_label_defaults_to_the_models_num_classes():
    class Model(torch.nn.Module):
        num_classes = NULL

        def forward(self, x, t, y):
            return gaussian_velocity(MU_CLASSES)(x, t, y)

    noise, labels = whitened_noise(32, 0), class_labels(32)
    kw = dict(method="ode", steps=5, cfg_scale=2.0, guidance_high=1.0)
    expected = sample(gaussian_velocity(MU_CLASSES), noise, labels, null_label=NULL, **kw)
    model = Model().eval()
    assert torch.equal(sample(model, noise, labels, **kw), expected)
    assert torch.equal(sample(model.forward, noise, labels, **kw), expected)


def test_a_model_in_training_mode_is_refused():
    # Label dropout (and any dropout) would silently corrupt the samples.
    from repa.sit.models import SiT

    model = SiT(input_size=8, patch_size=4, in_channels=1, hidden_size=16, depth=1, num_heads=2, num_classes=3)
    with pytest.raises(ConfigError, match=r"SiT is in training mode.*model.eval\(\)"):
        sample(model, torch.randn(2, 1, 8, 8), torch.tensor([0, 1]), steps=2)


def test_sampler_keeps_the_noise_dtype_and_calls_the_model_in_it():
    seen = []

    def model_fn(x, t, y):
        seen.append((x.dtype, t.dtype))
        return -x

    out = sample(model_fn, torch.randn(2, 3, dtype=torch.float32), method="ode", steps=3)
    assert out.dtype == torch.float32 and set(seen) == {(torch.float32, torch.float32)}


def test_invalid_options_are_rejected():
    f, z = gaussian_velocity(MU[None]), whitened_noise(4, 0)
    with pytest.raises(ConfigError, match="'ddim'.*ode, sde"):
        sample(f, z, method="ddim")
    with pytest.raises(ConfigError, match="'heun' is not available for method='sde'"):
        sample(f, z, method="sde", solver="heun")
    with pytest.raises(ConfigError, match="steps must be a positive int, got 0"):
        sample(f, z, steps=0)
    with pytest.raises(ConfigError, match=r"\[0.8, 0.2\] is empty"):
        sample(f, z, guidance_low=0.8, guidance_high=0.2)
    with pytest.raises(ConfigError, match="needs class labels and a null label"):
        sample(f, z, class_labels(4), cfg_scale=2.0, guidance_high=1.0)
    with pytest.raises(ShapeMismatchError, match=r"labels must have shape \(4,\)"):
        sample(f, z, class_labels(3))


def test_samplers_drive_a_sit_model():
    from repa.sit.models import SiT

    model = SiT(input_size=8, patch_size=4, in_channels=1, hidden_size=16, depth=1, num_heads=2, num_classes=3).eval()
    noise = torch.randn(2, 1, 8, 8)
    labels = torch.tensor([0, 2])
    # adaLN-Zero init: the velocity is exactly zero, so the ODE leaves the noise unchanged.
    assert torch.equal(sample(model, noise, labels, method="ode", steps=3), noise)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    out = sample(model, noise, labels, method="sde", steps=4, cfg_scale=1.8, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()
