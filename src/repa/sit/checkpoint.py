"""Training checkpoints of the SiT recipe: a safe format, atomic writes, discovery, RNG state.

A checkpoint is one ``torch.save`` file ``<run>/checkpoints/<step:07d>.pt`` holding a dict
(model, EMA, optimizer, grad scaler, regularizer, the resolved config, the step and the RNG
states of every rank). It holds tensors and plain containers only (dict, list, tuple, str,
int, float, bool, None): the settings (``config``, ``data``, ``model_kwargs``,
``regularizer_config``) are stored as JSON strings and the python / numpy RNG states as
tensors, so ``torch.load(path, weights_only=True)`` reads it and loading a checkpoint never
runs code from the file. :func:`load_checkpoint` reads nothing else: a file that needs the
full unpickler (a crafted file, or a checkpoint of repa 0.1, format ``repa-sit-train/1``) is
refused; :func:`convert_legacy_checkpoint` converts a 0.1 checkpoint (numpy arrays allowed, nothing else).

A checkpoint is written to a hidden temporary file in the same folder, flushed to disk, then
renamed over the final name with ``os.replace``: a write that fails (disk full, file size
limit) raises :class:`~repa.errors.CheckpointWriteError` and removes its temporary file, a
write killed half-way leaves only the temporary file, which discovery ignores and
:func:`clean_stale_temp_files` removes at the next start, and every earlier checkpoint stays
loadable.

The training program draws the per-step randomness (noise, times, label dropout) from a
generator seeded by (seed, step) and the data order from (seed, epoch), so a checkpoint's
step alone fixes what comes next; the global torch / numpy / python RNG states are stored and
restored as well, for any code that uses them.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import numpy as np
import torch

from .._io import atomic_write
from ..errors import CheckpointError, CheckpointWriteError, UnsafeCheckpointError

__all__ = [
    "CHECKPOINT_FORMAT",
    "LEGACY_FORMATS",
    "SETTINGS_KEYS",
    "Checkpoint",
    "atomic_save",
    "save_checkpoint",
    "checkpoint_path",
    "list_checkpoints",
    "latest_checkpoint",
    "resolve_checkpoint",
    "load_checkpoint",
    "convert_legacy_checkpoint",
    "clean_stale_temp_files",
    "capture_rng_state",
    "restore_rng_state",
]

_log = logging.getLogger("repa")

#: The value of ``checkpoint["format"]`` written by ``repa train``: tensors, plain containers
#: and JSON settings only, readable with ``torch.load(weights_only=True)``.
CHECKPOINT_FORMAT = "repa-sit-train/2"
#: Formats of earlier releases: their files hold pickled numpy objects, which :func:`load_checkpoint`
#: refuses (see :func:`convert_legacy_checkpoint`).
LEGACY_FORMATS = ("repa-sit-train/1",)
#: Entries holding settings; stored as JSON strings, returned by :func:`load_checkpoint` as dicts.
SETTINGS_KEYS = ("config", "data", "model_kwargs", "regularizer_config")
#: Everything ``repa train`` writes; a missing one is named when a caller asks for it.
_WRITTEN = (
    "format", "step", "epoch", "steps_per_epoch", "world_size", "config", "data", "model_name", "model_kwargs",
    "model", "ema", "optimizer", "scaler", "regularizer", "regularizer_config", "rng",
)  # fmt: skip
_NAME = re.compile(r"^(\d{7,})\.pt$")
_TEMP = re.compile(r"^\.(.+)\.tmp(\d+)$")
# exact types: a subclass (numpy.float64, a namedtuple, a dict subclass) pickles as a class reference
_PLAIN = (str, int, float, bool, type(None), torch.dtype, torch.device, torch.Size)
_CONTAINERS = (dict, OrderedDict)
PathLike = Union[str, "os.PathLike[str]"]


def atomic_save(obj: Any, path: PathLike, save: Optional[Callable[[Any, str], None]] = None) -> Path:
    """Write ``obj`` to ``path`` atomically: temp file in the same folder, fsync, then ``os.replace``.

    ``save(obj, tmp_path)`` does the writing (default ``torch.save``). If it fails (disk full,
    file size limit, ...) the temporary file is removed, ``path`` keeps its previous content and
    :class:`~repa.errors.CheckpointWriteError` (an ``OSError``) says so; if the process dies the
    temporary file is left hidden, named ``.<name>.tmp<pid>`` (see :func:`clean_stale_temp_files`).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: (save or torch.save)(obj, tmp))  # fsync'd before the rename
    except Exception as exc:  # OSError (ENOSPC, EFBIG), or torch's RuntimeError wrapping a failed write
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointWriteError(
            f"could not write {str(path)!r} ({type(exc).__name__}: {reason}{_space_report(path.parent)}); earlier "
            "checkpoints are kept. Free disk space (or raise the quota / file size limit) and continue with "
            "--resume latest"
        ) from exc
    return path


