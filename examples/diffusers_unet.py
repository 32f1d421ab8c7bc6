#!/usr/bin/env python
"""REPA on diffusers' UNet2DModel (pixel space, from scratch), U-REPA style.

Aligned layer: ``layers="mid_block"``, the U-Net's middle stage, as U-REPA aligns it: the
lowest-resolution, most semantic features. They are (B, C, H, W) maps (8x8 for a 256 px
DDPM U-Net); the model preset projects them per position and then upsamples the prediction to
the encoder's grid (DINOv2-B: 16x16), i.e. ``resample="model"``, instead of shrinking the
targets. An int ``layers=k`` indexes ``down_blocks..., mid_block, up_blocks...`` (down blocks
return ``(hidden, skips)``: the preset takes the hidden states). U-REPA's extra manifold loss is
not part of this example. ``--tiny``: 64 px images, a 4x4 mid block upsampled to an 8x8 grid.

    python examples/diffusers_unet.py --tiny --steps 20   # CPU, random weights, seconds
    python examples/diffusers_unet.py --steps 100000      # DDPM-256 U-Net config, DINOv2-B targets

Objective: the linear flow path (x_t = (1 - t) x + t eps, velocity target eps - x).
Synthetic images stand in for your data loader: replace ``synthetic_images``.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import List, Optional

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel

from repa import REPARegularizer, create_encoder
from repa.errors import REPAError


def synthetic_images(batch: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """Smooth random images (B, 3, size, size) in [0, 1]: a stand-in for a DataLoader."""
    low = torch.rand(batch, 3, 4, 4, generator=gen)  # (B, 3, 4, 4)
    return F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--tiny", action="store_true", help="tiny config and random-init encoder (offline, CPU)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=None, help="default: 4 with --tiny, 16 otherwise")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    size = 64 if args.tiny else 256
    batch = args.batch_size or (4 if args.tiny else 16)

    # The encoder first: a missing weights file fails here, before anything large is built.
    if args.tiny:  # DINOv2-S layout, one block, random weights; 64 px -> 112 px input: an 8x8 grid
        encoder = create_encoder("dinov2-vit-s", pretrained=False, depth=1, resolution=size, input_scale=1.75)
    else:  # 256 px -> 224 px input: a 16x16 grid
        encoder = create_encoder("dinov2-vit-b", resolution=size)

    if args.tiny:  # 4 downsamplings: 64 px -> a 4x4 mid block
        model = UNet2DModel(
            sample_size=size, in_channels=3, out_channels=3, layers_per_block=1,
            block_out_channels=(8, 16, 16, 16, 16), norm_num_groups=4, attention_head_dim=8,
            down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
        )
    else:  # the DDPM 256 px U-Net: 5 downsamplings -> an 8x8 mid block of 512 channels
        model = UNet2DModel(
            sample_size=size, in_channels=3, out_channels=3, layers_per_block=2,
            block_out_channels=(128, 128, 256, 256, 512, 512),
            down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
        )
    model.to(device).train()

    reg = REPARegularizer(model, layers="mid_block", encoders=encoder, weight=0.5).to(device)
    print(f"hooked layers: {reg.layer_names} (resample={reg.resample!r})")
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
        pred = model(x_t, timestep=t * 1000).sample  # hooks capture the mid block (B, C, h, w)
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
