"""Dispersive Loss (Wang and He, arXiv 2506.09027, "Diffuse and Disperse"): no teacher at all.

    disp = DispersiveRegularizer(model, layers="blocks.2")
    pred = model(x_t, t, y)                       # hooks capture blocks.2's output
    loss = F.mse_loss(pred, target) + disp()      # pushes the batch's hidden states apart

The repulsive half of a contrastive loss, applied to one block's hidden states of the noisy
batch the model just saw: no positive pairs, no encoder, no extra parameters. Every variant
reads z_i = the flattened hidden state of sample i (all its tokens and channels), shape (B, D).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .base import HookedObjective
from .capture import LayersLike, resolve_layers, unwrap_model
from .config import settings_from_dict, settings_kwargs
from .errors import ConfigError, ShapeMismatchError
from .schedules import WeightLike

__all__ = ["DispersiveRegularizer", "DispersiveOutput", "DispersiveConfig", "dispersive_loss", "DISPERSIVE_VARIANTS"]

DISPERSIVE_VARIANTS = ("infonce-l2", "infonce-cosine", "hinge", "covariance")


@dataclass
class DispersiveConfig:
    """The settings of a :class:`DispersiveRegularizer` (``disp.config``, ``dispersive_config.json``).

    ``weight`` is a number, a schedule's ``to_dict()`` or None (a callable, not saveable).
    """

    layers: List[str]
    weight: Any = 0.5
    variant: str = "infonce-l2"
    temperature: float = 0.5
    margin: float = 1.0
    normalize_by_dim: bool = True
    objective: str = "dispersive"

    def __post_init__(self) -> None:
        if self.variant not in DISPERSIVE_VARIANTS:
            raise ConfigError(
                f"variant={self.variant!r} is not a dispersive loss; choose from {list(DISPERSIVE_VARIANTS)}"
            )
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise ConfigError(f"temperature must be > 0, got {self.temperature!r} (the paper uses 0.5)")
        self.temperature = float(self.temperature)
        self.margin = float(self.margin)
        self.normalize_by_dim = bool(self.normalize_by_dim)


class DispersiveOutput(NamedTuple):
    """What ``disp(return_breakdown=True)`` returns.

    Attributes:
        total: ``weight * loss``, the term to add to the diffusion loss (scalar, with grad).
        loss: the unweighted dispersive loss, mean over the hooked layers (detached).
        weight: the weight used at this step.
        per_layer: the unweighted loss of each hooked layer (detached scalars).
    """

    total: torch.Tensor
    loss: torch.Tensor
    weight: float
    per_layer: Dict[str, torch.Tensor]


def _pairwise_sq_dist(z: torch.Tensor) -> torch.Tensor:
    """(B, D) -> (B, B) squared L2 distances, clamped at 0 (the Gram form can go slightly negative)."""
    sq = (z * z).sum(1)  # (B,)
    return (sq[:, None] + sq[None, :] - 2.0 * (z @ z.t())).clamp_min(0.0)


@torch.autocast("cuda", enabled=False)
@torch.autocast("cpu", enabled=False)
def dispersive_loss(
    z: torch.Tensor,
    variant: str = "infonce-l2",
    temperature: float = 0.5,
    margin: float = 1.0,
    normalize_by_dim: bool = True,
) -> torch.Tensor:
    """One batch's dispersive loss, in fp32. ``z`` is (B, ...) and is flattened to (B, D).

    - ``"infonce-l2"`` (the paper's default): log( (1/B^2) sum_{i,j} exp(-d_ij / tau) ) with
      d_ij = ||z_i - z_j||^2 / D over all B^2 pairs, i = j included (the official code builds
      the full B x B matrix and divides the squared distance by D).
    - ``"infonce-cosine"``: the same with d_ij = -cos(z_i, z_j).
    - ``"hinge"``: (1 / (B (B-1))) sum_{i != j} max(0, margin - d_ij)^2, d_ij as for infonce-l2.
    - ``"covariance"``: sum over m != n of Cov_mn^2, Cov the (D, D) covariance over the batch of
      the L2-normalized z (computed through the B x B Gram matrix: never D x D).

    ``normalize_by_dim=False`` drops the 1/D of the squared distance.
    """
    if z.ndim < 2:
        raise ShapeMismatchError(f"dispersive_loss needs a batch (B, ...) of hidden states, got shape {tuple(z.shape)}")
    b = z.shape[0]
    z = z.reshape(b, -1).float()  # (B, D)
    d = z.shape[1]
    if b < 2:
        return z.sum() * 0.0  # one sample has nothing to be dispersed from
    if variant in ("infonce-l2", "hinge"):
        dist = _pairwise_sq_dist(z)  # (B, B)
        if normalize_by_dim:
            dist = dist / d
        if variant == "infonce-l2":
            return torch.logsumexp((-dist / temperature).reshape(-1), 0) - math.log(b * b)
        off = ~torch.eye(b, dtype=torch.bool, device=z.device)
        return F.relu(margin - dist[off]).pow(2).mean()
    if variant == "infonce-cosine":
        zn = F.normalize(z, dim=1)
        cos = zn @ zn.t()  # (B, B)
        return torch.logsumexp((cos / temperature).reshape(-1), 0) - math.log(b * b)
    if variant == "covariance":
        zn = F.normalize(z, dim=1)
        zc = zn - zn.mean(0, keepdim=True)  # (B, D), centered over the batch
        gram = zc @ zc.t()  # (B, B); ||Zc^T Zc||_F^2 = ||Zc Zc^T||_F^2
        total = gram.pow(2).sum() / (b - 1) ** 2  # sum_{m,n} Cov_mn^2
        diag = (zc * zc).sum(0).div(b - 1).pow(2).sum()  # sum_m Cov_mm^2
        return total - diag
    raise ConfigError(f"unknown dispersive variant {variant!r}; choose from {list(DISPERSIVE_VARIANTS)}")


class DispersiveRegularizer(HookedObjective):
    """Dispersive Loss on the hidden states of one (or more) blocks, by forward hooks.

    The paper (Wang and He, arXiv 2506.09027): total = diffusion loss + lambda * L_disp, with
    L_disp = log E_{i,j}[exp(-D(z_i, z_j) / tau)] over the batch (InfoNCE with squared L2
    distance, its default), z the flattened hidden state of a block. Paper defaults (its JAX
    runs): lambda = 0.5, tau = 0.5, the block at depth num_layers // 4 (so ``layers=2`` =
    ``blocks.2`` on a 12-block SiT-B); the official PyTorch port uses lambda 0.25, tau 1 and the
    last block. The squared distance is divided by D as in the official code.
    Variants (paper's Table 1): ``"infonce-cosine"``, ``"hinge"`` (``margin``, default 1.0 on
    the D-normalized distance; a margin is not restated here from the paper), ``"covariance"``
    (squared off-diagonal covariance of the L2-normalized z); see :func:`dispersive_loss`.

    Distributed training: the batch is EACH RANK'S OWN batch, as in the paper (its runs used a
    local batch of 16 per device; the official code computes the loss per GPU without any
    gather). Under DDP the averaged gradient is then that of the mean of the per-rank losses.

    No parameters: ``parameters()`` is empty and nothing needs to go to the optimizer. While the
    weight schedule is 0 nothing is computed (a zero is returned).

    Args:
        model: the diffusion model (attach before ``torch.compile``).
        layers: which block outputs, as for :class:`~repa.REPARegularizer` (name, regex, int
            into the block list, or a list; the loss is the mean over layers).
        weight: lambda (paper: 0.5), a schedule from :mod:`repa.schedules` or ``step -> float``.
        variant: ``"infonce-l2"`` (paper default), ``"infonce-cosine"``, ``"hinge"``, ``"covariance"``.
        temperature: tau of the InfoNCE variants (paper: 0.5).
        margin: epsilon of the hinge variant.
        normalize_by_dim: divide squared distances by D (official code: yes).
        tokens: which part of a hooked output to use: None (the tensor, or the first element of a
            tuple), a slice over tokens (e.g. skip text tokens), or a callable on the raw output.
    """

    CONFIG_NAME = "dispersive_config.json"
    WEIGHTS_NAME = "dispersive.safetensors"

    def __init__(
        self,
        model: nn.Module,
        layers: LayersLike,
        *,
        weight: WeightLike = 0.5,
        variant: str = "infonce-l2",
        temperature: float = 0.5,
        margin: float = 1.0,
        normalize_by_dim: bool = True,
        tokens: Any = None,
    ) -> None:
        super().__init__()
        settings = DispersiveConfig(
            [], self._weight_config(weight), variant, temperature, margin, normalize_by_dim
        )  # checks the values before anything is hooked
        if tokens is not None and not isinstance(tokens, slice) and not callable(tokens):
            raise ConfigError(f"tokens must be None, a slice or a callable, got {tokens!r}")
        base = unwrap_model(model)
        resolved = resolve_layers(base, layers)
        self._setup_weight(weight)
        self._setup_capture(model, base, resolved)
        settings.layers = list(self.layer_names)
        self._config = settings
        self.variant = settings.variant
        self.temperature = settings.temperature
        self.margin = settings.margin
        self.normalize_by_dim = settings.normalize_by_dim
        self._tokens = tokens

    def _call_name(self) -> str:
        return "disp"

    def _hidden(self, layer: str, output: Any) -> torch.Tensor:
        x = self._tokens(output) if callable(self._tokens) else output
        if isinstance(x, (tuple, list)):
            x = x[0]
        if not isinstance(x, torch.Tensor):
            raise ShapeMismatchError(
                f"layer {layer!r} returned {type(x).__name__}, not a tensor; pass tokens=<callable output -> tensor>"
            )
        if isinstance(self._tokens, slice):
            if x.ndim != 3:
                raise ConfigError(f"tokens=slice(...) needs (B, N, D) tokens; layer {layer!r} gives {tuple(x.shape)}")
            x = x[:, self._tokens]  # (B, N_img, D)
        return x

    def forward(
        self, *, step: Optional[int] = None, return_breakdown: bool = False
    ) -> Union[torch.Tensor, DispersiveOutput]:
        """``weight * L_disp`` of the hidden states captured in the last model forward.

        Args:
            step: use this step for the weight schedule (the counter then continues from it).
            return_breakdown: return a :class:`DispersiveOutput` instead of the weighted scalar.
        """
        captures = self._take_captures()
        weight = self._advance(step)
        if weight == 0.0:
            device = next((c.device for c in captures.values() if isinstance(c, torch.Tensor)), None)
            zero = self._zero(device)
            return DispersiveOutput(zero, zero.detach(), 0.0, {}) if return_breakdown else zero
        per_layer = {}
        for layer in self.layer_names:
            h = self._hidden(layer, captures[layer])  # (B, ...)
            per_layer[layer] = dispersive_loss(
                h, self.variant, self.temperature, self.margin, self.normalize_by_dim
            )
        loss = torch.stack(list(per_layer.values())).mean()
        total = weight * loss
        if return_breakdown:
            return DispersiveOutput(total, loss.detach(), weight, {k: v.detach() for k, v in per_layer.items()})
        return total

    @classmethod
    def from_pretrained(cls, directory: Any, model: nn.Module, **overrides: Any) -> DispersiveRegularizer:
        """Rebuild a regularizer saved by :meth:`save_pretrained` on ``model`` (step restored)."""
        config, state = cls._read_saved(directory)
        if config.get("objective") != "dispersive":
            raise ConfigError(
                f"{str(directory)!r} holds a {config.get('objective', 'REPA')!r} objective, not dispersive"
            )
        settings = settings_from_dict(DispersiveConfig, config, repr(str(directory)))
        kwargs = settings_kwargs(settings, exclude=("layers", "objective"))
        kwargs.update(overrides)
        if kwargs["weight"] is None:
            raise ConfigError("the saved regularizer used a custom weight callable; pass weight=... to from_pretrained")
        reg = cls(model, settings.layers, **kwargs)
        reg.load_state_dict(state)
        return reg

    def extra_repr(self) -> str:
        return f"layers={self.layer_names}, variant={self.variant!r}, temperature={self.temperature}, step={self._step}"
