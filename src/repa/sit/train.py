"""``repa train``: train a SiT with (or without) REPA, the reference recipe as a program.

    repa train                                   # the offline CPU demo (Fashion-MNIST, minutes)
    torchrun --nproc_per_node 8 -m repa.sit.train --config imagenet256 --data LATENTS
    torchrun --nproc_per_node 8 -m repa.sit.train --config imagenet256 --data FEATURE_CACHE

The step reads top to bottom like the paper's recipe (REPA_FACTS section 3):

    x (pixels in [-1, 1], or SD-VAE latents (mean + std * eps) * 0.18215)
    t ~ uniform | lognormal;  x_t, v = path.interpolate(x, noise, t)
    pred = model(x_t, t, y with 10% dropped to the null class)         # hooks capture blocks.k
    loss = mse(pred, v) + reg(clean_images)                             # REPA, the public API
           (or reg(features=batch["features"]) when --data is a feature cache: no encoder at all)
    backward; clip grad norm 1.0; AdamW; EMA (model and projectors)

Determinism: the data order is a function of (seed, epoch); the noise, times and label
dropout of step s are drawn for the whole global batch from a generator seeded by (seed, s)
and each rank takes its samples' rows. So a resumed run repeats an uninterrupted one exactly,
and N processes on a global batch compute what one process does on it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import logging
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..cache import is_feature_cache
from ..errors import (
    CacheMismatchError,
    CheckpointError,
    ConfigError,
    NonFiniteLossError,
    WeightsNotFoundError,
    require,
)
from .checkpoint import (
    CHECKPOINT_FORMAT,
    capture_rng_state,
    checkpoint_path,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
    restore_rng_state,
    save_checkpoint,
    clean_stale_temp_files,
)
from .configs import CONFIGS, FIELD_NAMES, MIXED_PRECISION, TrainConfig, build_model, model_names, resolve_config
from .data import DataInfo, encode_moments, images_to_model_input, load_vae, open_dataset, sample_latents
from .distributed import (
    DistInfo,
    ResumableDistributedSampler,
    all_gather_objects,
    barrier,
    init_distributed,
    lock_folder_on_main,
    shutdown_distributed,
)
from .ema import EMA
from .sampling import METHODS, sample
from .transport import PATHS, TIME_SAMPLERS, get_path, sample_time, velocity_loss

__all__ = ["add_arguments", "main", "train", "TrainResult", "precision_settings", "step_generator"]

_log = logging.getLogger("repa")

# What a resumed run may change (issue 12). Everything not listed here must equal the saved run's
# value: it changes what a step computes, or the state the checkpoint holds was built for it.
# Applied on resume: written into the restored optimizer (a logged note says so).
_RESUME_APPLIED = ("learning_rate",)
# Free: how long to train, what to write and where, how to load batches; no effect on the numbers.
_RESUME_FREE = (
    "max_train_steps", "checkpointing_steps", "log_every", "sample_every", "sample_count", "sample_steps",
    "sample_mode", "sample_cfg", "tensorboard", "num_workers", "allow_tf32", "output_dir", "exp_name",
    "resume", "config_name", "init_from", "verify_cache",
)
# Kept for code that imported it: the settings refused when they differ on resume.
_RESUME_KEYS = tuple(f for f in FIELD_NAMES if f not in _RESUME_APPLIED + _RESUME_FREE)


@dataclass
class TrainResult:
    """What :func:`train` returns: where it wrote, the last step, and why it stopped."""

    run_dir: Path
    step: int
    checkpoint: Optional[Path]
    stopped_by: Optional[str] = None  # "SIGTERM" / "SIGINT" when interrupted


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``repa train``; each maps to the :class:`TrainConfig` field of the same name."""
    d = TrainConfig()
    S = argparse.SUPPRESS

    def add(group, flag: str, help_: str, **kw: Any) -> None:
        name = flag[2:].replace("-", "_")
        default = getattr(d, name) if name in FIELD_NAMES else None
        flag_only = kw.get("action") in ("store_true", "store_false")
        shown = "" if flag_only or default is None else f" (default: {default})"
        group.add_argument(flag, default=S, help=help_ + shown, **kw)

    g = parser.add_argument_group("configuration")
    g.add_argument(
        "--config",
        default=None,
        help=f"a built-in recipe ({', '.join(CONFIGS)}) or a JSON file of settings (field names as the flags, "
        "'base' to extend a recipe); flags override it. Default: the Fashion-MNIST CPU demo",
    )
    g.add_argument("--print-config", action="store_true", help="print the resolved settings as JSON and exit")

    g = parser.add_argument_group("model")
    add(g, "--model", "SiT size (imagenet256: SiT-XL/2)", choices=model_names())
    add(g, "--model-kwargs", "extra SiT arguments as JSON, e.g. '{\"qk_norm\": true}'", type=json.loads)

    g = parser.add_argument_group("data")
    add(
        g,
        "--data",
        "folder of IDX files (Fashion-MNIST format), of images (class subfolders = labels), of prepared "
        "latents (python -m repa.sit.data prepare-latents), or a feature cache (repa cache: the encoder is then "
        "never loaded); default: /usr/share/datasets/fashion-mnist",
    )
    add(g, "--resolution", "center-crop size for image folders", type=int)
    add(g, "--vae", "SD-VAE (diffusers AutoencoderKL folder or cached hub id) to encode image folders on the fly")
    add(g, "--num-workers", "DataLoader worker processes per rank", type=int)
    add(g, "--skip-bad-images", "image folders: skip (with a warning) files that cannot be decoded instead of "
        "stopping; every image is decoded once at start to find them", action="store_true")
    add(
        g,
        "--no-verify-cache",
        "a feature cache --data: skip the sha256 of each shard before its first read (for a cache already checked "
        "with `repa cache verify`); targets are still checked finite as they are read",
        dest="verify_cache",
        action="store_false",
    )

    g = parser.add_argument_group("REPA")
    add(g, "--no-repa", "train the baseline without the alignment term", dest="repa", action="store_false")
    add(g, "--enc-type", "frozen encoder(s), comma-separated registry names (imagenet256: dinov2-vit-b)")
    add(g, "--enc-weights", "a local weights file for the encoder instead of its default location")
    add(
        g,
        "--encoder-depth",
        "align the output of this block, counted from 1 as in the paper: 8 = module blocks.7 = layers=7",
        type=int,
    )
    add(g, "--proj-coeff", "lambda, the alignment loss weight (REPA: 0.5)", type=float)
    add(g, "--projector-dim", "hidden width of the MLP projector (REPA: 2048)", type=int)

    g = parser.add_argument_group("representation objectives (no pretrained encoder needed: dispersive, sra, vae)")
    add(
        g,
        "--regularizer",
        "repa, dispersive (arXiv 2506.09027), sra (self-alignment to the EMA model, arXiv 2505.02831), vae (the VAE's "
        "latent as teacher, arXiv 2601.17830; latent runs only) or none; comma-separated to combine, e.g. repa,dispersive",
    )
    add(g, "--disp-weight", "Dispersive Loss weight lambda (paper: 0.5)", type=float)
    add(g, "--disp-variant", "infonce-l2 (paper default), infonce-cosine, hinge, covariance")
    add(g, "--disp-temperature", "Dispersive Loss temperature tau (paper: 0.5)", type=float)
    add(g, "--disp-depth", "block for the Dispersive Loss, counted from 1 (default: depth // 4, the paper's)", type=int)
    add(g, "--sra-weight", "SRA loss weight (paper: 0.2 with smooth-L1)", type=float)
    add(g, "--sra-student-depth", "SRA student block, counted from 1 (default: --encoder-depth)", type=int)
    add(g, "--sra-teacher-depth", "SRA teacher block of the EMA model, from 1 (default: twice the student's)", type=int)
    add(g, "--sra-max-gap", "SRA teacher time t - U(0, gap) (paper: 0.2)", type=float)
    add(g, "--vae-weight", "weight of the alignment to the VAE latent", type=float)
    add(g, "--vae-depth", "block aligned to the VAE latent, counted from 1 (default: --encoder-depth)", type=int)

    g = parser.add_argument_group("objective")
    add(g, "--path-type", "interpolant path", choices=list(PATHS))
    add(g, "--weighting", "training-time distribution", choices=list(TIME_SAMPLERS))
    add(g, "--cfg-prob", "label dropout probability for classifier-free guidance", type=float)

    g = parser.add_argument_group("optimization")
    add(g, "--batch-size", "GLOBAL batch size, split evenly over the processes", type=int)
    add(g, "--learning-rate", "AdamW learning rate, constant", type=float)
    add(g, "--adam-beta1", "AdamW beta1", type=float)
    add(g, "--adam-beta2", "AdamW beta2", type=float)
    add(g, "--adam-weight-decay", "AdamW weight decay", type=float)
    add(g, "--adam-epsilon", "AdamW epsilon", type=float)
    add(g, "--max-grad-norm", "gradient clipping norm (<= 0: no clipping)", type=float)
    add(g, "--ema-decay", "EMA decay of the model and projectors (REPA: 0.9999)", type=float)
    add(g, "--mixed-precision", "autocast dtype (fp16 adds a GradScaler)", choices=list(MIXED_PRECISION))
    add(g, "--allow-tf32", "allow TF32 matmuls on Ampere+ GPUs", dest="allow_tf32", action="store_true")
    add(g, "--max-train-steps", "number of optimizer steps", type=int)
    add(g, "--seed", "seed of the initialization, the data order and the per-step noise", type=int)

    g = parser.add_argument_group("outputs")
    add(g, "--output-dir", "parent folder of the run folder")
    add(g, "--exp-name", "run folder name (default: <config>-<model>-repa|baseline)")
    add(g, "--checkpointing-steps", "write a checkpoint every N steps", type=int)
    add(g, "--log-every", "append a JSONL record every N steps", type=int)
    add(g, "--sample-every", "write a PNG grid of EMA samples every N steps", type=int)
    add(g, "--sample-count", "images in the sample grid", type=int)
    add(g, "--sample-steps", "sampler steps for the grid", type=int)
    add(g, "--sample-mode", "sampler for the grid", choices=list(METHODS))
    add(g, "--sample-cfg", "guidance scale for the grid (1 = none)", type=float)
    add(g, "--tensorboard", "also log to TensorBoard (needs the tensorboard package)", action="store_true")
    add(g, "--resume", "continue from a checkpoint: a file, a run folder, or 'latest' (this run's newest)")
    add(
        g,
        "--init-from",
        "start from an official REPA checkpoint (released last.pt or a train.py checkpoint): SiT, EMA and "
        "projectors; a train.py checkpoint's args set model, encoder, depth, path, ... unless flags say otherwise",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults <- ``--config`` <- the flags given on the command line."""
    given = {k: v for k, v in vars(args).items() if k in FIELD_NAMES}
    if given.get("init_from") and not given.get("resume"):
        from .official import official_train_settings

        # the checkpoint's settings sit between --config and the flags
        given = {**official_train_settings(given["init_from"]), **given}
    return resolve_config(getattr(args, "config", None), given)


def main(args: argparse.Namespace) -> int:
    """Run ``repa train`` with parsed arguments; returns the exit status."""
    cfg = config_from_args(args)
    if getattr(args, "print_config", False):
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    result = train(cfg, progress=not getattr(args, "no_progress", False))
    return 0 if result is not None else 1


# --------------------------------------------------------------------------------------------
# Pieces of the program
# --------------------------------------------------------------------------------------------


def precision_settings(mixed_precision: str, device: torch.device):
    """``(autocast dtype or None, GradScaler)`` for ``--mixed-precision`` no / fp16 / bf16."""
    dtypes = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}
    if mixed_precision not in dtypes:
        raise ConfigError(f"--mixed-precision {mixed_precision!r} is not valid; choose from {', '.join(dtypes)}")
    dtype = dtypes[mixed_precision]
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
    return dtype, scaler


def step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """The generator of step ``step``'s noise, times and label dropout: seeded by (seed, step) only."""
    g = torch.Generator(device=device)
    g.manual_seed((int(seed) * 1_000_003 + int(step) * 7_919 + 12_345) % (2**63 - 1))
    return g


class _StopSignal:
    """Turns SIGTERM / SIGINT into a flag checked after each step (a second Ctrl-C aborts at once)."""

    def __init__(self) -> None:
        self.received: Optional[str] = None
        self._previous: Dict[int, Any] = {}

    def __enter__(self) -> "_StopSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        print(
            f"\nrepa train: {self.received} received; finishing this step, writing a checkpoint, then exiting "
            "(Ctrl-C again to abort without saving)",
            file=sys.stderr,
            flush=True,
        )

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _train_teacher_if_possible(name: str, path: Path) -> None:
    """The demo's teacher is missing: run ``repa teacher`` when that command exists, else explain."""
    if importlib.util.find_spec("repa.sit.teacher") is None:
        raise WeightsNotFoundError(
            f"the REPA teacher encoder {name!r} has no weights at {path}; train it first with `repa teacher` "
            "(a few minutes on CPU), or pass --enc-weights FILE, or run the baseline with --no-repa"
        )
    teacher = importlib.import_module("repa.sit.teacher")
    print(
        f"repa train: the teacher encoder {name!r} has no weights at {path}; training it now with `repa teacher` "
        "(once, a few minutes on CPU)",
        file=sys.stderr,
        flush=True,
    )
    parser = argparse.ArgumentParser(prog="repa teacher")
    teacher.add_arguments(parser)
    status = teacher.main(parser.parse_args([]))
    if status not in (None, 0):
        raise WeightsNotFoundError(f"`repa teacher` failed (exit status {status}); the teacher {name!r} is still missing")


