"""Alignment metrics: how similar are two representations of the same samples?

REPA measures alignment between a diffusion model's hidden states and a frozen encoder's
features with CKNNA (Huh et al. 2024, "The Platonic Representation Hypothesis"), and judges
representation quality by linear probing. This module gives those and their usual companions:

- :func:`cknna`: centered kernel nearest-neighbour alignment (REPA's alignment measure, k = 10).
- :func:`cka`: linear centered kernel alignment (Kornblith et al. 2019).
- :func:`mutual_knn`: mean fraction of shared k nearest neighbours (Huh et al. 2024).
- :func:`frechet_distance`, :func:`frechet_distance_from_stats`, :func:`feature_stats`: the
  Frechet distance between Gaussians fitted to two feature sets (FID / FD-DINOv2).
- :func:`linear_probe`: top-1 accuracy of a linear classifier on frozen features.
- :func:`precision_recall`: improved precision and recall of generated samples (Kynkaanniemi
  et al. 2019): how many samples fall on the real data's manifold, and how much of it they cover.

Every function takes features as torch tensors or numpy arrays of shape (n, d), one row per
sample (average tokens first, e.g. ``tokens.mean(1)`` for (n, N, d)); rows of the two inputs of
:func:`cknna`, :func:`cka` and :func:`mutual_knn` are paired (the same image). Sums are
accumulated in float64, and the n x n kernels are never held whole: they are built in row
blocks of at most 256 MiB and reduced to each row's top-k at once, so 10k x 1024
features need well under 1 GB beyond the inputs' float64 copies.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ConfigError, ShapeMismatchError

ArrayLike = Union[torch.Tensor, np.ndarray]

__all__ = [
    "DegenerateFeaturesError",
    "cknna",
    "cka",
    "mutual_knn",
    "feature_stats",
    "frechet_distance",
    "frechet_distance_from_stats",
    "linear_probe",
    "precision_recall",
]

# Largest kernel block (rows x n, float64) built at once: 256 MiB.
_CHUNK_BYTES = 256 * 2**20


class DegenerateFeaturesError(ConfigError):
    """The features carry no variation a similarity can be normalized by (e.g. all rows equal)."""


# ----------------------------------------------------------------------------- inputs


def _as_features(x: ArrayLike, name: str) -> torch.Tensor:
    """Convert a tensor or array (n, d) to a float64 tensor, on the tensor's device."""
    if isinstance(x, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(x))
    elif isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        raise ConfigError(
            f"{name} must be a torch.Tensor or numpy.ndarray of shape (n, d), got {type(x).__name__}"
        )
    if t.dim() != 2:
        raise ShapeMismatchError(
            f"{name} must have shape (n, d) (one feature row per sample), got shape {tuple(t.shape)}; "
            "average or flatten tokens first, e.g. tokens.mean(1) for (n, N, d) patch tokens"
        )
    if t.is_complex() or t.dtype == torch.bool:
        raise ConfigError(f"{name} must hold real numbers, got dtype {t.dtype}")
    t = t.to(torch.float64)
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ConfigError(f"{name} holds {bad} NaN or infinite values; remove or fix those samples first")
    return t


def _paired(a: ArrayLike, b: ArrayLike) -> Tuple[torch.Tensor, torch.Tensor]:
    """Both inputs as float64 (n, d_a), (n, d_b) on a's device; their rows must pair up."""
    ta, tb = _as_features(a, "a"), _as_features(b, "b")
    if ta.shape[0] != tb.shape[0]:
        raise ShapeMismatchError(
            f"a and b must hold the same samples in the same order, got n = {ta.shape[0]} rows in a "
            f"and n = {tb.shape[0]} rows in b; pass features of the same images to both"
        )
    return ta, tb.to(ta.device)


