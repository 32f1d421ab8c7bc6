"""Distributed setup of the SiT recipe: the names of :mod:`repa._distributed`, re-exported.

The helpers moved to the bottom of the package so the cache builds with ``torchrun`` without
importing the recipe; ``from repa.sit.distributed import ...`` keeps working.
"""

from .._distributed import (  # noqa: F401
    DistInfo,
    ResumableDistributedSampler,
    __all__,
    all_gather_objects,
    barrier,
    init_distributed,
    lock_folder_on_main,
    shutdown_distributed,
)