def _build_encoders(cfg: TrainConfig, info: DataInfo, dist_info: DistInfo) -> List[nn.Module]:
    """The frozen encoders named by ``--enc-type``, trained first (rank 0) if the demo teacher is missing."""
    from ..encoders import create_encoder, local_weights_path

    encoders = []
    for name in cfg.encoder_names:
        kwargs = dict(weights=cfg.enc_weights, resolution=info.image_size, device=dist_info.device)
        try:
            encoders.append(create_encoder(name, **kwargs))
            continue
        except WeightsNotFoundError:
            if name.lower() != "fmnist-vit" or cfg.enc_weights is not None:
                raise
        # the offline demo's teacher: train it once (rank 0), the other ranks wait for the file
        failure: Optional[BaseException] = None
        if dist_info.is_main:
            try:
                _train_teacher_if_possible(name, local_weights_path(name))
            except BaseException as exc:  # other ranks must still leave the barrier
                failure = exc
        barrier(dist_info)
        if failure is not None:
            raise failure
        encoders.append(create_encoder(name, **kwargs))
    return encoders


def _open_feature_cache(cfg: TrainConfig, dist_info: DistInfo) -> Tuple[Dataset, DataInfo, Dict[str, int]]:
    """``--data`` is a feature cache (``repa cache``): its dataset, what it feeds, and the target widths.

    Every batch then carries the encoders' targets (``batch["features"]``), so the regularizer is
    built from their widths alone and the frozen encoder is never loaded.
    """
    from ..cache import CachedFeatureDataset

    names = cfg.encoder_names if "repa" in cfg.objectives else []
    if "repa" in cfg.objectives and cfg.enc_weights is not None:
        raise ConfigError(
            f"--enc-weights {cfg.enc_weights!r} has no effect with a feature cache ({cfg.data}): its targets were "
            "computed when the cache was built (see its index.json); drop --enc-weights, or build a cache with "
            "`repa cache --weights NAME=FILE ...`"
        )
    dataset = CachedFeatureDataset(
        cfg.data, encoders=names, resolution=cfg.resolution, verify="sha256" if cfg.verify_cache else "none"
    )
    info = dataset.data_info()
    if info.kind == "pixels" and not dataset.load_images:
        raise CacheMismatchError(
            f"the feature cache {cfg.data} holds neither pixels nor VAE latents (built with --no-images and no "
            "--vae), so there is nothing to train on; rebuild it without --no-images, or with --vae"
        )
    if cfg.vae is not None and info.kind == "pixels":
        raise CacheMismatchError(
            f"the run trains on SD-VAE latents (vae={cfg.vae!r}) but the feature cache {cfg.data} stores no latent "
            f"moments; rebuild it with `repa cache ... --vae {cfg.vae}`, or train in pixel space without --vae"
        )
    if info.kind == "latents":
        dataset.load_images = False  # the step needs the moments only
    entries = {e["name"].lower(): e for e in dataset.index["encoders"]}
    widths = {name: int(entries[name.lower()]["shape"][1]) for name in dataset.encoder_names}
    untrained = [n for n in dataset.encoder_names if entries[n.lower()].get("weights", {}).get("source") == "random"]
    if untrained and dist_info.is_main:
        print(
            f"repa train: warning: the feature cache {cfg.data} holds targets of randomly initialized encoder(s) "
            f"{untrained} (built with --no-pretrained): a control experiment, not REPA with a trained teacher",
            file=sys.stderr,
            flush=True,
        )
    return dataset, info, widths


