#!/usr/bin/env python
"""REPA while fine-tuning diffusers' FluxTransformer2DModel (double- then single-stream blocks).

Aligned layer: ``layers=7``, the output of the 8th of FLUX.1's 19 double-stream blocks: an early
block, as REPA's depth 8 of 24-28 (REPA's early-block rule carried over to Flux; not a setting
the paper reports). The model preset makes an int index the concatenation ``transformer_blocks`` (19)
then ``single_transformer_blocks`` (38), so ``layers=19`` is the first single-stream block; from
either kind only the image tokens are aligned, never the text tokens of the joint sequence.
``--tiny`` keeps an early double-stream block with a 2 + 2-block model and ``layers=1``.

    python examples/diffusers_flux.py --tiny --steps 20   # CPU, random weights, seconds
    python examples/diffusers_flux.py --steps 1000        # FLUX.1-dev transformer + VAE from the local
                                                          # Hugging Face cache, DINOv2-B targets

Objective: rectified flow (x_t = (1 - t) x + t eps, target eps - x) on 2x2-packed VAE latents.
Synthetic images and text embeddings (T5 per-token (B, 512, 4096), CLIP pooled (B, 768)) stand in
for your data loader: replace ``synthetic_batch``.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FluxTransformer2DModel

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


def synthetic_batch(
    batch: int, size: int, text_len: int, text_dim: int, pooled_dim: int, gen: torch.Generator
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images (B, 3, size, size) in [0, 1], text embeddings (B, L, text_dim), pooled (B, pooled_dim)."""
    low = torch.rand(batch, 3, 4, 4, generator=gen)  # (B, 3, 4, 4)
    images = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    text = torch.randn(batch, text_len, text_dim, generator=gen)  # (B, L, text_dim)
    pooled = torch.randn(batch, pooled_dim, generator=gen)  # (B, pooled_dim)
    return images, text, pooled


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] (B, 3, H, W) -> shifted, scaled VAE latents (B, 16, H/8, W/8)."""
    z = vae.encode(images * 2 - 1).latent_dist.sample()  # (B, 16, H/8, W/8)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (z - shift) * vae.config.scaling_factor


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, (H/2)(W/2), 4C): Flux's 2x2 patches as tokens, row-major."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # (B, H/2, W/2, C, 2, 2)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def image_ids(h: int, w: int, device: torch.device) -> torch.Tensor:
    """Rotary position ids (h*w, 3) of the packed image tokens: (0, row, column)."""
    rows, cols = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(h * w, 3).float()


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--tiny", action="store_true", help="tiny configs and random-init encoder (offline, CPU)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=None, help="default: 4 with --tiny, 4 otherwise")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--model", default="black-forest-labs/FLUX.1-dev",
                   help="pipeline id or folder with transformer/ and vae/ (not used with --tiny)")
    p.add_argument("--resolution", type=int, default=512, help="training image size (not used with --tiny)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    size = 64 if args.tiny else args.resolution  # 8x VAE, 2x2 packing: 16 px per token (512 -> 32x32)
    batch = args.batch_size or 4

    # The encoder first: a missing weights file fails here, before anything large is loaded.
    if args.tiny:  # DINOv2-S layout, one block, random weights: the registry path without a download
        encoder = create_encoder("dinov2-vit-s", pretrained=False, depth=1, resolution=size)
    else:  # DINOv2 at 448 px for 512 px images: a 32x32 grid, the transformer's grid
        encoder = create_encoder("dinov2-vit-b", resolution=size)

    if args.tiny:
        vae = tiny_vae(latent_channels=16)
        model = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6),
        )
        text_len, layer = 7, 1
    else:
        vae = AutoencoderKL.from_pretrained(args.model, subfolder="vae")
        model = FluxTransformer2DModel.from_pretrained(args.model, subfolder="transformer")
        text_len, layer = 512, 7
    vae.to(device).eval().requires_grad_(False)
    model.to(device).train()
    text_dim, pooled_dim = model.config.joint_attention_dim, model.config.pooled_projection_dim

    reg = REPARegularizer(model, layers=layer, encoders=encoder, weight=0.5).to(device)
    print(f"hooked layers: {reg.layer_names}")
    params = list(model.parameters()) + list(reg.parameters())  # the projectors are trained too
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)

    gen = torch.Generator().manual_seed(args.seed)
    for step in range(args.steps):
        images, text, pooled = (v.to(device) for v in synthetic_batch(batch, size, text_len, text_dim, pooled_dim, gen))
        z = encode_latents(vae, images)  # (B, 16, H/8, W/8)
        x = pack(z)  # (B, N_img, 64)
        img_ids = image_ids(z.shape[-2] // 2, z.shape[-1] // 2, device)  # (N_img, 3)
        txt_ids = torch.zeros(text_len, 3, device=device)  # (L, 3)
        t = torch.sigmoid(torch.randn(batch, device=device))  # (B,) logit-normal
        noise = torch.randn_like(x)
        tt = t.view(-1, 1, 1)
        x_t = (1 - tt) * x + tt * noise
        guidance = torch.ones(batch, device=device) if model.config.guidance_embeds else None
        pred = model(
            x_t, encoder_hidden_states=text, pooled_projections=pooled, timestep=t,  # Flux scales t by 1000
            img_ids=img_ids, txt_ids=txt_ids, guidance=guidance,
        ).sample  # (B, N_img, 64)
        diffusion = F.mse_loss(pred, noise - x)
        repa = reg(images, return_breakdown=True)  # image tokens of the hooked block only
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
