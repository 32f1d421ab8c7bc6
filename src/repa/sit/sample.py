"""``repa sample``: images from a ``repa train`` checkpoint, as PNGs and as an ADM-style ``.npz``.

Official checkpoints of the REPA code (the released ``last.pt``, train.py checkpoints, legacy
ones) sample too: ``repa sample --ckpt last.pt`` (see :mod:`repa.sit.official`).

    repa sample --ckpt runs/fmnist-sit-t4-repa --num-samples 1000 --mode ode --steps 50
    torchrun --nproc_per_node 8 -m repa.sit.sample --ckpt CKPT --num-samples 50000 \\
        --mode sde --steps 250 --cfg-scale 1.8 --guidance-high 0.7      # REPA's FID 1.42 setting

Sample ``i`` (0 <= i < N) belongs to rank ``i % world``. Its label is the ``i``-th draw of a
generator seeded with ``--seed`` (``--classes random``, the default: uniform labels, the
reference's FID protocol) or ``i % num_classes`` (``balanced``: exactly N / num_classes per
class); its initial noise comes from a generator seeded by (seed, i). So with the ODE sampler
the images do not depend on the number of processes or the batch size; the SDE's per-step
noise is drawn per batch. Each rank writes its own
``images/<i:06d>.png`` (existing ones are kept, so an interrupted job continues); then rank 0
packs all N into ``samples.npz`` with ``arr_0`` uint8 (N, H, W, 3) (grayscale repeated to 3
channels), the input of the ADM evaluation suite (FID, sFID, IS, precision, recall), and a
``samples.json`` record of how they were drawn (label protocol, pixel rounding, sampler, seed).
Pixels are written as the reference writes them, clamp(127.5 (x + 1), 0, 255) cast to uint8
(``--pixels truncate``, the default), so FIDs compare with the paper's; ``--pixels round``
rounds to the nearest level instead.
Latent models are decoded with the checkpoint's SD-VAE (or ``--vae``).

An output folder never mixes settings: ``samples.json`` is written before sampling starts and
records everything that changes the images (the checkpoint's sha256 and step, weights, seed,
sampler, steps, guidance, classes, pixels, N, precision, VAE; for the SDE also the batch
layout); the default folder name encodes them, and a folder made with other settings is
refused. The folder is locked while a process writes it.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from .._io import atomic_write, atomic_write_text
from ..errors import CheckpointError, ConfigError
from .checkpoint import resolve_checkpoint
from .configs import build_model
from .distributed import DistInfo, barrier, init_distributed, lock_folder_on_main, shutdown_distributed
from .images import PIXEL_ROUNDINGS, save_png, to_uint8
from .official import add_official_arguments, load_any_checkpoint
from .sampling import METHODS, SOLVERS, sample

_log = logging.getLogger("repa")

__all__ = [
    "add_arguments", "main", "load_sampling_model", "sample_labels", "sample_noise", "write_npz", "write_record",
    "sample_settings",
]

CLASS_MODES = ("balanced", "random")
WEIGHT_CHOICES = ("ema", "model")
PRECISIONS = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``repa sample``."""
    parser.add_argument("--ckpt", required=True,
                        help="a checkpoint file written by `repa train`, or its run folder (newest), or an official REPA checkpoint")
    parser.add_argument("--num-samples", type=int, default=50_000, help="N images in all (default: 50000, FID-50K)")
    parser.add_argument("--mode", choices=list(METHODS), default="sde", help="sampler (default: sde, REPA's)")
    parser.add_argument("--solver", choices=sorted({s for v in SOLVERS.values() for s in v}), default="euler",
                        help="ODE solver: euler or heun (the SDE is Euler-Maruyama) (default: euler)")
    parser.add_argument("--steps", type=int, default=250, help="sampler steps (default: 250)")
    parser.add_argument("--cfg-scale", type=float, default=1.0,
                        help="classifier-free guidance scale, applied only when > 1 as in the reference (paper best: 1.8)")
    parser.add_argument("--guidance-low", type=float, default=0.0, help="guide only steps starting at t >= this (default: 0)")
    parser.add_argument("--guidance-high", type=float, default=0.7, help="guide only steps starting at t <= this (default: 0.7)")
    parser.add_argument("--classes", choices=list(CLASS_MODES), default="random",
                        help="labels: random (seeded uniform draws, the reference's FID protocol) or balanced "
                        "(i %% num_classes) (default: random)")
    parser.add_argument("--pixels", choices=list(PIXEL_ROUNDINGS), default="truncate",
                        help="float -> uint8: truncate (the reference's clamp(127.5 (x + 1), 0, 255) cast) or round "
                        "(default: truncate)")
    parser.add_argument("--per-proc-batch", type=int, default=64, help="images per forward on each process (default: 64)")
    parser.add_argument("--out", "--output", dest="output", default=None,
                        help="output folder, alias --output (default: <run>/eval/<step>-<ckpt sha8>-<weights>-<sampler>-cfg...-<classes>-"
                        "seed<S>-n<N>, every setting that changes the images); a folder made with other settings is refused")
    parser.add_argument("--seed", type=int, default=0, help="seed of the labels and noise (default: 0)")
    parser.add_argument("--model-weights", "--weights", dest="weights", choices=list(WEIGHT_CHOICES), default="ema",
                        help="EMA or raw weights of the SiT, as `repa probe --model-weights`; alias --weights (default: ema)")
    parser.add_argument("--mixed-precision", choices=list(PRECISIONS), default="no", help="autocast dtype (default: no)")
    parser.add_argument("--vae", default=None, help="SD-VAE folder or cached hub id (default: the one the run used)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_official_arguments(parser)


def load_sampling_model(ckpt: Dict[str, Any], weights: str = "ema") -> torch.nn.Module:
    """Rebuild the checkpoint's SiT with its EMA (or raw) weights, in eval mode."""
    if weights not in WEIGHT_CHOICES:
        raise ConfigError(f"weights must be one of {WEIGHT_CHOICES}, got {weights!r}")
    model = build_model(ckpt["model_name"], **ckpt["model_kwargs"])
    if weights == "ema":
        prefix = "shadows.model."
        state = {k[len(prefix):]: v for k, v in ckpt["ema"].items() if k.startswith(prefix)}
    else:
        state = ckpt["model"]
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"the checkpoint's {weights} weights do not fit {ckpt['model_name']}: {exc}") from exc
    return model.eval().requires_grad_(False)