def _flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _check_resume_compatible(saved: Dict[str, Any], cfg: TrainConfig, path: Path) -> None:
    """Refuse a resume whose settings differ from the checkpoint's in anything but the free/applied ones.

    One message lists every difference as ``--flag: saved X, given Y``. A setting the checkpoint
    predates counts as its default.
    """
    now, defaults = cfg.to_dict(), TrainConfig().to_dict()
    diffs = [
        f"{_flag_name(k)}: saved {saved.get(k, defaults[k])!r}, given {now[k]!r}"
        for k in _RESUME_KEYS
        if saved.get(k, defaults[k]) != now[k]
    ]
    if diffs:
        raise CheckpointError(
            f"cannot resume from {path}: {len(diffs)} setting(s) differ from the saved run ({'; '.join(diffs)}). "
            "These change what a step computes or the state the checkpoint was built for; resume with the "
            "saved values (the run's config.json lists them), or start a new run. Only "
            f"{', '.join(map(_flag_name, _RESUME_APPLIED))} and the output/length settings may change on resume"
        )


def _apply_resume_changes(saved: Dict[str, Any], cfg: TrainConfig, optimizer: torch.optim.Optimizer, is_main: bool) -> None:
    """Write the settings that may change on resume into the restored state (the optimizer's learning rate)."""
    old = saved.get("learning_rate")
    for group in optimizer.param_groups:  # load_state_dict restored the saved rate: the given one wins
        group["lr"] = cfg.learning_rate
    if old is not None and old != cfg.learning_rate and is_main:
        _log.warning("resume: --learning-rate changed from %g (saved) to %g; the optimizer now uses %g",
                     old, cfg.learning_rate, cfg.learning_rate)


