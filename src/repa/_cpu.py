"""CPU threads of the `repa` programs on shared machines (issue 12, section 5).

With the OpenMP defaults a torch process runs one intra-op thread per core, and a thread that
waits at the end of a parallel region spins (busy-waits) before it sleeps. Two such processes on
a small machine spin against each other: measured on 2 busy cores, `repa train` took 12 s per
step instead of 0.6 s (benchmarks/RESULTS.md). The passive wait policy (threads sleep at once)
removes that, but OpenMP reads it only when torch is first imported. So the `repa` programs
(the `repa` command, ``python -m repa.*``, torchrun of a ``repa`` module) set
``OMP_WAIT_POLICY=PASSIVE`` before torch loads, unless the user chose a policy. A program that
merely imports `repa` as a library keeps its own environment.
"""

from __future__ import annotations

import os
import sys

__all__ = ["is_repa_program", "prefer_passive_openmp"]


def is_repa_program() -> bool:
    """Whether this process runs a `repa` program (the console script or ``-m repa...``), not a user's script."""
    argv = list(getattr(sys, "orig_argv", None) or sys.argv)
    if argv and os.path.basename(str(sys.argv[0] if sys.argv else "")) in ("repa", "repa.exe"):
        return True
    for i, arg in enumerate(argv[:-1]):
        if arg == "-m":
            module = argv[i + 1]
            if module == "repa" or module.startswith("repa."):
                return True
            if module in ("torch.distributed.run", "torch.distributed.launch"):
                continue  # torchrun -m repa.sit.train: the module follows later
    return "torch.distributed.run" in argv and any(a == "repa" or a.startswith("repa.") for a in argv)


def prefer_passive_openmp() -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` for a `repa` program if torch is not loaded yet; True if set."""
    if "torch" in sys.modules or "OMP_WAIT_POLICY" in os.environ or not is_repa_program():
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True
