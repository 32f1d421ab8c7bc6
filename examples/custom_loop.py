#!/usr/bin/env python
"""REPA in your own training loop: any model, one added line in the loss.

Aligned layer: ``layers="blocks.3"``, the output of the 4th of this denoiser's 12 blocks
(REPA aligns depth 4 of 12 blocks, depth 8 of 24-28: an early block). The model is not a
known architecture, so the block is named explicitly, exactly as ``model.named_modules()``
prints it; ``layers=3`` would work too (an int indexes the longest list of same-type blocks).

    python examples/custom_loop.py --tiny --steps 20   # CPU, random-init encoder, seconds
    python examples/custom_loop.py --steps 1000        # DINOv2-B targets: needs its local weights

The REPA touches are marked ``# REPA``:
  1. build the regularizer on the model (forward hooks attach to the named block);
  2. its projectors go into the optimizer, the EMA and the checkpoint;
  3. ``loss = diffusion_loss + reg(clean_images)`` right after the model's forward on x_t;
  4. sampling runs under ``torch.no_grad()`` / ``reg.disabled()``: nothing is captured.

Synthetic images stand in for your data loader: replace ``synthetic_images``.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from repa import REPARegularizer, create_encoder
from repa.errors import REPAError


class Denoiser(nn.Module):
    """A plain pixel-space transformer: patchify, add a time embedding, blocks, unpatchify."""

    def __init__(self, image_size: int, patch: int, dim: int, depth: int, heads: int) -> None:
        super().__init__()
        self.patch, self.grid = patch, image_size // patch
        self.embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.pos = nn.Parameter(torch.zeros(1, self.grid**2, dim))
        self.time = nn.Sequential(nn.Linear(1, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(depth)
        )
        self.out = nn.Linear(dim, 3 * patch * patch)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b, p, g = x.shape[0], self.patch, self.grid
        h = self.embed(x).flatten(2).transpose(1, 2) + self.pos  # (B, N, D)
        h = h + self.time(t.view(b, 1)).unsqueeze(1)  # (B, N, D)
        for block in self.blocks:
            h = block(h)  # (B, N, D)
        out = self.out(h).view(b, g, g, 3, p, p)  # (B, g, g, 3, p, p)
        return out.permute(0, 3, 1, 4, 2, 5).reshape(b, 3, g * p, g * p)  # (B, 3, H, W)


def synthetic_images(batch: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Smooth random images (B, 3, size, size) in [0, 1]: a stand-in for a DataLoader."""
    low = torch.rand(batch, 3, 4, 4, generator=generator)  # (B, 3, 4, 4)
    return F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)


@torch.no_grad()
def ema_update(ema: nn.Module, live: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), live.parameters()):
        e.lerp_(p, 1.0 - decay)


@torch.no_grad()
def euler_sample(model: nn.Module, n: int, size: int, steps: int, device: torch.device) -> torch.Tensor:
    """Integrate the velocity from t=1 (noise) to t=0; returns images (n, 3, size, size) in [-1, 1]."""
    x = torch.randn(n, 3, size, size, device=device)
    ts = torch.linspace(1.0, 0.0, steps + 1, device=device)
    for t0, t1 in zip(ts[:-1], ts[1:]):
        x = x + (t1 - t0) * model(x, t0.expand(n))
    return x.clamp(-1, 1)


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny model and random-init encoder (offline, CPU)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=None, help="default: 4 with --tiny, 64 otherwise")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--out", default=None, help="write a checkpoint (model, EMA, projectors, optimizer) here")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    size = 64 if args.tiny else 256  # 16 px patches: 4x4 / 16x16 tokens, DINOv2's grid at that size
    batch = args.batch_size or (4 if args.tiny else 64)

    # The encoder first: a missing weights file fails here, before anything large is built.
    if args.tiny:  # DINOv2-S layout with one block and random weights: same code path, no download
        encoder = create_encoder("dinov2-vit-s", pretrained=False, depth=1, resolution=size)
    else:
        encoder = create_encoder("dinov2-vit-b", resolution=size)

    dim, heads = (32, 2) if args.tiny else (768, 12)
    model = Denoiser(size, patch=16, dim=dim, depth=12, heads=heads).to(device)

    reg = REPARegularizer(model, layers="blocks.3", encoders=encoder, weight=0.5).to(device)  # REPA (1)
    print(f"hooked layers: {reg.layer_names}")

    params = list(model.parameters()) + list(reg.parameters())  # REPA (2): projectors are trained
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    ema = copy.deepcopy(nn.ModuleDict({"model": model, "projectors": reg.projectors})).requires_grad_(False)
    live = nn.ModuleDict({"model": model, "projectors": reg.projectors})

    gen = torch.Generator().manual_seed(args.seed)
    for step in range(args.steps):
        images = synthetic_images(batch, size, gen).to(device)  # (B, 3, H, W) in [0, 1]
        x = images * 2 - 1  # the model works in [-1, 1]
        t = torch.rand(batch, device=device)  # (B,)
        noise = torch.randn_like(x)
        tt = t.view(-1, 1, 1, 1)
        x_t = (1 - tt) * x + tt * noise  # linear path, t = 1 is noise
        pred = model(x_t, t)  # forward hooks capture blocks.3
        diffusion = F.mse_loss(pred, noise - x)
        repa = reg(images, return_breakdown=True)  # REPA (3): the clean images of this batch
        loss = diffusion + repa.total

        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_update(ema, live, decay=0.9999)
        d, r = diffusion.item(), repa.loss.item()
        cosine = sum(c.item() for c in repa.cosine.values()) / len(repa.cosine)
        print(f"step {step + 1}/{args.steps}  diffusion {d:.4f}  repa {r:.4f}  cosine {cosine:.4f}")
        if not (math.isfinite(d) and math.isfinite(r)):
            print("error: non-finite loss", file=sys.stderr)
            return 1

    with reg.disabled():  # REPA (4): sampling captures nothing
        samples = euler_sample(ema["model"], n=2, size=size, steps=4, device=device)
    print(f"sampled {tuple(samples.shape)} with the EMA model")

    if args.out:  # REPA (2): the projectors are part of the training state
        os.makedirs(args.out, exist_ok=True)
        state = {"model": model.state_dict(), "ema": ema.state_dict(), "repa": reg.state_dict(), "optimizer": opt.state_dict()}
        path = os.path.join(args.out, "checkpoint.pt")
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)  # atomic: a crash never leaves half a checkpoint
        print(f"saved {path}")
    print("done")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except REPAError as exc:  # e.g. WeightsNotFoundError: the message says how to fix it
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(2)
