"""``repa cache [verify DIR]``: the command line of the feature cache.
"""

from __future__ import annotations

import argparse
import os
import sys

from .._cli import add_hidden_alias
from ..errors import ConfigError
from .build import build_cache
from .format import (
    STORAGE_DTYPES,
    load_index,
    verify_cache,
)

# --------------------------------------------------------------------------------------------
# repa cache [verify DIR]
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``repa cache`` (build) and ``repa cache verify DIR``."""
    parser.add_argument("action", nargs="?", choices=["verify"], help="'verify DIR': check every shard against the index")
    parser.add_argument("directory", nargs="?", help="the cache folder to verify")
    parser.add_argument("--data", help="image folder (class subfolders = labels), IDX folder, or prepared latent folder")
    parser.add_argument("--encoders", help="comma-separated registry encoders, e.g. dinov2-vit-b,clip-vit-L")
    add_hidden_alias(parser, "--encoder", dest="encoders")
    parser.add_argument("--out", help="the cache folder to write (re-running continues an unfinished build)")
    parser.add_argument("--resolution", type=int, default=None, help="center-crop size of image folders (e.g. 256)")
    parser.add_argument("--vae", default=None, help="local AutoencoderKL folder: also store SD-VAE latent moments")
    parser.add_argument("--dtype", default="fp16", choices=list(STORAGE_DTYPES), help="storage dtype of the targets (default: fp16)")
    parser.add_argument("--compute-dtype", default="fp32", choices=list(STORAGE_DTYPES),
                        help="dtype the encoders run in (default: fp32, what training computes online)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per encoder call (default: 64)")
    parser.add_argument("--shard-size", type=int, default=1024, help="images per shard file (default: 1024)")
    parser.add_argument("--encoder-weights", dest="weights", action="append", default=[], metavar="NAME=PATH",
                        help="a local weights file for one encoder (repeatable)")
    add_hidden_alias(parser, "--weights", dest="weights", action="append", metavar="NAME=PATH")  # the old name
    parser.add_argument("--no-pretrained", dest="pretrained", action="store_false",
                        help="random encoders seeded by --seed (tests, benchmarks); never for training")
    parser.add_argument("--seed", type=int, default=0, help="seed of random encoders with --no-pretrained (default: 0)")
    parser.add_argument("--no-images", dest="store_images", action="store_false",
                        help="do not store the pixels (allowed with --vae: the moments are the training input)")
    workers = min(4, os.cpu_count() or 1)
    parser.add_argument("--num-workers", type=int, default=workers,
                        help=f"DataLoader workers reading images (default: min(4, CPU count) = {workers})")
    parser.add_argument("--device", default=None, help="default: this rank's GPU, else cpu")
    parser.add_argument("--no-checksums", dest="checksums", action="store_false",
                        help="verify: skip the sha256 of each shard (sizes, shapes and metadata only)")
    parser.add_argument("--skip-bad-images", action="store_true",
                        help="image folders: skip (with a warning) files that cannot be decoded instead of stopping")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    from .video import (
        add_video_arguments,  # --video: folders of clip frames (repa.video_cache)
    )

    add_video_arguments(parser)


def main(args: argparse.Namespace) -> int:
    """Run ``repa cache`` (build) or ``repa cache verify DIR``; returns the exit status."""
    from . import video as video_cache

    if video_cache.handles(args):  # --video builds and video caches: repa.video_cache
        return video_cache.main(args)
    if args.action == "verify":
        if not args.directory:
            raise ConfigError("usage: repa cache verify DIR")
        problems = verify_cache(args.directory, checksums=args.checksums)
        if problems:
            for p in problems:
                print(f"repa cache verify: BAD: {p}", file=sys.stderr)
            print(f"repa cache verify: {len(problems)} problem(s) in {args.directory}", file=sys.stderr)
            return 1
        index = load_index(args.directory)
        print(f"repa cache verify: OK: {index['num_shards']} shard(s), {index['count']} items in {args.directory}")
        return 0
    if args.directory:
        raise ConfigError(f"unexpected argument {args.directory!r}; to verify a cache run `repa cache verify DIR`")
    missing = [flag for flag, value in (("--data", args.data), ("--encoders", args.encoders), ("--out", args.out)) if not value]
    if missing:
        raise ConfigError(f"repa cache needs {', '.join(missing)} (or `repa cache verify DIR`)")
    report = build_cache(
        args.data, args.out, args.encoders,
        resolution=args.resolution, dtype=args.dtype, compute_dtype=args.compute_dtype, vae=args.vae,
        batch_size=args.batch_size, shard_size=args.shard_size, weights=args.weights, pretrained=args.pretrained,
        seed=args.seed, store_images=args.store_images, num_workers=args.num_workers, device=args.device,
        progress=not args.no_progress, skip_bad_images=args.skip_bad_images,
    )
    if report.rank == 0:
        print(
            f"repa cache: {report.count} items in {report.num_shards} shard(s) at {report.out} "
            f"(built {len(report.built)}, of which {len(report.repaired)} damaged and rebuilt, kept {len(report.skipped)} "
            f"on rank 0); check with `repa cache verify {report.out}`",
            file=sys.stderr,
        )
    return 0
