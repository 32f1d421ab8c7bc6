"""One process at a time per folder: the lock file of a run, cache or sample output folder.

A lock is the file ``<folder>/.repa.lock`` holding JSON ``{"pid", "host", "started", "purpose",
"argv"}``. It is created atomically (written to a temporary file, then hard-linked to its
final name, which fails if the name exists), so a reader never sees a half-written lock.

A second process that finds the lock refuses at once with :class:`FolderInUseError` naming the
holder. A lock left by a process that died (kill -9, power loss) on this same host is taken
over with a warning; a lock from another host (a shared file system) is never taken over
automatically, since its process cannot be checked from here: the message says which file to
delete once that run is known to be gone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, Union

from .errors import ConfigError, FolderInUseError

__all__ = ["LOCK_NAME", "FolderLock", "lock_holder", "make_folder"]

LOCK_NAME = ".repa.lock"
_log = logging.getLogger("repa")
PathLike = Union[str, "os.PathLike[str]"]


def make_folder(folder: PathLike, flag: str = "--output-dir") -> bool:
    """Create ``folder`` (and its parents); True if it did not exist. A file in the way is a :class:`ConfigError`."""
    folder = Path(folder)
    existed = folder.is_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        blocker = next((p for p in [folder, *folder.parents] if p.exists() and not p.is_dir()), folder)
        raise ConfigError(
            f"cannot create the folder {str(folder)!r}: {str(blocker)!r} is a file, not a folder; "
            f"pass another {flag}, or move that file away"
        ) from exc
    return not existed


def _process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host and is not a zombie."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    try:  # a killed child not yet reaped is a zombie: it holds nothing any more
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def lock_holder(folder: PathLike) -> Optional[Dict[str, Any]]:
    """The record of the process holding ``folder``'s lock, ``{}`` if the lock is unreadable, None if unlocked."""
    path = Path(folder) / LOCK_NAME
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return record if isinstance(record, dict) else {}


class FolderLock:
    """The lock of one folder, held while a process writes into it.

    ``with FolderLock(run_dir, "repa train"):`` creates the folder if needed, takes the lock
    (or raises :class:`FolderInUseError`), and on exit removes the lock (and the folder, if
    this lock created it and nothing was written into it).
    """

    def __init__(self, folder: PathLike, purpose: str = "repa", flag: str = "--output-dir") -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.purpose = purpose
        self.flag = flag
        self.held = False
        self._created = False

    def acquire(self) -> FolderLock:
        """Take the lock; raises :class:`FolderInUseError` if a live process holds it."""
        self._created = make_folder(self.folder, self.flag)
        host, pid = socket.gethostname(), os.getpid()
        record = {
            "pid": pid,
            "host": host,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "purpose": self.purpose,
            "argv": list(sys.argv),
        }
        tmp = self.folder / f"{LOCK_NAME}.tmp{pid}"
        tmp.write_text(json.dumps(record))
        try:
            for _ in range(3):  # a stale lock is removed and the link tried again
                if self._link(tmp):
                    self.held = True
                    return self
                holder = lock_holder(self.folder)
                if holder is None:  # released between our attempt and the read
                    continue
                if holder.get("host") == host and isinstance(holder.get("pid"), int) and not _process_alive(holder["pid"]):
                    _log.warning(
                        "%s: taking over the stale lock %s of process %s (%s, started %s), which no longer runs",
                        self.purpose, self.path, holder["pid"], holder.get("purpose"), holder.get("started"),
                    )
                    with contextlib.suppress(FileNotFoundError):
                        self.path.unlink()
                    continue
                raise FolderInUseError(self._in_use_message(holder))
            raise FolderInUseError(self._in_use_message(lock_holder(self.folder) or {}))
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def _link(self, tmp: Path) -> bool:
        """Publish the lock atomically; False if a lock already exists."""
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: exclusive create instead
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as fh:
                fh.write(tmp.read_text())
            return True

    def _in_use_message(self, holder: Dict[str, Any]) -> str:
        if not holder:
            who = "an unknown process (the lock file is unreadable)"
        else:
            argv = " ".join(map(str, holder.get("argv") or []))
            who = (
                f"process {holder.get('pid')} on host {holder.get('host')!r} ({holder.get('purpose')}, started "
                f"{holder.get('started')}{': ' + argv if argv else ''})"
            )
        return (
            f"{str(self.folder)!r} is in use by {who}; two processes must not write one folder. Wait for it to "
            f"finish, or use another {self.flag}; if that process is gone (e.g. it ran on another host), "
            f"delete {str(self.path)!r}"
        )

    def release(self) -> None:
        """Remove the lock if this process still holds it (and the folder if this lock made it and it is empty)."""
        if not self.held:
            return
        self.held = False
        holder = lock_holder(self.folder)
        if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        if self._created:
            try:
                self.folder.rmdir()  # only if empty: a failed start leaves no trace
            except OSError:
                pass

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
