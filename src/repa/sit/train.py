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

The program is split by what each part does: :mod:`repa.sit.train_args` (the flags),
:mod:`repa.sit.train_build` (data, model, objectives, optimizer), :mod:`repa.sit.run_control`
(resume rules, signals, workers, the log, non-finite stops), :mod:`repa.sit.step` (the step),
and this module (setup, resume, the loop, checkpoints).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..errors import CheckpointError, ConfigError, require
from .checkpoint import (
    CHECKPOINT_FORMAT,
    capture_rng_state,
    checkpoint_path,
    clean_stale_temp_files,
    latest_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from .configs import TrainConfig
from .data import DataInfo, encode_moments, images_to_model_input, load_vae, sample_latents
from .distributed import (
    DistInfo,
    ResumableDistributedSampler,
    all_gather_objects,
    init_distributed,
    lock_folder_on_main,
    shutdown_distributed,
)
from .run_control import (  # noqa: F401  (the private names stay importable from here)
    _RESUME_APPLIED,
    _RESUME_FREE,
    _RESUME_KEYS,
    _STOP_SIGNALS,
    _append_log,
    _apply_resume_changes,
    _batches,
    _check_resume_compatible,
    _flag_name,
    _json_safe,
    _nonfinite_step,
    _raise_if_any_failed,
    _resume_source,
    _stop_nonfinite,
    _StopSignal,
    _truncate_log,
    _worker_init,
)
from .step import StepBatch, StepRecord, training_step
from .train_args import add_arguments, config_from_args
from .train_build import (  # noqa: F401
    TrainParts,
    _build_encoders,
    _build_objectives,
    _build_sra,
    _describe,
    _open_feature_cache,
    _to_device,
    _train_teacher_if_possible,
    _write_sample_grid,
    build_loader,
    build_parts,
    open_data,
)
from .transport import get_path, sample_time, velocity_loss

__all__ = ["add_arguments", "main", "train", "TrainResult", "precision_settings", "step_generator"]

_log = logging.getLogger("repa")


@dataclass
class TrainResult:
    """What :func:`train` returns: where it wrote, the last step, and why it stopped."""

    run_dir: Path
    step: int
    checkpoint: Optional[Path]
    stopped_by: Optional[str] = None  # "SIGTERM" / "SIGINT" when interrupted


def main(args: argparse.Namespace) -> int:
    """Run ``repa train`` with parsed arguments; returns the exit status."""
    cfg = config_from_args(args)
    if getattr(args, "print_config", False):
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    result = train(cfg, progress=not getattr(args, "no_progress", False))
    return 0 if result is not None else 1


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


# --------------------------------------------------------------------------------------------
# The program: setup -> build -> resume -> loop (step, log, sample, save) -> finish
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


@dataclass
class _Run:
    """Everything the loop needs, built once by :func:`_build_run`."""

    cfg: TrainConfig
    dist_info: DistInfo
    run_dir: Path
    resume_path: Optional[Path]
    dataset: Dataset
    info: DataInfo
    vae: Any
    sampler: ResumableDistributedSampler
    loader: DataLoader
    parts: TrainParts
    amp_dtype: Optional[torch.dtype]
    scaler: Any
    path: Any
    acc: torch.Tensor  # (6,) float64 log sums: loss, denoise, align, cos, grad norm, count
    obj_acc: torch.Tensor  # (n_objectives,) float64: each objective's unweighted loss
    start_step: int = 0
    ddp_model: Optional[nn.Module] = None
    ddp_reg: Optional[nn.Module] = None
    ddp_objectives: Dict[str, nn.Module] = field(default_factory=dict)
    writer: Any = None

    @property
    def steps_per_epoch(self) -> int:
        return len(self.loader)

    @property
    def log_file(self) -> Path:
        return self.run_dir / "log.jsonl"


def _setup(cfg: TrainConfig, dist_info: DistInfo) -> None:
    """Checks that need no data (batch split, tensorboard) and the TF32 switch."""
    world = dist_info.world_size
    if cfg.batch_size % world:
        raise ConfigError(
            f"--batch-size {cfg.batch_size} (global) is not divisible by the {world} processes; "
            f"use a multiple of {world}"
        )
    if cfg.tensorboard and dist_info.is_main:
        require("tensorboard", "tensorboard")  # fail before any work
    if dist_info.device.type == "cuda" and cfg.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def _build_run(
    cfg: TrainConfig,
    dist_info: DistInfo,
    encoders: Optional[Sequence[nn.Module]],
    dataset: Optional[Dataset],
    data_info: Optional[DataInfo],
) -> _Run:
    """Run folder check, data, loader, model, objectives, optimizer, precision and ``--init-from``."""
    device = dist_info.device
    run_dir = cfg.run_dir
    resume_path = _resume_source(cfg, run_dir)
    dataset, info, cached_widths = open_data(cfg, dist_info, dataset, data_info)
    # the VAE encodes image folders on the fly ("vae") and decodes the preview grids (rank 0) of latent runs
    needs_vae = info.kind == "vae" or (info.kind == "latents" and dist_info.is_main)
    vae = load_vae(info.vae, device) if needs_vae else None
    sampler, loader = build_loader(cfg, dataset, dist_info)
    parts = build_parts(cfg, info, dist_info, encoders, cached_widths)
    amp_dtype, scaler = precision_settings(cfg.mixed_precision, device)
    path = get_path(cfg.path_type)
    if cfg.init_from and resume_path is None:  # an official REPA checkpoint: SiT, EMA, projectors
        from .official import init_from_official

        init_from_official(cfg.init_from, parts.model, parts.reg, parts.ema, encoder_depth=None)
    return _Run(
        cfg=cfg, dist_info=dist_info, run_dir=run_dir, resume_path=resume_path, dataset=dataset, info=info,
        vae=vae, sampler=sampler, loader=loader, parts=parts, amp_dtype=amp_dtype, scaler=scaler, path=path,
        acc=torch.zeros(6, dtype=torch.float64, device=device),
        obj_acc=torch.zeros(len(parts.objectives), dtype=torch.float64, device=device),
    )


def _resume(run: _Run) -> None:
    """Restore a checkpoint (weights, EMA, optimizer, scaler, RNG, open log window), or seed a fresh run."""
    cfg, rank, world = run.cfg, run.dist_info.rank, run.dist_info.world_size
    p = run.parts
    if run.resume_path is None:
        random.seed(cfg.seed + rank)
        np.random.seed((cfg.seed + rank) % 2**32)
        torch.manual_seed(cfg.seed + rank)
        return
    ckpt = load_checkpoint(run.resume_path)
    _check_resume_compatible(ckpt["config"], cfg, run.resume_path)
    try:
        p.model.load_state_dict(ckpt["model"])
        p.ema.load_state_dict(ckpt["ema"])
        p.optimizer.load_state_dict(ckpt["optimizer"])
        run.scaler.load_state_dict(ckpt["scaler"])
        if p.reg is not None:
            p.reg.load_state_dict(ckpt["regularizer"])
        for name, obj in p.objectives.items():
            obj.load_state_dict((ckpt.get("objectives") or {})[name])
    except CheckpointError:  # entries missing: the checkpoint names them
        raise
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(
            f"checkpoint {str(run.resume_path)!r} does not fit this run ({type(exc).__name__}: {str(exc)[:300]}); "
            "it is damaged, edited, or from another model: resume from another checkpoint"
        ) from exc
    _apply_resume_changes(ckpt["config"], cfg, p.optimizer, run.dist_info.is_main)
    run.start_step = int(ckpt["step"])
    rng = ckpt.get("rng") or []
    if len(rng) == world:
        restore_rng_state(rng[rank])
    sums = ckpt.get("log_sums") or []
    if len(sums) == world:  # the partial log window before the checkpoint (a resume between log points)
        run.acc.copy_(torch.as_tensor(sums[rank], dtype=torch.float64))
    obj_sums = ckpt.get("log_sums_objectives") or []
    if len(obj_sums) == world and obj_sums[rank].numel() == run.obj_acc.numel():
        run.obj_acc.copy_(torch.as_tensor(obj_sums[rank], dtype=torch.float64))


def _wrap(run: _Run) -> None:
    """DDP wrappers of the trained modules (the frozen encoder is never wrapped)."""
    p = run.parts
    run.ddp_model, run.ddp_reg, run.ddp_objectives = p.model, p.reg, dict(p.objectives)
    if not run.dist_info.distributed:
        return
    device = run.dist_info.device
    ids = [device.index] if device.type == "cuda" else None
    run.ddp_model = nn.parallel.DistributedDataParallel(p.model, device_ids=ids)
    if p.reg is not None:
        run.ddp_reg = nn.parallel.DistributedDataParallel(p.reg, device_ids=ids)
    run.ddp_objectives = {  # Dispersive Loss has no parameters: nothing to wrap
        k: nn.parallel.DistributedDataParallel(v, device_ids=ids) if list(v.parameters()) else v
        for k, v in p.objectives.items()
    }


def _open_outputs(run: _Run) -> None:
    """Rank 0: the run folder, ``config.json``, the log (truncated on resume), TensorBoard, the start-up line."""
    cfg, info, p = run.cfg, run.info, run.parts
    if not run.dist_info.is_main:
        return
    run_dir, log_file = run.run_dir, run.log_file
    run_dir.mkdir(parents=True, exist_ok=True)
    clean_stale_temp_files(run_dir)  # unfinished checkpoint writes of a killed process
    run_meta: Dict[str, Any] = {"config": cfg.to_dict(), "data": info.to_dict(), "world_size": run.dist_info.world_size}
    if run.resume_path is not None:
        run_meta["resumed_from"] = {"checkpoint": str(run.resume_path), "step": run.start_step}
    (run_dir / "config.json").write_text(json.dumps(run_meta, indent=2))
    if run.resume_path is not None:
        _truncate_log(log_file, run.start_step)
    elif log_file.exists():
        log_file.unlink()
    if cfg.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        run.writer = SummaryWriter(str(run_dir / "tensorboard"))
    n_params = sum(q.numel() for q in p.model.parameters())
    what = (
        f"REPA on blocks.{cfg.repa_layer()} with {', '.join(p.reg.encoder_names)}"
        if p.reg is not None
        else ("no REPA" if p.objectives else "no REPA (baseline)")
    )
    what += "".join(f" + {name} ({_describe(obj)})" for name, obj in p.objectives.items())
    _log.info(
        f"train: {cfg.model} ({n_params / 1e6:.1f}M parameters), {what}; {info.kind} "
        f"{info.input_channels}x{info.input_size}x{info.input_size} from {info.source} ({len(run.dataset)} items); "
        f"global batch {cfg.batch_size} on {run.dist_info.world_size} process(es) ({run.dist_info.device}); "
        f"steps {run.start_step}->{cfg.max_train_steps}; writing to {run_dir}",
    )


def _save(run: _Run, step: int) -> Path:
    """Collective: gather every rank's RNG state, rank 0 writes the checkpoint atomically."""
    cfg, p, dist_info = run.cfg, run.parts, run.dist_info
    rng_states = all_gather_objects(dist_info, capture_rng_state())
    log_sums = [t.cpu() for t in all_gather_objects(dist_info, run.acc.detach().cpu())]  # every rank's open log window
    obj_log_sums = [t.cpu() for t in all_gather_objects(dist_info, run.obj_acc.detach().cpu())]
    target = checkpoint_path(run.run_dir, step)
    failure: Optional[BaseException] = None
    if dist_info.is_main:
        try:
            save_checkpoint(
                {
                    "format": CHECKPOINT_FORMAT,
                    "step": step,
                    "epoch": step // run.steps_per_epoch,
                    "steps_per_epoch": run.steps_per_epoch,
                    "world_size": dist_info.world_size,
                    "config": cfg.to_dict(),
                    "data": run.info.to_dict(),
                    "model_name": cfg.model,
                    "model_kwargs": p.model_kwargs,
                    "model": p.model.state_dict(),
                    "ema": p.ema.state_dict(),
                    "optimizer": p.optimizer.state_dict(),
                    "scaler": run.scaler.state_dict(),
                    "regularizer": p.reg.state_dict() if p.reg is not None else None,
                    "regularizer_config": p.reg.config if p.reg is not None else None,
                    "rng": rng_states,
                    "objectives": {k: v.state_dict() for k, v in p.objectives.items()},
                    "log_sums": log_sums,
                    "log_sums_objectives": obj_log_sums,
                },
                target,
            )
        except (CheckpointError, OSError) as exc:  # disk full, quota: earlier checkpoints are intact
            failure = exc
    _raise_if_any_failed(failure, target, dist_info)
    return target


def _step_batch(run: _Run, batch: Dict[str, Any], g: torch.Generator, rows: slice) -> StepBatch:
    """This rank's rows of step ``g``'s global draws (times, noise, dropout, latent eps) and its batch."""
    cfg, info, device = run.cfg, run.info, run.dist_info.device
    G = cfg.batch_size
    input_shape = (info.input_channels, info.input_size, info.input_size)
    images = batch["image"].to(device, non_blocking=True) if "image" in batch else None  # (b, C, H, W) uint8
    y = batch["y"].to(device, non_blocking=True)  # (b,)
    t = sample_time(G, cfg.weighting, path=run.path, generator=g, device=device)[rows]  # (b,)
    noise = torch.randn((G, *input_shape), generator=g, device=device)[rows]  # (b, C, h, w)
    drop = (torch.rand(G, generator=g, device=device) < cfg.cfg_prob)[rows].long()  # (b,) 1 = null class
    moments = None
    if info.kind == "pixels":
        x = images_to_model_input(images)  # (b, C, H, W) in [-1, 1]
    else:
        eps = torch.randn((G, *input_shape), generator=g, device=device)[rows]  # (b, c, h, w)
        moments = (
            batch["moments"].to(device, non_blocking=True) if "moments" in batch else encode_moments(run.vae, images)
        )  # (b, 2c, h, w)
        x = sample_latents(moments, eps, info.latent_scale)  # (b, c, h, w)
    features = None
    if "features" in batch and run.ddp_reg is not None:  # precomputed encoder targets (feature cache)
        features = _to_device(batch["features"], device)
    return StepBatch(x=x, y=y, t=t, noise=noise, drop=drop, images=images, features=features, moments=moments)


def _train_step(run: _Run, batch: Dict[str, Any], step: int) -> StepRecord:
    """Step ``step`` (0-based) through the shared :func:`repa.sit.step.training_step`; stops on a non-finite loss."""
    cfg, dist_info = run.cfg, run.dist_info
    rows = slice(dist_info.rank, cfg.batch_size, dist_info.world_size)  # this rank's global positions
    g = step_generator(cfg.seed, step, dist_info.device)
    inputs = _step_batch(run, batch, g, rows)

    def check(loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        bad = _nonfinite_step(loss, grad_norm, not run.scaler.is_enabled(), dist_info)
        if bad is not None:  # stop before the update: the weights and checkpoints stay good
            _stop_nonfinite(bad, loss, grad_norm, step + 1, run.run_dir, run.log_file, dist_info)

    record = training_step(
        run.ddp_model, inputs, path=run.path, optimizer=run.parts.optimizer, regularizer=run.ddp_reg,
        objectives=run.ddp_objectives, scaler=run.scaler, amp_dtype=run.amp_dtype, max_grad_norm=cfg.max_grad_norm,
        ema=run.parts.ema, ema_sources=run.parts.ema_sources, generator=g, global_batch=cfg.batch_size, rows=rows,
        before_update=check, loss_fn=velocity_loss,
    )
    with torch.no_grad():
        one = torch.ones((), dtype=torch.float64, device=dist_info.device)
        run.acc += torch.stack(
            [record.loss.double(), record.denoise.double(), record.align.double(), record.cos.double(),
             record.grad_norm.double(), one]
        )
        if run.parts.objectives:
            run.obj_acc += torch.stack([record.terms[k].double() for k in run.parts.objectives])
    return record


def _write_log(run: _Run, step: int, window: Dict[str, float], bar: Any) -> None:
    """Average the open log window over every rank, append it to ``log.jsonl`` (and TensorBoard), reset it."""
    cfg, p = run.cfg, run.parts
    if run.dist_info.distributed:
        dist.all_reduce(run.acc)
        if p.objectives:
            dist.all_reduce(run.obj_acc)
    obj_vals = (run.obj_acc / run.acc[5]).tolist() if p.objectives else []
    vals = (run.acc[:5] / run.acc[5]).tolist()
    now = time.time()
    record = {
        "step": step,
        "epoch": (step - 1) // run.steps_per_epoch,
        "loss": vals[0],
        "loss_denoise": vals[1],
        "grad_norm": vals[4],
        "images_per_sec": cfg.batch_size * (step - window["step"]) / max(now - window["time"], 1e-9),
        "lr": p.optimizer.param_groups[0]["lr"],
    }
    if p.reg is not None:
        record["loss_align"] = vals[2]
        record["cos_sim"] = vals[3]
    for name, value in zip(p.objectives, obj_vals):
        record[f"loss_{name}"] = value
    if run.dist_info.is_main:
        _append_log(run.log_file, record)
        if run.writer is not None:
            for key, value in record.items():
                if key != "step":
                    run.writer.add_scalar(f"train/{key}", value, step)
        bar.set_postfix(loss=f"{vals[1]:.4f}", **({"cos": f"{vals[3]:.3f}"} if p.reg is not None else {}))
    run.acc.zero_()
    run.obj_acc.zero_()
    window.update(time=now, step=step)


def _write_samples(run: _Run, step: int) -> None:
    """Rank 0: the EMA model's sample grid (the regularizer's hooks off)."""
    with contextlib.ExitStack() as stack:
        if run.parts.reg is not None:
            stack.enter_context(run.parts.reg.disabled())
        _write_sample_grid(
            run.parts.ema["model"], run.cfg, run.info, run.vae, run.dist_info.device,
            run.run_dir / "samples" / f"{step:07d}.png",
        )


def _stop_requested(run: _Run, signals: _StopSignal) -> Optional[str]:
    """The received stop signal, agreed on by every rank (one rank's SIGTERM stops them all)."""
    received = signals.received
    if run.dist_info.distributed:
        flag = torch.tensor([1 if received else 0], device=run.dist_info.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        received = received or ("SIGTERM" if flag.item() else None)
    return received


def _loop(run: _Run, progress: bool) -> TrainResult:
    """Train from ``run.start_step`` to ``max_train_steps``: step, log window, samples, checkpoints, signals."""
    from tqdm.auto import tqdm

    cfg, p = run.cfg, run.parts
    step = run.start_step
    last_ckpt: Optional[Path] = None
    last_saved = step if run.resume_path is not None else -1
    window = {"time": time.time(), "step": step}
    bar = tqdm(total=cfg.max_train_steps, initial=step, disable=not (progress and run.dist_info.is_main),
               desc="train", unit="step", dynamic_ncols=True)
    stop: Optional[str] = None
    for module in (p.model, p.reg, *p.objectives.values()):
        if module is not None:
            module.train()
    with _StopSignal() as signals:
        epoch, skip = step // run.steps_per_epoch, step % run.steps_per_epoch
        while step < cfg.max_train_steps and stop is None:
            run.sampler.set_epoch(epoch, skip_batches=skip)
            for batch in _batches(run.loader):
                _train_step(run, batch, step)
                step += 1
                bar.update(1)
                last = step == cfg.max_train_steps
                if step % cfg.log_every == 0 or last:
                    _write_log(run, step, window, bar)
                if run.dist_info.is_main and (step % cfg.sample_every == 0 or last):
                    _write_samples(run, step)
                if step % cfg.checkpointing_steps == 0 or last:
                    last_ckpt, last_saved = _save(run, step), step
                stop = _stop_requested(run, signals)
                if stop or step >= cfg.max_train_steps:
                    break
            epoch, skip = epoch + 1, 0  # a break ends the while loop too (stop or last step)
        if stop is not None and last_saved != step:
            last_ckpt = _save(run, step)
    bar.close()
    return TrainResult(run_dir=run.run_dir, step=step, checkpoint=last_ckpt, stopped_by=stop)


def _train(
    cfg: TrainConfig,
    dist_info: DistInfo,
    encoders: Optional[Sequence[nn.Module]],
    dataset: Optional[Dataset],
    data_info: Optional[DataInfo],
    progress: bool,
) -> TrainResult:
    """setup -> build -> resume -> wrap -> outputs -> loop -> finish."""
    _setup(cfg, dist_info)
    run = _build_run(cfg, dist_info, encoders, dataset, data_info)
    _resume(run)
    _wrap(run)
    _open_outputs(run)
    result = _loop(run, progress)
    if run.writer is not None:
        run.writer.close()
    if dist_info.is_main:
        if result.stopped_by is not None:
            _log.info(
                f"train: stopped by {result.stopped_by} at step {result.step}; checkpoint {result.checkpoint}; "
                "continue with --resume latest",
            )
        else:
            _log.info(f"train: done at step {result.step}; outputs in {run.run_dir}")
    result.checkpoint = result.checkpoint or latest_checkpoint(run.run_dir)
    return result


if __name__ == "__main__":  # python -m repa.sit.train [flags]  (also under torchrun)
    _parser = argparse.ArgumentParser(prog="python -m repa.sit.train", description=__doc__.splitlines()[0])
    add_arguments(_parser)
    from ..cli import finish_process, run_command

    _args = _parser.parse_args()
    sys.exit(finish_process(run_command(lambda: main(_args))))
