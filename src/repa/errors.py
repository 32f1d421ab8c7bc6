"""The exceptions `repa` raises.

Every error derives from :class:`REPAError` and from the built-in exception a user would
naturally catch (``ValueError``, ``TypeError``, ``FileNotFoundError``, ``RuntimeError``), so both
``except repa.errors.REPAError`` and ``except ValueError`` work. Messages name the bad value,
what was expected, and how to fix it.
"""

from __future__ import annotations

__all__ = [
    "REPAError",
    "ConfigError",
    "UnknownNameError",
    "LayerNotFoundError",
    "HiddenDimError",
    "InputRangeError",
    "NonFiniteInputError",
    "ShapeMismatchError",
    "GridMismatchError",
    "CaptureError",
    "StateDictError",
    "WeightsNotFoundError",
    "CheckpointError",
    "CheckpointWriteError",
    "UnsafeCheckpointError",
    "DataNotFoundError",
    "CacheError",
    "CacheMismatchError",
    "CorruptCacheError",
    "MissingDependencyError",
    "FolderInUseError",
    "CorruptImageError",
    "NonFiniteLossError",
]


class REPAError(Exception):
    """Base class of every error raised by `repa`."""


class ConfigError(REPAError, ValueError):
    """An argument or option has an invalid value."""


class UnknownNameError(ConfigError):
    """A registry name (encoder, projector, loss, schedule, model, ...) does not exist."""


class LayerNotFoundError(ConfigError):
    """A ``layers=`` entry matches no module of the model."""


class HiddenDimError(ConfigError):
    """The width of a hooked module cannot be inferred; pass ``model_dim=`` (``hidden_dim=`` for SRA)."""


class InputRangeError(ConfigError):
    """Images are outside the declared ``input_range``."""


class NonFiniteInputError(InputRangeError):
    """Images or precomputed encoder targets passed to the regularizer hold NaN or Inf."""


class ShapeMismatchError(ConfigError):
    """A tensor has a shape other than the one expected."""


class GridMismatchError(ShapeMismatchError):
    """The model's token grid and the encoder's token grid differ and ``mismatch="error"``."""


class CaptureError(REPAError, RuntimeError):
    """A hooked layer produced no usable capture (not run, or run without grad)."""


class StateDictError(REPAError, RuntimeError):
    """A state dict or saved regularizer does not match the module it is loaded into."""


class WeightsNotFoundError(REPAError, FileNotFoundError):
    """Pretrained weights are not available locally (and the network may not be used)."""


class CheckpointError(REPAError, RuntimeError):
    """A training checkpoint is missing, incomplete or incompatible."""


class CheckpointWriteError(CheckpointError, OSError):
    """Writing a checkpoint failed (disk full, file size limit); earlier checkpoints are kept."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint holds pickled Python objects, which `repa` refuses to load (they could run code)."""


class DataNotFoundError(REPAError, FileNotFoundError):
    """A dataset folder or file does not exist or holds no usable data."""


class CacheError(REPAError, RuntimeError):
    """Base class of feature-cache errors."""


class CacheMismatchError(CacheError, ValueError):
    """A feature cache was made for another encoder, resolution or dtype than requested."""


class CorruptCacheError(CacheError, OSError):
    """A feature cache is damaged: a shard missing, a checksum or size that does not match its
    record, non-finite targets, or a missing or unreadable ``index.json``."""


class MissingDependencyError(REPAError, ImportError):
    """An optional dependency is not installed; the message gives the install command."""


class FolderInUseError(REPAError, RuntimeError):
    """A run, cache or output folder is locked by another live process."""


class CorruptImageError(REPAError, OSError):
    """An image file of a dataset cannot be decoded (truncated, not an image, ...)."""


class NonFiniteLossError(REPAError, FloatingPointError):
    """The training loss (or gradient norm) became NaN or infinite; the run stopped without saving it."""


def require(module: str, extra: str | None = None):
    """Import an optional dependency or raise :class:`MissingDependencyError` with a hint."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        hint = f'pip install "repa[{extra}]"' if extra else f"pip install {module.split('.')[0]}"
        raise MissingDependencyError(
            f"{module!r} is required for this feature but is not installed; install it with: {hint}"
        ) from exc