def _space_report(folder: Path) -> str:
    """``"; N MiB free on the disk[, file size limit M KiB]"``: why a write may have failed ('' if unknown)."""
    parts = []
    try:
        import shutil

        parts.append(f"{shutil.disk_usage(folder).free / 2**20:.0f} MiB free on its disk")
    except OSError:
        pass
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY:
            parts.append(f"file size limit (ulimit -f) {limit / 2**10:.0f} KiB")
    except (ImportError, OSError, ValueError):  # pragma: no cover - no resource module (Windows)
        pass
    return "; " + ", ".join(parts) if parts else ""


def _check_plain(obj: Any, where: str) -> None:
    """Raise :class:`CheckpointError` unless ``obj`` is tensors and plain containers only."""
    if isinstance(obj, torch.Tensor) or type(obj) in _PLAIN:
        return
    if type(obj) in _CONTAINERS or type(obj) is Checkpoint:
        for key, value in obj.items():
            if not isinstance(key, (str, int)):
                raise CheckpointError(f"checkpoint entry {where} has a key of type {type(key).__name__}; use str or int")
            _check_plain(value, f"{where}.{key}" if where else str(key))
        return
    if type(obj) in (list, tuple):
        for i, value in enumerate(obj):
            _check_plain(value, f"{where}[{i}]")
        return
    raise CheckpointError(
        f"checkpoint entry {where or 'the checkpoint'} is a {type(obj).__module__}.{type(obj).__qualname__}; "
        "a checkpoint holds tensors and plain containers only (torch.load(weights_only=True) must read it): "
        "convert it to a tensor, a number, a string or a dict/list of these"
    )


def save_checkpoint(checkpoint: Dict[str, Any], path: PathLike) -> Path:
    """Write a training checkpoint in the safe format, atomically; returns ``path``.

    ``checkpoint`` is the dict ``repa train`` assembles; its :data:`SETTINGS_KEYS` are stored as
    JSON strings and ``format`` is set to :data:`CHECKPOINT_FORMAT`. Anything that is not a
    tensor or a plain container raises :class:`CheckpointError` before a byte is written (a
    checkpoint nobody could load safely must not be discovered after a week of training).

    Raises:
        CheckpointError: an entry is not serializable safely.
        CheckpointWriteError: the write failed; earlier checkpoints are kept.
    """
    out: Dict[str, Any] = dict(checkpoint)
    out["format"] = CHECKPOINT_FORMAT
    for key in SETTINGS_KEYS:
        if key in out and out[key] is not None and not isinstance(out[key], str):
            try:
                out[key] = json.dumps(out[key], sort_keys=True)
            except (TypeError, ValueError) as exc:
                raise CheckpointError(f"checkpoint entry {key!r} is not JSON-serializable ({exc})") from exc
    _check_plain(out, "")
    return atomic_save(out, path)


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


class Checkpoint(dict):
    """A loaded checkpoint: a plain dict whose missing entries raise :class:`CheckpointError`.

    ``ckpt["optimizer"]`` on a file without one names every entry ``repa train`` writes that the
    file lacks, instead of a bare ``KeyError``.
    """

    path: str = ""

    def __reduce__(self) -> Any:  # saved again, it is a plain container that weights_only=True reads
        return (OrderedDict, (list(self.items()),))

    def __missing__(self, key: Any) -> Any:
        lacking = [k for k in _WRITTEN if k not in self]
        if key not in lacking:
            lacking.insert(0, key)
        raise CheckpointError(
            f"checkpoint {self.path!r} has no entr{'y' if len(lacking) == 1 else 'ies'} "
            f"{', '.join(repr(k) for k in lacking)}; every checkpoint `repa train` writes has them, so the file "
            "was written by other code or edited: use another checkpoint of the run (see its checkpoints/ folder)"
        )


