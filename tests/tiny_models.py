"""Tiny models shared by the core tests: a DiT-like transformer and a conv encoder."""

from __future__ import annotations

import torch
from torch import nn


class TinyBlock(nn.Module):
    """Pre-norm transformer block with an adaLN-style modulation (so widths differ inside)."""

    def __init__(self, dim: int, heads: int = 2) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.ada = nn.Linear(dim, 2 * dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.ada(c).unsqueeze(1).chunk(2, dim=-1)  # (B, 1, D) each
        h = self.norm1(x) * (1 + scale) + shift
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))  # (B, N, D)


class TinyDiT(nn.Module):
    """Patchify (B, C, H, W) -> tokens, a few blocks, unpatchify; conditioned on t."""

    def __init__(self, in_ch: int = 3, size: int = 16, patch: int = 4, dim: int = 32, depth: int = 4) -> None:
        super().__init__()
        self.patch, self.size, self.in_ch = patch, size, in_ch
        self.embed = nn.Conv2d(in_ch, dim, patch, stride=patch)
        self.t_embed = nn.Sequential(nn.Linear(1, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(TinyBlock(dim) for _ in range(depth))
        self.out = nn.Linear(dim, in_ch * patch * patch)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        h = self.embed(x).flatten(2).transpose(1, 2)  # (B, N, D)
        c = self.t_embed(t.view(b, 1).float())  # (B, D)
        for block in self.blocks:
            h = block(h, c)  # (B, N, D)
        g = self.size // self.patch
        out = self.out(h)  # (B, N, C*p*p)
        out = out.view(b, g, g, self.in_ch, self.patch, self.patch).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(b, self.in_ch, self.size, self.size)


class ConvEncoder(nn.Module):
    """A frozen-encoder stand-in: (B, 3, H, W) in [0, 1] -> (B, (H/4)*(W/4), dim) tokens."""

    def __init__(self, dim: int = 24, stride: int = 4, fmap: bool = False) -> None:
        super().__init__()
        self.embed_dim = dim
        self.stride = stride
        self.fmap = fmap
        self.conv = nn.Conv2d(3, dim, stride, stride=stride)

    def grid(self, image_size):
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        return (h // self.stride, w // self.stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)  # (B, D, h, w)
        return y if self.fmap else y.flatten(2).transpose(1, 2)  # (B, N, D)


def exit_spawned_worker() -> None:
    """End a successful ``mp.spawn`` worker without interpreter finalization.

    Reached only after the worker's work, barrier and ``destroy_process_group`` succeeded (an
    exception skips it and fails the test as usual). Gloo's C++ threads can still be alive while
    the interpreter finalizes, which now and then aborts the process ("terminate called without
    an active exception", SIGABRT) after everything the test checks was written; ``os._exit(0)``
    skips that finalization.
    """
    import os
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
