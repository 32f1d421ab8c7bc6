"""Training checkpoints of the SiT recipe: atomic writes, discovery, and random-number state.

A checkpoint is one ``torch.save`` file ``<run>/checkpoints/<step:07d>.pt`` holding a dict
(model, EMA, optimizer, grad scaler, regularizer, the resolved config, the step and the RNG
states of every rank). It is written to a hidden temporary file in the same folder, flushed
to disk, then renamed over the final name with ``os.replace``: a write killed half-way leaves
only the temporary file, which discovery ignores, and every earlier checkpoint stays loadable.

The training program draws the per-step randomness (noise, times, label dropout) from a
generator seeded by (seed, step) and the data order from (seed, epoch), so a checkpoint's
step alone fixes what comes next; the global torch / numpy / python RNG states are stored and
restored as well, for any code that uses them.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import numpy as np
import torch

from ..errors import CheckpointError

__all__ = [
    "CHECKPOINT_FORMAT",
    "atomic_save",
    "checkpoint_path",
    "list_checkpoints",
    "latest_checkpoint",
    "resolve_checkpoint",
    "load_checkpoint",
    "capture_rng_state",
    "restore_rng_state",
]

#: The value of ``checkpoint["format"]`` written by ``repa train``.
CHECKPOINT_FORMAT = "repa-sit-train/1"
_NAME = re.compile(r"^(\d{7,})\.pt$")
PathLike = Union[str, "os.PathLike[str]"]


def atomic_save(obj: Any, path: PathLike, save: Optional[Callable[[Any, str], None]] = None) -> Path:
    """Write ``obj`` to ``path`` atomically: temp file in the same folder, fsync, then ``os.replace``.

    ``save(obj, tmp_path)`` does the writing (default ``torch.save``). If it raises (or the
    process dies) the temporary file is removed (or left hidden, named ``.<name>.tmp<pid>``) and
    ``path`` keeps its previous content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        (save or torch.save)(obj, str(tmp))
        with open(tmp, "rb+") as fh:  # make the bytes durable before the rename makes them visible
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def checkpoint_path(run_dir: PathLike, step: int) -> Path:
    """``<run_dir>/checkpoints/<step:07d>.pt`` (the reference's naming)."""
    return Path(run_dir) / "checkpoints" / f"{step:07d}.pt"


def list_checkpoints(run_dir: PathLike) -> List[Path]:
    """Complete checkpoints of a run folder, oldest first (temporary files are ignored)."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: PathLike) -> Optional[Path]:
    """The highest-step checkpoint of a run folder, or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_checkpoint(value: PathLike, run_dir: Optional[PathLike] = None) -> Path:
    """The checkpoint file meant by ``--resume`` / ``--ckpt``.

    ``"latest"`` is the newest checkpoint of ``run_dir``; a folder is a run folder (its newest
    checkpoint) or its ``checkpoints`` subfolder; anything else must be a checkpoint file.
    """
    text = str(value)
    if text == "latest":
        if run_dir is None:
            raise CheckpointError("'latest' needs a run folder; pass the checkpoint file or run folder instead")
        found = latest_checkpoint(run_dir)
        if found is None:
            raise CheckpointError(
                f"--resume latest: no checkpoint in {Path(run_dir) / 'checkpoints'}; start without --resume, "
                "or pass the path of a checkpoint file"
            )
        return found
    path = Path(text).expanduser()
    if path.is_dir():
        run = path.parent if path.name == "checkpoints" else path
        found = latest_checkpoint(run)
        if found is None:
            raise CheckpointError(f"no checkpoint (<step>.pt) in {run / 'checkpoints'}; pass a checkpoint file")
        return found
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {text!r} does not exist; pass a file written by `repa train` "
            "(<run>/checkpoints/<step>.pt), a run folder, or 'latest'"
        )
    return path


def load_checkpoint(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> Dict[str, Any]:
    """Load a ``repa train`` checkpoint; raises :class:`CheckpointError` for unreadable or foreign files."""
    try:
        ckpt = torch.load(str(path), map_location=map_location, weights_only=False)
    except Exception as exc:  # truncated, not a torch file, ...
        raise CheckpointError(
            f"cannot read checkpoint {str(path)!r} ({type(exc).__name__}: {exc}); the file is damaged or not a "
            "checkpoint: resume from an earlier one (see the run's checkpoints/ folder)"
        ) from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(
            f"{str(path)!r} is not a `repa train` checkpoint (format {found!r}, expected {CHECKPOINT_FORMAT!r})"
        )
    return ckpt


def capture_rng_state() -> Dict[str, Any]:
    """The global RNG states of this process: python, numpy, torch CPU and its current CUDA device."""
    state: Dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this process's current device only
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`capture_rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())
