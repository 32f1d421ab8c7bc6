#!/usr/bin/env python
"""REPA on diffusers' DiTTransformer2DModel (class-conditional latent DiT), trained from scratch.

Aligned layer: ``layers=7``, the output of the 8th of DiT-XL/2's 28 transformer blocks: REPA
aligns depth 8 for the 24-28-block models (SiT-L/2, SiT-XL/2) and finds early blocks best.
The model preset (found from the class name) makes the int index ``transformer_blocks``; all
of DiT's tokens are image patches. ``--tiny`` keeps the choice of an early block with a
4-block model and ``layers=1``.

    python examples/diffusers_dit.py --tiny --steps 20     # CPU, random weights, seconds
    python examples/diffusers_dit.py --steps 400000        # DiT-XL/2 config, DINOv2-B targets
                                                           # (local encoder + sd-vae-ft-ema weights)

Objective: the linear flow path of SiT (x_t = (1 - t) x + t eps, velocity target eps - x), so
the transformer predicts 4 latent channels (DiT's own recipe predicts 8: noise and variance).
Synthetic images and labels stand in for your data loader: replace ``synthetic_batch``.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DiTTransformer2DModel

from repa import REPARegularizer, create_encoder
from repa.errors import REPAError


def tiny_vae(latent_channels: int) -> AutoencoderKL:
    """An 8x-downsampling AutoencoderKL with random weights (only the shapes matter for --tiny)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
    )


def synthetic_batch(batch: int, size: int, classes: int, gen: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """Smooth random images (B, 3, size, size) in [0, 1] and labels (B,)."""
    low = torch.rand(batch, 3, 4, 4, generator=gen)  # (B, 3, 4, 4)
    images = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    return images, torch.randint(0, classes, (batch,), generator=gen)


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] (B, 3, H, W) -> scaled VAE latents (B, C, H/8, W/8)."""
    z = vae.encode(images * 2 - 1).latent_dist.sample()  # (B, C, H/8, W/8)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (z - shift) * vae.config.scaling_factor


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--tiny", action="store_true", help="tiny configs and random-init encoder (offline, CPU)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=None, help="default: 4 with --tiny, 32 otherwise")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--vae", default="stabilityai/sd-vae-ft-ema", help="VAE id or folder (not used with --tiny)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    size = 64 if args.tiny else 256  # SD-VAE: 256 px -> 32x32 latents -> 16x16 tokens = DINOv2-B's grid
    batch = args.batch_size or (4 if args.tiny else 32)
    classes = 10 if args.tiny else 1000

    # The encoder first: a missing weights file fails here, before anything large is built.
    if args.tiny:  # DINOv2-S layout, one block, random weights: the registry path without a download
        encoder = create_encoder("dinov2-vit-s", pretrained=False, depth=1, resolution=size)
    else:
        encoder = create_encoder("dinov2-vit-b", resolution=size)

    if args.tiny:
        vae = tiny_vae(latent_channels=4)
        model = DiTTransformer2DModel(
            num_attention_heads=2, attention_head_dim=16, in_channels=4, num_layers=4,
            sample_size=size // 8, patch_size=2, num_embeds_ada_norm=classes,
        )
        layer = 1
    else:
        vae = AutoencoderKL.from_pretrained(args.vae)
        model = DiTTransformer2DModel(  # DiT-XL/2 (the class defaults), flow-matching output
            num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=4, num_layers=28,
            sample_size=size // 8, patch_size=2, num_embeds_ada_norm=classes,
        )
        layer = 7
    vae.to(device).eval().requires_grad_(False)
    model.to(device).train()

    reg = REPARegularizer(model, layers=layer, encoders=encoder, weight=0.5).to(device)
    print(f"hooked layers: {reg.layer_names}")
    params = list(model.parameters()) + list(reg.parameters())  # the projectors are trained too
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)

    gen = torch.Generator().manual_seed(args.seed)
    for step in range(args.steps):
        images, labels = synthetic_batch(batch, size, classes, gen)
        images, labels = images.to(device), labels.to(device)
        x = encode_latents(vae, images)  # (B, 4, H/8, W/8)
        t = torch.rand(batch, device=device)  # (B,)
        noise = torch.randn_like(x)
        tt = t.view(-1, 1, 1, 1)
        x_t = (1 - tt) * x + tt * noise
        pred = model(x_t, timestep=t * 1000, class_labels=labels).sample  # hooks capture the block
        diffusion = F.mse_loss(pred, noise - x)
        repa = reg(images, return_breakdown=True)  # clean images -> encoder targets
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