def _refusal(path: str, exc: Exception) -> CheckpointError:
    """The error for a file the restricted unpickler refused (nothing from it was executed)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    blocked = next((line for line in lines if "GLOBAL" in line), None)
    if blocked is None:  # an opcode the restricted unpickler does not know: garbage, or a raw pickle
        detail = next((line for line in lines if line.startswith("Unsupported")), type(exc).__name__)
        return CheckpointError(
            f"cannot read checkpoint {path!r} safely ({detail}); the file is damaged or not a checkpoint (nothing "
            "in it was run): resume from an earlier one (see the run's checkpoints/ folder)"
        )
    return UnsafeCheckpointError(
        f"refusing to load {path!r}: it holds Python objects other than tensors and plain containers "
        f"({blocked[:160]}), and unpickling them could run code from the file; nothing in it was run. "
        f"Checkpoints of this version ({CHECKPOINT_FORMAT}) never hold such objects. If it is a checkpoint of "
        f"repa 0.1 ({LEGACY_FORMATS[0]}), convert it once with "
        "repa.sit.checkpoint.convert_legacy_checkpoint(src, dst) and use dst"
    )


def load_checkpoint(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> Dict[str, Any]:
    """Load a ``repa train`` checkpoint without running any code from the file.

    The file is read with ``torch.load(weights_only=True)``: tensors and plain containers only.
    Settings stored as JSON strings (:data:`SETTINGS_KEYS`) come back as dicts, so callers see
    the dict ``repa train`` assembled. The result raises :class:`CheckpointError` naming the
    missing entries when one that ``repa train`` writes is asked for and absent.

    Raises:
        UnsafeCheckpointError: the file needs the full unpickler (a crafted file, a checkpoint
            of repa 0.1): nothing from it was executed; the message says how to convert a
            0.1 checkpoint.
        CheckpointError: the file is damaged or not a ``repa train`` checkpoint; later, an
            entry ``repa train`` writes is asked for and missing (all missing ones are named).
    """
    import pickle

    name = str(path)
    try:
        raw = torch.load(name, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:  # the restricted unpickler met a global it does not allow
        raise _refusal(name, exc) from None
    except Exception as exc:  # truncated, not a torch file, ...
        raise CheckpointError(
            f"cannot read checkpoint {name!r} ({type(exc).__name__}: {exc}); the file is damaged or not a "
            "checkpoint: resume from an earlier one (see the run's checkpoints/ folder)"
        ) from exc
    found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
    # a 0.1 file that the restricted unpickler read holds nothing unsafe (its RNG tuples restore as well)
    if not isinstance(raw, dict) or found not in (CHECKPOINT_FORMAT, *LEGACY_FORMATS):
        raise CheckpointError(f"{name!r} is not a `repa train` checkpoint (format {found!r}, expected {CHECKPOINT_FORMAT!r})")
    ckpt = Checkpoint(raw)
    ckpt.path = name
    for key in SETTINGS_KEYS:
        if isinstance(ckpt.get(key), str):
            try:
                ckpt[key] = json.loads(ckpt[key])
            except ValueError as exc:
                raise CheckpointError(f"checkpoint {name!r}: entry {key!r} is not valid JSON ({exc}); the file was edited") from exc
    return ckpt


def _numpy_data_globals() -> List[Any]:
    """The numpy names a 0.1 checkpoint's RNG states need: array and scalar reconstruction, nothing callable beyond."""
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct, scalar  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct, scalar  # type: ignore[no-redef]
    dtypes = [type(np.dtype(t)) for t in (np.uint32, np.int64, np.float64, np.float32, np.bool_)]
    return [np.ndarray, np.dtype, _reconstruct, scalar, *dtypes]


