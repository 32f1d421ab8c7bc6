"""``repa probe``: how aligned is a SiT training checkpoint with a frozen encoder, layer by layer and per t?

The recipe's side of the alignment analysis: load a ``repa train`` checkpoint (or an official
REPA one), read a seeded subset of ``--data``, and run :func:`repa.probing.probe_alignment`
with the null class label; writes ``alignment.json`` and ``alignment.png``.

    repa probe --ckpt runs/my-run --encoder dinov2-vit-b --data IMAGES --layers all --t 0.25,0.5,0.75
    # -> <run>/probe/<step>-<encoder>/alignment.json and alignment.png
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from .._cli import add_hidden_alias
from .._io import atomic_write_text
from ..errors import ConfigError
from ..probing import plot_alignment, probe_alignment
from .transport import get_path

_log = logging.getLogger("repa")

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``repa probe``."""
    parser.add_argument("--ckpt", required=True,
                        help="a `repa train` checkpoint file, or its run folder (newest), or an official REPA checkpoint")
    parser.add_argument("--encoder", required=True, help="registry encoder to compare with, e.g. dinov2-vit-b")
    parser.add_argument("--data", required=True, help="images with labels: image folder (class subfolders), IDX folder or latent folder")
    parser.add_argument("--layers", default="all", help="'all' blocks, or block indices / module names: 0,3,5 (default: all)")
    parser.add_argument("--t", default="0.25,0.5,0.75", help="noise levels, comma-separated (default: 0.25,0.5,0.75)")
    parser.add_argument("--num-samples", type=int, default=1000, help="images measured, a seeded random subset (default: 1000)")
    parser.add_argument("--out", default=None, help="output folder (default: <run>/probe/<step>-<encoder>)")
    parser.add_argument("--encoder-weights", dest="weights", default=None, help="local weights file of the encoder")
    add_hidden_alias(parser, "--weights", dest="weights")  # the old name
    parser.add_argument("--no-pretrained", dest="pretrained", action="store_false", help="random encoder (tests only)")
    parser.add_argument("--model-weights", choices=["ema", "model"], default="ema", help="EMA or raw weights (default: ema)")
    parser.add_argument("--topk", type=int, default=10, help="k of CKNNA (default: 10, REPA's)")
    parser.add_argument("--train-fraction", type=float, default=0.8, help="share of samples training the probes (default: 0.8)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward (default: 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subset, the noise and the split (default: 0)")
    parser.add_argument("--vae", default=None, help="SD-VAE folder for latent models (default: the checkpoint's)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    from .official import add_official_arguments

    add_official_arguments(parser)


def _parse_ts(text: str) -> List[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--t must be comma-separated numbers in [0, 1], got {text!r}") from None


def _load_samples(data: str, info: Dict[str, Any], n: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """A seeded subset of ``--data``: images (n, C, R, R) uint8, labels (n,), moments (n, 2c, h, w) or None."""
    from .data import open_dataset

    dataset, data_info = open_dataset(data, resolution=int(info["image_size"]))
    if int(data_info.image_size) != int(info["image_size"]):
        raise ConfigError(
            f"--data {data!r} has {data_info.image_size}px images but the checkpoint was trained on {info['image_size']}px"
        )
    total = len(dataset)
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[: min(n, total)]
    items = [dataset[int(i)] for i in order]
    images = torch.stack([it["image"] for it in items])  # (n, C, R, R)
    labels = torch.stack([torch.as_tensor(it["y"]) for it in items]).long()  # (n,)
    moments = torch.stack([it["moments"] for it in items]) if "moments" in items[0] else None
    return images, labels, moments


def main(args: argparse.Namespace) -> int:
    """Run ``repa probe`` with parsed arguments; returns the exit status."""
    from ..encoders import create_encoder
    from .checkpoint import resolve_checkpoint
    from .official import load_any_checkpoint
    from .sample import load_sampling_model

    ts = _parse_ts(args.t)
    if args.num_samples <= args.topk:
        raise ConfigError(f"--num-samples {args.num_samples} must exceed --topk {args.topk}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ckpt_path = resolve_checkpoint(args.ckpt)
    ckpt = load_any_checkpoint(ckpt_path, args)  # repa's own format, or an official REPA checkpoint
    model = load_sampling_model(ckpt, args.model_weights).to(device)
    info, cfg, step = ckpt["data"], ckpt.get("config", {}), int(ckpt["step"])
    official = "official" in ckpt  # an official REPA file: outputs go beside it, named after it
    del ckpt
    images, labels, moments = _load_samples(args.data, info, args.num_samples, args.seed)

    if info["kind"] == "pixels":
        inputs = images.float() / 127.5 - 1.0  # (n, C, R, R): the pixel model's input
    else:  # SD-VAE latents: the posterior mean, scaled (no sampling noise in the measurement)
        from .data import encode_moments, load_vae

        if moments is None:
            vae = load_vae(args.vae or info["vae"], device)
            moments = torch.cat([encode_moments(vae, images[s : s + args.batch_size].to(device)).cpu()
                                 for s in range(0, images.shape[0], args.batch_size)])
        inputs = moments.float().chunk(2, dim=1)[0] * float(info["latent_scale"])  # (n, c, h, w)

    if not args.pretrained and args.weights is None:
        torch.manual_seed(args.seed)  # a reproducible random encoder (tests only)
    encoder = create_encoder(
        args.encoder, pretrained=args.pretrained if args.weights is None else False, weights=args.weights,
        resolution=int(info["image_size"]), device=device,
    )
    result = probe_alignment(
        model, encoder, images, labels, args.layers, ts, inputs=inputs, path=get_path(cfg.get("path_type", "linear")),
        topk=args.topk, batch_size=args.batch_size, train_fraction=args.train_fraction, seed=args.seed,
        device=device, progress=not args.no_progress,
    )
    result.meta = {
        "checkpoint": str(ckpt_path),
        "step": step,
        "model": cfg.get("model"),
        "model_weights": args.model_weights,
        "encoder": encoder.name,
        "encoder_weights": args.weights or ("pretrained" if args.pretrained else "random"),
        "data": str(args.data),
        "path": cfg.get("path_type", "linear"),
        "null_label": True,
    }
    run, tag = (ckpt_path.parent, ckpt_path.stem) if official else (ckpt_path.parent.parent, f"{step:07d}")
    out = Path(args.out) if args.out else run / "probe" / f"{tag}-{encoder.name}"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "alignment.json", json.dumps(result.to_dict(), indent=1), fsync=False)
    png = plot_alignment(result, out / "alignment.png")
    best = max(range(len(result.layers)), key=lambda j: max(row[j] for row in result.cknna))
    _log.info(
        f"probe: {result.num_samples} samples, {len(result.layers)} layers x {len(ts)} noise levels; highest CKNNA "
        f"at {result.layers[best]}; wrote {out / 'alignment.json'} and {png}",
    )
    return 0
