"""Alignment losses between projected hidden states and encoder targets.

Every loss maps ``pred`` (B, N, D) and ``target`` (B, N, D) to a scalar and is computed in
float32 whatever the autocast dtype: REPA's reference normalized in fp16 and produced NaN
losses after 70-160K steps (its issue #46); upcasting first fixes it.

Names: ``"cosine"`` (REPA), ``"nt-xent"``, ``"smooth-l1"``, ``"mse"``, ``"vf"`` (VA-VAE),
``"relation"`` (token-relation MSE), ``"trd"`` (VideoREPA's Token Relation Distillation, chunked
over token rows so its memory stays bounded for long videos). :func:`build_loss` also accepts a
callable.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from .errors import ConfigError, UnknownNameError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

__all__ = [
    "cosine_alignment",
    "nt_xent_alignment",
    "smooth_l1_alignment",
    "mse_alignment",
    "vf_alignment",
    "relation_alignment",
    "token_relation_distillation",
    "mean_cosine_similarity",
    "zscore_targets",
    "build_loss",
    "register_loss",
    "list_losses",
]


def _fp32(*xs: torch.Tensor):
    return tuple(x.float() for x in xs)


@torch.autocast("cuda", enabled=False)
@torch.autocast("cpu", enabled=False)
def mean_cosine_similarity(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over batch and tokens of cos(pred[b, n], target[b, n]), in fp32."""
    pred, target = _fp32(pred, target)
    return (F.normalize(pred, dim=-1) * F.normalize(target, dim=-1)).sum(-1).mean()


