"""Interpolant paths, time sampling and the velocity loss of the SiT recipe (REPA_FACTS section 3).

A path mixes clean data x and Gaussian noise eps (SiT paper, arXiv 2401.08740):

    x_t = alpha(t) x + sigma(t) eps,      t in [0, 1], t = 0 clean, t = 1 pure noise,
    v_t = d_alpha(t) x + d_sigma(t) eps   (the velocity the model regresses).

``"linear"``: alpha = 1 - t, sigma = t, so v = eps - x.
``"cosine"``: alpha = cos(pi t / 2), sigma = sin(pi t / 2), so v = (pi/2)(cos(pi t/2) eps - sin(pi t/2) x).

For a trained model v(x_t, t) = E[v_t | x_t]. Because x_t and v_t are both linear in (x, eps),
the 2x2 system

    [x_t]   [alpha    sigma  ] [x  ]
    [v  ] = [d_alpha  d_sigma] [eps]

gives, with det = alpha d_sigma - d_alpha sigma (1 for linear, pi/2 for cosine),

    E[x | x_t]   = (d_sigma x_t - sigma v) / det        (Tweedie's denoised estimate)
    E[eps | x_t] = (alpha v - d_alpha x_t) / det
    score(x_t)   = -E[eps | x_t] / sigma                (Tweedie: grad log p_t = -E[eps|x_t]/sigma)

These conversions are what the SDE sampler needs (:mod:`repa.sit.sampling`).
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple, Union

import torch

from ..errors import ShapeMismatchError, UnknownNameError

__all__ = [
    "Path",
    "LinearPath",
    "CosinePath",
    "PATHS",
    "TIME_SAMPLERS",
    "get_path",
    "sample_time",
    "velocity_loss",
]


def _expand(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape per-sample times (B,) to (B, 1, ..., 1) so they broadcast against ``like`` (B, ...)."""
    if t.ndim == 0:
        return t
    return t.reshape(t.shape[0], *([1] * (like.ndim - 1)))


