#!/usr/bin/env python
"""REPA on diffusers' WanTransformer3DModel (text-to-video): per-frame DINOv2 targets on the clean clips.

Aligned layer: ``layers=7``, the output of the 8th of Wan 2.1 1.3B's 30 blocks. This is a
recommendation carried over from REPA's image results (an early block, about a quarter of the
depth), not a published Wan setting. The model preset (found from the class name) makes the
int index ``blocks``, reads each forward's (t, h, w) token grid from the latents' shape and the
config's patch size (1, 2, 2), and groups the clean frames like Wan's VAE: the first frame
alone, then groups of 4 (81 frames -> 21 latent frames). DINOv2 runs on every frame, 64 frames
per call (``frame_chunk``), and the targets of a group are averaged. ``--tiny`` builds a tiny
Wan transformer and a tiny causal Wan VAE with random weights and aligns ``layers=1``.

    python examples/diffusers_wan.py --tiny --steps 20      # CPU, random weights, seconds
    python examples/diffusers_wan.py --steps 1000           # Wan2.1-T2V-1.3B-Diffusers, 81 x 480 x 832 clips
                                                            # (local DINOv2-B and Wan weights)

Objective: rectified flow as Wan trains it (x_t = (1 - t) x + t eps, velocity target eps - x).
Synthetic clips and text embeddings stand in for your data loader and UMT5 text encoder:
replace ``synthetic_clips`` and ``text_embeddings``.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import List, Optional

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan, WanTransformer3DModel

from repa import REPARegularizer, create_encoder
from repa.errors import REPAError


def synthetic_clips(batch: int, frames: int, height: int, width: int, gen: torch.Generator) -> torch.Tensor:
    """Smooth random clips (B, 3, T, H, W) in [0, 1] whose content drifts over time."""
    low = torch.rand(batch, 3, 2, 4, 4, generator=gen)  # (B, 3, 2, 4, 4)
    clips = F.interpolate(low, size=(frames, height, width), mode="trilinear", align_corners=True)
    return clips.clamp(0, 1)  # (B, 3, T, H, W)


def text_embeddings(batch: int, length: int, dim: int, gen: torch.Generator) -> torch.Tensor:
    """Stand-in for UMT5 prompt embeddings (B, L, D)."""
    return torch.randn(batch, length, dim, generator=gen)


@torch.no_grad()
def encode_latents(vae: AutoencoderKLWan, clips: torch.Tensor) -> torch.Tensor:
    """Clips in [0, 1] (B, 3, T, H, W) -> normalized Wan latents (B, z, 1 + (T - 1) / 4, H / 8, W / 8)."""
    z = vae.encode(clips * 2 - 1).latent_dist.sample()  # (B, z, T_lat, H/8, W/8)
    mean = torch.tensor(vae.config.latents_mean[: z.shape[1]], device=z.device).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std[: z.shape[1]], device=z.device).view(1, -1, 1, 1, 1)
    return (z - mean) / std


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--tiny", action="store_true", help="tiny configs and random-init encoder (offline, CPU)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=None, help="default: 2 with --tiny, 1 otherwise")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--model", default="Wan-AI/Wan2.1-T2V-1.3B-Diffusers", help="Wan id or folder (not with --tiny)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    # Wan 2.1 at 480p: 81 frames of 480 x 832 -> latents 21 x 60 x 104 -> tokens 21 x 30 x 52;
    # DINOv2-B reads each frame at 420 x 728 -> 30 x 52 tokens: the spatial grids match.
    frames, height, width = (9, 64, 64) if args.tiny else (81, 480, 832)
    batch = args.batch_size or (2 if args.tiny else 1)

    # The encoder first: a missing weights file fails here, before anything large is built.
    if args.tiny:  # DINOv2-S layout, one block, random weights: the registry path without a download
        encoder = create_encoder("dinov2-vit-s", pretrained=False, depth=1, resolution=height)
    else:
        encoder = create_encoder("dinov2-vit-b", resolution=(height, width))

    if args.tiny:
        vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1)
        model = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
            text_dim=32, freq_dim=32, ffn_dim=64, num_layers=4, rope_max_seq_len=64,
        )
        layer, text_len = 1, 8
    else:
        vae = AutoencoderKLWan.from_pretrained(args.model, subfolder="vae")
        model = WanTransformer3DModel.from_pretrained(args.model, subfolder="transformer")
        layer, text_len = 7, 512
    vae.to(device).eval().requires_grad_(False)
    model.to(device).train()

    reg = REPARegularizer(
        model, layers=layer, encoders=encoder, weight=0.5,
        temporal_compression=vae.config.scale_factor_temporal,  # 4: the preset's value, stated here for clarity
        video_layout="BCTHW", frame_chunk=64,
    ).to(device)
    print(f"hooked layers: {reg.layer_names}")
    params = list(model.parameters()) + list(reg.parameters())  # the projectors are trained too
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)

    gen = torch.Generator().manual_seed(args.seed)
    for step in range(args.steps):
        clips = synthetic_clips(batch, frames, height, width, gen).to(device)  # (B, 3, T, H, W) in [0, 1]
        text = text_embeddings(batch, text_len, model.config.text_dim, gen).to(device)
        x = encode_latents(vae, clips)  # (B, z, T_lat, H/8, W/8)
        t = torch.rand(batch, device=device)  # (B,)
        noise = torch.randn_like(x)
        tt = t.view(-1, 1, 1, 1, 1)
        x_t = (1 - tt) * x + tt * noise
        pred = model(x_t, timestep=t * 1000, encoder_hidden_states=text).sample  # hooks capture the block
        diffusion = F.mse_loss(pred, noise - x)
        repa = reg(clips, return_breakdown=True)  # clean clips -> per-frame targets -> latent frames
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
