"""Checks of precomputed targets shared by the regularizer and the video path (no cycle between them)."""

from __future__ import annotations

import math
from typing import Any, Dict

import torch

from .errors import NonFiniteInputError

__all__ = ["check_finite_features"]


def check_finite_features(features: Dict[str, Any]) -> None:
    """Precomputed targets must be finite; one fused reduction per encoder and one host sync for all.

    ``aminmax`` is the reduction: NaN propagates through min and max and Inf shows in them, in
    one pass without the boolean tensor ``isfinite`` would allocate.
    """
    tensors = {n: t for n, t in features.items() if isinstance(t, torch.Tensor) and t.numel() > 0}
    if not tensors:
        return
    extremes = [torch.stack(torch.aminmax(t.detach())).float() for t in tensors.values()]  # (2,) per encoder
    if len({e.device for e in extremes}) == 1:
        values = torch.stack(extremes).tolist()  # a single host sync
    else:
        values = [e.tolist() for e in extremes]
    bad = [n for n, (lo, hi) in zip(tensors, values) if not (math.isfinite(lo) and math.isfinite(hi))]
    if bad:
        t = tensors[bad[0]].detach().float()
        raise NonFiniteInputError(
            f"features= for encoder {bad[0]!r} hold {int(torch.isnan(t).sum())} NaN and {int(torch.isinf(t).sum())} "
            f"Inf value(s) (shape {tuple(t.shape)}); the targets are damaged: for a feature cache run "
            "`repa cache verify DIR` and rebuild it with its `repa cache` command"
            + (f" (also bad: {bad[1:]})" if len(bad) > 1 else "")
        )