def cosine_alignment(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """REPA's L = -(1/N) sum_n cos(pred[n], target[n]), averaged over the batch (negative by design)."""
    return -mean_cosine_similarity(pred, target)


@torch.autocast("cuda", enabled=False)
@torch.autocast("cpu", enabled=False)
def nt_xent_alignment(pred: torch.Tensor, target: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Patch-wise InfoNCE across the batch.

    For each token position n, pred[b, n] must pick target[b, n] among target[:, n] of the
    whole batch: cross-entropy over logits cos(pred[b, n], target[b', n]) / temperature.
    """
    pred, target = _fp32(pred, target)
    p = F.normalize(pred, dim=-1).transpose(0, 1)  # (N, B, D)
    t = F.normalize(target, dim=-1).transpose(0, 1)  # (N, B, D)
    logits = p @ t.transpose(1, 2) / temperature  # (N, B, B)
    n, b, _ = logits.shape
    labels = torch.arange(b, device=logits.device).expand(n, b)  # (N, B)
    return F.cross_entropy(logits.reshape(n * b, b), labels.reshape(-1))


@torch.autocast("cuda", enabled=False)
@torch.autocast("cpu", enabled=False)
def smooth_l1_alignment(pred: torch.Tensor, target: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """Smooth-L1 between raw features (SRA's choice), mean over all elements."""
    pred, target = _fp32(pred, target)
    return F.smooth_l1_loss(pred, target, beta=beta)


@torch.autocast("cuda", enabled=False)
@torch.autocast("cpu", enabled=False)
def mse_alignment(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error between raw features, mean over all elements."""
    pred, target = _fp32(pred, target)
    return F.mse_loss(pred, target)


def _token_cosine_matrix(x: torch.Tensor) -> torch.Tensor:
    x = F.normalize(x, dim=-1)
    return x @ x.transpose(1, 2)  # (B, N, N)


@torch.autocast("cuda", enabled=False)
@torch.autocast("cpu", enabled=False)
def vf_alignment(
    pred: torch.Tensor, target: torch.Tensor, margin_cos: float = 0.5, margin_dist: float = 0.25
) -> torch.Tensor:
    """VA-VAE's vision-foundation loss: margin cosine plus margin distance-matrix terms.

    relu(1 - m_cos - cos(z_i, f_i)) averaged over tokens, plus
    relu(|cos(z_i, z_j) - cos(f_i, f_j)| - m_dist) averaged over token pairs of each image.
    """
    pred, target = _fp32(pred, target)
    cos = (F.normalize(pred, dim=-1) * F.normalize(target, dim=-1)).sum(-1)  # (B, N)
    l_cos = F.relu(1.0 - margin_cos - cos).mean()
    diff = (_token_cosine_matrix(pred) - _token_cosine_matrix(target)).abs()  # (B, N, N)
    l_dist = F.relu(diff - margin_dist).mean()
    return l_cos + l_dist


@torch.autocast("cuda", enabled=False)
@torch.autocast("cpu", enabled=False)
def relation_alignment(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Match token-to-token cosine-similarity matrices (VideoREPA's relation distillation): MSE."""
    pred, target = _fp32(pred, target)
    return F.mse_loss(_token_cosine_matrix(pred), _token_cosine_matrix(target))


def _trd_rows(
    p_rows: torch.Tensor, p_all: torch.Tensor, t_rows: torch.Tensor, t_all: torch.Tensor, margin: float
) -> torch.Tensor:
    """Sum over a block of rows of relu(|cos_pred - cos_target| - margin); inputs L2-normalized."""
    gap = (p_rows @ p_all.transpose(1, 2) - t_rows @ t_all.transpose(1, 2)).abs()  # (B, r, N)
    return F.relu(gap - margin).sum()


@torch.autocast("cuda", enabled=False)
@torch.autocast("cpu", enabled=False)
def token_relation_distillation(
    pred: torch.Tensor, target: torch.Tensor, margin: float = 0.1, chunk_size: int = 1024
) -> torch.Tensor:
    """VideoREPA's Token Relation Distillation (TRD) loss (arXiv 2505.23656), in fp32.

    For each sample, with L2-normalized tokens p_i (projected model tokens) and y_i (teacher
    tokens) over all N = t*h*w tokens of the latent video, the relation of two tokens is their
    cosine similarity; pairs within one latent frame are the spatial relations, pairs across
    latent frames the temporal ones. The loss is the mean over samples and over all N^2 pairs
    (i, j) of ``relu(|cos(p_i, p_j) - cos(y_i, y_j)| - margin)``: relations closer than the
    margin cost nothing (soft guidance). The margin 0.1 is the value of the authors' released
    CogVideoX-2B training script. Only relations enter, so no token is pushed onto its target.

    The N x N similarity matrices are never built whole: rows are processed ``chunk_size`` at
    a time and each block is recomputed in the backward pass (activation checkpointing), so
    memory is O(B * chunk_size * N) instead of O(B * N^2), with the same value and gradients.
    """
    if margin < 0:
        raise ConfigError(f"margin must be >= 0, got {margin!r}")
    if isinstance(chunk_size, bool) or int(chunk_size) < 1:
        raise ConfigError(f"chunk_size must be a positive int (token rows per block), got {chunk_size!r}")
    pred, target = _fp32(pred, target)
    p = F.normalize(pred, dim=-1)  # (B, N, D)
    t = F.normalize(target, dim=-1)  # (B, N, D_e)
    b, n, _ = p.shape
    chunk = int(chunk_size)
    if n <= chunk:
        total = _trd_rows(p, p, t, t, margin)
    else:
        from torch.utils.checkpoint import checkpoint

        total = p.new_zeros(())
        for start in range(0, n, chunk):
            rows = slice(start, min(start + chunk, n))
            part = checkpoint(_trd_rows, p[:, rows], p, t[:, rows], t, margin, use_reentrant=False)
            total = total + part
    return total / (b * n * n)


def zscore_targets(target: torch.Tensor, alpha: float = 0.6, eps: float = 1e-6) -> torch.Tensor:
    """iREPA's spatial normalization of targets (B, N, D), per channel over tokens.

    y <- (y - alpha * mean_n(y)) / (std_n(y) + eps). Done in fp32.
    """
    y = target.float()
    mean = y.mean(dim=1, keepdim=True)  # (B, 1, D)
    std = y.std(dim=1, keepdim=True, unbiased=False)  # (B, 1, D)
    return (y - alpha * mean) / (std + eps)


_LOSSES: Dict[str, Callable[..., torch.Tensor]] = {
    "cosine": cosine_alignment,
    "nt-xent": nt_xent_alignment,
    "smooth-l1": smooth_l1_alignment,
    "mse": mse_alignment,
    "vf": vf_alignment,
    "relation": relation_alignment,
    "trd": token_relation_distillation,
}

# per loss: constructor keyword of REPARegularizer -> keyword of the loss function
_LOSS_OPTIONS: Dict[str, Dict[str, str]] = {
    "nt-xent": {"temperature": "temperature"},
    "smooth-l1": {"beta": "beta"},
    "vf": {"margin_cos": "margin_cos", "margin_dist": "margin_dist"},
    "trd": {"margin": "margin", "relation_chunk": "chunk_size"},
}


def register_loss(
    name: str, fn: Optional[Callable[..., torch.Tensor]] = None, *, options: Optional[Dict[str, str]] = None,
    overwrite: bool = False,
) -> Any:
    """Register ``fn(pred, target, **kw) -> scalar`` under ``name`` (usable as ``loss=name``).

    Use it as ``register_loss("mine", fn)`` or as a decorator ``@register_loss("mine")``.
    ``options`` maps constructor keywords of :class:`~repa.REPARegularizer` to keywords of
    ``fn`` (e.g. ``{"temperature": "tau"}``), so ``REPARegularizer(..., loss="mine",
    temperature=0.2)`` binds ``tau=0.2``. ``overwrite=True`` replaces an existing entry.
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"register_loss: name must be a non-empty string, got {name!r}")
    key = name.lower()

    def add(loss_fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        if not callable(loss_fn):
            raise ConfigError(
                f"register_loss({name!r}, ...): expected a callable (pred, target) -> scalar, got {loss_fn!r}"
            )
        if key in _LOSSES and not overwrite:
            raise ConfigError(f"loss {key!r} is already registered; pass overwrite=True to replace it")
        _LOSSES[key] = loss_fn
        _LOSS_OPTIONS.pop(key, None)
        if options:
            _LOSS_OPTIONS[key] = dict(options)
        return loss_fn

    return add if fn is None else add(fn)


def list_losses() -> List[str]:
    """The registered loss names, sorted (the values ``loss=`` accepts besides a callable)."""
    return sorted(_LOSSES)


def loss_option_keys() -> List[str]:
    """Every constructor keyword some registered loss accepts (``temperature``, ``beta``, ...)."""
    return sorted({k for opts in _LOSS_OPTIONS.values() for k in opts})


def __getattr__(name: str) -> Any:
    """``LOSSES`` and ``LOSS_OPTIONS``: deprecated public names of the registry's dicts."""
    if name in ("LOSSES", "LOSS_OPTIONS"):
        warnings.warn(
            f"repa.losses.{name} is deprecated; use repa.register_loss / repa.list_losses",
            DeprecationWarning,
            stacklevel=2,
        )
        return _LOSSES if name == "LOSSES" else _LOSS_OPTIONS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_loss(loss: str | LossFn, options: Optional[Dict[str, Any]] = None) -> LossFn:
    """Return the loss function for a name (with its options bound) or pass a callable through."""
    options = dict(options or {})
    if callable(loss):
        if options:
            raise ConfigError(f"loss options {sorted(options)} only apply to named losses, not to a callable")
        return loss
    if not isinstance(loss, str) or loss.lower() not in _LOSSES:
        raise UnknownNameError(
            f"unknown loss {loss!r}; choose from {list_losses()} or pass a callable (pred, target) -> scalar"
        )
    name = loss.lower()
    allowed = _LOSS_OPTIONS.get(name, {})
    bad = sorted(set(options) - set(allowed))
    if bad:
        raise ConfigError(
            f"option(s) {bad} do not apply to loss {name!r}; it accepts {sorted(allowed) or 'no options'}"
        )
    fn = _LOSSES[name]
    return functools.partial(fn, **{allowed[k]: v for k, v in options.items()}) if options else fn
