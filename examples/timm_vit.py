#!/usr/bin/env python
"""REPA on a timm VisionTransformer used as a pixel-space denoiser.

Aligned layer: ``layers=3``, the output of the 4th of ViT-B's 12 blocks (REPA aligns depth 4
for its 12-block SiT-B/2, depth 8 for 24-28 blocks). The regularizer is attached to the timm
ViT inside the denoiser, so timm's preset applies: an int indexes ``blocks``, and the class
token (and any register tokens) are dropped, only the patch tokens are aligned.

    python examples/timm_vit.py --tiny --steps 20   # CPU, random weights, seconds
    python examples/timm_vit.py --steps 100000      # ViT-B/16 at 256 px (16x16 tokens), DINOv2-B targets

The time t enters as a fourth input channel (the simplest conditioning that leaves timm's
ViT untouched). Objective: the linear flow path (x_t = (1 - t) x + t eps, target eps - x).
Synthetic images stand in for your data loader: replace ``synthetic_images``.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import List, Optional

import timm
import torch
import torch.nn.functional as F
from torch import nn

from repa import REPARegularizer, create_encoder
from repa.errors import REPAError


class ViTDenoiser(nn.Module):
    """timm ViT on [image, t] -> patch tokens -> a linear head that unpatchifies to a velocity."""

    def __init__(self, vit: nn.Module, image_size: int) -> None:
        super().__init__()
        self.vit = vit
        self.patch = vit.patch_embed.patch_size[0]
        self.grid = image_size // self.patch
        self.head = nn.Linear(vit.embed_dim, 3 * self.patch * self.patch)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b, p, g = x.shape[0], self.patch, self.grid
        t_plane = t.view(b, 1, 1, 1).expand(b, 1, *x.shape[-2:])  # (B, 1, H, W)
        tokens = self.vit.forward_features(torch.cat([x, t_plane], dim=1))  # (B, prefix + N, D)
        tokens = tokens[:, self.vit.num_prefix_tokens :]  # (B, N, D)
        out = self.head(tokens).view(b, g, g, 3, p, p)  # (B, g, g, 3, p, p)
        return out.permute(0, 3, 1, 4, 2, 5).reshape(b, 3, g * p, g * p)  # (B, 3, H, W)


def synthetic_images(batch: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """Smooth random images (B, 3, size, size) in [0, 1]: a stand-in for a DataLoader."""
    low = torch.rand(batch, 3, 4, 4, generator=gen)  # (B, 3, 4, 4)
    return F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--tiny", action="store_true", help="tiny ViT and random-init encoder (offline, CPU)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=None, help="default: 4 with --tiny, 64 otherwise")
    p.add_argument("--lr", type=float, default=1e-4)
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
    if args.tiny:  # DINOv2-S layout, one block, random weights: the registry path without a download
        encoder = create_encoder("dinov2-vit-s", pretrained=False, depth=1, resolution=size)
    else:
        encoder = create_encoder("dinov2-vit-b", resolution=size)

    width = dict(embed_dim=32, num_heads=2) if args.tiny else {}
    vit = timm.create_model(
        "vit_base_patch16_224", pretrained=False, img_size=size, in_chans=4, num_classes=0, global_pool="", **width
    )
    model = ViTDenoiser(vit, size).to(device)

    reg = REPARegularizer(model.vit, layers=3, encoders=encoder, weight=0.5).to(device)  # hooks on the ViT
    print(f"hooked layers: {reg.layer_names} (prefix tokens dropped: {vit.num_prefix_tokens})")
    params = list(model.parameters()) + list(reg.parameters())  # the projectors are trained too
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)

    gen = torch.Generator().manual_seed(args.seed)
    for step in range(args.steps):
        images = synthetic_images(batch, size, gen).to(device)  # (B, 3, H, W) in [0, 1]
        x = images * 2 - 1
        t = torch.rand(batch, device=device)  # (B,)
        noise = torch.randn_like(x)
        tt = t.view(-1, 1, 1, 1)
        x_t = (1 - tt) * x + tt * noise
        pred = model(x_t, t)  # hooks capture vit.blocks.3
        diffusion = F.mse_loss(pred, noise - x)
        repa = reg(images, return_breakdown=True)
        loss = diffusion + repa.total

        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        d, r = diffusion.item(), repa.loss.item()
        print(f"step {step + 1}/{args.steps}  diffusion {d:.4f}  repa {r:.4f}")
        if not (math.isfinite(d) and math.isfinite(r)):
            print("error: non-finite loss", file=sys.stderr)
            return 1
    print("done")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except REPAError as exc:  # e.g. WeightsNotFoundError: the message says how to fix it
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(2)
