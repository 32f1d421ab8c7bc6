"""The training objectives of ``repa teacher``: batched augmentations, heads and losses.

:func:`augment` makes one random view of each image and returns the affine map that made it,
so the dense term can put two views' token maps in correspondence; :func:`teacher_loss` is one
batch's loss under each of :data:`OBJECTIVES` (see :mod:`repa.sit.teacher` for what they are).
The training loop, evaluation and the command line live in :mod:`repa.sit.teacher`, which
re-exports these names.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

__all__ = ["OBJECTIVES", "DEFAULT_DENSE_WEIGHT", "augment", "TeacherHeads", "teacher_loss"]

OBJECTIVES = ("simclr-nn", "simclr", "supervised")
DEFAULT_DENSE_WEIGHT = 0.5


# --------------------------------------------------------------------------------------------
# augmentations (batched, on CPU, with their geometry for the dense term)
# --------------------------------------------------------------------------------------------


def augment(
    images: torch.Tensor,
    generator: torch.Generator,
    *,
    scale: Tuple[float, float] = (0.3, 1.0),
    ratio: Tuple[float, float] = (3 / 4, 4 / 3),
    flip: float = 0.5,
    erase: float = 0.25,
    brightness: float = 0.4,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One random view of each image, and the affine map that made it.

    Random resized crop (area fraction in ``scale``, aspect in ``ratio``, anywhere in the image:
    this also translates), horizontal flip, brightness scaling by U(1 - b, 1 + b), and random
    erasing of one rectangle (2-20 % of the area) with probability ``erase``.

    Args:
        images: float images (B, C, H, W) in [0, 1].
    Returns:
        ``(views, theta)``: views (B, C, H, W) in [0, 1]; theta (B, 2, 3) maps a view's normalized
        coordinates (x, y in [-1, 1]) to the source image's: ``src = theta[:, :, :2] @ v + theta[:, :, 2]``.
    """
    b, c, h, w = images.shape
    rand = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    area = scale[0] + (scale[1] - scale[0]) * rand(b)  # (B,)
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * rand(b)
    aspect = torch.exp(log_r)
    sx = torch.sqrt(area * aspect).clamp(max=1.0)  # (B,) crop width / image width
    sy = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (1 - sx) * (2 * rand(b) - 1)  # crop centre, the crop stays inside the image
    cy = (1 - sy) * (2 * rand(b) - 1)
    sign = torch.where(rand(b) < flip, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = sx * sign, cx
    theta[:, 1, 1], theta[:, 1, 2] = sy, cy
    grid = F.affine_grid(theta, [b, c, h, w], align_corners=False)  # (B, H, W, 2)
    views = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    views = views * (1 + brightness * (2 * rand(b, 1, 1, 1) - 1))  # (B, C, H, W)
    if erase > 0:
        e_area = 0.02 + 0.18 * rand(b)
        e_aspect = torch.exp(math.log(0.3) + (math.log(3.3) - math.log(0.3)) * rand(b))
        eh = (torch.sqrt(e_area * e_aspect) * h).clamp(1, h)  # (B,) pixels
        ew = (torch.sqrt(e_area / e_aspect) * w).clamp(1, w)
        top = rand(b) * (h - eh)
        left = rand(b) * (w - ew)
        ys = torch.arange(h).view(1, h, 1)
        xs = torch.arange(w).view(1, 1, w)
        box = (
            (ys >= top.view(b, 1, 1)) & (ys < (top + eh).view(b, 1, 1))
            & (xs >= left.view(b, 1, 1)) & (xs < (left + ew).view(b, 1, 1))
        )  # (B, H, W)
        box &= (rand(b) < erase).view(b, 1, 1)
        views = views.masked_fill(box[:, None], 0.0)
    return views.clamp(0, 1), theta


def _view_to_view_grid(theta_a: torch.Tensor, theta_b: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """Where each token centre of view a lies in view b's normalized coordinates: (B, h, w, 2) as (x, y)."""
    h, w = grid
    ys = (2 * torch.arange(h) + 1) / h - 1  # token centres, align_corners=False convention
    xs = (2 * torch.arange(w) + 1) / w - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    v = torch.stack([gx, gy], -1).view(1, h * w, 2)  # (1, N, 2)
    src = v @ theta_a[:, :, :2].transpose(1, 2) + theta_a[:, None, :, 2]  # (B, N, 2) source-image coords
    lin_b = theta_b[:, :, :2]  # diagonal (flip, scale)
    diag = torch.stack([lin_b[:, 0, 0], lin_b[:, 1, 1]], -1)  # (B, 2)
    vb = (src - theta_b[:, None, :, 2]) / diag[:, None]  # (B, N, 2)
    return vb.view(-1, h, w, 2)


# --------------------------------------------------------------------------------------------
# heads and losses
# --------------------------------------------------------------------------------------------


class TeacherHeads(nn.Module):
    """Training-only heads on the trunk's tokens; discarded after training.

    ``proj``: pooled tokens -> global embedding (SimCLR projector, BatchNorm MLP);
    ``dense``: each token -> dense embedding (token MLP); ``cls``: pooled tokens -> 10 logits.
    """

    def __init__(self, dim: int, num_classes: int = 10, proj_dim: int = 128, hidden: int = 512) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, proj_dim)
        )
        self.dense = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, proj_dim))
        self.cls = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))