def sample_labels(n: int, num_classes: int, mode: str, seed: int) -> torch.Tensor:
    """Labels of samples 0..n-1: ``i % num_classes`` (balanced) or seeded uniform draws (random), (n,) int64."""
    if mode == "balanced":
        return torch.arange(n) % num_classes
    if mode == "random":
        return torch.randint(num_classes, (n,), generator=torch.Generator().manual_seed(seed))
    raise ConfigError(f"--classes must be one of {CLASS_MODES}, got {mode!r}")


def sample_noise(indices: List[int], shape: Tuple[int, ...], seed: int) -> torch.Tensor:
    """Initial noise of the given sample indices, each from its own generator seeded by (seed, i): (len, *shape)."""
    out = []
    for i in indices:
        g = torch.Generator().manual_seed((seed * 1_000_003 + i) % (2**63 - 1))
        out.append(torch.randn(shape, generator=g))
    return torch.stack(out)  # (B, *shape)


def _png_path(folder: Path, index: int) -> Path:
    return folder / "images" / f"{index:06d}.png"


def _savez(path: str, arr: np.ndarray) -> None:
    with open(path, "wb") as fh:  # a file handle, so numpy keeps the name
        np.savez(fh, arr_0=arr)


def write_npz(folder: Path, n: int, progress: bool = False) -> Path:
    """Pack ``images/000000.png`` .. into ``samples.npz`` (``arr_0`` uint8 (n, H, W, 3)), atomically."""
    from PIL import Image
    from tqdm.auto import tqdm

    first = np.asarray(Image.open(_png_path(folder, 0)))
    h, w = first.shape[:2]
    tmp_npy = folder / f".arr_0.tmp{os.getpid()}.npy"
    arr = np.lib.format.open_memmap(tmp_npy, mode="w+", dtype=np.uint8, shape=(n, h, w, 3))
    for i in tqdm(range(n), desc="npz", disable=not progress):
        path = _png_path(folder, i)
        if not path.is_file():
            raise CheckpointError(f"sample {path} is missing; run `repa sample` again with the same flags to fill it in")
        img = np.asarray(Image.open(path))
        arr[i] = np.repeat(img[..., None], 3, axis=-1) if img.ndim == 2 else img[..., :3]
    arr.flush()
    out = folder / "samples.npz"
    try:
        atomic_write(out, functools.partial(_savez, arr=arr))
    finally:
        del arr
        if tmp_npy.exists():
            tmp_npy.unlink()
    return out


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """The sha256 of a file, read in 4 MiB chunks (the identity of a checkpoint)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def sample_settings(
    args: argparse.Namespace, ckpt_path: Path, ckpt_sha256: str, step: int, vae: Any, world_size: int
) -> Dict[str, Any]:
    """Every setting that changes the images of a ``repa sample`` run (the ``samples.json`` record).

    The ODE's images depend on (checkpoint, weights, seed, i, sampler, guidance, labels, pixels,
    precision, VAE) only; the SDE draws its per-step noise per batch, so its batch layout counts too.
    """
    settings: Dict[str, Any] = {
        "checkpoint": str(ckpt_path),
        "checkpoint_sha256": ckpt_sha256,
        "step": step,
        "num_samples": args.num_samples,
        "classes": getattr(args, "classes", "random"),  # random = the reference's protocol
        "pixels": getattr(args, "pixels", "truncate"),  # truncate = the reference's uint8 conversion
        "mode": args.mode,
        "solver": args.solver if args.mode == "ode" else "euler-maruyama",
        "steps": args.steps,
        "cfg_scale": args.cfg_scale,
        "guidance_low": args.guidance_low,
        "guidance_high": args.guidance_high,
        "seed": args.seed,
        "weights": args.weights,
        "mixed_precision": args.mixed_precision,
        "vae": vae,
    }
    if args.mode == "sde":
        settings["per_proc_batch"] = args.per_proc_batch
        settings["world_size"] = world_size
    return settings


def default_output(run: Path, tag: str, settings: Dict[str, Any]) -> Path:
    """``<run>/eval/<tag>-<sha8>-<weights>-<sampler>-cfg<s>[-g<lo>-<hi>]-<classes>-seed<S>[...]-n<N>``."""
    s = settings
    layout = f"-{s['solver']}" if s["mode"] == "ode" else f"-b{s['per_proc_batch']}x{s['world_size']}"
    parts = [tag, s["checkpoint_sha256"][:8], s["weights"], f"{s['mode']}{s['steps']}{layout}", f"cfg{s['cfg_scale']:g}"]
    if s["cfg_scale"] > 1.0:  # guidance (and so its interval) applies only above 1
        parts.append(f"g{s['guidance_low']:g}-{s['guidance_high']:g}")
    parts += [s["classes"], f"seed{s['seed']}"]
    if s["pixels"] != "truncate":
        parts.append(s["pixels"])
    if s["mixed_precision"] != "no":
        parts.append(s["mixed_precision"])
    if s["vae"] is not None:
        parts.append("vae" + hashlib.sha256(str(s["vae"]).encode()).hexdigest()[:6])
    parts.append(f"n{s['num_samples']}")
    return run / "eval" / "-".join(parts)


def write_record(folder: Path, settings: Dict[str, Any]) -> Path:
    """``samples.json`` beside ``samples.npz``: how the samples were drawn, so FIDs can be compared.

    Written before sampling starts; a folder whose record says other settings (or that holds
    images without a record) is refused, so PNGs drawn one way are never completed with PNGs
    drawn another way. The checkpoint counts by its sha256 (a file replaced under the same name
    is another checkpoint); its path may change (a moved run folder).
    """
    path = folder / "samples.json"
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{str(path)!r} is unreadable ({exc}); delete {str(folder)!r} to draw the samples again") from exc
        keys = [k for k in dict.fromkeys([*settings, *old]) if k != "checkpoint"]
        diffs = [f"{k}: {old.get(k)!r} there, {settings.get(k)!r} now" for k in keys if old.get(k) != settings.get(k)]
        if diffs:
            raise ConfigError(
                f"{folder} holds samples drawn with other settings ({'; '.join(diffs)}); its images would be stale. "
                "Pass another --out (or drop --out for a folder named after the settings), or delete that "
                "folder to draw them again"
            )
    else:
        images = folder / "images"
        if images.is_dir() and any(images.iterdir()):
            raise ConfigError(
                f"{folder} already holds images but no samples.json, so they may come from other settings; pass "
                "another --out, or delete that folder"
            )
    return atomic_write_text(path, json.dumps(settings, indent=2))


def _raise_on_any_rank(info: DistInfo, failure: Optional[BaseException], what: str) -> None:
    """Every rank raises if one failed (rank 0 its own error, the others a short one)."""
    failed = failure is not None
    if info.distributed:
        flag = torch.tensor([1 if failed else 0], device=info.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        failed = bool(flag.item())
    if failure is not None:
        raise failure
    if failed:
        raise ConfigError(f"{what} failed on rank 0 (see its error); stopping")


def main(args: argparse.Namespace) -> int:
    """Run ``repa sample`` with parsed arguments; returns the exit status."""
    from tqdm.auto import tqdm

    if args.num_samples < 1 or args.per_proc_batch < 1 or args.steps < 1:
        raise ConfigError("--num-samples, --per-proc-batch and --steps must be positive integers")
    if args.mode == "sde" and args.solver != "euler":
        raise ConfigError(f"--solver {args.solver} applies to --mode ode; the SDE sampler is Euler-Maruyama")
    info = init_distributed()
    lock = None
    try:
        ckpt_path = resolve_checkpoint(args.ckpt)
        ckpt = load_any_checkpoint(ckpt_path, args)  # repa's own format, or an official REPA checkpoint
        model = load_sampling_model(ckpt, args.weights).to(info.device)
        data, cfg = ckpt["data"], ckpt["config"]
        step = int(ckpt["step"])
        official = "official" in ckpt  # an official REPA file: outputs go beside it, named after it
        del ckpt
        vae = None
        vae_name = None
        if data["kind"] != "pixels":
            from .data import load_vae

            vae_name = args.vae or data["vae"]
            vae = load_vae(vae_name, info.device)
        settings = sample_settings(args, ckpt_path, file_sha256(ckpt_path), step, vae_name, info.world_size)
        if args.output is not None:
            out = Path(args.output)
        else:
            run, tag = (ckpt_path.parent, ckpt_path.stem) if official else (ckpt_path.parent.parent, f"{step:07d}")
            out = default_output(run, tag, settings)
        lock = lock_folder_on_main(info, out, "repa sample", flag="--out")  # one writer per output folder
        failure: Optional[BaseException] = None
        if info.is_main:
            try:
                write_record(out, settings)  # refuses a folder drawn with other settings
                (out / "images").mkdir(parents=True, exist_ok=True)
            except Exception as exc:  # every rank stops below
                failure = exc
        _raise_on_any_rank(info, failure, f"preparing {out}")

        n, num_classes = args.num_samples, int(data["num_classes"])
        labels_all = sample_labels(n, num_classes, args.classes, args.seed)  # (N,)
        shape = (int(data["input_channels"]), int(data["input_size"]), int(data["input_size"]))
        mine = [i for i in range(info.rank, n, info.world_size) if not _png_path(out, i).is_file()]
        amp = PRECISIONS[args.mixed_precision]
        batches = [mine[k : k + args.per_proc_batch] for k in range(0, len(mine), args.per_proc_batch)]
        for idx in tqdm(batches, desc=f"sample rank {info.rank}", disable=args.no_progress or not info.is_main):
            noise = sample_noise(idx, shape, args.seed).to(info.device)  # (B, C, h, w)
            labels = labels_all[idx].to(info.device)  # (B,)
            g = torch.Generator(device=info.device).manual_seed((args.seed * 1_000_003 + idx[0] + 2**40) % (2**63 - 1))
            with torch.autocast(info.device.type, dtype=amp or torch.float32, enabled=amp is not None):
                x = sample(
                    model,
                    noise,
                    labels,
                    method=args.mode,
                    solver=args.solver,
                    steps=args.steps,
                    cfg_scale=args.cfg_scale,
                    guidance_low=args.guidance_low,
                    guidance_high=args.guidance_high,
                    path=cfg["path_type"],
                    generator=g,
                )  # (B, C, h, w)
            if vae is not None:
                from .data import decode_latents

                x = decode_latents(vae, x, float(data["latent_scale"]))  # (B, 3, R, R)
            images = to_uint8(x, getattr(args, "pixels", "truncate")).cpu()  # (B, C, H, W)
            for i, img in zip(idx, images):
                save_png(img.permute(1, 2, 0).numpy(), _png_path(out, i))
        barrier(info)
        if info.is_main:
            npz = write_npz(out, n, progress=not args.no_progress)
            _log.info(f"sample: {n} images in {out / 'images'}; ADM evaluation input {npz}")
        barrier(info)
    finally:
        if lock is not None:
            lock.release()
        shutdown_distributed(info)
    return 0


if __name__ == "__main__":  # python -m repa.sit.sample [flags]  (also under torchrun)
    _parser = argparse.ArgumentParser(prog="python -m repa.sit.sample", description=__doc__.splitlines()[0])
    add_arguments(_parser)
    from ..cli import run_command

    _args = _parser.parse_args()
    sys.exit(run_command(lambda: main(_args)))
