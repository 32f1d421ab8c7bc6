"""HookedObjective: the machinery every representation objective in ``repa`` shares.

REPA, Dispersive Loss and self-alignment all read hidden states that forward hooks capture
while the user's own forward runs, weigh their loss by a schedule of the step, return a
DDP-safe zero while the schedule is 0, and save their few weights with a JSON config. This
base class holds exactly that, so each objective is one small class on top:

- capture: :meth:`_setup_capture` hooks the resolved layers; :meth:`_take_captures` hands them
  over once (a layer that did not run is a :class:`~repa.errors.CaptureError`);
  :meth:`disabled`, :meth:`clear`, :meth:`remove` and the context manager manage them;
- schedule: ``weight`` is a number, a :mod:`repa.schedules` schedule or ``step -> float``; the
  step counter lives in the ``step`` buffer (so in ``state_dict()``) and :meth:`_advance`
  returns this call's weight;
- zero: :meth:`_zero` touches every trainable parameter, so DDP sees no unused parameters once
  a stop schedule fires;
- save/load: :meth:`save_pretrained` writes the weights (safetensors, the config in its
  metadata) and a JSON config; :meth:`load_state_dict` names missing and unexpected keys.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ._io import atomic_write as _atomic_write  # the package's one atomic write
from ._version import __version__
from .capture import CaptureHook, unwrap_model
from .errors import CaptureError, StateDictError
from .schedules import Schedule, WeightLike, as_schedule, weight_at_step

__all__ = ["HookedObjective"]


class HookedObjective(nn.Module):
    """Base of the objectives that read hidden states captured by forward hooks.

    Subclasses call ``super().__init__()``, then :meth:`_setup_weight` and
    :meth:`_setup_capture`, and in ``forward`` :meth:`_take_captures` then :meth:`_advance`.
    """

    step: torch.Tensor  # the step counter buffer (registered by _setup_weight)

    #: file names used by :meth:`save_pretrained`; subclasses pick their own
    CONFIG_NAME = "repa_config.json"
    WEIGHTS_NAME = "repa_projectors.safetensors"

    # ------------------------------------------------------------------ setup
    def _setup_weight(self, weight: WeightLike) -> None:
        """The weight schedule and the step counter (a buffer, so it is saved and restored)."""
        self.weight_fn = as_schedule(weight)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self._step = 0
        self.register_load_state_dict_post_hook(lambda module, keys: module._sync_step())

    def _setup_capture(self, model: nn.Module, base: nn.Module, resolved: Sequence[Tuple[str, nn.Module]]) -> None:
        """Hook every resolved (name, module); captures go to ``self._captures`` by name."""
        self.layer_names: List[str] = [name for name, _ in resolved]
        self._captures: Dict[str, Any] = {}
        self._ran_without_grad: set = set()
        self._capture_enabled = True
        self._handles = [module.register_forward_hook(CaptureHook(name, self)) for name, module in resolved]
        self._model_ref = [base]  # a list, so the model is not registered as a submodule
        self._attached_to_compiled = base is not model and hasattr(model, "_orig_mod")

    @staticmethod
    def _weight_config(weight: Any) -> Any:
        """A JSON form of ``weight`` (None for an arbitrary callable, which cannot be saved)."""
        if isinstance(weight, (int, float)) and not isinstance(weight, bool):
            return float(weight)
        if isinstance(weight, Schedule):
            return weight.to_dict()
        return None

    # ------------------------------------------------------------------ public properties
    @property
    def config(self) -> Dict[str, Any]:
        """The JSON-serializable configuration written by :meth:`save_pretrained` (a copy)."""
        settings = self._config
        if dataclasses.is_dataclass(settings) and not isinstance(settings, type):
            settings = dataclasses.asdict(settings)
        return json.loads(json.dumps(settings))

    def weight_at(self, step: Optional[int] = None) -> float:
        """The objective's weight at ``step`` (default: the current step)."""
        return weight_at_step(self.weight_fn, self._step if step is None else int(step))

    # ------------------------------------------------------------------ capture lifecycle
    @contextlib.contextmanager
    def disabled(self) -> Iterator[HookedObjective]:
        """Within this block nothing is captured (e.g. sampling or evaluation forwards)."""
        previous = self._capture_enabled
        self._capture_enabled = False
        try:
            yield self
        finally:
            self._capture_enabled = previous

    def _on_remove(self) -> None:
        """Subclass hook: release anything else attached to the model."""

    def remove(self) -> None:
        """Detach every hook from the model. Idempotent."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._on_remove()
        self._captures.clear()

    def __enter__(self) -> HookedObjective:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def clear(self) -> None:
        """Drop any captured activations without computing a loss."""
        self._captures.clear()
        self._ran_without_grad.clear()

    def _sync_step(self) -> None:
        self._step = int(self.step.item())

    def _call_name(self) -> str:
        return "reg"

    def _take_captures(self) -> Dict[str, Any]:
        """The captures of every hooked layer, released from the objective (read once)."""
        captures = {}
        call = self._call_name()
        for name in self.layer_names:
            if name not in self._captures:
                if name in self._ran_without_grad:
                    self.clear()
                    raise CaptureError(
                        f"layer {name!r} ran with gradients disabled, so nothing was captured: run the model's "
                        f"forward with grad enabled before calling {call}(). With activation checkpointing, use "
                        "use_reentrant=False (reentrant checkpointing runs the forward under no_grad)"
                    )
                self.clear()
                hint = (
                    "; the regularizer was attached to an already compiled model, whose compiled graph "
                    "ignores new hooks: attach to the plain model first, then call torch.compile"
                    if self._attached_to_compiled
                    else " (hooks removed? call order inverted?)"
                )
                raise CaptureError(
                    f"layer {name!r} has not run since the last {call}() call: run the model's forward on x_t "
                    f"first, then call {call}(...){hint}"
                )
            captures[name] = self._captures[name]
        self.clear()
        return captures

    # ------------------------------------------------------------------ schedule and zero
    def _advance(self, step: Optional[int] = None) -> float:
        """This call's weight; the counter moves on by one (from ``step`` when given)."""
        current = self._step if step is None else int(step)
        weight = weight_at_step(self.weight_fn, current)  # a finite number >= 0, or a clear error
        self._step = current + 1
        self.step.fill_(self._step)
        return weight

    def _zero(self, device: Optional[torch.device] = None) -> torch.Tensor:
        """A zero that touches every trainable parameter (DDP then sees none unused)."""
        params = [p for p in self.parameters() if p.requires_grad]
        if params:
            total: torch.Tensor = sum((p.sum() for p in params[1:]), params[0].sum())
            return total * 0.0
        return torch.zeros((), device=device)

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, directory: Union[str, os.PathLike]) -> None:
        """Write the weights (safetensors, config in its metadata) and a JSON config.

        Weights sharded by FSDP2 (``fully_shard``; DTensors) are gathered first, which is a
        collective: call it on every rank then; rank 0 writes the files.
        """
        from safetensors.torch import save_file

        state = self.state_dict()
        sharded = any(_is_dtensor(v) for v in state.values())
        tensors = {k: (v.full_tensor() if _is_dtensor(v) else v).detach().cpu().contiguous() for k, v in state.items()}
        if sharded and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
            return
        os.makedirs(directory, exist_ok=True)
        config = {**self.config, "repa_version": __version__}
        text = json.dumps(config, indent=2, sort_keys=True)
        _atomic_write(
            os.path.join(directory, self.WEIGHTS_NAME), lambda p: save_file(tensors, p, metadata={"repa_config": text})
        )
        _atomic_write(os.path.join(directory, self.CONFIG_NAME), lambda p: open(p, "w").write(text + "\n"))

    @classmethod
    def _read_saved(cls, directory: Union[str, os.PathLike]) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
        """The saved JSON config and weights of :meth:`save_pretrained`."""
        from safetensors.torch import load_file

        weights_path = os.path.join(directory, cls.WEIGHTS_NAME)
        config_path = os.path.join(directory, cls.CONFIG_NAME)
        if not os.path.exists(weights_path) or not os.path.exists(config_path):
            raise StateDictError(
                f"no {cls.WEIGHTS_NAME} and {cls.CONFIG_NAME} in {str(directory)!r}; save one with "
                f"{cls.__name__}.save_pretrained(dir)"
            )
        with open(config_path) as fh:
            config = json.load(fh)
        return config, load_file(weights_path)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False):
        """Load weights and step; with ``strict`` a mismatch names missing and unexpected keys."""
        if strict:
            own = set(self.state_dict())
            missing, unexpected = sorted(own - set(state_dict)), sorted(set(state_dict) - own)
            if missing or unexpected:
                raise StateDictError(
                    f"state dict does not match this regularizer: missing keys {missing}, unexpected keys "
                    f"{unexpected}; was it saved with the same layers and settings?"
                )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def _is_dtensor(t: Any) -> bool:
    """True for a distributed tensor (e.g. an FSDP2-sharded weight); without importing it eagerly."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # builds without distributed support
        return False
    return isinstance(t, DTensor)


def model_base(model: nn.Module) -> nn.Module:
    """The model under DDP / compile wrappers (re-exported for the objectives)."""
    return unwrap_model(model)