def _resume_source(cfg: TrainConfig, run_dir: Path) -> Optional[Path]:
    """The checkpoint to resume from (None: a fresh run), refusing anything that would overwrite a run.

    A fresh start in a folder that holds checkpoints is refused. ``--resume`` with another run's
    checkpoint starts this run's folder from it (a new run: nothing of the other run is touched),
    but is refused if this folder already holds a run of its own (checkpoints or a log), which
    the resumed run would overwrite.
    """
    if not cfg.resume:
        newest = latest_checkpoint(run_dir)
        if newest is not None:
            raise CheckpointError(
                f"{run_dir} already holds checkpoints (newest: {newest.name}); continue that run "
                "with --resume latest, or start a new one with another --exp-name or --output-dir"
            )
        return None
    path = resolve_checkpoint(cfg.resume, run_dir)
    source_run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    if source_run.resolve() == run_dir.resolve():
        return path
    own = [p.name for p in list_checkpoints(run_dir)] + (["log.jsonl"] if (run_dir / "log.jsonl").exists() else [])
    if own:
        raise CheckpointError(
            f"--resume {cfg.resume} is a checkpoint of another run ({source_run}), but this run's folder {run_dir} "
            f"already holds {', '.join(own[-3:])}, which resuming would overwrite. To continue {run_dir.name}, use "
            f"--resume latest; to start a new run from that checkpoint, pick a new folder, e.g. "
            f"--exp-name {run_dir.name}-from-{source_run.name}"
        )
    _log.info("resume: starting the new run folder %s from %s (the run %s is not modified)", run_dir, path, source_run)
    return path


_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _worker_init(worker_id: int) -> None:
    """DataLoader workers ignore SIGINT / SIGTERM and use one thread.

    A signal sent to the whole process group (Ctrl-C, SLURM preemption, ``kill -TERM -PGID``)
    reaches the workers too; the main process alone decides to stop, finishes its step and
    writes a checkpoint, and would otherwise find its workers dead. One intra-op thread per
    worker keeps N workers from competing with the training process for the cores.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)  # blocked by _batches while it forked us
    torch.set_num_threads(1)


def _batches(loader: DataLoader):
    """Iterate ``loader`` and always shut its workers down, also when an error or a ``break`` ends the loop.

    The workers ignore SIGTERM (:func:`_worker_init`), so the DataLoader's own last resort of
    terminating them with SIGTERM would not work: an iterator kept alive by an exception's
    traceback would leave them waiting, and the interpreter waiting for them at exit.
    """
    # A worker inherits the signal mask of the process that forks it. Blocking the stop signals
    # while the workers start closes the window between the fork and _worker_init, in which a
    # group signal would kill a new worker (each epoch forks new ones); the main process
    # receives a signal sent meanwhile as soon as the mask is restored.
    blocked = loader.num_workers > 0 and threading.current_thread() is threading.main_thread()
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS) if blocked else None
    try:
        iterator = iter(loader)
    finally:
        if old_mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    try:
        yield from iterator
    finally:
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if callable(shutdown):
            shutdown()


def _json_safe(record: Dict[str, Any]) -> Dict[str, Any]:
    """Non-finite floats become None, so ``log.jsonl`` stays strict JSON (no bare NaN / Infinity)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


def _append_log(log_file: Path, record: Dict[str, Any]) -> None:
    with open(log_file, "a") as fh:
        fh.write(json.dumps(_json_safe(record), allow_nan=False) + "\n")


