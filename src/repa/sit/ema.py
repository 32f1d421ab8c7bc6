"""Exponential moving average of training weights (REPA: decay 0.9999, projectors included).

After every optimizer step each shadow parameter becomes
``shadow = decay * shadow + (1 - decay) * param``; buffers are copied. The shadows are
independent deep copies in eval mode, so sampling from them never touches the training model
(or the regularizer's hooks on it).
"""

from __future__ import annotations

import copy
from typing import Collection, Dict, Mapping

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError

__all__ = ["EMA"]


class EMA(nn.Module):
    """Shadow copies of several modules, updated together: ``EMA({"model": m, "projectors": p}, 0.9999)``.

    ``ema["model"]`` is the averaged copy of ``m``. ``state_dict()`` holds every shadow, keyed
    by name, so one checkpoint entry restores them all.
    """

    def __init__(self, modules: Mapping[str, nn.Module], decay: float = 0.9999) -> None:
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ConfigError(f"EMA decay must lie in [0, 1], got {decay}; REPA uses 0.9999")
        self.decay = float(decay)
        self.shadows = nn.ModuleDict()
        for name, module in modules.items():
            shadow = copy.deepcopy(module).eval()
            shadow.requires_grad_(False)
            self.shadows[name] = shadow

    def __getitem__(self, name: str) -> nn.Module:
        return self.shadows[name]

    def train(self, mode: bool = True) -> EMA:
        """Shadows always stay in eval mode (their label dropout must not fire when sampling)."""
        return super().train(False)

    @torch.no_grad()
    def update(self, modules: Mapping[str, nn.Module], decay: float | None = None, skip: Collection[str] = ()) -> None:
        """shadow <- decay * shadow + (1 - decay) * param for every parameter; buffers copied.

        ``skip``: names whose shadows are left as they are this time (modules nothing updated).
        """
        d = self.decay if decay is None else float(decay)
        if set(modules) != set(self.shadows.keys()):
            raise ConfigError(f"EMA.update got modules {sorted(modules)}, expected {sorted(self.shadows.keys())}")
        for name, module in modules.items():
            if name in skip:
                continue
            shadow = self.shadows[name]
            s_params = list(shadow.parameters())
            params = [p.detach() for p in module.parameters()]
            if len(s_params) != len(params):
                raise ConfigError(f"EMA shadow {name!r} has {len(s_params)} parameters, the module {len(params)}")
            if s_params:
                torch._foreach_lerp_(s_params, params, 1.0 - d)  # s + (1-d)(p - s) = d s + (1-d) p
            for s_buf, buf in zip(shadow.buffers(), module.buffers()):
                s_buf.copy_(buf)

    def load_state_dict(self, state_dict: Dict[str, torch.Tensor], strict: bool = True):  # type: ignore[override]
        try:
            return super().load_state_dict(state_dict, strict=strict)
        except RuntimeError as exc:
            raise CheckpointError(f"EMA weights do not match the model: {exc}") from exc
