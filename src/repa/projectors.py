"""Projectors from the diffusion model's hidden width to an encoder's width.

``"mlp"`` is REPA's exactly: Linear(D, 2048) -> SiLU -> Linear(2048, 2048) -> SiLU ->
Linear(2048, D_e). ``"linear"`` is one Linear. ``"conv"`` is iREPA's k x k convolution over the
token grid. A callable ``(in_dim, out_dim) -> nn.Module`` builds a custom projector.

Projectors map tokens (B, N, D) -> (B, N, D_e). Those that need the spatial grid set
``uses_grid = True`` and take ``forward(x, grid)``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple, Union

import torch
from torch import nn

from .errors import ConfigError, UnknownNameError

__all__ = ["MLPProjector", "LinearProjector", "ConvProjector", "build_projector", "PROJECTORS"]


class MLPProjector(nn.Sequential):
    """REPA's projector: Linear-SiLU-Linear-SiLU-Linear with hidden width ``hidden_dim`` (2048)."""

    uses_grid = False

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048) -> None:
        super().__init__(
            nn.Linear(in_dim, hidden_dim),
            nn.SiLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.SiLU(),
            nn.Linear(hidden_dim, out_dim),
        )


class LinearProjector(nn.Linear):
    """A single Linear(D, D_e)."""

    uses_grid = False


class ConvProjector(nn.Module):
    """iREPA's projector: a k x k convolution over the (h, w) token grid, 'same' padding."""

    uses_grid = True

    def __init__(self, in_dim: int, out_dim: int, kernel_size: int = 3) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ConfigError(f"conv projector: kernel_size must be a positive odd int, got {kernel_size!r}")
        self.conv = nn.Conv2d(in_dim, out_dim, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        b, n, d = x.shape
        fmap = x.transpose(1, 2).reshape(b, d, *grid)  # (B, D, h, w)
        return self.conv(fmap).flatten(2).transpose(1, 2)  # (B, N, D_e)


PROJECTORS = {"mlp": MLPProjector, "linear": LinearProjector, "conv": ConvProjector}

ProjectorLike = Union[str, Callable[[int, int], nn.Module]]


def _check_projector_dim(projector_dim: Any) -> None:
    """``projector_dim`` is a width: a positive int (REPA: 2048)."""
    if isinstance(projector_dim, bool) or not isinstance(projector_dim, int) or projector_dim <= 0:
        raise ConfigError(f"projector_dim must be a positive int (REPA: 2048), got {projector_dim!r}")


def build_projector(
    kind: ProjectorLike,
    in_dim: int,
    out_dim: int,
    *,
    projector_dim: int = 2048,
    kernel_size: Optional[int] = None,
) -> nn.Module:
    """Build one projector from a name or a factory ``(in_dim, out_dim) -> nn.Module``."""
    _check_projector_dim(projector_dim)
    if callable(kind) and not isinstance(kind, str):
        module = kind(in_dim, out_dim)
        if not isinstance(module, nn.Module):
            raise ConfigError(f"projector factory {kind!r} returned {type(module).__name__}, not an nn.Module")
        return module
    if not isinstance(kind, str) or kind.lower() not in PROJECTORS:
        raise UnknownNameError(
            f"unknown projector {kind!r}; choose from {sorted(PROJECTORS)} or pass a callable (in_dim, out_dim) -> nn.Module"
        )
    kind = kind.lower()
    if kernel_size is not None and kind != "conv":
        raise ConfigError(f"kernel_size={kernel_size} only applies to projector='conv', not {kind!r}")
    kwargs: dict[str, Any] = {}
    if kind == "mlp":
        kwargs["hidden_dim"] = projector_dim
    elif kind == "conv" and kernel_size is not None:
        kwargs["kernel_size"] = kernel_size
    return PROJECTORS[kind](in_dim, out_dim, **kwargs)
