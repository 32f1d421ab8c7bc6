"""torch.distributed plumbing shared by the recipe and the cache: process group, devices, data order.

Started with ``torchrun`` (environment ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_*``)
the programs (`repa train`, `repa sample`, `repa cache`) join a process group: ``nccl`` on GPUs (one per process, ``cuda:LOCAL_RANK``),
``gloo`` on CPU. Started plainly they run as rank 0 of 1. No launcher of our own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler

__all__ = ["DistInfo", "init_distributed", "shutdown_distributed", "barrier", "all_gather_objects", "ResumableDistributedSampler"]


@dataclass
class DistInfo:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool  # True if this program created the process group (and must destroy it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: Optional[str] = None) -> DistInfo:
    """Join the torchrun process group when there is one (or reuse an existing one).

    The backend is ``nccl`` when CUDA is available, else ``gloo``; the device is
    ``cuda:LOCAL_RANK`` or ``cpu`` (``device`` overrides it, e.g. ``"cpu"`` on a GPU machine).
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    owns = False
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
        rank, world, owns = dist.get_rank(), dist.get_world_size(), True
    else:
        rank, world = 0, 1
    if device is not None:
        dev = torch.device(device)
    else:
        dev = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    return DistInfo(rank, world, local_rank, dev, owns)


def shutdown_distributed(info: DistInfo) -> None:
    """Destroy the process group if :func:`init_distributed` created it."""
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def all_gather_objects(info: DistInfo, obj: Any) -> List[Any]:
    """Every rank's ``obj`` in rank order (``[obj]`` in a single process)."""
    if not info.distributed:
        return [obj]
    out: List[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def lock_folder_on_main(info: DistInfo, folder: Any, purpose: str, flag: str = "--output-dir") -> Optional[Any]:
    """Rank 0 locks ``folder`` (:class:`repa._runlock.FolderLock`); every rank raises if it could not.

    All ranks agree (one all-reduce), so a refused lock stops the whole job at once instead of
    leaving the other ranks waiting in a collective. Returns the held lock on rank 0, else None.
    """
    from ._runlock import FolderLock

    lock: Optional[Any] = None
    failure: Optional[BaseException] = None
    if info.is_main:
        try:
            lock = FolderLock(folder, purpose, flag=flag).acquire()
        except Exception as exc:  # reported on every rank below
            failure = exc
    if info.distributed:
        flag_t = torch.tensor([0 if failure is None else 1], device=info.device)
        dist.all_reduce(flag_t, op=dist.ReduceOp.MAX)
        if flag_t.item() and failure is None and not info.is_main:
            from ..errors import FolderInUseError

            raise FolderInUseError(f"rank 0 could not lock {str(folder)!r} (see its error); stopping")
    if failure is not None:
        raise failure
    return lock


class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler`` whose order is a function of (seed, epoch) and that can start mid-epoch.

    ``set_epoch(epoch, skip_batches=k)`` drops this rank's first ``k * batch_size`` indices, so a
    resumed run sees exactly the samples an uninterrupted run would. ``drop_last=True``
    keeps the union of the ranks' step-``s`` batches equal to items ``s*G .. (s+1)*G - 1`` of
    the epoch's permutation for any world size (G = global batch), with rank ``r``'s ``j``-th
    sample at global position ``r + world_size * j``.
    """

    def __init__(self, dataset: Dataset, batch_size: int, *, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.batch_size = batch_size
        self.skip = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:  # type: ignore[override]
        super().set_epoch(epoch)
        self.skip = skip_batches * self.batch_size

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.skip :])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.skip)
