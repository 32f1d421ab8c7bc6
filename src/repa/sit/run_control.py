"""Run control of ``repa train``: resume rules, stop signals, DataLoader workers, the JSONL log, non-finite stops.

These are the parts of a run that keep it safe rather than compute it: which settings a resumed
run may change, how SIGTERM / SIGINT end a run with a checkpoint, how DataLoader workers start
with the stop signals blocked, how ``log.jsonl`` stays strict JSON, and how a non-finite loss
stops before the update. :mod:`repa.sit.train` uses them; they are kept apart so the program
itself reads as setup / build / resume / loop / save.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from .._io import atomic_write_text
from ..errors import CheckpointError, NonFiniteLossError
from .checkpoint import latest_checkpoint, list_checkpoints, resolve_checkpoint
from .configs import FIELD_NAMES, TrainConfig
from .distributed import DistInfo

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


class _StopSignal:
    """Turns SIGTERM / SIGINT into a flag checked after each step (a second Ctrl-C aborts at once)."""

    def __init__(self) -> None:
        self.received: Optional[str] = None
        self._previous: Dict[int, Any] = {}

    def __enter__(self) -> _StopSignal:
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
    atomic_write_text(log_file, "".join(line + "\n" for line in kept))

