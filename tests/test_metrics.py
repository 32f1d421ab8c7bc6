"""Specification of repa.metrics: every metric against an independent implementation of its
formula (plain loops / numpy / scipy, written here) and against known cases."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from repa import metrics
from repa.errors import ConfigError, ShapeMismatchError
from repa.metrics import (
    DegenerateFeaturesError,
    cka,
    cknna,
    feature_stats,
    frechet_distance,
    frechet_distance_from_stats,
    linear_probe,
    mutual_knn,
    precision_recall,
)

# ----------------------------------------------------------------------------- references


def _normalize_rows(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _ref_topk_sets(kernel, k):
    """Row i -> set of the k columns j != i with the largest kernel[i, j] (plain loops)."""
    n = kernel.shape[0]
    sets = []
    for i in range(n):
        others = [j for j in range(n) if j != i]
        others.sort(key=lambda j: -kernel[i, j])
        sets.append(set(others[:k]))
    return sets


def _ref_hsic_u(x, y):
    """Unbiased HSIC, term by term with loops:
    [tr(X~Y~) + (1'X~1)(1'Y~1)/((n-1)(n-2)) - 2/(n-2) 1'X~Y~1] / (n(n-3))."""
    n = x.shape[0]
    xt, yt = x.copy(), y.copy()
    for i in range(n):
        xt[i, i] = 0.0
        yt[i, i] = 0.0
    trace = sum(xt[i, j] * yt[j, i] for i in range(n) for j in range(n))
    sum_x = sum(xt[i, j] for i in range(n) for j in range(n))
    sum_y = sum(yt[i, j] for i in range(n) for j in range(n))
    col_x = [sum(xt[i, k] for i in range(n)) for k in range(n)]  # 1'X~
    row_y = [sum(yt[k, j] for j in range(n)) for k in range(n)]  # Y~1
    ones_xy_ones = sum(col_x[k] * row_y[k] for k in range(n))
    return (trace + sum_x * sum_y / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * ones_xy_ones) / (n * (n - 3))


def _ref_cknna(a, b, k):
    a, b = _normalize_rows(np.asarray(a, np.float64)), _normalize_rows(np.asarray(b, np.float64))
    kern, lern = a @ a.T, b @ b.T
    n = a.shape[0]

    def sim(p, q):
        tp, tq = _ref_topk_sets(p, k), _ref_topk_sets(q, k)
        mask = np.zeros((n, n))
        for i in range(n):
            for j in range(n):
                if i != j and j in tp[i] and j in tq[i]:
                    mask[i, j] = 1.0
        return _ref_hsic_u(mask * p, mask * q)

    return sim(kern, lern) / math.sqrt(sim(kern, kern) * sim(lern, lern))


def _ref_cka(a, b):
    """Linear CKA with explicit centering matrix H: HSIC(K, L) = tr(K H L H) / (n-1)^2."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    n = a.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    kern, lern = a @ a.T, b @ b.T

    def hsic(p, q):
        return np.trace(p @ h @ q @ h) / (n - 1) ** 2

    return hsic(kern, lern) / math.sqrt(hsic(kern, kern) * hsic(lern, lern))


def _ref_mutual_knn(a, b, k):
    a, b = _normalize_rows(np.asarray(a, np.float64)), _normalize_rows(np.asarray(b, np.float64))
    na, nb = _ref_topk_sets(a @ a.T, k), _ref_topk_sets(b @ b.T, k)
    return sum(len(na[i] & nb[i]) / k for i in range(a.shape[0])) / a.shape[0]


def _ref_frechet(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.fixture(params=["one chunk", "many chunks"])
def chunking(request, monkeypatch):
    """Run each kernel test once whole and once with row chunks of a few rows."""
    if request.param == "many chunks":
        monkeypatch.setattr(metrics, "_CHUNK_BYTES", 8 * 7 * 30)  # about 7 rows of a 30-sample kernel
    return request.param


def _rng(seed=0):
    return np.random.default_rng(seed)


# ----------------------------------------------------------------------------- CKNNA


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("k", [1, 4])
def test_cknna_matches_formula(seed, k, chunking):
    rng = _rng(seed)
    a = rng.normal(size=(24, 6))
    b = a @ rng.normal(size=(6, 5)) + 0.7 * rng.normal(size=(24, 5))  # partly aligned
    assert cknna(a, b, topk=k) == pytest.approx(_ref_cknna(a, b, k), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_cknna_matches_formula_on_tiny_sets(seed):
    """n = 6, k = 1: the kernels often share no nearest neighbour at all (sim(K, L) = 0)."""
    rng = _rng(100 + seed)
    a, b = rng.normal(size=(6, 3)), rng.normal(size=(6, 3))
    assert cknna(a, b, topk=1) == pytest.approx(_ref_cknna(a, b, 1), rel=1e-9, abs=1e-12)


def test_cknna_accepts_torch_and_numpy_alike():
    rng = _rng(2)
    a = rng.normal(size=(30, 8)).astype(np.float32)
    b = rng.normal(size=(30, 3)).astype(np.float32)
    expected = _ref_cknna(a, b, 5)
    assert cknna(torch.from_numpy(a), torch.from_numpy(b), topk=5) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert cknna(a, torch.from_numpy(b), topk=5) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_cknna_identical_features_is_one():
    a = torch.randn(200, 16)
    assert cknna(a, a.clone(), topk=10) == pytest.approx(1.0, abs=1e-12)


def test_cknna_invariant_to_rotation_and_row_scale():
    """Rows are L2-normalized, so an orthogonal map and positive per-row scales change nothing."""
    rng = _rng(3)
    a = rng.normal(size=(80, 10))
    b = a[:, :4] + 0.5 * rng.normal(size=(80, 4))
    q, _ = np.linalg.qr(rng.normal(size=(10, 10)))
    scales = rng.uniform(0.1, 10.0, size=(80, 1))
    assert cknna(a @ q * scales, b, topk=10) == pytest.approx(cknna(a, b, topk=10), abs=1e-9)
    assert cknna(a, b, topk=10) > 0.3


def test_cknna_independent_features_near_zero():
    """n = 2000 unrelated Gaussian features: |CKNNA| < 0.05 (observed ~0.01)."""
    rng = _rng(4)
    a, b = rng.normal(size=(2000, 32)), rng.normal(size=(2000, 32))
    assert abs(cknna(a, b, topk=10)) < 0.05


def test_cknna_errors():
    a = torch.randn(20, 4)
    with pytest.raises(ShapeMismatchError, match="n = 20 rows in a and n = 19 rows in b"):
        cknna(a, torch.randn(19, 4))
    with pytest.raises(ShapeMismatchError, match="topk=20 needs more than topk samples.*n = 20"):
        cknna(a, a, topk=20)
    with pytest.raises(ConfigError, match="topk must be a positive int, got 0"):
        cknna(a, a, topk=0)
    with pytest.raises(ShapeMismatchError, match=r"must have shape \(n, d\).*\(20, 3, 4\).*mean\(1\)"):
        cknna(torch.randn(20, 3, 4), a)
    with pytest.raises(ShapeMismatchError, match="at least 4 samples"):
        cknna(torch.randn(3, 4), torch.randn(3, 4), topk=1)
    with pytest.raises(ConfigError, match="1 NaN or infinite"):
        bad = a.clone()
        bad[3, 1] = float("nan")
        cknna(bad, a)
    with pytest.raises(ConfigError, match="torch.Tensor or numpy.ndarray.*list"):
        cknna([[1.0, 2.0]] * 20, a)
    with pytest.raises(ConfigError, match="a must hold real numbers, got dtype torch.bool"):
        cknna(torch.ones(20, 4, dtype=torch.bool), a)
    with pytest.raises(DegenerateFeaturesError, match="cknna is undefined"):
        cknna(torch.zeros(20, 4), a, topk=3)


# ----------------------------------------------------------------------------- CKA


@pytest.mark.parametrize("shape", [(40, 5, 3), (6, 10, 12)], ids=["feature space", "sample space"])
def test_cka_matches_formula(shape):
    n, da, db = shape
    rng = _rng(5)
    a = rng.normal(size=(n, da)) + 3.0  # offset: centering must matter
    b = a @ rng.normal(size=(da, db)) + rng.normal(size=(n, db))
    assert cka(a, b) == pytest.approx(_ref_cka(a, b), rel=1e-10)


def test_cka_identical_is_one_and_invariances():
    rng = _rng(6)
    a = rng.normal(size=(50, 7))
    b = np.tanh(a[:, :3]) + 0.3 * rng.normal(size=(50, 3))
    q, _ = np.linalg.qr(rng.normal(size=(7, 7)))
    assert cka(a, a) == pytest.approx(1.0, abs=1e-12)
    assert cka(a @ q, b) == pytest.approx(_ref_cka(a, b), rel=1e-10)  # orthogonal transform
    assert cka(5.0 * a, 0.2 * b) == pytest.approx(_ref_cka(a, b), rel=1e-10)  # isotropic scaling


def test_cka_independent_features_near_zero():
    """Biased linear CKA of unrelated features is about d / n: 8 / 4000, so < 0.01."""
    rng = _rng(7)
    assert abs(cka(rng.normal(size=(4000, 8)), rng.normal(size=(4000, 8)))) < 0.01


def test_cka_errors():
    with pytest.raises(ShapeMismatchError, match="n = 5 rows in a and n = 4 rows in b"):
        cka(torch.randn(5, 3), torch.randn(4, 3))
    with pytest.raises(DegenerateFeaturesError, match="zero variance"):
        cka(torch.ones(10, 3), torch.randn(10, 3))


# ----------------------------------------------------------------------------- mutual kNN


@pytest.mark.parametrize("k", [1, 5])
def test_mutual_knn_matches_formula(k, chunking):
    rng = _rng(8)
    a = rng.normal(size=(30, 6))
    b = a[:, :3] + 0.5 * rng.normal(size=(30, 3))
    assert mutual_knn(a, b, topk=k) == pytest.approx(_ref_mutual_knn(a, b, k), abs=1e-12)


def test_mutual_knn_known_cases():
    rng = _rng(9)
    a = rng.normal(size=(1000, 16))
    assert mutual_knn(a, a * 3.0, topk=10) == pytest.approx(1.0)
    # Unrelated: each shared neighbour has chance k / (n - 1) = 0.01; expect < 0.02.
    assert mutual_knn(a, rng.normal(size=(1000, 16)), topk=10) < 0.02


def test_mutual_knn_errors():
    with pytest.raises(ShapeMismatchError, match="topk=10 needs more than topk samples"):
        mutual_knn(torch.randn(8, 3), torch.randn(8, 3), topk=10)
    with pytest.raises(ShapeMismatchError, match="same samples in the same order"):
        mutual_knn(torch.randn(8, 3), torch.randn(9, 3), topk=2)


# ----------------------------------------------------------------------------- Frechet distance


def test_feature_stats_match_numpy(chunking):
    rng = _rng(10)
    x = rng.normal(size=(30, 7)) * 2 + 5
    mu, sigma = feature_stats(x)
    np.testing.assert_allclose(mu.numpy(), x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma.numpy(), np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)


def test_frechet_from_stats_matches_scipy_sqrtm():
    rng = _rng(11)
    d = 6
    m1, m2 = rng.normal(size=d), rng.normal(size=d)
    r1, r2 = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = r1 @ r1.T + 0.1 * np.eye(d), r2 @ r2.T + 0.1 * np.eye(d)
    assert frechet_distance_from_stats(m1, s1, m2, s2) == pytest.approx(_ref_frechet(m1, s1, m2, s2), rel=1e-9)
    assert frechet_distance_from_stats(torch.from_numpy(m1), s1, m1, s1) == pytest.approx(0.0, abs=1e-9)


def test_frechet_diagonal_gaussians_closed_form():
    """Diagonal covariances: FD = |mu1 - mu2|^2 + sum_i (s1_i + s2_i - 2 sqrt(s1_i s2_i)),
    including zero variances (a singular covariance)."""
    m1, m2 = np.array([0.0, 1.0, -2.0, 0.5]), np.array([1.0, 1.0, 0.0, 0.0])
    v1, v2 = np.array([1.0, 4.0, 0.0, 2.0]), np.array([9.0, 1.0, 3.0, 0.0])
    closed = np.sum((m1 - m2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    assert frechet_distance_from_stats(m1, np.diag(v1), m2, np.diag(v2)) == pytest.approx(closed, rel=1e-12)
    # eps * I on both covariances: each term becomes (v1+eps) + (v2+eps) - 2 sqrt((v1+eps)(v2+eps)).
    eps = 1e-3
    closed_eps = np.sum((m1 - m2) ** 2) + np.sum(v1 + v2 + 2 * eps - 2 * np.sqrt((v1 + eps) * (v2 + eps)))
    got = frechet_distance_from_stats(m1, np.diag(v1), m2, np.diag(v2), eps=eps)
    assert got == pytest.approx(closed_eps, rel=1e-12)


def test_frechet_distance_of_samples():
    """Features from two known Gaussians: the FD of samples matches scipy on the sample
    statistics exactly and the closed form of the true parameters to sampling error."""
    rng = _rng(12)
    n, m1, m2 = 20000, np.array([0.0, 0.0, 1.0]), np.array([1.0, -1.0, 1.0])
    sd1, sd2 = np.array([1.0, 2.0, 0.5]), np.array([2.0, 1.0, 0.5])
    a = m1 + sd1 * rng.normal(size=(n, 3))
    b = m2 + sd2 * rng.normal(size=(n // 2, 3))  # sample counts may differ
    exact = _ref_frechet(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert frechet_distance(a, torch.from_numpy(b)) == pytest.approx(exact, rel=1e-9)
    closed = np.sum((m1 - m2) ** 2) + np.sum((sd1 - sd2) ** 2)  # = 2 + 2
    assert frechet_distance(a, b) == pytest.approx(closed, abs=0.15)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def test_frechet_errors():
    with pytest.raises(ShapeMismatchError, match="same feature width, got d = 3 and d = 4"):
        frechet_distance(torch.randn(10, 3), torch.randn(10, 4))
    with pytest.raises(ShapeMismatchError, match=r"sigma2 has shape \(2, 2\).*\(3, 3\) was expected"):
        frechet_distance_from_stats(np.zeros(3), np.eye(3), np.zeros(3), np.eye(2))
    with pytest.raises(ShapeMismatchError, match=r"mu1 must have shape \(d,\)"):
        frechet_distance_from_stats(np.zeros((3, 1)), np.eye(3), np.zeros(3), np.eye(3))
    with pytest.raises(ShapeMismatchError, match="at least 2 samples.*n = 1"):
        feature_stats(torch.randn(1, 3))


# ----------------------------------------------------------------------------- linear probe


def _separable(seed, n, margin):
    """Labels argmax(x W) of Gaussian points, keeping points whose top two scores differ by > margin."""
    rng = _rng(seed)
    w = rng.normal(size=(16, 3))
    x = rng.normal(size=(4 * n, 16))
    scores = np.sort(x @ w, axis=1)
    x = x[scores[:, -1] - scores[:, -2] > margin][:n]
    return x * 4 + 10, np.argmax(x @ w, axis=1)  # an offset and scale that standardization removes


@pytest.mark.parametrize("optimizer", ["lbfgs", "adamw"])
def test_linear_probe_separable_data_is_near_perfect(optimizer):
    x, y = _separable(13, 1400, margin=0.5)
    acc = linear_probe(
        torch.from_numpy(x[:600]).float(), y[:600], x[600:], torch.from_numpy(y[600:]), optimizer=optimizer, epochs=100
    )
    assert acc >= 0.95


def test_linear_probe_random_labels_is_chance():
    """4 classes, labels independent of the features: 2000 test samples, chance 0.25,
    standard error 0.01, tolerance 0.05."""
    rng = _rng(14)
    x_train, x_test = rng.normal(size=(400, 16)), rng.normal(size=(2000, 16))
    y_train, y_test = rng.integers(0, 4, 400), rng.integers(0, 4, 2000)
    acc = linear_probe(x_train, y_train, x_test, y_test, epochs=20)
    assert abs(acc - 0.25) < 0.05


def test_linear_probe_is_deterministic_and_leaves_global_rng_alone():
    rng = _rng(15)
    x, y = rng.normal(size=(200, 8)), rng.integers(0, 3, 200)
    state = torch.get_rng_state()
    first = linear_probe(x[:100], y[:100], x[100:], y[100:], optimizer="adamw", epochs=3, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    with torch.no_grad():  # trains even when called under no_grad
        second = linear_probe(x[:100], y[:100], x[100:], y[100:], optimizer="adamw", epochs=3, seed=1)
    assert first == second


def test_linear_probe_errors():
    x, y = torch.randn(10, 4), torch.arange(10) % 2
    with pytest.raises(ShapeMismatchError, match=r"train_labels must have shape \(10,\).*\(9,\)"):
        linear_probe(x, y[:9], x, y)
    with pytest.raises(ConfigError, match="integer class ids, got dtype torch.float32"):
        linear_probe(x, y.float(), x, y)
    with pytest.raises(ConfigError, match="negative class id -1"):
        linear_probe(x, y - 1, x, y)
    with pytest.raises(ShapeMismatchError, match="same width, got d = 4 and d = 5"):
        linear_probe(x, y, torch.randn(10, 5), y)
    with pytest.raises(ConfigError, match="num_classes=1 but the labels hold class id 1"):
        linear_probe(x, y, x, y, num_classes=1)
    with pytest.raises(ConfigError, match=r"optimizer must be one of \('lbfgs', 'adamw'\), got 'sgd'"):
        linear_probe(x, y, x, y, optimizer="sgd")
    with pytest.raises(ConfigError, match="epochs must be a positive int, got 0"):
        linear_probe(x, y, x, y, epochs=0)


# ----------------------------------------------------------------------------- precision and recall


def _pr_reference(real, fake, k):
    """Kynkaanniemi et al. 2019 with plain loops: k-NN radii in each set, then ball membership."""

    def radii(x):
        out = []
        for i in range(len(x)):
            d = sorted(float(np.linalg.norm(x[i] - x[j])) for j in range(len(x)) if j != i)
            out.append(d[k - 1])
        return out

    def covered(points, centres, r):
        return sum(any(np.linalg.norm(p - c) <= rc for c, rc in zip(centres, r)) for p in points) / len(points)

    return covered(fake, real, radii(real)), covered(real, fake, radii(fake))


@pytest.mark.parametrize("chunking", [False, True])
@pytest.mark.parametrize("k", [1, 3])
def test_precision_recall_matches_loops(k, chunking, monkeypatch):
    if chunking:
        monkeypatch.setattr(metrics, "_CHUNK_BYTES", 8 * 40 * 3)  # 3 rows per block
    rng = _rng(5 + k)
    real = rng.normal(size=(40, 4))
    fake = rng.normal(size=(30, 4)) * 0.6 + 1.0  # shifted and narrower: precision and recall both below 1
    p, r = precision_recall(real, torch.from_numpy(fake), k=k)
    p_ref, r_ref = _pr_reference(real, fake, k)
    assert (p, r) == pytest.approx((p_ref, r_ref), abs=1e-12)
    assert 0 < p < 1 and 0 < r < 1


def test_precision_recall_hand_cases():
    # real on a line at 0, 1, 2, 3: with k = 1 each real ball has radius 1, covering [-1, 4]
    real = np.array([[0.0], [1.0], [2.0], [3.0]])
    fake = np.array([[0.5], [3.9], [10.0], [11.0]])  # two inside the real balls, two far away
    p, r = precision_recall(real, fake, k=1)
    assert p == 0.5
    # fake radii (k = 1): 0.5 -> 3.4, 3.9 -> 3.4, 10 -> 1, 11 -> 1; every real point lies within 3.4 of 0.5
    assert r == 1.0
    same = np.random.default_rng(0).normal(size=(50, 3))
    assert precision_recall(same, same.copy()) == (1.0, 1.0)


def test_precision_recall_errors():
    with pytest.raises(ShapeMismatchError, match="same feature width"):
        precision_recall(torch.randn(10, 3), torch.randn(10, 4))
    with pytest.raises(ShapeMismatchError, match="more than k=3 rows in fake, got 3"):
        precision_recall(torch.randn(10, 3), torch.randn(3, 3))
    with pytest.raises(ConfigError, match="k must be a positive int"):
        precision_recall(torch.randn(10, 3), torch.randn(10, 3), k=0)
    with pytest.raises(ConfigError, match="NaN"):
        precision_recall(torch.full((10, 3), float("nan")), torch.randn(10, 3))
