"""What reading a feature cache safely costs: the sha256 of a shard and the per-item finite check.

    python benchmarks/cache_verify.py                 # one realistic shard, about 2 minutes on 2 cores
    python benchmarks/cache_verify.py --images 64     # a small shard, seconds (dry run)

Builds one shard with ``repa cache``'s own code path (``build_cache``) shaped like the
ImageNet recipe's: ``--shard-size`` images (default 1024, the cache's default) of 256 px with
their uint8 pixels and 16x16 tokens of width 768 in fp16 (DINOv2-B's target size at 256 px;
the encoder is a cheap stand-in of that geometry, since the bytes, not the encoder, are timed).
Then measures with ``CachedFeatureDataset``:

- the first read of the shard with ``verify="sha256"`` (the default: hash, then read) and with
  ``verify="none"``, page cache warm (the file was just written or read), ``--repeats`` times;
- the hash alone (``repa.cache._sha256_file``) and its throughput;
- the time per item (``ds[i]`` over the whole shard) with the finite check and without it
  (the check replaced by a no-op), interleaved; one intra-op thread, as in a DataLoader worker.

Prints the exact command and a markdown table; ``--json`` writes every number.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch
from PIL import Image
from torch import nn


class _PatchMean(nn.Module):
    """(B, 3, 256, 256) -> (B, 768, 16, 16): 16x16 patch means mixed by a 1x1 conv (cheap; right shape)."""

    def __init__(self, dim: int = 768, patch: int = 16) -> None:
        super().__init__()
        self.patch = patch
        self.mix = nn.Conv2d(3, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(nn.functional.avg_pool2d(x, self.patch))  # (B, D, h, w)


def _make_images(root: Path, count: int, size: int) -> None:
    """``count`` smooth random RGB PNGs (compress well, so the folder stays small), two classes."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for i in range(count):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        a, b, c = rng.uniform(0, 255, size=3)
        img = np.stack([a * xx, b * yy, c * (xx + yy) / 2], -1).astype(np.uint8)  # (H, W, 3)
        Image.fromarray(img).save(folder / f"{i:05d}.png", compress_level=1)


def _time(fn, repeats: int) -> List[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1024, help="images in the shard (default: 1024, one full shard)")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--embed-dim", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=5, help="timed first reads per mode (default: 5)")
    parser.add_argument("--dir", default=None, help="where to build (default: a temporary folder, removed after)")
    parser.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # what a DataLoader worker runs with (PyTorch sets 1 thread in each)

    import repa.cache as cache
    from repa.encoders import register_encoder

    register_encoder(
        "bench-patch-mean", embed_dim=args.embed_dim, patch_size=16, license="benchmark", overwrite=True
    )(lambda spec, **kw: _PatchMean(args.embed_dim, 16))

    command = "python benchmarks/cache_verify.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    print(f"command: {command}", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp_path = Path(tmp)
        t0 = time.perf_counter()
        _make_images(tmp_path / "images", args.images, args.resolution)
        out = tmp_path / "cache"
        cache.build_cache(
            tmp_path / "images", out, "bench-patch-mean", resolution=args.resolution, dtype="fp16",
            shard_size=args.images, batch_size=64, pretrained=False, progress=False, num_workers=0,
        )
        build_s = time.perf_counter() - t0
        shard = out / "shard-00000.safetensors"
        size = shard.stat().st_size
        print(f"built {shard} ({size / 1e6:.1f} MB) in {build_s:.1f} s", file=sys.stderr)

        hash_s = _time(lambda: cache._sha256_file(shard), args.repeats)

        def first_read(mode: str):
            return lambda: cache.CachedFeatureDataset(out, verify=mode)[0]

        first: Dict[str, List[float]] = {"sha256": [], "none": []}
        for _ in range(args.repeats):  # interleaved
            for mode in first:
                first[mode] += _time(first_read(mode), 1)

        ds = cache.CachedFeatureDataset(out, verify="none")
        ds[0]
        real_check = cache.dataset._check_finite_item  # where the dataset looks it up
        per_item: Dict[str, List[float]] = {"with finite check": [], "without": []}
        for _ in range(args.repeats):
            for label in per_item:
                cache.dataset._check_finite_item = real_check if label == "with finite check" else (lambda *a, **k: None)
                t = time.perf_counter()
                for i in range(len(ds)):
                    ds[i]
                per_item[label].append((time.perf_counter() - t) / len(ds))
        cache.dataset._check_finite_item = real_check

    med = {k: statistics.median(v) for k, v in {**{f"first read, verify={m}": v for m, v in first.items()},
                                                "sha256 alone": hash_s}.items()}
    item_med = {k: statistics.median(v) for k, v in per_item.items()}
    item_read = item_med["without"]
    result: Dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()} {platform.system()} {platform.release()}, {os.cpu_count()} CPU(s)",
        "torch": torch.__version__,
        "command": command,
        "shard_bytes": size,
        "images": args.images,
        "hash_seconds": hash_s,
        "hash_MB_per_s": size / 1e6 / statistics.median(hash_s),
        "first_read_seconds": first,
        "per_item_seconds": per_item,
        "hash_per_item_seconds": statistics.median(hash_s) / args.images,
        "finite_check_per_item_seconds": item_med["with finite check"] - item_read,
    }
    print(f"\nOne shard of {args.images} images, {size / 1e6:.1f} MB ({args.resolution} px uint8 pixels + "
          f"{(args.resolution // 16) ** 2} x {args.embed_dim} fp16 targets per image); page cache warm\n")
    print("| what | median | per item of the shard | relative to reading an item |")
    print("|---|---:|---:|---:|")
    for k, v in med.items():
        print(f"| {k} | {v:.3f} s | {v / args.images * 1e6:.0f} us | {v / args.images / item_read:.2f}x |")
    for k, v in item_med.items():
        print(f"| ds[i], {k} | {v * 1e6:.0f} us | | |")
    extra = result["finite_check_per_item_seconds"]
    print(f"\nsha256 throughput {result['hash_MB_per_s']:.0f} MB/s; finite check adds {extra * 1e6:.0f} us per item "
          f"({100 * extra / item_read:.1f}% of a read)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
