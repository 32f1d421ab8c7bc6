"""Atomic file writes, the one implementation every writer of the package uses.

A file is written to a hidden temporary name in its own folder (``.<name>.tmp<pid>``), flushed
to disk, then renamed over the final name with ``os.replace``: a reader never sees half a file,
and a failed write leaves the previous content in place. Lives at the bottom of the package
(no ``repa`` imports), under the tools and the recipe alike.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Union

__all__ = ["temp_path", "atomic_write", "atomic_write_text"]

PathLike = Union[str, "os.PathLike[str]"]


def temp_path(path: PathLike) -> Path:
    """The hidden temporary name beside ``path`` that :func:`atomic_write` writes first."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def atomic_write(path: PathLike, write: Callable[[str], Any], *, fsync: bool = True) -> Path:
    """Write ``path`` through ``write(tmp_path)``, then rename the temporary file over it.

    ``fsync`` makes the bytes durable before the rename makes them visible. On any error the
    temporary file is removed and the error propagates (``path`` keeps its previous content).
    Returns ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        write(str(tmp))
        if fsync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        try:
            if tmp.exists():
                tmp.unlink()
        except OSError:  # pragma: no cover - the folder vanished or became read-only: keep the first error
            pass
    return path


def atomic_write_text(path: PathLike, text: str, *, fsync: bool = True) -> Path:
    """Write the text file ``path`` (UTF-8) atomically; see :func:`atomic_write`."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    return atomic_write(path, write, fsync=fsync)
