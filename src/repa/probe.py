"""``repa.probe``: the names of the alignment probe where they were.

The generic probe (any model's hooked layers against an encoder) is :mod:`repa.probing`, a
tool; ``repa probe`` on a SiT checkpoint is :mod:`repa.sit.probe`, the recipe. This module sits
above both and re-exports them, so ``from repa.probe import probe_alignment`` keeps working.
"""

from .probing import PROBE_PATHS, AlignmentResult, plot_alignment, probe_alignment, resolve_probe_layers
from .sit.probe import _load_samples, _parse_ts, add_arguments, main  # noqa: F401

__all__ = ["AlignmentResult", "probe_alignment", "plot_alignment", "resolve_probe_layers", "add_arguments", "main"]
__all__ += ["PROBE_PATHS"]  # _load_samples, _parse_ts: the old private names
