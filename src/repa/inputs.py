"""Checks of what a regularizer call receives: clean images, precomputed targets, grids.

Split from :mod:`repa.regularizer` so its ``forward`` reads as the pipeline; every check here
raises a :mod:`repa.errors` error that names the bad value and the fix.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from .errors import (
    ConfigError,
    InputRangeError,
    NonFiniteInputError,
    ShapeMismatchError,
)
from .grid import Grid, as_grid, infer_grid

__all__ = ["normalize_images", "features_by_encoder", "check_nonempty", "check_finite_features", "matching_image_size"]


def normalize_images(images: torch.Tensor, input_range: Tuple[float, float], check: bool = True) -> torch.Tensor:
    """Clean images as float in [0, 1]: uint8 is divided by 255, floats are mapped from ``input_range``.

    With ``check`` (one host sync) float images must be finite and lie in ``input_range``
    (1e-3 of its span as tolerance); the result is a new tensor, never the caller's.
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise ShapeMismatchError(
            f"images must be a (B, C, H, W) tensor, got "
            f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}"
        )
    check_nonempty(images, "images")
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    if not images.is_floating_point():
        raise InputRangeError(f"images must be uint8 (0-255) or float, got dtype {images.dtype}")
    lo, hi = input_range
    if check:
        mn, mx = (float(v) for v in torch.stack(torch.aminmax(images.detach().float())).tolist())
        if not (math.isfinite(mn) and math.isfinite(mx)):  # aminmax propagates NaN: no extra pass
            raise NonFiniteInputError(
                f"images hold non-finite values (min {mn}, max {mx}); NaN or Inf pixels make the encoder's "
                "targets NaN: check the data pipeline (decoding, normalization) before reg(images)"
            )
        tol = 1e-3 * (hi - lo)
        if mn < lo - tol or mx > hi + tol:
            raise InputRangeError(
                f"float images span [{mn:.3g}, {mx:.3g}] but input_range=({lo:g}, {hi:g}); pass "
                f"REPARegularizer(..., input_range=(-1, 1)) for images in [-1, 1], or uint8 images"
            )
    images = images.float()
    if (lo, hi) != (0.0, 1.0):
        images = (images - lo) / (hi - lo)
    return images.clamp(0.0, 1.0)  # never in place: the caller still owns `images`

def features_by_encoder(features: Any, names: List[str]) -> Dict[str, torch.Tensor]:
    """``features=`` (a tensor, a list in encoder order or a dict by name) as a dict keyed by encoder name."""
    if isinstance(features, torch.Tensor):
        if len(names) != 1:
            raise ConfigError(
                f"features= is one tensor but there are {len(names)} encoders {names}; pass a list or dict"
            )
        return {names[0]: features}
    if isinstance(features, (list, tuple)):
        if len(features) != len(names):
            raise ConfigError(f"features= has {len(features)} entries for {len(names)} encoders {names}")
        return dict(zip(names, features))
    if isinstance(features, dict):
        missing, extra = sorted(set(names) - set(features)), sorted(set(features) - set(names))
        if missing or extra:
            raise ConfigError(f"features= keys must be the encoder names {names}; missing {missing}, unknown {extra}")
        return dict(features)
    raise ConfigError(f"features= must be a tensor, a list or a dict of tensors, got {type(features).__name__}")


def check_nonempty(x: torch.Tensor, what: str) -> None:
    """An empty batch (or zero tokens) has no alignment loss to compute: say so instead of a NaN mean."""
    if x.ndim >= 2 and (x.shape[0] == 0 or x.shape[1] == 0):
        raise ShapeMismatchError(
            f"{what} has shape {tuple(x.shape)}: an empty batch (or no tokens); call reg() only for batches "
            "with at least one item"
        )


def check_finite_features(features: Dict[str, Any]) -> None:
    """Precomputed targets must be finite; one fused reduction per encoder and one host sync for all.

    ``aminmax`` is the reduction: NaN propagates through min and max and Inf shows in them, in
    one pass without the boolean tensor ``isfinite`` would allocate.
    """
    tensors = {n: t for n, t in features.items() if isinstance(t, torch.Tensor) and t.numel() > 0}
    if not tensors:
        return
    extremes = [torch.stack(torch.aminmax(t.detach())).float() for t in tensors.values()]  # (2,) per encoder
    if len({e.device for e in extremes}) == 1:
        values = torch.stack(extremes).tolist()  # a single host sync
    else:
        values = [e.tolist() for e in extremes]
    bad = [n for n, (lo, hi) in zip(tensors, values) if not (math.isfinite(lo) and math.isfinite(hi))]
    if bad:
        t = tensors[bad[0]].detach().float()
        raise NonFiniteInputError(
            f"features= for encoder {bad[0]!r} hold {int(torch.isnan(t).sum())} NaN and {int(torch.isinf(t).sum())} "
            f"Inf value(s) (shape {tuple(t.shape)}); the targets are damaged: for a feature cache run "
            "`repa cache verify DIR` and rebuild it with its `repa cache` command"
            + (f" (also bad: {bad[1:]})" if len(bad) > 1 else "")
        )


def matching_image_size(encoder: Any, images: torch.Tensor, grid_e: Grid, grid_m: Grid) -> Optional[Grid]:
    """An image size (H, W) for which ``encoder`` returns the grid ``grid_m``, or None if none is found.

    The encoder's stride is derived from the batch it was given (``H / h_e``, ``W / w_e``), so
    the estimate ``grid_m * stride`` works for any encoder whose grid follows the image size,
    a user's own module included. The estimate is checked with the encoder's ``grid()`` method
    where it has one, else with one forward of a blank (1, C, H, W) image; encoders that resize
    their input (DINOv2: 256 -> 224 px) are also searched over square sizes through ``grid()``.
    """
    size = (int(images.shape[-2]), int(images.shape[-1]))
    has_grid = callable(getattr(encoder, "grid", None))

    def grid_at(hw: Grid) -> Optional[Grid]:
        try:
            if has_grid:
                return as_grid(encoder.grid(hw))
            param = next(encoder.parameters(), None) if isinstance(encoder, nn.Module) else None
            blank = torch.zeros(1, images.shape[1], *hw, device=images.device,  # (1, C, H, W)
                                dtype=param.dtype if param is not None and param.is_floating_point() else torch.float32)
            with torch.no_grad():
                out = encoder(blank)
            if out.ndim == 4:  # (1, D, h, w)
                return (int(out.shape[-2]), int(out.shape[-1]))
            return infer_grid(int(out.shape[1]))  # (1, N, D): square grids only
        except Exception:  # a size the encoder cannot take: no suggestion from it
            return None

    if grid_e[0] > 0 and grid_e[1] > 0:
        estimate = (round(grid_m[0] * size[0] / grid_e[0]), round(grid_m[1] * size[1] / grid_e[1]))  # grid_m * stride
        if 0 < min(estimate) and max(estimate) <= 8192 and grid_at(estimate) == tuple(grid_m):
            return estimate
    if has_grid and grid_m[0] == grid_m[1]:
        for r in range(8, 2049, 8):
            if grid_at((r, r)) == tuple(grid_m):
                return (r, r)
    return None
