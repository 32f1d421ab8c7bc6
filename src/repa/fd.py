"""``repa fd``: Frechet distance between two image sets in the feature space of any registry encoder.

FD-DINOv2 (Stein et al. 2023) replaces Inception by DINOv2: fit a Gaussian to each set's
features and compare them, FD = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)). Here the feature
of an image is one vector per image from a registry encoder, pooled from its patch tokens:

- ``--pool mean`` (default, every encoder): the mean of the patch tokens the encoder returns
  (the REPA target tokens, prefix tokens dropped);
- ``--pool cls``: the class token after the final norm, for timm ViTs that have one (DINOv2,
  CLIP, MAE, DINO, MoCo v3), the feature Stein et al.'s FD-DINOv2 uses.

Values are comparable only for the same encoder, pooling and image size. Inputs are a folder of
images (searched recursively), an ``.npz`` with ``arr_0`` uint8 (N, H, W, C) as written by
``repa sample`` and the ADM suite, or (for ``--ref``) a statistics file saved by ``--save-stats``::

    repa fd --samples run/eval/.../samples.npz --ref imagenet_val/ --encoder dinov2-vit-b --save-stats in256.npz
    repa fd --samples run/eval/.../samples.npz --ref in256.npz --encoder dinov2-vit-b
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch

from ._cli import add_hidden_alias
from ._io import atomic_write, atomic_write_text
from .errors import ConfigError, CorruptImageError, DataNotFoundError, ShapeMismatchError
from .metrics import feature_stats, frechet_distance_from_stats

__all__ = [
    "POOLS",
    "STATS_FORMAT",
    "iter_image_batches",
    "pooled_features",
    "compute_stats",
    "save_stats",
    "load_stats",
    "fd_between",
    "add_arguments",
    "main",
]

POOLS = ("mean", "cls")
STATS_FORMAT = "repa-fd-stats/1"
PathLike = Union[str, "os.PathLike[str]"]


# --------------------------------------------------------------------------------------------
# image sources
# --------------------------------------------------------------------------------------------


def _is_stats(path: Path) -> bool:
    if path.suffix != ".npz" or not path.is_file():
        return False
    with np.load(path, allow_pickle=False) as z:
        return "repa_fd_meta" in z.files


def _to_chw(arr: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W), (N, H, W, C) -> (N, C, H, W)."""
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise ShapeMismatchError(f"images must be (N, H, W) or (N, H, W, C) with C in (1, 3), got {arr.shape}")
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2)  # (N, C, H, W)


