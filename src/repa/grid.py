"""Token grids: infer (h, w) from a token count and resample tokens between grids.

Tokens are carried in the canonical layout (B, N, C) with N = h * w in row-major order, the
layout of ViT/DiT patch tokens and of a flattened (B, C, H, W) feature map. Video models lay
their tokens on a 3D grid (t, h, w): N = t * h * w, frame-major (all tokens of latent frame 0,
then frame 1, ...), each frame row-major, the layout of a flattened (B, C, t, h, w) map.
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from einops import rearrange

from .errors import ConfigError, ShapeMismatchError

Grid = Tuple[int, int]
Grid3D = Tuple[int, int, int]
AnyGrid = Union[Grid, Grid3D]
GridLike = Union[int, Sequence[int]]

__all__ = [
    "Grid",
    "Grid3D",
    "AnyGrid",
    "as_grid",
    "as_token_grid",
    "grid_cells",
    "format_grid",
    "infer_grid",
    "flatten_feature_map",
    "resample_tokens",
]


def as_grid(value: GridLike) -> Grid:
    """Normalize ``16`` or ``(16, 16)`` to a ``(h, w)`` tuple of positive ints."""
    if isinstance(value, int):
        h = w = value
    else:
        try:
            h, w = (int(v) for v in value)
        except (TypeError, ValueError):
            raise ConfigError(f"grid must be an int or a pair (h, w) of ints, got {value!r}") from None
    if h <= 0 or w <= 0:
        raise ConfigError(f"grid sides must be positive, got {(h, w)}")
    return (h, w)


def as_token_grid(value: GridLike) -> AnyGrid:
    """Normalize ``16``, ``(h, w)`` or ``(t, h, w)`` to a tuple of positive ints.

    A 3-tuple is a video grid: ``t`` latent frames (after temporal patching) of ``h x w`` tokens.
    """
    if not isinstance(value, int):
        try:
            sides = tuple(int(v) for v in value)
        except (TypeError, ValueError):
            raise ConfigError(
                f"grid must be an int, a pair (h, w) or a triple (t, h, w) of ints, got {value!r}"
            ) from None
        if len(sides) == 3:
            if min(sides) <= 0:
                raise ConfigError(f"grid sides must be positive, got {sides}")
            return sides
        if len(sides) != 2:
            raise ConfigError(f"grid must be (h, w) or (t, h, w), got {len(sides)} sides: {value!r}")
    return as_grid(value)


def grid_cells(grid: Sequence[int]) -> int:
    """Number of tokens a grid holds: h * w, or t * h * w."""
    return int(math.prod(int(v) for v in grid))


def format_grid(grid: Sequence[int]) -> str:
    """``(16, 16)`` -> ``"16x16"``; ``(21, 30, 52)`` -> ``"21x30x52"`` (t x h x w)."""
    return "x".join(str(int(v)) for v in grid)


def infer_grid(num_tokens: int, *, what: str = "tokens") -> Grid:
    """Return the square grid ``(s, s)`` with ``s * s == num_tokens``.

    Non-square token counts cannot be inferred; the error asks for an explicit ``grid=(h, w)``.
    """
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ShapeMismatchError(
            f"cannot infer a square token grid from {num_tokens} {what}; "
            f"pass grid=(h, w) with h * w == {num_tokens}"
        )
    return (side, side)


def flatten_feature_map(x: torch.Tensor) -> Tuple[torch.Tensor, Grid]:
    """(B, C, H, W) -> ((B, H*W, C), (H, W)): the one place conv features become tokens."""
    h, w = x.shape[-2:]
    return rearrange(x, "b c h w -> b (h w) c"), (h, w)  # (B, H*W, C)


def resample_tokens(tokens: torch.Tensor, src: GridLike, dst: GridLike, mode: str = "auto") -> torch.Tensor:
    """Resample tokens (B, N_s, C) laid out on grid ``src`` to grid ``dst``.

    2D grids (h, w): the tokens are reshaped to a feature map and resampled with
    ``F.interpolate``. ``"auto"`` averages when shrinking on both axes (``"area"``: an integer
    factor gives the exact mean of each block of tokens) and otherwise interpolates bilinearly
    (``align_corners=False``: token centres sit at cell centres; antialiased where an axis shrinks).

    3D grids (t, h, w): each frame is resampled in space as above, then each token position is
    resampled in time, ``"area"`` (mean of whole frames for an integer factor) when time
    shrinks and ``"linear"`` (``align_corners=False``) otherwise. Both steps are separable, so
    this equals trilinear/area resampling without materializing both grids at full size.
    Returns (B, N_d, C). Identical grids return the input unchanged.
    """
    src, dst = as_token_grid(src), as_token_grid(dst)
    b, n, c = tokens.shape
    if n != grid_cells(src):
        raise ShapeMismatchError(
            f"{n} tokens do not fill the source grid {format_grid(src)} ({grid_cells(src)} cells)"
        )
    if src == dst:
        return tokens
    if len(src) != len(dst):
        raise ShapeMismatchError(
            f"cannot resample tokens between a {len(src)}D grid {format_grid(src)} and a {len(dst)}D grid "
            f"{format_grid(dst)}: give both sides video grids (t, h, w) or both image grids (h, w)"
        )
    if len(src) == 3:
        return _resample_3d(tokens, src, dst, mode)  # type: ignore[arg-type]
    fmap = rearrange(tokens, "b (h w) c -> b c h w", h=src[0])  # (B, C, h_s, w_s)
    dtype = fmap.dtype
    if mode == "auto":
        mode = "area" if dst[0] <= src[0] and dst[1] <= src[1] else "bilinear"
    kwargs = {"align_corners": False, "antialias": True} if mode in ("bilinear", "bicubic") else {}
    out = F.interpolate(fmap.float(), size=dst, mode=mode, **kwargs)  # (B, C, h_d, w_d)
    return rearrange(out, "b c h w -> b (h w) c").to(dtype)  # (B, h_d*w_d, C)


def _resample_3d(tokens: torch.Tensor, src: Grid3D, dst: Grid3D, mode: str) -> torch.Tensor:
    """Space per frame, then time per token position; see :func:`resample_tokens`."""
    b, _, c = tokens.shape
    t_s, t_d = src[0], dst[0]
    x = tokens.reshape(b * t_s, src[1] * src[2], c)  # (B*t_s, h_s*w_s, C)
    x = resample_tokens(x, src[1:], dst[1:], mode)  # (B*t_s, h_d*w_d, C)
    n_d = dst[1] * dst[2]
    if t_s == t_d:
        return x.reshape(b, t_s * n_d, c)
    dtype = x.dtype
    seq = x.reshape(b, t_s, n_d * c).transpose(1, 2)  # (B, h_d*w_d*C, t_s): time as the 1D axis
    time_mode = ("area" if t_d <= t_s else "linear") if mode == "auto" else ("area" if mode == "area" else "linear")
    kwargs = {"align_corners": False} if time_mode == "linear" else {}
    out = F.interpolate(seq.float(), size=t_d, mode=time_mode, **kwargs)  # (B, h_d*w_d*C, t_d)
    return out.transpose(1, 2).reshape(b, t_d * n_d, c).to(dtype)  # (B, t_d*h_d*w_d, C)