def _check_topk(topk: int, n: int) -> int:
    if isinstance(topk, bool) or not isinstance(topk, (int, np.integer)) or topk < 1:
        raise ConfigError(f"topk must be a positive int, got {topk!r}")
    if topk >= n:
        raise ShapeMismatchError(
            f"topk={topk} needs more than topk samples (each sample's own row is excluded), got n = {n}; "
            f"use topk < {n} or more samples"
        )
    return int(topk)


# ----------------------------------------------------------------------------- nearest neighbours


def _l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """Rows of x L2-normalized (float64), so inner products are cosine similarities."""
    return F.normalize(x, dim=1)


def _topk_neighbours(x: torch.Tensor, topk: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """For each row i of the kernel K = x x^T, the top-k columns j != i and their values.

    x: (n, d) float64. Returns indices (n, k) int64 and values K[i, idx] (n, k) float64. The
    kernel is built in blocks of rows of at most ``_CHUNK_BYTES`` and never held whole.
    """
    n = x.shape[0]
    rows = max(1, _CHUNK_BYTES // (8 * n))
    idx_out = torch.empty(n, topk, dtype=torch.int64, device=x.device)
    val_out = torch.empty(n, topk, dtype=torch.float64, device=x.device)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        block = x[start:stop] @ x.T  # (m, n)
        own = torch.arange(start, stop, device=x.device)
        block[own - start, own] = -math.inf  # the diagonal is excluded
        vals, idx = torch.topk(block, topk, dim=1)  # (m, k)
        idx_out[start:stop] = idx
        val_out[start:stop] = vals
    return idx_out, val_out


# ----------------------------------------------------------------------------- CKNNA


def _hsic_unbiased_sparse(
    n: int, rows: torch.Tensor, cols: torch.Tensor, x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """HSIC_u(X, Y) for n x n matrices with zero diagonal given by their nonzero entries.

    X[rows, cols] = x and Y[rows, cols] = y (same support, no diagonal entries). The unbiased
    estimator (Song et al. 2012, as used by Huh et al. 2024):
    HSIC_u = [tr(X Y) + (1^T X 1)(1^T Y 1) / ((n-1)(n-2)) - 2/(n-2) 1^T X Y 1] / (n(n-3)).
    X and Y need not be symmetric: tr(X Y) = sum_ij X_ij Y_ji.
    """
    keys = rows * n + cols  # (E,)
    order = torch.argsort(keys)
    keys_sorted = keys[order]
    transposed = cols * n + rows  # key of entry (j, i) for each (i, j)
    pos = torch.searchsorted(keys_sorted, transposed).clamp_(max=keys.numel() - 1)
    present = keys_sorted[pos] == transposed
    y_t = torch.where(present, y[order][pos], torch.zeros_like(y))  # Y[j, i] for each (i, j)
    trace_xy = (x * y_t).sum()
    col_sum_x = torch.zeros(n, dtype=x.dtype, device=x.device).index_add_(0, cols, x)  # (n,) 1^T X
    row_sum_y = torch.zeros(n, dtype=y.dtype, device=y.device).index_add_(0, rows, y)  # (n,) Y 1
    one_xy_one = (col_sum_x * row_sum_y).sum()
    value = trace_xy + x.sum() * y.sum() / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * one_xy_one
    return value / (n * (n - 3))


def _masked_sim(
    n: int, idx_p: torch.Tensor, val_p: torch.Tensor, idx_q: torch.Tensor, val_q: torch.Tensor
) -> torch.Tensor:
    """sim(P, Q) = HSIC_u(M*P, M*Q), M_ij = 1 iff j is in the top-k of row i of both P and Q."""
    match = idx_p[:, :, None] == idx_q[:, None, :]  # (n, k, k): slot s of P equals slot t of Q
    in_both = match.any(-1)  # (n, k) over P's slots
    q_at_p = (match * val_q[:, None, :]).sum(-1)  # (n, k) Q[i, idx_p[i, s]] where in_both
    rows = torch.arange(n, device=idx_p.device)[:, None].expand_as(idx_p)[in_both]
    cols = idx_p[in_both]
    return _hsic_unbiased_sparse(n, rows, cols, val_p[in_both], q_at_p[in_both])


def cknna(a: ArrayLike, b: ArrayLike, topk: int = 10) -> float:
    """Centered kernel nearest-neighbour alignment of paired features a (n, d_a) and b (n, d_b).

    Follows Huh et al. 2024 ("The Platonic Representation Hypothesis"), the measure REPA uses
    with k = 10: rows are L2-normalized, K = A A^T and L = B B^T. For kernels (P, Q) the mask
    M_ij is 1 when i != j and j is among the top-k entries of row i of P (diagonal excluded)
    AND among the top-k of row i of Q; sim(P, Q) = HSIC_u(M*P, M*Q) with the unbiased HSIC
    estimator. CKNNA = sim(K, L) / sqrt(sim(K, K) * sim(L, L)); sim(K, K) uses the mask of
    (K, K), i.e. the top-k of K alone. Identical features give 1; unrelated ones about 0.

    Kernels are evaluated in float64 in row chunks and reduced to top-k at once (memory
    O(n k) plus one chunk). Ties in a row's top-k are broken by ``torch.topk``.
    Raises :class:`ShapeMismatchError` if n differs or ``topk >= n``, and
    :class:`DegenerateFeaturesError` if sim(K, K) * sim(L, L) <= 0.
    """
    ta, tb = _paired(a, b)
    n = ta.shape[0]
    if n < 4:
        raise ShapeMismatchError(f"cknna needs at least 4 samples (the unbiased HSIC divides by n - 3), got n = {n}")
    topk = _check_topk(topk, n)
    idx_k, val_k = _topk_neighbours(_l2_normalize(ta), topk)  # (n, k), (n, k)
    idx_l, val_l = _topk_neighbours(_l2_normalize(tb), topk)  # (n, k), (n, k)
    sim_kl = _masked_sim(n, idx_k, val_k, idx_l, val_l)
    sim_kk = _masked_sim(n, idx_k, val_k, idx_k, val_k)
    sim_ll = _masked_sim(n, idx_l, val_l, idx_l, val_l)
    denom = float(sim_kk * sim_ll)
    if not denom > 0:
        raise DegenerateFeaturesError(
            f"cknna is undefined here: sim(K, K) * sim(L, L) = {denom:.3g} (expected > 0); the features "
            "have (nearly) no variation among nearest neighbours, e.g. all rows equal; check the inputs"
        )
    return float(sim_kl) / math.sqrt(denom)


# ----------------------------------------------------------------------------- CKA


def cka(a: ArrayLike, b: ArrayLike) -> float:
    """Linear centered kernel alignment of paired features a (n, d_a) and b (n, d_b).

    Kornblith et al. 2019: with column-centered X and Y (no row normalization),
    CKA = HSIC(X X^T, Y Y^T) / sqrt(HSIC(X X^T, X X^T) HSIC(Y Y^T, Y Y^T)) using the biased
    HSIC estimator, i.e. ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F). Invariant to orthogonal
    transforms and isotropic scaling of either input; 1 for identical features. Computed in
    float64 in whichever of feature space (d_a x d_b) or sample space (n x n) is smaller.
    """
    ta, tb = _paired(a, b)
    n = ta.shape[0]
    if n < 2:
        raise ShapeMismatchError(f"cka needs at least 2 samples, got n = {n}")
    x = ta - ta.mean(0, keepdim=True)  # (n, d_a)
    y = tb - tb.mean(0, keepdim=True)  # (n, d_b)
    if x.shape[1] * y.shape[1] <= n * n:
        xy = (y.T @ x).square().sum()
        xx = (x.T @ x).square().sum().sqrt()
        yy = (y.T @ y).square().sum().sqrt()
    else:
        gram_x = x @ x.T  # (n, n), already centered
        gram_y = y @ y.T  # (n, n)
        xy = (gram_x * gram_y).sum()
        xx = gram_x.square().sum().sqrt()
        yy = gram_y.square().sum().sqrt()
    denom = float(xx * yy)
    if not denom > 0:
        raise DegenerateFeaturesError(
            "cka is undefined here: one input has zero variance (all rows equal); check the inputs"
        )
    return float(xy) / denom


# ----------------------------------------------------------------------------- mutual kNN


def mutual_knn(a: ArrayLike, b: ArrayLike, topk: int = 10) -> float:
    """Mean fraction of shared nearest neighbours of paired features a (n, d_a) and b (n, d_b).

    Huh et al. 2024: rows are L2-normalized, each sample's k nearest neighbours (cosine
    similarity, itself excluded) are found in a and in b, and the score is the mean over
    samples of |N_a(i) ∩ N_b(i)| / k. 1 for identical features; about k / (n - 1) for unrelated ones.
    """
    ta, tb = _paired(a, b)
    n = ta.shape[0]
    topk = _check_topk(topk, n)
    idx_a, _ = _topk_neighbours(_l2_normalize(ta), topk)  # (n, k)
    idx_b, _ = _topk_neighbours(_l2_normalize(tb), topk)  # (n, k)
    shared = (idx_a[:, :, None] == idx_b[:, None, :]).any(-1).sum(1)  # (n,)
    return float(shared.double().mean()) / topk


# ----------------------------------------------------------------------------- Frechet distance


def feature_stats(feats: ArrayLike) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean (d,) and covariance (d, d) of features (n, d), float64, unbiased (divides by n - 1).

    The statistics the Frechet distance compares; save them once for a reference set. The
    covariance is accumulated in row chunks after subtracting the mean (two passes, stable).
    """
    x = _as_features(feats, "feats")
    n, d = x.shape
    if n < 2:
        raise ShapeMismatchError(f"feature_stats needs at least 2 samples to estimate a covariance, got n = {n}")
    mu = x.mean(0)  # (d,)
    sigma = torch.zeros(d, d, dtype=torch.float64, device=x.device)
    rows = max(1, _CHUNK_BYTES // (8 * d))
    for start in range(0, n, rows):
        c = x[start : start + rows] - mu  # (m, d)
        sigma += c.T @ c
    sigma /= n - 1
    return mu, sigma


def _sqrt_psd(s: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric positive semi-definite matrix (round-off clamped)."""
    w, v = torch.linalg.eigh(s)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance_from_stats(
    mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike, *, eps: float = 0.0
) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

    FD = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), computed in float64. The trace
    term uses tr((S1 S2)^(1/2)) = sum_i sqrt(lambda_i) with lambda the eigenvalues of the
    symmetric PSD matrix S1^(1/2) S2 S1^(1/2) (similar to S1 S2), so no non-symmetric matrix
    square root and no complex round-off is involved; singular covariances are fine.
    ``eps > 0`` adds eps * I to both covariances, the offset customarily used for FID when a
    covariance is near-singular (it changes the value by O(eps * d)).
    """
    m1 = _stat(mu1, "mu1", 1)
    m2 = _stat(mu2, "mu2", 1)
    s1 = _stat(sigma1, "sigma1", 2)
    s2 = _stat(sigma2, "sigma2", 2)
    d = m1.shape[0]
    for name, t, want in (("mu2", m2, (d,)), ("sigma1", s1, (d, d)), ("sigma2", s2, (d, d))):
        if tuple(t.shape) != want:
            raise ShapeMismatchError(
                f"{name} has shape {tuple(t.shape)} but mu1 has d = {d}, so {want} was expected; "
                "pass statistics of features from the same encoder"
            )
    device = m1.device
    m2, s1, s2 = m2.to(device), s1.to(device), s2.to(device)
    s1 = (s1 + s1.T) / 2
    s2 = (s2 + s2.T) / 2
    if eps:
        eye = torch.eye(d, dtype=torch.float64, device=device)
        s1 = s1 + eps * eye
        s2 = s2 + eps * eye
    root1 = _sqrt_psd(s1)  # (d, d)
    inner = root1 @ s2 @ root1  # (d, d) symmetric PSD
    lam = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0)  # (d,)
    value = (m1 - m2).square().sum() + torch.trace(s1) + torch.trace(s2) - 2 * lam.sqrt().sum()
    return float(value)


def _stat(x: ArrayLike, name: str, ndim: int) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(x))
    elif isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        raise ConfigError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")
    if t.dim() != ndim:
        want = "(d,)" if ndim == 1 else "(d, d)"
        raise ShapeMismatchError(f"{name} must have shape {want}, got shape {tuple(t.shape)}")
    t = t.to(torch.float64)
    if not bool(torch.isfinite(t).all()):
        raise ConfigError(f"{name} holds NaN or infinite values; recompute the statistics")
    return t


def frechet_distance(a: ArrayLike, b: ArrayLike, *, eps: float = 0.0) -> float:
    """Frechet distance between Gaussians fitted to features a (n_a, d) and b (n_b, d).

    FID when the features come from Inception, FD-DINOv2 (Stein et al. 2023) from DINOv2; the
    sample counts may differ but the feature width must not.
    """
    ta, tb = _as_features(a, "a"), _as_features(b, "b")
    if ta.shape[1] != tb.shape[1]:
        raise ShapeMismatchError(
            f"a and b must have the same feature width, got d = {ta.shape[1]} and d = {tb.shape[1]}; "
            "extract both with the same encoder"
        )
    return frechet_distance_from_stats(*feature_stats(ta), *feature_stats(tb), eps=eps)


# ----------------------------------------------------------------------------- precision and recall


def _kth_neighbour_radius(x: torch.Tensor, k: int) -> torch.Tensor:
    """For each row of x (n, d) float64, the Euclidean distance to its k-th nearest other row: (n,)."""
    n = x.shape[0]
    rows = max(1, _CHUNK_BYTES // (8 * n))
    out = torch.empty(n, dtype=torch.float64, device=x.device)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        block = torch.cdist(x[start:stop], x)  # (m, n)
        own = torch.arange(start, stop, device=x.device)
        block[own - start, own] = math.inf  # a row is not its own neighbour
        out[start:stop] = torch.topk(block, k, dim=1, largest=False).values[:, -1]
    return out


def _inside_any_ball(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """Fraction of ``points`` (m, d) within ``radii[j]`` of some ``centres[j]`` (n, d) (boundary included)."""
    rows = max(1, _CHUNK_BYTES // (8 * centres.shape[0]))
    hits = 0
    for start in range(0, points.shape[0], rows):
        block = torch.cdist(points[start : start + rows], centres)  # (m', n)
        hits += int((block <= radii[None, :]).any(dim=1).sum())
    return torch.tensor(hits / points.shape[0], dtype=torch.float64)


def precision_recall(real: ArrayLike, fake: ArrayLike, k: int = 3) -> Tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) of ``fake`` features against ``real``.

    Each set's manifold is the union of balls around its points, each ball's radius the
    distance to the point's ``k``-th nearest neighbour in its own set (k = 3, the paper's
    default). Precision is the fraction of fake rows inside the real manifold (are samples
    realistic?); recall the fraction of real rows inside the fake manifold (do samples cover
    the data?). Both in [0, 1]; the paper uses the same number of real and fake rows.
    Distances are Euclidean in float64, built in row blocks of at most 256 MiB.
    """
    tr, tf = _as_features(real, "real"), _as_features(fake, "fake")
    if tr.shape[1] != tf.shape[1]:
        raise ShapeMismatchError(
            f"real and fake must have the same feature width, got d = {tr.shape[1]} and d = {tf.shape[1]}; "
            "extract both with the same network"
        )
    tf = tf.to(tr.device)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"k must be a positive int (the paper uses 3), got {k!r}")
    for name, t in (("real", tr), ("fake", tf)):
        if t.shape[0] <= k:
            raise ShapeMismatchError(
                f"precision_recall needs more than k={k} rows in {name}, got {t.shape[0]}; pass more samples or a smaller k"
            )
    precision = _inside_any_ball(tf, tr, _kth_neighbour_radius(tr, k))
    recall = _inside_any_ball(tr, tf, _kth_neighbour_radius(tf, k))
    return float(precision), float(recall)


# ----------------------------------------------------------------------------- linear probe


def _as_labels(y: ArrayLike, name: str, n: int) -> torch.Tensor:
    t = torch.from_numpy(np.asarray(y)) if isinstance(y, np.ndarray) else y
    if not isinstance(t, torch.Tensor):
        raise ConfigError(f"{name} must be a torch.Tensor or numpy.ndarray of int class ids, got {type(y).__name__}")
    if t.dim() != 1 or t.shape[0] != n:
        raise ShapeMismatchError(
            f"{name} must have shape ({n},) (one class id per feature row), got shape {tuple(t.shape)}"
        )
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ConfigError(f"{name} must hold integer class ids, got dtype {t.dtype}")
    t = t.detach().to(torch.int64)
    if n and int(t.min()) < 0:
        raise ConfigError(f"{name} holds the negative class id {int(t.min())}; class ids must be 0, 1, ..., C-1")
    return t


_PROBE_OPTIMIZERS = ("lbfgs", "adamw")


def _fit_linear_head(
    xtr: torch.Tensor, ytr: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, optimizer: str, epochs: int,
    lr: float, weight_decay: float, batch_size: int, gen: torch.Generator, progress: bool,
) -> None:
    """Fit ``weight`` (C, d) and ``bias`` (C,) in place on (n_train, d) features: L-BFGS or AdamW (see linear_probe)."""
    dev = xtr.device
    from tqdm.auto import tqdm

    bar = tqdm(total=epochs, desc="linear probe", unit="epoch", disable=not progress)
    with torch.enable_grad(), torch.autocast(dev.type, enabled=False):
        if optimizer == "lbfgs":
            opt = torch.optim.LBFGS(
                [weight, bias], lr=lr, max_iter=epochs, history_size=20, line_search_fn="strong_wolfe",
                tolerance_grad=1e-9, tolerance_change=1e-12,
            )

            def closure() -> torch.Tensor:
                opt.zero_grad(set_to_none=True)
                logits = F.linear(xtr, weight, bias)  # (n_train, C)
                loss = F.cross_entropy(logits, ytr) + 0.5 * weight_decay * weight.square().sum()
                loss.backward()
                return loss

            opt.step(closure)
            bar.update(epochs)
        else:
            opt = torch.optim.AdamW([weight, bias], lr=lr, weight_decay=weight_decay)
            n = xtr.shape[0]
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * math.ceil(n / batch_size))
            for _ in range(epochs):
                order = torch.randperm(n, generator=gen).to(dev)
                for start in range(0, n, batch_size):
                    batch = order[start : start + batch_size]
                    logits = F.linear(xtr[batch], weight, bias)  # (B, C)
                    loss = F.cross_entropy(logits, ytr[batch])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                bar.update(1)
    bar.close()