def _list_images(root: Path) -> List[Path]:
    from ._images import IMAGE_EXTENSIONS

    files = sorted(
        Path(d) / f for d, _, names in os.walk(root) for f in names if f.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not files:
        raise DataNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {str(root)!r} or its subfolders")
    return files


def iter_image_batches(
    source: PathLike,
    batch_size: int = 64,
    *,
    resolution: Optional[int] = None,
    channels: int = 3,
    skip_bad_images: bool = False,
) -> Iterator[torch.Tensor]:
    """uint8 batches (B, C, H, W) from a folder of images or an ``.npz`` (``arr_0``: (N, H, W[, C])).

    ``channels`` is 3 (RGB) or 1 (grayscale; RGB is averaged). ``resolution`` center-crops every
    image as ADM does (``repa._images.center_crop``); otherwise every image must have one size.
    A file that cannot be decoded raises :class:`CorruptImageError` naming it, or with
    ``skip_bad_images`` is left out with a warning.
    """
    from PIL import Image

    from ._images import bad_image_message, center_crop

    path = Path(os.path.expanduser(str(source)))
    if not path.exists():
        raise DataNotFoundError(f"{str(source)!r} does not exist; pass a folder of images or an .npz with arr_0")

    def fix(batch: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) uint8 -> the wanted channels
        if batch.shape[1] == channels:
            return batch
        if channels == 1:
            return batch.float().mean(1, keepdim=True).round().to(torch.uint8)  # (B, 1, H, W)
        return batch.expand(-1, 3, -1, -1)  # grayscale -> RGB

    def crop(arr: np.ndarray) -> np.ndarray:  # (H, W, C) -> (R, R, C)
        if resolution is None:
            return arr
        img = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
        out = center_crop(img, resolution)  # (R, R, 3)
        return out if arr.shape[-1] == 3 else out[..., :1]

    if path.is_file():
        if path.suffix != ".npz":
            raise DataNotFoundError(f"{str(source)!r} is a file but not an .npz; pass a folder of images or an .npz")
        with np.load(path, allow_pickle=False) as z:
            if "arr_0" not in z.files:
                raise DataNotFoundError(
                    f"{str(source)!r} has no 'arr_0' array of images (it holds {z.files}); statistics without repa's "
                    "metadata (e.g. the ADM suite's Inception mu/sigma) cannot be compared in another feature space"
                )
            arr = z["arr_0"]
        if arr.dtype != np.uint8:
            raise ConfigError(f"{str(source)!r}: arr_0 must be uint8 images, got {arr.dtype}")
        arr = arr if arr.ndim == 4 else arr[..., None]
        for s in range(0, arr.shape[0], batch_size):
            chunk = arr[s : s + batch_size]
            if resolution is not None:
                chunk = np.stack([crop(a) for a in chunk])
            yield fix(_to_chw(chunk))
        return

    files = _list_images(path)
    size: Optional[Tuple[int, int]] = None
    for s in range(0, len(files), batch_size):
        arrs = []
        for f in files[s : s + batch_size]:
            try:
                with Image.open(f) as img:
                    arr = np.asarray(img.convert("RGB" if channels == 3 else "L"))
            except (OSError, ValueError, SyntaxError) as exc:  # PIL: truncated, not an image, bad header
                if not skip_bad_images:
                    raise CorruptImageError(bad_image_message(f, exc)) from exc
                logging.getLogger("repa").warning("skipping the unreadable image %s (%s: %s)", f, type(exc).__name__, exc)
                continue
            arr = crop(arr if arr.ndim == 3 else arr[..., None])
            if size is None:
                size = arr.shape[:2]
            elif arr.shape[:2] != size:
                raise ShapeMismatchError(
                    f"{str(f)!r} is {arr.shape[1]}x{arr.shape[0]} but earlier images are {size[1]}x{size[0]}; pass "
                    "--resolution R to center-crop every image to R x R"
                )
            arrs.append(arr)
        if arrs:
            yield fix(_to_chw(np.stack(arrs)))


# --------------------------------------------------------------------------------------------
# features and statistics
# --------------------------------------------------------------------------------------------


def _cls_tokens(encoder: Any, images: torch.Tensor) -> torch.Tensor:
    """The class token after the final norm of a timm ViT encoder: (B, D)."""
    x = encoder.preprocess(images)  # (B, C, H, W) normalized, resized
    param = next(encoder.model.parameters())
    tokens = encoder.model.forward_features(x.to(device=param.device, dtype=param.dtype))  # (B, prefix + N, D)
    return tokens[:, 0].float()


def _check_pool(encoder: Any, pool: str) -> None:
    if pool not in POOLS:
        raise ConfigError(f"pool must be one of {POOLS}, got {pool!r}")
    if pool == "cls":
        spec = getattr(encoder, "spec", None)
        has_cls = (
            spec is not None
            and spec.extract == "vit"
            and spec.prefix_tokens >= 1
            and getattr(getattr(encoder, "model", None), "cls_token", None) is not None
        )
        if not has_cls:
            name = getattr(encoder, "name", type(encoder).__name__)
            raise ConfigError(f"--pool cls needs an encoder with a class token; {name!r} has none: use --pool mean")


@torch.no_grad()
def pooled_features(
    encoder: Any,
    source: PathLike,
    *,
    pool: str = "mean",
    batch_size: int = 64,
    resolution: Optional[int] = None,
    limit: Optional[int] = None,
    progress: bool = False,
    skip_bad_images: bool = False,
) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """One feature per image of ``source``: (n, D) float64, and the image size (H, W) they were computed at."""
    from tqdm.auto import tqdm

    _check_pool(encoder, pool)
    channels = getattr(getattr(encoder, "spec", None), "in_chans", 3)
    feats: List[torch.Tensor] = []
    size: Optional[Tuple[int, int]] = None
    count = 0
    bar = tqdm(desc=f"features {Path(str(source)).name}", unit="img", disable=not progress)
    batches = iter_image_batches(
        source, batch_size, resolution=resolution, channels=channels, skip_bad_images=skip_bad_images
    )
    for batch in batches:
        if limit is not None:
            batch = batch[: max(0, limit - count)]
            if batch.shape[0] == 0:
                break
        if size is None:
            size = (int(batch.shape[-2]), int(batch.shape[-1]))
        elif (batch.shape[-2], batch.shape[-1]) != size:
            raise ShapeMismatchError(f"{str(source)!r} mixes image sizes {size} and {tuple(batch.shape[-2:])}; pass --resolution")
        if pool == "cls":
            f = _cls_tokens(encoder, batch)  # (B, D)
        else:
            f = encoder(batch).float().mean(dim=1)  # (B, N, D) -> (B, D)
        feats.append(f.double().cpu())
        count += batch.shape[0]
        bar.update(batch.shape[0])
    bar.close()
    if count < 2:
        raise DataNotFoundError(f"{str(source)!r} holds {count} image(s); a Frechet distance needs at least 2 per set")
    return torch.cat(feats), size  # type: ignore[return-value]


def compute_stats(
    encoder: Any, source: PathLike, *, pool: str = "mean", batch_size: int = 64, resolution: Optional[int] = None,
    limit: Optional[int] = None, progress: bool = False, skip_bad_images: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, Any]]:
    """(mu (D,), sigma (D, D), meta) of ``source``'s pooled features; meta says how they were computed."""
    feats, size = pooled_features(encoder, source, pool=pool, batch_size=batch_size, resolution=resolution,
                                  limit=limit, progress=progress, skip_bad_images=skip_bad_images)
    mu, sigma = feature_stats(feats)
    meta = {
        "format": STATS_FORMAT,
        "encoder": getattr(encoder, "name", type(encoder).__name__),
        "pool": pool,
        "image_size": list(size),
        "count": int(feats.shape[0]),
        "dim": int(feats.shape[1]),
        "source": str(Path(os.path.expanduser(str(source))).resolve()),
    }
    return mu, sigma, meta


