"""Projectors from the diffusion model's hidden width to an encoder's width.

``"mlp"`` is REPA's exactly: Linear(D, 2048) -> SiLU -> Linear(2048, 2048) -> SiLU ->
Linear(2048, D_e), initialized as the reference initializes it (inside its SiT's
``initialize_weights``): Xavier-uniform weights, zero biases. ``"linear"`` is one Linear with
the same initialization. ``"conv"`` is iREPA's k x k convolution over the
token grid. A callable ``(in_dim, out_dim) -> nn.Module`` builds a custom projector.

Projectors map tokens (B, N, D) -> (B, N, D_e). Those that need the spatial grid set
``uses_grid = True`` and take ``forward(x, grid)``.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from .errors import ConfigError, UnknownNameError

__all__ = [
    "MLPProjector", "LinearProjector", "ConvProjector", "build_projector", "register_projector", "list_projectors",
]


def _xavier_init(linear: nn.Linear) -> None:
    """The reference's rule for every Linear of its projectors: Xavier-uniform weight, zero bias.

    Xavier-uniform draws from U(-a, a) with a = sqrt(6 / (fan_in + fan_out)), so the output
    variance neither grows nor shrinks with the width (PyTorch's default Linear init instead
    uses a = 1 / sqrt(fan_in) and a non-zero bias).
    """
    nn.init.xavier_uniform_(linear.weight)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


class MLPProjector(nn.Sequential):
    """REPA's projector: Linear-SiLU-Linear-SiLU-Linear with hidden width ``projector_dim`` (2048).

    Submodules ``0``, ``2``, ``4`` are the Linears, the names of the reference's
    ``projectors.{i}.{0,2,4}`` (so its weights load by name); initialized Xavier-uniform with
    zero biases, as the reference does.
    """

    uses_grid = False

    def __init__(
        self, in_dim: int, out_dim: int, projector_dim: int = 2048, *, hidden_dim: Optional[int] = None
    ) -> None:
        if hidden_dim is not None:  # the name before 0.2: deprecated (the model's width is `model_dim`)
            warnings.warn(
                "MLPProjector(hidden_dim=...) is deprecated; pass projector_dim=... (the MLP's width)",
                DeprecationWarning,
                stacklevel=2,
            )
            projector_dim = hidden_dim
        super().__init__(
            nn.Linear(in_dim, projector_dim),
            nn.SiLU(),
            nn.Linear(projector_dim, projector_dim),
            nn.SiLU(),
            nn.Linear(projector_dim, out_dim),
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform weights and zero biases for the three Linears (the reference's init)."""
        for module in self:
            if isinstance(module, nn.Linear):
                _xavier_init(module)


class LinearProjector(nn.Linear):
    """A single Linear(D, D_e), initialized like the MLP's Linears (Xavier-uniform, zero bias)."""

    uses_grid = False

    def reset_parameters(self) -> None:  # called by nn.Linear.__init__
        _xavier_init(self)


class ConvProjector(nn.Module):
    """iREPA's projector: a k x k convolution over the (h, w) token grid, 'same' padding (per frame for (t, h, w))."""

    uses_grid = True

    def __init__(self, in_dim: int, out_dim: int, kernel_size: int = 3) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ConfigError(f"conv projector: kernel_size must be a positive odd int, got {kernel_size!r}")
        self.conv = nn.Conv2d(in_dim, out_dim, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor, grid: Tuple[int, ...]) -> torch.Tensor:
        b, n, d = x.shape
        if len(grid) == 3:  # video tokens (t, h, w): the same 2D convolution on each latent frame
            t = int(grid[0])
            return self.forward(x.reshape(b * t, n // t, d), tuple(grid[1:])).reshape(b, n, -1)  # (B, N, D_e)
        fmap = x.transpose(1, 2).reshape(b, d, *grid)  # (B, D, h, w)
        return self.conv(fmap).flatten(2).transpose(1, 2)  # (B, N, D_e)


_PROJECTORS: Dict[str, Callable[..., nn.Module]] = {
    "mlp": MLPProjector,
    "linear": LinearProjector,
    "conv": ConvProjector,
}


def register_projector(
    name: str, factory: Optional[Callable[..., nn.Module]] = None, *, overwrite: bool = False
) -> Any:
    """Register ``factory(in_dim, out_dim) -> nn.Module`` under ``name`` (usable as ``projector=name``).

    Use it as ``register_projector("mine", factory)`` or as a decorator. A module that reads
    the token grid sets ``uses_grid = True`` and takes ``forward(x, grid)``.
    ``overwrite=True`` replaces an existing entry.
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"register_projector: name must be a non-empty string, got {name!r}")
    key = name.lower()

    def add(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if not callable(fn):
            raise ConfigError(f"register_projector({name!r}, ...): expected a callable (in_dim, out_dim) -> nn.Module")
        if key in _PROJECTORS and not overwrite:
            raise ConfigError(f"projector {key!r} is already registered; pass overwrite=True to replace it")
        _PROJECTORS[key] = fn
        return fn

    return add if factory is None else add(factory)


def list_projectors() -> List[str]:
    """The registered projector names, sorted (the values ``projector=`` accepts besides a callable)."""
    return sorted(_PROJECTORS)


def __getattr__(name: str) -> Any:
    """``PROJECTORS``: the deprecated public name of the registry's dict."""
    if name == "PROJECTORS":
        warnings.warn(
            "repa.projectors.PROJECTORS is deprecated; use repa.register_projector / repa.list_projectors",
            DeprecationWarning,
            stacklevel=2,
        )
        return _PROJECTORS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

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
    if not isinstance(kind, str) or kind.lower() not in _PROJECTORS:
        raise UnknownNameError(
            f"unknown projector {kind!r}; choose from {list_projectors()} or pass a callable "
            "(in_dim, out_dim) -> nn.Module"
        )
    kind = kind.lower()
    if kernel_size is not None and kind != "conv":
        raise ConfigError(f"kernel_size={kernel_size} only applies to projector='conv', not {kind!r}")
    kwargs: dict[str, Any] = {}
    if kind == "mlp":
        kwargs["projector_dim"] = projector_dim
    elif kind == "conv" and kernel_size is not None:
        kwargs["kernel_size"] = kernel_size
    return _PROJECTORS[kind](in_dim, out_dim, **kwargs)
