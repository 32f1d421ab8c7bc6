"""Weight schedules for the alignment term: ``weight(step) -> float``.

REPA uses a constant lambda = 0.5. HASTE ("REPA works until it doesn't") switches the term off
at a fixed step; small-scale runs benefit from decays. While a schedule returns 0 the
regularizer skips the encoder and projectors entirely.

Every schedule is a small callable object with a ``to_dict()`` so it can be saved with a
regularizer's config and rebuilt with :func:`from_dict`. Each has one name, its class
(``StopAt(0.5, 250_000)``); the lower-case names of 0.1.0 (``stop_at``, ...) still work and
warn (deprecated).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Union

from .errors import ConfigError, UnknownNameError

__all__ = [
    "Schedule",
    "Constant",
    "StopAt",
    "LinearDecay",
    "CosineDecay",
    "Warmup",
    "from_dict",
    "as_schedule",
    "weight_at_step",
]


class Schedule:
    """Base class: ``schedule(step) -> weight``; ``to_dict()`` for serialization."""

    kind: str = ""

    def __call__(self, step: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def to_dict(self) -> Dict[str, Any]:
        return {"kind": self.kind, **asdict(self)}  # type: ignore[call-overload]


def _check_weight(weight: float) -> float:
    weight = float(weight)
    if not math.isfinite(weight) or weight < 0:
        raise ConfigError(f"weight must be a finite number >= 0, got {weight!r}")
    return weight


@dataclass(frozen=True)
class Constant(Schedule):
    """Always ``weight`` (REPA: 0.5)."""

    weight: float = 0.5
    kind = "constant"

    def __post_init__(self) -> None:
        object.__setattr__(self, "weight", _check_weight(self.weight))

    def __call__(self, step: int) -> float:
        return self.weight


@dataclass(frozen=True)
class StopAt(Schedule):
    """``weight`` for steps ``< stop``, then 0 (HASTE's hard stop, e.g. 250K for SiT-XL/2)."""

    weight: float
    stop: int
    kind = "stop_at"

    def __post_init__(self) -> None:
        object.__setattr__(self, "weight", _check_weight(self.weight))
        if int(self.stop) < 0:
            raise ConfigError(f"stop_at: stop must be >= 0, got {self.stop!r}")

    def __call__(self, step: int) -> float:
        return self.weight if step < self.stop else 0.0


@dataclass(frozen=True)
class LinearDecay(Schedule):
    """``weight`` until ``start``, linearly down to ``final`` at ``end``, then ``final``."""

    weight: float
    start: int
    end: int
    final: float = 0.0
    kind = "linear_decay"

    def __post_init__(self) -> None:
        object.__setattr__(self, "weight", _check_weight(self.weight))
        _check_weight(self.final)
        if not 0 <= self.start < self.end:
            raise ConfigError(f"{self.kind}: need 0 <= start < end, got start={self.start}, end={self.end}")

    def _progress(self, step: int) -> float:
        return min(max((step - self.start) / (self.end - self.start), 0.0), 1.0)

    def __call__(self, step: int) -> float:
        p = self._progress(step)
        return self.weight + (self.final - self.weight) * p


@dataclass(frozen=True)
class CosineDecay(LinearDecay):
    """``weight`` until ``start``, half-cosine down to ``final`` at ``end``, then ``final``."""

    kind = "cosine_decay"

    def __call__(self, step: int) -> float:
        p = self._progress(step)
        return self.final + (self.weight - self.final) * 0.5 * (1.0 + math.cos(math.pi * p))


@dataclass(frozen=True)
class Warmup(Schedule):
    """Linear ramp from 0 at step 0 to ``weight`` at step ``steps``, then ``weight``."""

    weight: float
    steps: int
    kind = "warmup"

    def __post_init__(self) -> None:
        object.__setattr__(self, "weight", _check_weight(self.weight))
        if int(self.steps) <= 0:
            raise ConfigError(f"warmup: steps must be > 0, got {self.steps!r}")

    def __call__(self, step: int) -> float:
        return self.weight * min(step / self.steps, 1.0)


_KINDS = {cls.kind: cls for cls in (Constant, StopAt, LinearDecay, CosineDecay, Warmup)}


def __getattr__(name: str) -> Any:
    """The lower-case names of 0.1.0 (``stop_at``, ``warmup``, ...): deprecated aliases of the classes."""
    if name in _KINDS:
        cls = _KINDS[name]
        warnings.warn(
            f"repa.schedules.{name} is deprecated; use repa.schedules.{cls.__name__}", DeprecationWarning, stacklevel=2
        )
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def from_dict(spec: Dict[str, Any]) -> Schedule:
    """Rebuild a schedule from :meth:`Schedule.to_dict` output."""
    spec = dict(spec)
    kind = spec.pop("kind", None)
    if kind not in _KINDS:
        raise UnknownNameError(f"unknown schedule kind {kind!r}; choose from {sorted(_KINDS)}")
    return _KINDS[kind](**spec)


WeightLike = Union[float, int, Schedule, Callable[[int], float]]


def as_schedule(weight: WeightLike) -> Callable[[int], float]:
    """A float becomes :class:`Constant`; schedules and callables pass through."""
    if isinstance(weight, bool):
        raise ConfigError(f"weight must be a number, a schedule or a callable step -> float, got {weight!r}")
    if isinstance(weight, (int, float)):
        return Constant(float(weight))
    if callable(weight):
        return weight
    raise ConfigError(f"weight must be a number, a schedule or a callable step -> float, got {weight!r}")


def weight_at_step(schedule: Callable[[int], Any], step: int) -> float:
    """Evaluate ``schedule(step)`` and check the result: a finite number >= 0.

    Built-in schedules validate their parameters up front, but a user's callable can return
    anything; a NaN or negative weight would silently turn the alignment term into NaN or a
    reward for misalignment, so it stops here with the step and the value.
    """
    try:
        value = float(schedule(step))
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"the weight schedule {schedule!r} returned a non-number at step {step} ({exc}); "
            "it must return a float >= 0"
        ) from exc
    if not math.isfinite(value) or value < 0:
        raise ConfigError(
            f"the weight schedule {schedule!r} returned {value!r} at step {step}; a weight must be a finite number "
            ">= 0 (return 0.0 to switch the alignment term off)"
        )
    return value
