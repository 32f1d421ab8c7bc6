"""Turning model outputs into image files: [-1, 1] floats to uint8, grids, atomic PNG writes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import numpy as np
import torch

from .._io import atomic_write
from ..errors import ConfigError, ShapeMismatchError

__all__ = ["PIXEL_ROUNDINGS", "to_uint8", "to_hwc3", "make_grid", "save_png"]


#: How floats become pixel levels: ``"truncate"`` (REPA's and the ADM suite's samplers:
#: clamp(127.5 (x + 1), 0, 255) cast to uint8, i.e. floor) or ``"round"`` (to the nearest level).
PIXEL_ROUNDINGS = ("truncate", "round")


def to_uint8(x: torch.Tensor, rounding: str = "round") -> torch.Tensor:
    """Images in [-1, 1] (B, C, H, W) -> uint8 (B, C, H, W), clamped to [0, 255].

    ``rounding="round"``: round((x + 1) * 127.5). ``rounding="truncate"``: the cast of
    clamp((x + 1) * 127.5, 0, 255) to uint8, which drops the fraction; this is what REPA's
    ``generate.py`` (and the ADM samplers) write for FID, so FIDs compare with the paper's.
    """
    if rounding not in PIXEL_ROUNDINGS:
        raise ConfigError(f"pixel rounding must be one of {PIXEL_ROUNDINGS}, got {rounding!r}")
    scaled = (x.float() + 1.0) * 127.5  # (B, C, H, W) in about [0, 255]
    if rounding == "round":
        scaled = scaled.round()
    return scaled.clamp(0, 255).to(torch.uint8)  # (B, C, H, W); the cast truncates


def to_hwc3(images: torch.Tensor) -> np.ndarray:
    """uint8 (B, C, H, W) with C in {1, 3} -> (B, H, W, 3) numpy, grayscale repeated to 3 channels (ADM .npz)."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ShapeMismatchError(
            f"expected uint8 images (B, 1 or 3, H, W), got {images.dtype} {tuple(images.shape)}; convert with to_uint8"
        )
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)  # (B, 3, H, W)
    return images.permute(0, 2, 3, 1).contiguous().cpu().numpy()  # (B, H, W, 3)


def make_grid(images: torch.Tensor, nrow: int, pad: int = 2, value: int = 255) -> np.ndarray:
    """uint8 (B, C, H, W) -> one (rows*(H+pad)+pad, nrow*(W+pad)+pad, C) array, row-major, padded with ``value``."""
    b, c, h, w = images.shape
    rows = (b + nrow - 1) // nrow
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), value, dtype=np.uint8)
    arr = images.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, C)
    for i in range(b):
        r, col = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[top : top + h, left : left + w] = arr[i]
    return grid


def save_png(array: np.ndarray, path: Union[str, os.PathLike[str]]) -> Path:
    """Write an (H, W, C) uint8 array with C in {1, 3} as a PNG, atomically (temp file, then rename)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array, mode=None)
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"), fsync=False)