def _nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent: z1[i] and z2[i] are positives, the other 2B - 2 embeddings negatives."""
    z = F.normalize(torch.cat([z1, z2]), dim=-1)  # (2B, d)
    b = z1.shape[0]
    logits = z @ z.t() / temperature  # (2B, 2B)
    logits.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    return F.cross_entropy(logits, target)


def _dense_nce(
    q: torch.Tensor, k: torch.Tensor, where: torch.Tensor, grid: Tuple[int, int], temperature: float
) -> torch.Tensor:
    """Per-image InfoNCE between view a's tokens and view b's tokens at the same image location.

    q, k: dense embeddings (B, N, d) of views a and b on the grid (h, w); ``where`` (B, h, w, 2):
    each of a's token centres in b's coordinates. b's map is sampled there (bilinear); a token
    whose counterpart falls outside view b is ignored. Negatives: the image's other tokens.
    """
    b, n, d = k.shape
    h, w = grid
    kmap = k.transpose(1, 2).reshape(b, d, h, w)  # (B, d, h, w)
    aligned = F.grid_sample(kmap, where, mode="bilinear", padding_mode="border", align_corners=False)
    aligned = F.normalize(aligned.flatten(2).transpose(1, 2), dim=-1)  # (B, N, d)
    valid = (where.abs() <= 1).all(-1).view(b, n)  # (B, N)
    logits = F.normalize(q, dim=-1) @ aligned.transpose(1, 2) / temperature  # (B, N, N)
    logits = logits.masked_fill(~valid[:, None, :], -1e4)  # finite: an image may have no valid token
    target = torch.arange(n, device=q.device).expand(b, n)
    loss = F.cross_entropy(logits.reshape(b * n, n), target.reshape(-1), reduction="none").view(b, n)
    return (loss * valid).sum() / valid.sum().clamp(min=1)


def _trunk_tokens(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Preprocessed input (B, 1, H, W) -> the tokens REPA will use as targets (B, N, D), with gradients."""
    return encoder._tokens(x)  # the same extraction FrozenEncoder.forward runs under no_grad


def teacher_loss(
    objective: str,
    encoder: nn.Module,
    heads: TeacherHeads,
    images: torch.Tensor,
    labels: torch.Tensor,
    generator: torch.Generator,
    *,
    partners: Optional[torch.Tensor] = None,
    dense_weight: float = DEFAULT_DENSE_WEIGHT,
    temperature: float = 0.2,
) -> torch.Tensor:
    """The training loss of one batch.

    Args:
        objective: one of :data:`OBJECTIVES`.
        encoder: the ``fmnist-vit`` :class:`~repa.encoders.FrozenEncoder` whose ``.model`` is trained.
        images: uint8 (B, 1, H, W); labels (B,) (used by ``"supervised"`` only).
        partners: uint8 (B, 1, H, W) images the second view is made from (``simclr-nn``: an
            image's pixel neighbour or the image itself); default ``images``.
    """
    x = images.float() / 255.0  # (B, 1, H, W)
    if objective == "supervised":
        v, _ = augment(x, generator, erase=0.0, brightness=0.0, scale=(0.6, 1.0))
        pooled = _trunk_tokens(encoder, encoder.preprocess(v)).mean(1)  # (B, D)
        return F.cross_entropy(heads.cls(pooled), labels)
    if objective not in ("simclr", "simclr-nn"):
        raise ConfigError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    other = x if partners is None else partners.float() / 255.0
    v1, t1 = augment(x, generator)
    v2, t2 = augment(other, generator)
    b = x.shape[0]
    tokens = _trunk_tokens(encoder, encoder.preprocess(torch.cat([v1, v2])))  # (2B, N, D)
    loss = _nt_xent(heads.proj(tokens[:b].mean(1)), heads.proj(tokens[b:].mean(1)), temperature)
    if dense_weight > 0:
        grid = encoder.grid(tuple(x.shape[-2:]))
        same = torch.ones(b, dtype=torch.bool) if partners is None else (partners == images).flatten(1).all(1)
        if same.any():  # correspondence is known only between two views of the same image
            dense = heads.dense(tokens)  # (2B, N, d)
            q, k = dense[:b][same], dense[b:][same]
            ta, tb = t1[same], t2[same]
            d_loss = _dense_nce(q, k, _view_to_view_grid(ta, tb, grid), grid, temperature)
            d_loss = d_loss + _dense_nce(k, q, _view_to_view_grid(tb, ta, grid), grid, temperature)
            loss = loss + dense_weight * 0.5 * d_loss
    return loss
