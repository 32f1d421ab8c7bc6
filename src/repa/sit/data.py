"""Datasets of the SiT recipe: the names of :mod:`repa.datasets`, re-exported where they were.

The datasets moved down to the tools layer (:mod:`repa.datasets`, image helpers in
:mod:`repa._images`) so the cache and the probe read data without importing the recipe. This
module keeps ``from repa.sit.data import ...`` working and the deprecated command
``python -m repa.sit.data prepare-latents`` (``repa cache --vae`` replaces it).
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from typing import Optional, Sequence

from .._images import list_images as _scan_folder  # noqa: F401  (the old private name)
from ..datasets import *  # noqa: F401,F403
from ..datasets import (  # noqa: F401  (names used below and the old private helpers)
    LATENTS_DEPRECATED,
    _drop_unreadable,
    _has_images,
    _idx_file,
    bad_image_message,
    image_is_readable,
    prepare_latents,
)
from ..datasets import __all__ as _datasets_all

_log = logging.getLogger("repa")

__all__ = list(_datasets_all)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m repa.sit.data", description="Prepare datasets for `repa train`.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "prepare-latents",
        help="encode an image folder into SD-VAE latent moments (+ the clean images for REPA's encoder)",
    )
    p.add_argument("--data", required=True, help="image folder; class subfolders are the labels")
    p.add_argument("--out", required=True, help="output folder (moments.npy, labels.npy, images.npy, meta.json)")
    p.add_argument("--vae", default="stabilityai/sd-vae-ft-ema", help="AutoencoderKL folder or hub id (local cache only)")
    p.add_argument("--resolution", type=int, default=256, help="center-crop size (default: 256)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument(
        "--no-store-images",
        dest="store_images",
        action="store_false",
        help="record each item's source file instead of storing the cropped images (saves disk; the "
        "source folder must stay in place)",
    )
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m repa.sit.data prepare-latents ...`` (deprecated: use ``repa cache --vae``)."""
    args = _parser().parse_args(argv)
    warnings.warn(LATENTS_DEPRECATED, DeprecationWarning, stacklevel=2)
    _log.warning(f"prepare-latents: deprecated: {LATENTS_DEPRECATED}")
    from ..errors import REPAError

    try:
        out = prepare_latents(
            args.data,
            args.out,
            args.vae,
            args.resolution,
            batch_size=args.batch_size,
            store_images=args.store_images,
            num_workers=args.num_workers,
            device=args.device,
        )
    except REPAError as exc:
        print(f"prepare-latents: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote the latent dataset {out}; train on it with `repa train --data {out}`")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
