"""Several representation objectives in one loss, with one breakdown for logging.

    out = combine(repa=reg(x, return_breakdown=True), dispersive=disp(return_breakdown=True))
    loss = diffusion_loss + out.total
    log.update(out.logs())          # {"repa/loss": ..., "repa/weight": ..., "dispersive/loss": ..., ...}

The objectives are independent terms: the total is their plain sum (each already carries its
own weight and schedule). Any mix of REPA, Dispersive Loss, SRA and the VAE teacher combines.
"""

from __future__ import annotations

from typing import Any, Dict, NamedTuple

import torch

from .errors import ConfigError

__all__ = ["combine", "CombinedOutput"]


class CombinedOutput(NamedTuple):
    """The sum of several objectives' terms.

    Attributes:
        total: the sum of every term's ``total`` (scalar, with grad).
        losses: each objective's unweighted loss, by name (detached).
        weights: each objective's weight at this step, by name.
        metrics: extra detached scalars by ``"name/metric"`` (e.g. REPA's cosine per pair).
    """

    total: torch.Tensor
    losses: Dict[str, torch.Tensor]
    weights: Dict[str, float]
    metrics: Dict[str, torch.Tensor]

    def logs(self) -> Dict[str, float]:
        """A flat ``{"name/loss": float, "name/weight": float, ...}`` for a logger (one host sync)."""
        out: Dict[str, float] = {}
        for name, value in self.losses.items():
            out[f"{name}/loss"] = float(value)
            out[f"{name}/weight"] = float(self.weights[name])
        for key, value in self.metrics.items():
            out[key] = float(value)
        return out


def combine(**terms: Any) -> CombinedOutput:
    """Sum named terms: each a breakdown (``return_breakdown=True``) or a plain scalar tensor."""
    if not terms:
        raise ConfigError("combine() needs at least one named term, e.g. combine(repa=reg(x, return_breakdown=True))")
    totals, losses, weights, metrics = [], {}, {}, {}
    for name, term in terms.items():
        if isinstance(term, torch.Tensor):
            if term.ndim != 0:
                raise ConfigError(f"term {name!r} must be a scalar, got shape {tuple(term.shape)}")
            totals.append(term)
            losses[name] = term.detach()
            weights[name] = 1.0
            continue
        if not hasattr(term, "total") or not hasattr(term, "loss") or not hasattr(term, "weight"):
            raise ConfigError(
                f"term {name!r} is a {type(term).__name__}; pass a scalar tensor or a breakdown from "
                "obj(..., return_breakdown=True)"
            )
        totals.append(term.total)
        losses[name] = term.loss.detach()
        weights[name] = float(term.weight)
        for field in ("cosine", "per_layer"):
            extra = getattr(term, field, None)
            if isinstance(extra, dict):
                metrics.update({f"{name}/{field}/{k}": v.detach() for k, v in extra.items()})
            elif isinstance(extra, torch.Tensor):
                metrics[f"{name}/{field}"] = extra.detach()
    total = totals[0]
    for t in totals[1:]:
        total = total + t.to(total.device)
    return CombinedOutput(total, losses, weights, metrics)
