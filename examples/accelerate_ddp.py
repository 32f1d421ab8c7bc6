#!/usr/bin/env python
"""REPA with HF accelerate (DDP): the projectors travel with the model, the encoder stays outside.

Aligned layer: ``layers="blocks.3"``, the output of the 4th of the denoiser's 12 blocks (REPA
aligns depth 4 of 12 blocks, depth 8 of 24-28).

    torchrun --nproc_per_node 2 examples/accelerate_ddp.py --tiny --steps 5   # 2 CPU processes (gloo)
    python examples/accelerate_ddp.py --tiny --steps 5                        # one process
    accelerate launch --num_processes 8 examples/accelerate_ddp.py --steps 400000

What makes it work under DDP:
  - ``reg.attach_to(model)`` registers the projectors as ``model.repa_projectors`` BEFORE
    ``accelerator.prepare``: DDP then broadcasts, all-reduces and checkpoints them with the
    model, and ``model.parameters()`` (the optimizer's list) includes them. (The alternative:
    prepare ``reg`` itself as a second module, ``model, reg, opt = accelerator.prepare(model, reg, opt)``.)
  - the frozen encoder is never passed to ``prepare``: it has no trainable parameters (DDP
    refuses modules without any) and must not be wrapped; ``reg`` keeps it outside its
    ``parameters()`` and ``state_dict()``.
  - ``--stop-repa-at N`` switches REPA off at step N (HASTE-style); the zero the regularizer
    returns then still touches every projector parameter, so DDP sees no unused parameters.

Each step draws the GLOBAL batch from a seed and every process takes its rows, so N processes
compute what one process does on the whole batch; the last line prints a checksum of the
projector weights to compare runs.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from repa import REPARegularizer, create_encoder, schedules
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


def global_batch(step: int, seed: int, batch: int, size: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images (B, 3, size, size) in [0, 1], noise and times of the whole step, the same on every process."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    low = torch.rand(batch, 3, 4, 4, generator=gen)  # (B, 3, 4, 4)
    images = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    noise = torch.randn(batch, 3, size, size, generator=gen)  # (B, 3, H, W)
    t = torch.rand(batch, generator=gen)  # (B,)
    return images, noise, t


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--tiny", action="store_true", help="tiny model and random-init encoder (offline, CPU)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=None, help="global batch; default: 4 with --tiny, 256 otherwise")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--stop-repa-at", type=int, default=None, help="switch REPA off from this step on")
    p.add_argument("--out", default=None, help="save the projectors here (save_pretrained) at the end")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    # cpu=True on a machine without CUDA: accelerate then forms the multi-process CPU (gloo) group
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    device, world, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
    size = 64 if args.tiny else 256
    global_bs = args.batch_size or (4 if args.tiny else 256)
    if global_bs % world:
        raise SystemExit(f"--batch-size {global_bs} is not divisible by the {world} processes")
    local_bs = global_bs // world

    # The frozen encoder: built on every process, moved to its device, never prepared.
    if args.tiny:  # DINOv2-S layout, one block, random weights (same on every rank: seeded)
        torch.manual_seed(1234)
        encoder = create_encoder("dinov2-vit-s", pretrained=False, depth=1, resolution=size)
    else:
        encoder = create_encoder("dinov2-vit-b", resolution=size)
    encoder.to(device)

    torch.manual_seed(args.seed)
    dim, heads = (32, 2) if args.tiny else (768, 12)
    model = Denoiser(size, patch=16, dim=dim, depth=12, heads=heads)
    weight = 0.5 if args.stop_repa_at is None else schedules.StopAt(0.5, args.stop_repa_at)
    reg = REPARegularizer(model, layers="blocks.3", encoders=encoder, weight=weight)
    reg.attach_to(model)  # the projectors become model.repa_projectors: prepared with the model
    reg.to(device)  # the step counter buffer
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)  # includes the projectors
    model, opt = accelerator.prepare(model, opt)
    accelerator.print(f"hooked layers: {reg.layer_names}; processes: {world}")

    rows = slice(rank * local_bs, (rank + 1) * local_bs)
    for step in range(args.steps):
        images, noise, t = (v[rows].to(device) for v in global_batch(step, args.seed, global_bs, size))
        x = images * 2 - 1
        tt = t.view(-1, 1, 1, 1)
        x_t = (1 - tt) * x + tt * noise
        pred = model(x_t, t)  # DDP forward; the hooks on the inner model capture blocks.3
        diffusion = F.mse_loss(pred, noise - x)
        repa = reg(images, return_breakdown=True)
        loss = diffusion + repa.total

        opt.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        d = accelerator.reduce(diffusion.detach(), reduction="mean").item()
        r = accelerator.reduce(repa.loss.detach().to(device), reduction="mean").item()
        accelerator.print(f"step {step + 1}/{args.steps}  diffusion {d:.4f}  repa {r:.4f}  weight {repa.weight:g}")
        if not (math.isfinite(d) and math.isfinite(r)):
            accelerator.print("error: non-finite loss")
            return 1

    checksum = torch.stack([p.detach().double().sum() for p in reg.parameters()]).sum().to(device)
    sums = accelerator.gather(checksum.view(1)).tolist()
    if any(abs(s - sums[0]) > 1e-9 * max(1.0, abs(sums[0])) for s in sums):
        accelerator.print(f"error: projectors differ across processes: {sums}")
        return 1
    accelerator.print(f"projectors in sync across {world} process(es)")
    if args.out and accelerator.is_main_process:
        reg.save_pretrained(args.out)  # projector weights + config; the model saves as usual
        accelerator.print(f"saved the projectors to {os.path.abspath(args.out)}")
    accelerator.print(f"projector checksum: {sums[0]:.10f}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except REPAError as exc:  # e.g. WeightsNotFoundError: the message says how to fix it
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(2)
