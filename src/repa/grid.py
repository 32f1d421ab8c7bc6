"""Token grids: infer (h, w) from a token count and resample tokens between grids.

Tokens are carried in the canonical layout (B, N, C) with N = h * w in row-major order, the
layout of ViT/DiT patch tokens and of a flattened (B, C, H, W) feature map.
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .errors import ConfigError, ShapeMismatchError

Grid = Tuple[int, int]
GridLike = Union[int, Sequence[int]]

__all__ = ["Grid", "as_grid", "infer_grid", "flatten_feature_map", "resample_tokens"]


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
    b, c, h, w = x.shape
    return x.flatten(2).transpose(1, 2), (h, w)  # (B, H*W, C)


def resample_tokens(tokens: torch.Tensor, src: GridLike, dst: GridLike, mode: str = "auto") -> torch.Tensor:
    """Resample tokens (B, h_s*w_s, C) laid out on grid ``src`` to grid ``dst``.

    The tokens are reshaped to a feature map and resampled with ``F.interpolate``. ``"auto"``
    averages when shrinking on both axes (``"area"``: an integer factor gives the exact mean
    of each block of tokens) and otherwise interpolates bilinearly (``align_corners=False``:
    token centres sit at cell centres; antialiased where an axis shrinks).
    Returns (B, h_d*w_d, C). Identical grids return the input unchanged.
    """
    src, dst = as_grid(src), as_grid(dst)
    b, n, c = tokens.shape
    if n != src[0] * src[1]:
        raise ShapeMismatchError(f"{n} tokens do not fill the source grid {src} ({src[0] * src[1]} cells)")
    if src == dst:
        return tokens
    fmap = tokens.transpose(1, 2).reshape(b, c, *src)  # (B, C, h_s, w_s)
    dtype = fmap.dtype
    if mode == "auto":
        mode = "area" if dst[0] <= src[0] and dst[1] <= src[1] else "bilinear"
    kwargs = {"align_corners": False, "antialias": True} if mode in ("bilinear", "bicubic") else {}
    out = F.interpolate(fmap.float(), size=dst, mode=mode, **kwargs)  # (B, C, h_d, w_d)
    return out.flatten(2).transpose(1, 2).to(dtype)  # (B, h_d*w_d, C)