def save_stats(path: PathLike, mu: torch.Tensor, sigma: torch.Tensor, meta: Dict[str, Any]) -> Path:
    """Write (mu, sigma) and their metadata to an ``.npz`` atomically (no pickles inside)."""
    path = Path(os.path.expanduser(str(path)))
    if path.suffix != ".npz":
        raise ConfigError(f"--save-stats must name an .npz file, got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:  # a file object: np.savez appends no suffix
            np.savez(fh, mu=np.asarray(mu, dtype=np.float64), sigma=np.asarray(sigma, dtype=np.float64),
                     repa_fd_meta=np.array(json.dumps(meta, sort_keys=True)))

    return atomic_write(path, write)


def load_stats(path: PathLike) -> Tuple[np.ndarray, np.ndarray, Dict[str, Any]]:
    """(mu, sigma, meta) from a file written by :func:`save_stats`."""
    path = Path(os.path.expanduser(str(path)))
    with np.load(path, allow_pickle=False) as z:
        if "repa_fd_meta" not in z.files:
            raise ConfigError(f"{str(path)!r} is not a statistics file of `repa fd --save-stats` (keys {z.files})")
        return z["mu"], z["sigma"], json.loads(str(z["repa_fd_meta"]))


def fd_between(
    samples: PathLike,
    ref: PathLike,
    encoder: Any,
    *,
    pool: str = "mean",
    batch_size: int = 64,
    resolution: Optional[int] = None,
    limit: Optional[int] = None,
    save_ref_stats: Optional[PathLike] = None,
    progress: bool = False,
    skip_bad_images: bool = False,
) -> Tuple[float, Dict[str, Any]]:
    """FD between ``samples`` (folder / npz) and ``ref`` (folder / npz / stats file) in ``encoder``'s space.

    Returns the distance and a summary (counts, encoder, pool, image sizes). ``save_ref_stats``
    writes the reference statistics (when ``ref`` is images) for later runs.
    """
    ref_path = Path(os.path.expanduser(str(ref)))
    name = getattr(encoder, "name", type(encoder).__name__)
    if _is_stats(ref_path):
        mu_r, sigma_r, meta_r = load_stats(ref_path)
        if meta_r.get("encoder", "").lower() != str(name).lower() or meta_r.get("pool") != pool:
            raise ConfigError(
                f"the statistics {str(ref)!r} were computed with encoder {meta_r.get('encoder')!r} and --pool "
                f"{meta_r.get('pool')}, this run uses {name!r} and --pool {pool}; use the same, or pass the reference images"
            )
    else:
        mu_r, sigma_r, meta_r = compute_stats(encoder, ref, pool=pool, batch_size=batch_size, resolution=resolution,
                                              limit=limit, progress=progress, skip_bad_images=skip_bad_images)
        if save_ref_stats is not None:
            save_stats(save_ref_stats, mu_r, sigma_r, meta_r)
    mu_s, sigma_s, meta_s = compute_stats(encoder, samples, pool=pool, batch_size=batch_size, resolution=resolution,
                                          limit=limit, progress=progress, skip_bad_images=skip_bad_images)
    if list(meta_s["image_size"]) != list(meta_r["image_size"]):
        raise ConfigError(
            f"the samples are {meta_s['image_size']} images but the reference was {meta_r['image_size']}; features "
            "depend on the image size: pass --resolution R to center-crop both sets to R x R"
        )
    value = frechet_distance_from_stats(mu_s, sigma_s, mu_r, sigma_r)
    summary = {"fd": value, "encoder": name, "pool": pool, "samples": meta_s, "ref": meta_r}
    return value, summary


# --------------------------------------------------------------------------------------------
# repa fd
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``repa fd``."""
    parser.add_argument("--samples", required=True, help="generated images: a folder or an .npz with arr_0 (N, H, W, C)")
    parser.add_argument("--ref", required=True, help="reference images (folder / .npz) or a stats .npz from --save-stats")
    parser.add_argument("--encoder", default="dinov2-vit-b", help="registry encoder (default: dinov2-vit-b)")
    parser.add_argument("--encoder-weights", dest="weights", default=None, help="local weights file of the encoder")
    add_hidden_alias(parser, "--weights", dest="weights")  # the old name
    parser.add_argument("--no-pretrained", dest="pretrained", action="store_false", help="random encoder (tests only)")
    parser.add_argument("--seed", type=int, default=0, help="seed of a random encoder with --no-pretrained")
    parser.add_argument("--pool", choices=list(POOLS), default="mean",
                        help="mean of patch tokens (default) or the class token (FD-DINOv2 of Stein et al.)")
    parser.add_argument("--resolution", type=int, default=None, help="center-crop every image to R x R first")
    parser.add_argument("--save-stats", default=None, help="write the reference's (mu, sigma) to this .npz")
    parser.add_argument("--num-samples", type=int, default=None, help="use at most this many images per set")
    parser.add_argument("--batch-size", type=int, default=64, help="images per encoder call (default: 64)")
    parser.add_argument("--out", default=None, help="also write the result as JSON to this file")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--skip-bad-images", action="store_true",
                        help="skip (with a warning) image files that cannot be decoded instead of stopping")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    """Run ``repa fd``; prints the distance on stdout."""
    from .encoders import create_encoder

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not args.pretrained and args.weights is None:
        torch.manual_seed(args.seed)
    encoder = create_encoder(
        args.encoder, pretrained=args.pretrained if args.weights is None else False, weights=args.weights,
        resolution=args.resolution or 256, device=device,
    )
    if args.save_stats is not None and _is_stats(Path(os.path.expanduser(args.ref))):
        raise ConfigError("--save-stats stores statistics of reference images, but --ref is already a statistics file")
    value, summary = fd_between(
        args.samples, args.ref, encoder, pool=args.pool, batch_size=args.batch_size, resolution=args.resolution,
        limit=args.num_samples, save_ref_stats=args.save_stats, progress=not args.no_progress,
        skip_bad_images=args.skip_bad_images,
    )
    summary["encoder_weights"] = args.weights or ("pretrained" if args.pretrained else f"random(seed={args.seed})")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps(summary, indent=1))
    print(f"{value:.6f}")
    logging.getLogger("repa").info(
        f"fd: FD-{summary['encoder']} ({args.pool} pool) = {value:.4f} between {summary['samples']['count']} samples "
        f"and {summary['ref']['count']} reference images",
    )
    return 0
