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
    """Whether this process runs a `repa` program (the console script or ``-m repa...``), not a user's script.

    Under ``torchrun -m repa.sit.train`` each worker is started as ``python -m repa.sit.train``.
    """
    if sys.argv and os.path.basename(str(sys.argv[0])) in ("repa", "repa.exe"):
        return True
    argv = list(getattr(sys, "orig_argv", None) or sys.argv)
    return any(
        arg == "-m" and (argv[i + 1] == "repa" or argv[i + 1].startswith("repa.")) for i, arg in enumerate(argv[:-1])
    )


def prefer_passive_openmp() -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` for a `repa` program if torch is not loaded yet; True if set."""
    if "torch" in sys.modules or "OMP_WAIT_POLICY" in os.environ or not is_repa_program():
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True
