#!/usr/bin/env python
"""Memory of video REPA: target sizes per clip (arithmetic) and the TRD loss's peak memory (measured).

Part 1 computes, from the encoder registry's geometry and the VAE grouping rule, what one clip's
targets hold: 81 frames at 480 x 832 (Wan 2.1 480p) with DINOv2-B read at 420 x 728
(30 x 52 = 1,560 tokens per frame, 768 wide), grouped by temporal compression 4 into 21 latent
frames; and how big the token-relation matrices of the TRD loss are for the model's
21 x 30 x 52 = 32,760 tokens.

Part 2 measures, each in a fresh subprocess (peak resident memory of the process, ru_maxrss,
minus its value before the call), one forward + backward of ``repa.losses.token_relation_distillation``
over N tokens, unchunked and chunked, and one pass of per-frame targets through
``REPARegularizer`` (``reg(videos)``'s own path) for two frame chunk sizes.

    python benchmarks/video_memory.py                 # N = 21 x 15 x 26 = 8,190 tokens, CPU
    python benchmarks/video_memory.py --tiny          # seconds: small N, tiny encoder (tests)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

MB = 1e6
MIB = 2**20


def arithmetic(frames: int, height: int, width: int, encoder: str, k: int, vae_down: int, patch: int) -> Dict[str, Any]:
    """Sizes per clip, from the registry's geometry (no network is built)."""
    from repa.encoders import get_encoder_spec
    from repa.video import num_latent_frames

    spec = get_encoder_spec(encoder)
    gh, gw = spec.grid((height, width))
    tokens_frame = gh * gw
    t_lat = num_latent_frames(frames, k)
    model_tokens = t_lat * (height // vae_down // patch) * (width // vae_down // patch)
    d = spec.embed_dim
    return {
        "encoder": encoder,
        "encoder_input": list(spec.encoder_input_size((height, width))),
        "tokens_per_frame": tokens_frame,
        "grid_per_frame": [gh, gw],
        "embed_dim": d,
        "frames": frames,
        "latent_frames": t_lat,
        "targets_per_clip_fp16_bytes": t_lat * tokens_frame * d * 2,
        "per_frame_targets_fp16_bytes": frames * tokens_frame * d * 2,
        "targets_in_loss_fp32_bytes": t_lat * tokens_frame * d * 4,
        "model_tokens": model_tokens,
        "relation_matrix_fp32_bytes": model_tokens * model_tokens * 4,
        "relation_block_1024_rows_fp32_bytes": 1024 * model_tokens * 4,
    }


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def arm_trd(n: int, dim: int, chunk: int) -> Dict[str, Any]:
    import torch

    from repa.losses import token_relation_distillation

    warm = torch.randn(1, 8, 4, requires_grad=True)  # imports and first-call set-up, outside the measurement
    token_relation_distillation(warm, torch.randn(1, 8, 4), chunk_size=2).backward()
    torch.manual_seed(0)
    pred = torch.randn(1, n, dim, requires_grad=True)
    target = torch.randn(1, n, dim)
    before = _maxrss_bytes()
    t0 = time.perf_counter()
    loss = token_relation_distillation(pred, target, margin=0.1, chunk_size=chunk)
    loss.backward()
    seconds = time.perf_counter() - t0
    return {"arm": "trd", "n": n, "dim": dim, "chunk": chunk, "seconds": seconds,
            "peak_extra_bytes": _maxrss_bytes() - before, "loss": float(loss.detach())}


def arm_encode(frames: int, height: int, width: int, chunk: int, tiny: bool) -> Dict[str, Any]:
    import torch
    from torch import nn

    from repa import REPARegularizer, create_encoder

    torch.manual_seed(0)
    if tiny:
        encoder = create_encoder("dinov2-vit-s", pretrained=False, depth=1, resolution=(height, width))
    else:
        encoder = create_encoder("dinov2-vit-b", pretrained=False, resolution=(height, width))
    gh, gw = encoder.grid((height, width))
    t_lat = 1 + (frames - 1) // 4
    model = nn.Sequential(nn.Linear(8, 8))
    reg = REPARegularizer(model, layers="0", encoders=encoder, grid=(t_lat, gh, gw), temporal_compression=4,
                          frame_chunk=chunk, video_layout="BCTHW")
    videos = torch.rand(1, 3, frames, height, width)
    with torch.no_grad():  # first-call set-up outside the measurement
        encoder(torch.rand(1, 3, 28, 28))
    before = _maxrss_bytes()
    t0 = time.perf_counter()
    with torch.no_grad():
        targets = reg._targets(videos, None, {})  # the path of reg(videos): per-frame encoding and grouping
    seconds = time.perf_counter() - t0
    (y, grid), = targets.values()
    return {"arm": "encode", "frames": frames, "size": [height, width], "chunk": chunk, "seconds": seconds,
            "seconds_per_frame": seconds / frames, "peak_extra_bytes": _maxrss_bytes() - before,
            "targets_shape": list(y.shape), "grid": list(grid)}


def _subprocess(args: List[str]) -> Dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, timeout=3000)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: List[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--tiny", action="store_true", help="small sizes and a tiny encoder: seconds")
    p.add_argument("--arm", choices=["trd", "encode"], help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=None, help="TRD tokens (default 8190 = 21 x 15 x 26; --tiny 600)")
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--frames", type=int, default=None, help="frames encoded (default 5; --tiny 5)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.arm == "trd":
        print(json.dumps(arm_trd(args.n, args.dim, args.chunk)))
        return 0
    if args.arm == "encode":
        h, w = (56, 56) if args.tiny else (480, 832)
        print(json.dumps(arm_encode(args.frames, h, w, args.chunk, args.tiny)))
        return 0

    import torch

    result: Dict[str, Any] = {"torch": torch.__version__, "threads": torch.get_num_threads(), "tiny": args.tiny}
    a = arithmetic(81, 480, 832, "dinov2-vit-b", 4, 8, 2)
    result["arithmetic"] = a
    print("Targets per clip: 81 frames at 480 x 832, DINOv2-B, VAE temporal compression 4")
    print(f"  encoder input {a['encoder_input'][0]} x {a['encoder_input'][1]} -> {a['grid_per_frame'][0]} x "
          f"{a['grid_per_frame'][1]} = {a['tokens_per_frame']} tokens per frame, width {a['embed_dim']}")
    print(f"  latent frames 1 + (81 - 1) / 4 = {a['latent_frames']}")
    print(f"  per-latent-frame targets, fp16: {a['latent_frames']} x {a['tokens_per_frame']} x {a['embed_dim']} x 2 B = "
          f"{a['targets_per_clip_fp16_bytes']:,} B ({a['targets_per_clip_fp16_bytes'] / MB:.1f} MB)")
    print(f"  per-frame targets (before grouping), fp16: {a['per_frame_targets_fp16_bytes']:,} B "
          f"({a['per_frame_targets_fp16_bytes'] / MB:.1f} MB)")
    print(f"  targets in the loss (fp32): {a['targets_in_loss_fp32_bytes']:,} B ({a['targets_in_loss_fp32_bytes'] / MB:.1f} MB)")
    print(f"  model tokens 21 x 30 x 52 = {a['model_tokens']}; one N x N relation matrix fp32: "
          f"{a['relation_matrix_fp32_bytes']:,} B ({a['relation_matrix_fp32_bytes'] / 1e9:.2f} GB); a 1,024-row block: "
          f"{a['relation_block_1024_rows_fp32_bytes']:,} B ({a['relation_block_1024_rows_fp32_bytes'] / MB:.1f} MB)")

    n = args.n or (600 if args.tiny else 21 * 15 * 26)
    dim = 64 if args.tiny else args.dim
    chunks = [n, 128] if args.tiny else [n, 1024, 256]
    result["trd"] = []
    print(f"\nTRD forward + backward over N = {n} tokens of width {dim} (CPU, one process each)")
    print("| chunk (rows) | seconds | peak extra memory (MiB) | loss |")
    print("|---:|---:|---:|---:|")
    for c in chunks:
        r = _subprocess(["--arm", "trd", "--n", str(n), "--dim", str(dim), "--chunk", str(c)])
        result["trd"].append(r)
        print(f"| {c} | {r['seconds']:.2f} | {r['peak_extra_bytes'] / MIB:.0f} | {r['loss']:.6f} |")

    frames = args.frames or 5
    result["encode"] = []
    size = "56 x 56, tiny encoder" if args.tiny else "480 x 832, DINOv2-B (random weights)"
    print(f"\nPer-frame targets through REPARegularizer: {frames} frames at {size} (CPU, one process each)")
    print("| frame_chunk | seconds | seconds per frame | peak extra memory (MiB) | targets |")
    print("|---:|---:|---:|---:|---|")
    for c in (1, frames):
        r = _subprocess(["--arm", "encode", "--frames", str(frames), "--chunk", str(c)] + (["--tiny"] if args.tiny else []))
        result["encode"].append(r)
        print(f"| {c} | {r['seconds']:.2f} | {r['seconds_per_frame']:.2f} | {r['peak_extra_bytes'] / MIB:.0f} | "
              f"{tuple(r['targets_shape'])} on grid {tuple(r['grid'])} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