class Path:
    """An interpolant x_t = alpha(t) x + sigma(t) eps between data (t = 0) and noise (t = 1).

    Subclasses define ``alpha``, ``sigma``, ``d_alpha``, ``d_sigma`` (elementwise on a tensor of
    times) and ``time_from_ratio`` (the t at which sigma/alpha equals a given ratio, used by
    log-normal time sampling). Everything else follows from the 2x2 system in the module docstring.
    """

    name: str = ""

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def d_alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def d_sigma(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def time_from_ratio(self, ratio: torch.Tensor) -> torch.Tensor:
        """The time t with sigma(t) / alpha(t) = ratio (noise-to-signal ratio, ratio >= 0)."""
        raise NotImplementedError

    def coefficients(self, t: torch.Tensor, like: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """(alpha, sigma, d_alpha, d_sigma) at t (B,), shaped to broadcast against ``like`` (B, ...)."""
        t = _expand(torch.as_tensor(t, dtype=like.dtype, device=like.device), like)  # (B, 1, ..., 1)
        return self.alpha(t), self.sigma(t), self.d_alpha(t), self.d_sigma(t)

    def interpolate(self, x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Noised input and velocity target: x (B, ...), eps (B, ...), t (B,) -> (x_t, v_target).

        x_t = alpha x + sigma eps and v_target = d_alpha x + d_sigma eps (REPA_FACTS section 3).
        """
        if x.shape != eps.shape:
            raise ShapeMismatchError(
                f"interpolate: x has shape {tuple(x.shape)} but eps has {tuple(eps.shape)}; "
                "draw the noise with torch.randn_like(x)"
            )
        a, s, da, ds = self.coefficients(t, x)  # each (B, 1, ..., 1)
        x_t = a * x + s * eps  # (B, ...)
        v_target = da * x + ds * eps  # (B, ...)
        return x_t, v_target

    @staticmethod
    def _det(a: torch.Tensor, s: torch.Tensor, da: torch.Tensor, ds: torch.Tensor) -> torch.Tensor:
        """alpha d_sigma - d_alpha sigma, the determinant of the 2x2 system (never zero on a valid path)."""
        return a * ds - da * s  # (B, 1, ..., 1)

    def velocity_to_x0(self, v: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Denoised estimate E[x | x_t] = (d_sigma x_t - sigma v) / det from a velocity (B, ...)."""
        a, s, da, ds = self.coefficients(t, x_t)
        return (ds * x_t - s * v) / self._det(a, s, da, ds)  # (B, ...)

    def velocity_to_eps(self, v: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Noise estimate E[eps | x_t] = (alpha v - d_alpha x_t) / det from a velocity (B, ...)."""
        a, s, da, ds = self.coefficients(t, x_t)
        return (a * v - da * x_t) / self._det(a, s, da, ds)  # (B, ...)

    def velocity_to_score(self, v: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Score grad log p_t(x_t) = -E[eps | x_t] / sigma(t) from a velocity (B, ...); needs t > 0.

        Linear path: score = -(x_t + (1 - t) v) / t. Cosine path: score = -(sin x_t + (2/pi) cos v) / sin,
        with sin, cos evaluated at pi t / 2.
        """
        _, s, _, _ = self.coefficients(t, x_t)
        return -self.velocity_to_eps(v, x_t, t) / s  # (B, ...)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class LinearPath(Path):
    """alpha = 1 - t, sigma = t (rectified flow / SiT "Linear"): x_t = (1 - t) x + t eps, v = eps - x."""

    name = "linear"

    def alpha(self, t):
        return 1 - t

    def sigma(self, t):
        return t

    def d_alpha(self, t):
        return -torch.ones_like(t)

    def d_sigma(self, t):
        return torch.ones_like(t)

    def time_from_ratio(self, ratio):
        return ratio / (1 + ratio)  # t / (1 - t) = ratio


class CosinePath(Path):
    """alpha = cos(pi t / 2), sigma = sin(pi t / 2) (SiT "GVP", variance preserving)."""

    name = "cosine"

    def alpha(self, t):
        return torch.cos(t * (math.pi / 2))

    def sigma(self, t):
        return torch.sin(t * (math.pi / 2))

    def d_alpha(self, t):
        return -(math.pi / 2) * torch.sin(t * (math.pi / 2))

    def d_sigma(self, t):
        return (math.pi / 2) * torch.cos(t * (math.pi / 2))

    def time_from_ratio(self, ratio):
        return torch.atan(ratio) * (2 / math.pi)  # tan(pi t / 2) = ratio


PATHS: Dict[str, Path] = {"linear": LinearPath(), "cosine": CosinePath()}


def get_path(path: Union[str, Path]) -> Path:
    """A :class:`Path` from its name (``"linear"``, ``"cosine"``) or the instance itself."""
    if isinstance(path, Path):
        return path
    if path not in PATHS:
        raise UnknownNameError(f"unknown path {path!r}; valid paths are {', '.join(PATHS)} (or a Path instance)")
    return PATHS[path]


TIME_SAMPLERS = ("uniform", "lognormal")


def sample_time(
    batch: int,
    kind: str = "uniform",
    *,
    path: Union[str, Path] = "linear",
    generator: Optional[torch.Generator] = None,
    device: Optional[Union[str, torch.device]] = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Training times t (batch,) in [0, 1] (REPA's ``--weighting``).

    ``"uniform"``: t ~ U(0, 1).
    ``"lognormal"``: the noise-to-signal ratio sigma/alpha = exp(n), n ~ N(0, 1) (EDM's log-normal
    noise levels); for the linear path t = s / (1 + s), i.e. logit(t) ~ N(0, 1) and median t = 0.5;
    for the cosine path t = (2/pi) atan(s), as REPA's reference does.
    """
    if kind == "uniform":
        return torch.rand(batch, generator=generator, device=device, dtype=dtype)  # (B,)
    if kind == "lognormal":
        ratio = torch.randn(batch, generator=generator, device=device, dtype=dtype).exp()  # (B,)
        return get_path(path).time_from_ratio(ratio)  # (B,)
    raise UnknownNameError(f"unknown time sampling {kind!r}; valid kinds are {', '.join(TIME_SAMPLERS)}")


def velocity_loss(model_out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Unweighted squared error per sample: mean over all dims but the batch, (B, ...) -> (B,).

    The training loss is its batch mean (REPA_FACTS section 3: unweighted MSE on velocity).
    """
    if model_out.shape != target.shape:
        raise ShapeMismatchError(
            f"velocity_loss: prediction shape {tuple(model_out.shape)} != target shape {tuple(target.shape)}; "
            "the model must output a tensor shaped like its input"
        )
    if model_out.ndim < 1:
        raise ShapeMismatchError("velocity_loss needs a batch dimension, got a scalar")
    sq = (model_out.float() - target.float()) ** 2  # (B, ...)
    return sq.reshape(sq.shape[0], -1).mean(dim=1)  # (B,)