def linear_probe(
    train_feats: ArrayLike,
    train_labels: ArrayLike,
    test_feats: ArrayLike,
    test_labels: ArrayLike,
    *,
    optimizer: str = "lbfgs",
    epochs: int = 100,
    lr: Optional[float] = None,
    weight_decay: float = 1e-4,
    batch_size: int = 256,
    standardize: bool = True,
    num_classes: Optional[int] = None,
    device: Optional[Union[str, torch.device]] = None,
    seed: int = 0,
    progress: bool = False,
) -> float:
    """Top-1 test accuracy (in [0, 1]) of a linear classifier trained on frozen features.

    Features are standardized with the training set's per-dimension mean and std (the
    affine-free BatchNorm in front of the linear head of the MAE probing protocol), then a
    linear layer (C, d) + bias is fit with cross-entropy plus ``weight_decay`` * ||W||^2 / 2:

    - ``optimizer="lbfgs"`` (default): full-batch L-BFGS with a strong-Wolfe line search for
      ``epochs`` iterations (one full pass each; ``lr`` defaults to 1). It converges to the
      regularized logistic-regression optimum whatever the dataset size, so it is the stable
      choice for comparing layers. Holds (n_train, C) logits at once.
    - ``optimizer="adamw"``: minibatch AdamW (``lr`` defaults to 1e-2, decoupled weight decay)
      with a cosine schedule over ``epochs`` passes of ``batch_size`` samples; for training
      sets too large for one batch.

    Computed in float32 on ``device`` (default: train_feats' device). Deterministic for a given
    ``seed`` on a given device; initialization and shuffling use their own generator and leave
    torch's global RNG untouched. ``num_classes`` defaults to the largest class id + 1.
    """
    if optimizer not in _PROBE_OPTIMIZERS:
        raise ConfigError(f"optimizer must be one of {_PROBE_OPTIMIZERS}, got {optimizer!r}")
    xtr = _as_features(train_feats, "train_feats")
    xte = _as_features(test_feats, "test_feats")
    if xtr.shape[1] != xte.shape[1]:
        raise ShapeMismatchError(
            f"train_feats and test_feats must have the same width, got d = {xtr.shape[1]} and d = {xte.shape[1]}"
        )
    if xtr.shape[0] == 0 or xte.shape[0] == 0:
        raise ShapeMismatchError("linear_probe needs at least one training and one test sample, got an empty set")
    ytr = _as_labels(train_labels, "train_labels", xtr.shape[0])
    yte = _as_labels(test_labels, "test_labels", xte.shape[0])
    for name, v in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name} must be a positive int, got {v!r}")
    if lr is None:
        lr = 1.0 if optimizer == "lbfgs" else 1e-2
    if not lr > 0:
        raise ConfigError(f"lr must be > 0, got {lr!r}")
    if not weight_decay >= 0:
        raise ConfigError(f"weight_decay must be >= 0, got {weight_decay!r}")
    largest = int(max(int(ytr.max()), int(yte.max()))) + 1
    if num_classes is None:
        num_classes = largest
    elif num_classes < largest:
        raise ConfigError(
            f"num_classes={num_classes} but the labels hold class id {largest - 1}; pass num_classes >= {largest}"
        )

    if device is not None:
        dev = torch.device(device)
    elif isinstance(train_feats, torch.Tensor):
        dev = train_feats.device
    else:
        dev = torch.device("cpu")
    if standardize:
        mean = xtr.mean(0, keepdim=True)  # (1, d)
        std = xtr.std(0, keepdim=True).clamp(min=1e-6) if xtr.shape[0] > 1 else torch.ones_like(mean)
        xtr = (xtr - mean) / std
        xte = (xte - mean) / std
    xtr, xte = xtr.float().to(dev), xte.float().to(dev)  # (n_train, d), (n_test, d)
    ytr, yte = ytr.to(dev), yte.to(dev)

    # Own generator for init and shuffling: deterministic, and the global RNG is left untouched.
    gen = torch.Generator().manual_seed(seed)
    d = xtr.shape[1]
    bound = 1.0 / math.sqrt(d)
    weight = ((torch.rand(num_classes, d, generator=gen) * 2 - 1) * bound).to(dev).requires_grad_()  # (C, d)
    bias = torch.zeros(num_classes, device=dev, requires_grad=True)  # (C,)

    _fit_linear_head(xtr, ytr, weight, bias, optimizer, epochs, lr, weight_decay, batch_size, gen, progress)
    with torch.no_grad():
        pred = F.linear(xte, weight, bias).argmax(1)  # (n_test,)
    return float((pred == yte).double().mean())
