#!/usr/bin/env python
"""REPA with FSDP2 (``torch.distributed.fsdp.fully_shard``): model and projectors sharded, encoder not.

Aligned layer: ``layers="blocks.3"``, the output of the 4th of the denoiser's 12 blocks (REPA
aligns depth 4 of 12 blocks, depth 8 of 24-28).

    torchrun --standalone --nproc_per_node 2 examples/fsdp.py --tiny --steps 5   # 2 CPU processes (gloo)
    python examples/fsdp.py --tiny --steps 5                                     # one process
    torchrun --nproc_per_node 8 examples/fsdp.py --steps 400000                  # GPUs (nccl)

FSDP2 runs on CPU with the gloo backend (checked with torch 2.14), so ``--tiny`` really shards
across 2 CPU processes. What makes REPA work under FSDP:
  - build the regularizer on the plain model (hooks attach before any sharding or compiling);
  - ``reg.attach_to(model)`` makes the projectors ``model.repa_projectors``; each projector is
    ``fully_shard``-ed as its own unit (they run in ``reg()``, after the model's forward, and a
    unit gathers its weights in its own forward), then the blocks, then the root;
  - the optimizer takes ``model.parameters()``, which now includes the (sharded) projectors;
  - the frozen encoder is never sharded: FSDP1 refuses units that mix frozen and trainable
    weights, and a frozen encoder has nothing to gain from sharding; it stays a plain module
    on each device, outside ``reg.parameters()`` and ``reg.state_dict()``;
  - the checkpoint is the model's full state dict, projectors included (``repa_projectors.*``);
    ``reg.save_pretrained(dir)``, called on every rank, gathers the sharded projectors and
    rank 0 writes them for ``REPARegularizer.from_pretrained``.

Each step draws the GLOBAL batch from a seed and every process takes its rows, so N processes
compute what one process does on the whole batch; the last line prints a checksum of the
projector weights to compare runs.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

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


def global_batch(step: int, seed: int, batch: int, size: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images (B, 3, size, size) in [0, 1], noise and times of the whole step, the same on every process."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    low = torch.rand(batch, 3, 4, 4, generator=gen)  # (B, 3, 4, 4)
    images = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    noise = torch.randn(batch, 3, size, size, generator=gen)  # (B, 3, H, W)
    t = torch.rand(batch, generator=gen)  # (B,)
    return images, noise, t


def init_distributed() -> Tuple[int, int, torch.device]:
    """Join the torchrun group (nccl on GPUs, gloo on CPU), or form a group of one without torchrun."""
    use_cuda = torch.cuda.is_available()
    backend = "nccl" if use_cuda else "gloo"
    if "RANK" in os.environ:
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    rank = dist.get_rank()
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return rank, dist.get_world_size(), torch.device("cuda", local)
    return rank, dist.get_world_size(), torch.device("cpu")


# A projector's Linear on (B, N, D) tokens returns a view; FSDP2 warns that an in-place op on it
# would skip its backward hook. repa never modifies projector outputs in place, so it is safe.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--tiny", action="store_true", help="tiny model and random-init encoder (offline, CPU)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=None, help="global batch; default: 4 with --tiny, 256 otherwise")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--out", default=None, help="save the full state dict (model + projectors) here at the end")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    size = 64 if args.tiny else 256
    global_bs = args.batch_size or (4 if args.tiny else 256)

    # The encoder first (a missing weights file fails before the process group forms).
    if args.tiny:  # DINOv2-S layout, one block, random weights (same on every rank: seeded)
        torch.manual_seed(1234)
        encoder = create_encoder("dinov2-vit-s", pretrained=False, depth=1, resolution=size)
    else:
        encoder = create_encoder("dinov2-vit-b", resolution=size)

    rank, world, device = init_distributed()
    try:
        if global_bs % world:
            raise SystemExit(f"--batch-size {global_bs} is not divisible by the {world} processes")
        local_bs = global_bs // world
        encoder.to(device)  # a plain frozen module on every device: never sharded

        torch.manual_seed(args.seed)  # the same initial weights on every rank
        dim, heads = (32, 2) if args.tiny else (768, 12)
        model = Denoiser(size, patch=16, dim=dim, depth=12, heads=heads).to(device)
        reg = REPARegularizer(model, layers="blocks.3", encoders=encoder, weight=0.5).to(device)
        reg.attach_to(model)  # model.repa_projectors

        mesh = init_device_mesh(device.type, (world,))
        for projector in reg.projectors:  # own units: they run after the model's forward, in reg()
            fully_shard(projector, mesh=mesh)
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)  # includes the projectors
        if rank == 0:
            print(f"hooked layers: {reg.layer_names}; processes: {world}; FSDP2 on {device.type}")

        rows = slice(rank * local_bs, (rank + 1) * local_bs)
        for step in range(args.steps):
            images, noise, t = (v[rows].to(device) for v in global_batch(step, args.seed, global_bs, size))
            x = images * 2 - 1
            tt = t.view(-1, 1, 1, 1)
            x_t = (1 - tt) * x + tt * noise
            pred = model(x_t, t)  # sharded forward; the hooks capture blocks.3
            diffusion = F.mse_loss(pred, noise - x)
            repa = reg(images, return_breakdown=True)
            loss = diffusion + repa.total

            opt.zero_grad(set_to_none=True)
            loss.backward()  # gradients are reduce-scattered: the mean over processes
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            logged = torch.stack([diffusion.detach(), repa.loss.detach().to(device)])  # (2,)
            dist.all_reduce(logged)
            d, r = (logged / world).tolist()
            if rank == 0:
                print(f"step {step + 1}/{args.steps}  diffusion {d:.4f}  repa {r:.4f}")
            if not (math.isfinite(d) and math.isfinite(r)):
                print("error: non-finite loss", file=sys.stderr)
                return 1

        # the full (unsharded) projector weights, gathered from the shards on every rank
        full = {name: p.full_tensor() for name, p in reg.projectors.named_parameters()}
        checksum = sum(float(v.detach().double().sum()) for v in full.values())
        if args.out:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if rank == 0:  # keys include repa_projectors.* next to the model's own
                os.makedirs(args.out, exist_ok=True)
                path = os.path.join(args.out, "model.pt")
                torch.save({"model": state, "repa_step": int(reg.step)}, path + ".tmp")
                os.replace(path + ".tmp", path)
                print(f"saved {path}")
            reg.save_pretrained(os.path.join(args.out, "repa"))  # every rank: it gathers the shards; rank 0 writes
        if rank == 0:
            print(f"projector checksum: {checksum:.10f}")
        return 0
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except REPAError as exc:  # e.g. WeightsNotFoundError: the message says how to fix it
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(2)