def _raise_if_any_failed(failure: Optional[BaseException], target: Path, dist_info: DistInfo) -> None:
    """After rank 0's checkpoint write: every rank raises :class:`CheckpointError` if it failed."""
    failed = failure is not None
    if dist_info.distributed:
        flag = torch.tensor([1 if failed else 0], device=dist_info.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        failed = bool(flag.item())
    if isinstance(failure, CheckpointError):  # rank 0: the writer's own message (space left, limits)
        raise failure
    if failed:
        reason = f"{type(failure).__name__}: {failure}" if failure is not None else "see rank 0's error"
        raise CheckpointError(
            f"could not write checkpoint {str(target)!r} ({reason}); the earlier checkpoints are intact. Free disk "
            "space (or fix the folder's permissions) and continue with --resume latest"
        ) from failure


def _stop_nonfinite(
    what: str, loss: torch.Tensor, grad_norm: torch.Tensor, step: int, run_dir: Path, log_file: Path, dist_info: DistInfo
) -> None:
    """Log the failed step as strict JSON (nulls) and raise :class:`NonFiniteLossError`; nothing is saved."""
    value = float(loss.detach().float().item()) if what == "loss" else float(grad_norm.detach().float().item())
    if dist_info.is_main:
        _append_log(log_file, {"step": step, "loss": float(loss.detach().float().item()),
                               "grad_norm": float(grad_norm.detach().float().item()),
                               "error": f"non-finite {what} ({value})"})
    newest = latest_checkpoint(run_dir)
    last = f"the last good checkpoint is {newest}" if newest is not None else "no checkpoint was written yet"
    raise NonFiniteLossError(
        f"the training {what} is {value} at step {step}; stopped before the update, nothing of this step was saved "
        f"and {last}. Lower --learning-rate, check the data for NaN/Inf, or try --mixed-precision bf16 / no, then "
        "continue with --resume latest (or start again)"
    )


def _nonfinite_step(
    loss: torch.Tensor, grad_norm: torch.Tensor, check_grad: bool, dist_info: DistInfo
) -> Optional[str]:
    """What is not finite in this step on any rank (``"loss"`` / ``"gradient norm"``), or None.

    Checked before the optimizer step, so a NaN never reaches the weights. The gradient norm is
    checked unless the fp16 GradScaler is on (it skips such steps by design and lowers its scale).
    """
    bad = torch.stack([~torch.isfinite(loss.detach().float()), ~torch.isfinite(grad_norm.detach().float()) & check_grad])
    bad = bad.to(torch.int32)  # (2,)
    if dist_info.distributed:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    loss_bad, grad_bad = bad.tolist()  # one device sync per step
    if loss_bad:
        return "loss"
    if grad_bad:
        return "gradient norm"
    return None


def _truncate_log(log_file: Path, step: int) -> None:
    """Keep the records up to ``step`` (a resumed run rewrites what came after its checkpoint)."""
    if not log_file.is_file():
        return
    kept = []
    for line in log_file.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            continue
    tmp = log_file.with_name(f".{log_file.name}.tmp{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, log_file)


def _describe(obj: nn.Module) -> str:
    """A short description of an objective for the start-up line."""
    names = getattr(obj, "layer_names", [])
    if hasattr(obj, "teacher_layer"):
        return f"{obj.student_layer} -> EMA {obj.teacher_layer}"
    return ", ".join(names)


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


@torch.no_grad()
def _write_sample_grid(
    ema_model: nn.Module, cfg: TrainConfig, info: DataInfo, vae: Any, device: torch.device, path: Path
) -> None:
    """A PNG grid of EMA samples with fixed noise and balanced labels (one row per class when <= 16)."""
    from .images import make_grid, save_png, to_uint8

    n = cfg.sample_count
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    shape = (info.input_channels, info.input_size, info.input_size)
    noise = torch.randn((n, *shape), generator=g, device=device)  # (n, C, h, w)
    labels = torch.arange(n, device=device) % info.num_classes  # (n,)
    x = sample(
        ema_model,
        noise,
        labels,
        method=cfg.sample_mode,
        steps=cfg.sample_steps,
        cfg_scale=cfg.sample_cfg,
        guidance_low=0.0,
        guidance_high=1.0,
        path=cfg.path_type,
        generator=g,
    )  # (n, C, h, w)
    if info.kind != "pixels":
        from .data import decode_latents

        x = decode_latents(vae, x, info.latent_scale)  # (n, 3, R, R)
    nrow = info.num_classes if info.num_classes <= 16 else int(math.ceil(math.sqrt(n)))
    grid = make_grid(to_uint8(x), nrow=min(nrow, n))
    save_png(grid, path)


def _build_objectives(cfg: TrainConfig, model: nn.Module, info: DataInfo) -> Dict[str, nn.Module]:
    """The objectives of ``--regularizer`` other than REPA and SRA (SRA needs the EMA model first)."""
    from .. import DispersiveRegularizer, REPARegularizer

    depths = cfg.objective_depths(len(model.blocks))
    for name, depth in depths.items():
        if not 1 <= depth <= len(model.blocks):
            raise ConfigError(
                f"the {name.replace('_', ' ')} depth {depth} is outside the model's {len(model.blocks)} blocks; "
                f"use 1..{len(model.blocks)}"
            )
    out: Dict[str, nn.Module] = {}
    if "dispersive" in cfg.objectives:
        out["dispersive"] = DispersiveRegularizer(
            model,
            layers=depths["dispersive"] - 1,
            weight=cfg.disp_weight,
            variant=cfg.disp_variant,
            temperature=cfg.disp_temperature,
        )
    if "vae" in cfg.objectives:
        if info.kind == "pixels":
            raise ConfigError(
                "--regularizer vae aligns a block with the VAE's latent of the clean image, so it needs a latent "
                "run: pass --vae with an image folder, or --data with prepared latents (pixel runs have no VAE)"
            )
        # targets: the VAE posterior mean (B, c, h, w), read from the moments every latent step already has
        torch.manual_seed(cfg.seed + 2)
        out["vae"] = REPARegularizer(
            model,
            layers=depths["vae"] - 1,
            encoders={"vae-latent": info.input_channels},
            weight=cfg.vae_weight,
            projector_dim=cfg.projector_dim,
        )
    return out


def _build_sra(cfg: TrainConfig, model: nn.Module, ema_model: nn.Module) -> nn.Module:
    """SRA on the training model with the EMA model as teacher (``--regularizer sra``)."""
    from .. import SelfAlignmentRegularizer

    depths = cfg.objective_depths(len(model.blocks))
    torch.manual_seed(cfg.seed + 3)
    return SelfAlignmentRegularizer(
        model,
        ema_model,
        student_layer=depths["sra_student"] - 1,
        teacher_layer=depths["sra_teacher"] - 1,
        weight=cfg.sra_weight,
        max_gap=cfg.sra_max_gap,
    )


def _objective_terms(
    objectives: Dict[str, nn.Module],
    cfg: TrainConfig,
    *,
    x: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor,
    drop: torch.Tensor,
    moments: Optional[torch.Tensor],
    path: Any,
    g: torch.Generator,
    rows: slice,
    channels: int,
) -> Dict[str, Any]:
    """One step's breakdown of every non-REPA objective (each with ``.total`` and ``.loss``).

    SRA's teacher time t - U(0, gap) is drawn for the whole global batch from the step's
    generator, after every other draw of the step, so runs without SRA are unchanged.
    """
    terms: Dict[str, Any] = {}
    for name, obj in objectives.items():
        if name == "dispersive":
            terms[name] = obj(return_breakdown=True)
        elif name == "sra":
            u = torch.rand(cfg.batch_size, generator=g, device=t.device)[rows]  # (b,)
            t_lo = (t - cfg.sra_max_gap * u).clamp(0.0, 1.0)  # (b,) a lower noise level
            x_lo, _ = path.interpolate(x, noise, t_lo)  # (b, C, h, w): same image and noise
            terms[name] = obj(x_lo, t_lo, y, force_drop_ids=drop, return_breakdown=True)
        elif name == "vae":
            terms[name] = obj(features=moments[:, :channels], return_breakdown=True)  # posterior mean (b, c, h, w)
    return terms


# --------------------------------------------------------------------------------------------
# The program
# --------------------------------------------------------------------------------------------


def train(
    cfg: TrainConfig,
    *,
    encoders: Optional[Sequence[nn.Module]] = None,
    dataset: Optional[Dataset] = None,
    data_info: Optional[DataInfo] = None,
    progress: bool = True,
) -> TrainResult:
    """Train as ``cfg`` says; returns where it wrote and the last step.

    ``encoders`` replaces the ``--enc-type`` encoders (any modules following the encoder
    contract), ``dataset`` + ``data_info`` replace ``--data``: for programs and tests that
    bring their own. Under torchrun every process calls this; rank 0 writes the files.
    """
    cfg.validate()
    dist_info = init_distributed()
    lock = None
    try:
        # one process (job) per run folder: a second `repa train` on it refuses at once
        lock = lock_folder_on_main(dist_info, cfg.run_dir, "repa train")
        return _train(cfg, dist_info, encoders, dataset, data_info, progress)
    finally:
        if lock is not None:
            lock.release()
        shutdown_distributed(dist_info)


def _train(
    cfg: TrainConfig,
    dist_info: DistInfo,
    encoders: Optional[Sequence[nn.Module]],
    dataset: Optional[Dataset],
    data_info: Optional[DataInfo],
    progress: bool,
) -> TrainResult:
    from tqdm.auto import tqdm

    rank, world, device = dist_info.rank, dist_info.world_size, dist_info.device
    if cfg.batch_size % world:
        raise ConfigError(
            f"--batch-size {cfg.batch_size} (global) is not divisible by the {world} processes; "
            f"use a multiple of {world}"
        )
    local_batch = cfg.batch_size // world
    if cfg.tensorboard and dist_info.is_main:
        require("tensorboard", "tensorboard")  # fail before any work
    if device.type == "cuda" and cfg.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # ---------------------------------------------------------------- run folder
    run_dir = cfg.run_dir
    resume_path = _resume_source(cfg, run_dir)

    # ---------------------------------------------------------------- data
    cached_widths: Optional[Dict[str, int]] = None  # a feature cache: encoder name -> target width
    if dataset is None:
        if cfg.data is None and cfg.vae is not None:
            raise ConfigError(
                f"config {cfg.config_name!r} trains on SD-VAE latents: pass --data with a prepared latent folder "
                "(python -m repa.sit.data prepare-latents --data IMAGES --out LATENTS) or an image folder "
                "(class subfolders = labels, encoded on the fly)"
            )
        if cfg.data is not None and is_feature_cache(cfg.data):
            dataset, info, cached_widths = _open_feature_cache(cfg, dist_info)
        else:
            dataset, info = open_dataset(
                cfg.data, resolution=cfg.resolution, vae=cfg.vae, latent_scale=cfg.latent_scale,
                skip_bad_images=cfg.skip_bad_images,
            )
    else:
        if data_info is None:
            raise ConfigError("train(dataset=...) also needs data_info= (a repa.sit.data.DataInfo)")
        info = data_info
    # the VAE encodes image folders on the fly ("vae") and decodes the preview grids (rank 0) of latent runs
    needs_vae = info.kind == "vae" or (info.kind == "latents" and dist_info.is_main)
    vae = load_vae(info.vae, device) if needs_vae else None
    sampler = ResumableDistributedSampler(dataset, local_batch, num_replicas=world, rank=rank, seed=cfg.seed)
    loader = DataLoader(
        dataset,
        batch_size=local_batch,
        sampler=sampler,
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
        drop_last=True,
        generator=torch.Generator(),  # the loader never draws from the global RNG
        persistent_workers=False,
        worker_init_fn=_worker_init if cfg.num_workers > 0 else None,
    )
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ConfigError(
            f"the dataset has {len(dataset)} items, fewer than one global batch of {cfg.batch_size}; "
            "lower --batch-size or add data"
        )

    # ---------------------------------------------------------------- model, REPA, EMA, optimizer
    torch.manual_seed(cfg.seed)  # identical initialization on every rank
    model_kwargs = dict(
        input_size=info.input_size,
        in_channels=info.input_channels,
        num_classes=info.num_classes,
        class_dropout_prob=cfg.cfg_prob,
        **cfg.model_kwargs,
    )
    model = build_model(cfg.model, **model_kwargs).to(device)
    reg = None
    if "repa" in cfg.objectives:
        from .. import REPARegularizer

        if not 1 <= cfg.encoder_depth <= len(model.blocks):
            raise ConfigError(
                f"--encoder-depth {cfg.encoder_depth} is outside the model's {len(model.blocks)} blocks; "
                f"use 1..{len(model.blocks)} (the paper: 8 for SiT-L/XL, 4 for SiT-B)"
            )
        if encoders is not None:
            enc: Any = list(encoders)
        elif cached_widths is not None:  # targets come precomputed with every batch: never load the encoder
            enc = dict(cached_widths)
        else:
            enc = _build_encoders(cfg, info, dist_info)
        # the projectors' initialization depends on the seed only, not on whether building the
        # encoders drew random numbers (an online encoder does; a feature cache does not)
        torch.manual_seed(cfg.seed + 1)
        # --encoder-depth counts blocks from 1 (paper and reference); layers= is 0-based: depth 8 -> blocks.7
        reg = REPARegularizer(
            model,
            layers=cfg.repa_layer(),
            encoders=enc,
            weight=cfg.proj_coeff,
            projector_dim=cfg.projector_dim,
        ).to(device)
    objectives = _build_objectives(cfg, model, info)  # dispersive, vae
    objectives = {k: v.to(device) for k, v in objectives.items()}
    ema_sources: Dict[str, nn.Module] = {"model": model}
    if reg is not None:
        ema_sources["projectors"] = reg.projectors
    if "vae" in objectives:
        ema_sources["vae_projectors"] = objectives["vae"].projectors
    ema = EMA(ema_sources, cfg.ema_decay)
    if "sra" in cfg.objectives:  # the EMA model is SRA's teacher
        objectives["sra"] = _build_sra(cfg, model, ema["model"]).to(device)
    params = [
        *model.parameters(),
        *(reg.parameters() if reg is not None else []),
        *(p for obj in objectives.values() for p in obj.parameters()),
    ]
    optimizer = torch.optim.AdamW(
        params,
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        weight_decay=cfg.adam_weight_decay,
        eps=cfg.adam_epsilon,
    )
    amp_dtype, scaler = precision_settings(cfg.mixed_precision, device)
    path = get_path(cfg.path_type)

    if cfg.init_from and resume_path is None:  # an official REPA checkpoint: SiT, EMA, projectors
        from .official import init_from_official

        init_from_official(cfg.init_from, model, reg, ema, encoder_depth=None)

    # ---------------------------------------------------------------- resume
    start_step = 0
    acc = torch.zeros(6, dtype=torch.float64, device=device)  # log sums: loss, denoise, align, cos, grad norm, count
    obj_acc = torch.zeros(len(objectives), dtype=torch.float64, device=device)  # each objective's unweighted loss
    if resume_path is not None:
        ckpt = load_checkpoint(resume_path)
        _check_resume_compatible(ckpt["config"], cfg, resume_path)
        try:
            model.load_state_dict(ckpt["model"])
            ema.load_state_dict(ckpt["ema"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scaler.load_state_dict(ckpt["scaler"])
            if reg is not None:
                reg.load_state_dict(ckpt["regularizer"])
            for name, obj in objectives.items():
                obj.load_state_dict((ckpt.get("objectives") or {})[name])
        except CheckpointError:  # entries missing: the checkpoint names them
            raise
        except (RuntimeError, KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(
                f"checkpoint {str(resume_path)!r} does not fit this run ({type(exc).__name__}: {str(exc)[:300]}); "
                "it is damaged, edited, or from another model: resume from another checkpoint"
            ) from exc
        _apply_resume_changes(ckpt["config"], cfg, optimizer, dist_info.is_main)
        start_step = int(ckpt["step"])
        rng = ckpt.get("rng") or []
        if len(rng) == world:
            restore_rng_state(rng[rank])
        sums = ckpt.get("log_sums") or []
        if len(sums) == world:  # the partial log window before the checkpoint (a resume between log points)
            acc.copy_(torch.as_tensor(sums[rank], dtype=torch.float64))
        obj_sums = ckpt.get("log_sums_objectives") or []
        if len(obj_sums) == world and obj_sums[rank].numel() == obj_acc.numel():
            obj_acc.copy_(torch.as_tensor(obj_sums[rank], dtype=torch.float64))
        del ckpt
    else:
        random.seed(cfg.seed + rank)
        np.random.seed((cfg.seed + rank) % 2**32)
        torch.manual_seed(cfg.seed + rank)

    # ---------------------------------------------------------------- wrappers (the frozen encoder is never wrapped)
    ddp_model: nn.Module = model
    ddp_reg: Optional[nn.Module] = reg
    if dist_info.distributed:
        ids = [device.index] if device.type == "cuda" else None
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        if reg is not None:
            ddp_reg = nn.parallel.DistributedDataParallel(reg, device_ids=ids)
        ddp_objectives = {  # Dispersive Loss has no parameters: nothing to wrap
            k: nn.parallel.DistributedDataParallel(v, device_ids=ids) if list(v.parameters()) else v
            for k, v in objectives.items()
        }
    else:
        ddp_objectives = dict(objectives)

    # ---------------------------------------------------------------- outputs (rank 0)
    log_file = run_dir / "log.jsonl"
    writer = None
    if dist_info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        clean_stale_temp_files(run_dir)  # unfinished checkpoint writes of a killed process
        run_meta: Dict[str, Any] = {"config": cfg.to_dict(), "data": info.to_dict(), "world_size": world}
        if resume_path is not None:
            run_meta["resumed_from"] = {"checkpoint": str(resume_path), "step": start_step}
        (run_dir / "config.json").write_text(json.dumps(run_meta, indent=2))
        if resume_path is not None:
            _truncate_log(log_file, start_step)
        elif log_file.exists():
            log_file.unlink()
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(run_dir / "tensorboard"))
        n_params = sum(p.numel() for p in model.parameters())
        what = (
            f"REPA on blocks.{cfg.repa_layer()} with {', '.join(reg.encoder_names)}"
            if reg is not None
            else ("no REPA" if objectives else "no REPA (baseline)")
        )
        what += "".join(f" + {name} ({_describe(obj)})" for name, obj in objectives.items())
        print(
            f"repa train: {cfg.model} ({n_params / 1e6:.1f}M parameters), {what}; {info.kind} "
            f"{info.input_channels}x{info.input_size}x{info.input_size} from {info.source} ({len(dataset)} items); "
            f"global batch {cfg.batch_size} on {world} process(es) ({device}); steps {start_step}->{cfg.max_train_steps}; "
            f"writing to {run_dir}",
            file=sys.stderr,
            flush=True,
        )

    def save(step: int) -> Path:
        """Collective: gather every rank's RNG state, rank 0 writes the checkpoint atomically."""
        rng_states = all_gather_objects(dist_info, capture_rng_state())
        log_sums = [t.cpu() for t in all_gather_objects(dist_info, acc.detach().cpu())]  # every rank's open log window
        obj_log_sums = [t.cpu() for t in all_gather_objects(dist_info, obj_acc.detach().cpu())]
        target = checkpoint_path(run_dir, step)
        failure: Optional[BaseException] = None
        if dist_info.is_main:
            try:
                save_checkpoint(
                    {
                        "format": CHECKPOINT_FORMAT,
                        "step": step,
                        "epoch": step // steps_per_epoch,
                        "steps_per_epoch": steps_per_epoch,
                        "world_size": world,
                        "config": cfg.to_dict(),
                        "data": info.to_dict(),
                        "model_name": cfg.model,
                        "model_kwargs": model_kwargs,
                        "model": model.state_dict(),
                        "ema": ema.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scaler": scaler.state_dict(),
                        "regularizer": reg.state_dict() if reg is not None else None,
                        "regularizer_config": reg.config if reg is not None else None,
                        "rng": rng_states,
                        "objectives": {k: v.state_dict() for k, v in objectives.items()},
                        "log_sums": log_sums,
                        "log_sums_objectives": obj_log_sums,
                    },
                    target,
                )
            except (CheckpointError, OSError) as exc:  # disk full, quota: earlier checkpoints are intact
                failure = exc
        _raise_if_any_failed(failure, target, dist_info)
        return target

    # ---------------------------------------------------------------- the loop
    G = cfg.batch_size
    input_shape = (info.input_channels, info.input_size, info.input_size)
    rows = slice(rank, G, world)  # this rank's samples are at global positions rank + world * j
    step = start_step
    last_ckpt: Optional[Path] = None
    last_saved = start_step if resume_path is not None else -1
    t_last, step_last = time.time(), step
    bar = tqdm(total=cfg.max_train_steps, initial=step, disable=not (progress and dist_info.is_main), desc="train", unit="step", dynamic_ncols=True)
    stop: Optional[str] = None
    model.train()
    if reg is not None:
        reg.train()
    for obj in objectives.values():
        obj.train()
    with _StopSignal() as signals:
        epoch = step // steps_per_epoch
        skip = step % steps_per_epoch
        while step < cfg.max_train_steps and stop is None:
            sampler.set_epoch(epoch, skip_batches=skip)
            for batch in _batches(loader):
                images = batch["image"].to(device, non_blocking=True) if "image" in batch else None  # (b, C, H, W) uint8
                y = batch["y"].to(device, non_blocking=True)  # (b,)
                g = step_generator(cfg.seed, step, device)
                t = sample_time(G, cfg.weighting, path=path, generator=g, device=device)[rows]  # (b,)
                noise = torch.randn((G, *input_shape), generator=g, device=device)[rows]  # (b, C, h, w)
                drop = (torch.rand(G, generator=g, device=device) < cfg.cfg_prob)[rows].long()  # (b,) 1 = null class
                moments = None
                if info.kind == "pixels":
                    x = images_to_model_input(images)  # (b, C, H, W) in [-1, 1]
                else:
                    eps = torch.randn((G, *input_shape), generator=g, device=device)[rows]  # (b, c, h, w)
                    moments = (
                        batch["moments"].to(device, non_blocking=True) if "moments" in batch else encode_moments(vae, images)
                    )  # (b, 2c, h, w)
                    x = sample_latents(moments, eps, info.latent_scale)  # (b, c, h, w)
                x_t, v_target = path.interpolate(x, noise, t)  # (b, C, h, w) each

                with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    pred = ddp_model(x_t, t, y, force_drop_ids=drop)  # (b, C, h, w); hooks capture blocks.k
                    denoise = velocity_loss(pred, v_target).mean()
                    if ddp_reg is not None:
                        if "features" in batch:  # precomputed encoder targets (feature cache): no encoder run
                            out = ddp_reg(features=_to_device(batch["features"], device), return_breakdown=True)
                        else:
                            out = ddp_reg(images, return_breakdown=True)
                        loss = denoise + out.total
                    else:
                        loss = denoise
                    if ddp_objectives:
                        terms = _objective_terms(
                            ddp_objectives, cfg, x=x, noise=noise, t=t, y=y, drop=drop, moments=moments, path=path,
                            g=g, rows=rows, channels=info.input_channels,
                        )
                        loss = loss + sum(term.total for term in terms.values())
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
                grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
                bad = _nonfinite_step(loss, grad_norm, not scaler.is_enabled(), dist_info)
                if bad is not None:  # stop before the update: the weights and checkpoints stay good
                    _stop_nonfinite(bad, loss, grad_norm, step + 1, run_dir, log_file, dist_info)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                ema.update(ema_sources)
                step += 1

                with torch.no_grad():
                    align = out.loss if ddp_reg is not None else torch.zeros((), device=device)
                    cos = (
                        torch.stack([c.float() for c in out.cosine.values()]).mean()
                        if ddp_reg is not None and out.cosine
                        else torch.zeros((), device=device)
                    )
                    acc += torch.stack(
                        [loss.detach().double(), denoise.detach().double(), align.double(), cos.double(),
                         grad_norm.detach().double(), torch.ones((), dtype=torch.float64, device=device)]
                    )
                    if objectives:
                        obj_acc += torch.stack([terms[k].loss.double() for k in objectives])
                bar.update(1)

                if step % cfg.log_every == 0 or step == cfg.max_train_steps:
                    if dist_info.distributed:
                        dist.all_reduce(acc)
                        if objectives:
                            dist.all_reduce(obj_acc)
                    obj_vals = (obj_acc / acc[5]).tolist() if objectives else []
                    vals = (acc[:5] / acc[5]).tolist()
                    now = time.time()
                    record = {
                        "step": step,
                        "epoch": (step - 1) // steps_per_epoch,
                        "loss": vals[0],
                        "loss_denoise": vals[1],
                        "grad_norm": vals[4],
                        "images_per_sec": G * (step - step_last) / max(now - t_last, 1e-9),
                        "lr": optimizer.param_groups[0]["lr"],
                    }
                    if reg is not None:
                        record["loss_align"] = vals[2]
                        record["cos_sim"] = vals[3]
                    for name, value in zip(objectives, obj_vals):
                        record[f"loss_{name}"] = value
                    if dist_info.is_main:
                        _append_log(log_file, record)
                        if writer is not None:
                            for key, value in record.items():
                                if key != "step":
                                    writer.add_scalar(f"train/{key}", value, step)
                        bar.set_postfix(loss=f"{vals[1]:.4f}", **({"cos": f"{vals[3]:.3f}"} if reg is not None else {}))
                    acc.zero_()
                    obj_acc.zero_()
                    t_last, step_last = now, step

                if dist_info.is_main and (step % cfg.sample_every == 0 or step == cfg.max_train_steps):
                    with contextlib.ExitStack() as stack:
                        if reg is not None:
                            stack.enter_context(reg.disabled())
                        _write_sample_grid(ema["model"], cfg, info, vae, device, run_dir / "samples" / f"{step:07d}.png")

                if step % cfg.checkpointing_steps == 0 or step == cfg.max_train_steps:
                    last_ckpt, last_saved = save(step), step

                received = signals.received
                if dist_info.distributed:
                    flag = torch.tensor([1 if received else 0], device=device)
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                    received = received or ("SIGTERM" if flag.item() else None)
                if received:
                    stop = received
                    break
                if step >= cfg.max_train_steps:
                    break
            else:
                epoch, skip = epoch + 1, 0
                continue
            break

        if stop is not None and last_saved != step:
            last_ckpt = save(step)
    bar.close()
    if writer is not None:
        writer.close()
    if dist_info.is_main:
        if stop is not None:
            print(
                f"repa train: stopped by {stop} at step {step}; checkpoint {last_ckpt}; continue with --resume latest",
                file=sys.stderr,
                flush=True,
            )
        else:
            print(f"repa train: done at step {step}; outputs in {run_dir}", file=sys.stderr, flush=True)
    return TrainResult(run_dir=run_dir, step=step, checkpoint=last_ckpt or latest_checkpoint(run_dir), stopped_by=stop)


if __name__ == "__main__":  # python -m repa.sit.train [flags]  (also under torchrun)
    _parser = argparse.ArgumentParser(prog="python -m repa.sit.train", description=__doc__.splitlines()[0])
    add_arguments(_parser)
    from ..cli import run_command

    _args = _parser.parse_args()
    sys.exit(run_command(lambda: main(_args)))