def convert_legacy_checkpoint(src: PathLike, dst: PathLike) -> Path:
    """Rewrite a repa 0.1 checkpoint (``repa-sit-train/1``) in the current format.

    The old file is read with ``torch.load(weights_only=True)``, whose restricted unpickler is
    allowed numpy's array and scalar reconstruction (the 0.1 RNG states hold a numpy array) and
    nothing else: a file holding any other Python object is refused, so nothing in it runs. The
    result (``dst``, never ``src`` itself) loads with :func:`load_checkpoint` and resumes exactly.
    """
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise CheckpointError(f"convert_legacy_checkpoint: dst must differ from src ({str(src)!r}); keep the original")
    if not src.is_file():
        raise CheckpointError(f"checkpoint {str(src)!r} does not exist")
    try:
        with torch.serialization.safe_globals(_numpy_data_globals()):
            old = torch.load(str(src), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"cannot convert {str(src)!r} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "it is damaged, or holds Python objects other than tensors, plain containers and numpy arrays "
            "(nothing in it was run)"
        ) from exc
    if not isinstance(old, dict) or old.get("format") not in LEGACY_FORMATS + (CHECKPOINT_FORMAT,):
        found = old.get("format") if isinstance(old, dict) else type(old).__name__
        raise CheckpointError(f"{str(src)!r} is not a `repa train` checkpoint (format {found!r})")
    new = dict(old)
    if isinstance(new.get("rng"), list):
        new["rng"] = [_plain_rng_state(state) for state in new["rng"]]
    save_checkpoint(new, dst)
    _log.info("converted %s to %s (format %s)", src, dst, CHECKPOINT_FORMAT)
    return dst


def clean_stale_temp_files(run_dir: PathLike) -> List[Path]:
    """Remove the temporary files of checkpoint writes that died half-way (``kill -9``); returns them.

    A temporary file ``.<name>.tmp<pid>`` in ``<run_dir>/checkpoints`` whose writer process is no
    longer alive on this machine is stale: it is never a complete checkpoint (the rename makes
    a finished write visible). Files of a live process (a write in progress) are kept.
    """
    folder = Path(run_dir) / "checkpoints"
    removed: List[Path] = []
    if not folder.is_dir():
        return removed
    for p in sorted(folder.iterdir()):
        m = _TEMP.match(p.name)
        if not m or not p.is_file():
            continue
        pid = int(m.group(2))
        if pid != os.getpid() and _alive(pid):
            continue
        try:
            p.unlink()
        except FileNotFoundError:
            continue
        removed.append(p)
    if removed:
        _log.warning(
            "repa: removed %d unfinished checkpoint write(s) left by a killed process: %s",
            len(removed), ", ".join(p.name for p in removed),
        )
    return removed


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


# ---------------------------------------------------------------------- random-number state
def _plain_rng_state(state: Dict[str, Any]) -> Dict[str, Any]:
    """An RNG state of :func:`capture_rng_state`, with python/numpy entries as tensors (accepts 0.1's tuples)."""
    out = dict(state)
    py = out.get("python")
    if isinstance(py, tuple):  # random.getstate(): (version, 625 ints, gauss_next)
        version, internal, gauss = py
        out["python"] = {
            "version": int(version),
            "state": torch.tensor(internal, dtype=torch.int64),  # (625,): 624 words < 2**32 and the index
            "gauss_next": gauss,
        }
    npy = out.get("numpy")
    if isinstance(npy, tuple):  # np.random.get_state(): (name, uint32 keys, pos, has_gauss, cached_gaussian)
        algorithm, keys, pos, has_gauss, cached = npy
        out["numpy"] = {
            "algorithm": str(algorithm),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),  # (624,)
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }
    return out


def capture_rng_state() -> Dict[str, Any]:
    """The global RNG states of this process: python, numpy, torch CPU and its current CUDA device.

    Every entry is a tensor or a plain value (see :func:`_plain_rng_state`), so the state can be
    stored in a checkpoint that ``torch.load(weights_only=True)`` reads.
    """
    state: Dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this process's current device only
    return _plain_rng_state(state)


def restore_rng_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`capture_rng_state` returned."""
    try:
        py, npy = state["python"], state["numpy"]
        if isinstance(py, dict):
            py = (int(py["version"]), tuple(int(v) for v in py["state"].tolist()), py["gauss_next"])
        if isinstance(npy, dict):
            keys = npy["keys"].numpy().astype(np.uint32)
            npy = (npy["algorithm"], keys, int(npy["pos"]), int(npy["has_gauss"]), float(npy["cached_gaussian"]))
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(state["torch"].cpu())
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        raise CheckpointError(
            f"the checkpoint's random-number state is incomplete or malformed ({type(exc).__name__}: {exc}); "
            "the file was edited or written by other code: use another checkpoint of the run"
        ) from exc
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())
