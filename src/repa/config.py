"""REPAConfig: the settings of a :class:`~repa.REPARegularizer`, in one validated dataclass.

The regularizer builds one from its resolved constructor arguments; ``save_pretrained`` writes
it as ``repa_config.json`` (``dataclasses.asdict``) and ``from_pretrained`` reads it back with
:meth:`REPAConfig.from_dict` and rebuilds the regularizer from :meth:`REPAConfig.to_kwargs`.
A new option is one new field here (and the constructor argument of the same name).

Files written by repa 0.1.0 load unchanged: their ``hidden_dims`` field is read as
``model_dims``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Type, TypeVar

from .errors import ConfigError, StateDictError
from .schedules import from_dict as schedule_from_dict

__all__ = ["REPAConfig", "CONFIG_NAME", "WEIGHTS_NAME", "read_saved_config", "settings_from_dict", "settings_kwargs"]

CONFIG_NAME = "repa_config.json"
WEIGHTS_NAME = "repa_projectors.safetensors"

#: keys of older files -> the field that replaced them
_LEGACY_KEYS = {"hidden_dims": "model_dims"}
#: keys written beside the settings that are not settings
_INFO_KEYS = {"repa_version"}


T = TypeVar("T")


def settings_from_dict(cls: Type[T], data: Mapping[str, Any], where: str) -> T:
    """Build the settings dataclass ``cls`` from a saved dict: ``cls(**data)`` with clear errors.

    Keys that are not settings (``repa_version``) are dropped; a missing required field or an
    unknown one (a newer repa's file) is a :class:`~repa.errors.ConfigError` naming it, and so
    is a value that ``cls.__post_init__`` rejects.
    """
    values = {k: v for k, v in data.items() if k not in _INFO_KEYS}
    all_fields = fields(cls)  # type: ignore[arg-type]
    missing = [
        f.name for f in all_fields
        if f.default is MISSING and f.default_factory is MISSING and f.name not in values
    ]
    if missing:
        raise ConfigError(f"{where} lacks the field(s) {missing}; save the regularizer again with save_pretrained(dir)")
    unknown = sorted(set(values) - {f.name for f in all_fields})
    if unknown:
        raise ConfigError(
            f"{where} holds unknown setting(s) {unknown} (written by repa {data.get('repa_version', '?')}); "
            "upgrade repa to load it, or save the regularizer again with this version"
        )
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:  # ConfigError from __post_init__ included
        raise ConfigError(f"{where} holds an invalid setting ({exc}); save the regularizer again") from exc


def settings_kwargs(settings: Any, exclude: Iterable[str] = ()) -> Dict[str, Any]:
    """The constructor keywords a settings dataclass stands for: every field but ``exclude``.

    ``weight`` (a schedule's ``to_dict()``) becomes the schedule again.
    """
    skip = set(exclude)
    kwargs = {f.name: getattr(settings, f.name) for f in fields(settings) if f.name not in skip}
    if isinstance(kwargs.get("weight"), dict):
        kwargs["weight"] = schedule_from_dict(kwargs["weight"])
    return kwargs


def _is_int(v: Any, low: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > low - 1


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_names(v: Any) -> bool:
    return isinstance(v, list) and len(v) > 0 and all(isinstance(x, str) for x in v)


def _is_grids(v: Any) -> bool:
    return v is None or (
        isinstance(v, dict)
        and all(isinstance(g, list) and len(g) in (2, 3) and all(_is_int(x, 1) for x in g) for g in v.values())
    )  # (h, w), or (t, h, w) for video


def _spec(check: Callable[[Any], bool], expected: str, optional: bool = False) -> Dict[str, Any]:
    """Field metadata: the type check, what it expects (for messages), whether old files may omit it."""
    return {"check": check, "expected": expected, "optional": optional}


# ------------------------------------------------------------------ value checks shared with the constructor
def check_mismatch(mismatch: Any) -> None:
    if mismatch not in ("interpolate", "error"):
        raise ConfigError(f"mismatch must be 'interpolate' or 'error', got {mismatch!r}")


def check_resample(resample: Any) -> None:
    if resample not in (None, "target", "model"):
        raise ConfigError(f"resample must be 'target' or 'model', got {resample!r}")


def check_input_range(input_range: Any) -> Tuple[float, float]:
    """``(low, high)`` as floats with ``low < high``."""
    try:
        lo, hi = (float(v) for v in input_range)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"input_range must be (low, high), e.g. (-1, 1), got {input_range!r}") from exc
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ConfigError(f"input_range must be (low, high) with low < high, got {input_range!r}")
    return lo, hi


def check_target_norm(target_norm: Any) -> None:
    if target_norm not in (None, "zscore"):
        raise ConfigError(f"target_norm must be None or 'zscore', got {target_norm!r}")


@dataclass
class REPAConfig:
    """Every setting of a :class:`~repa.REPARegularizer`, resolved (what ``reg.config`` shows).

    Attributes:
        layers: hooked module names, in order.
        encoders: encoder names (registry names when built from the registry).
        encoder_dims: each encoder's output width D_e.
        model_dims: each hooked layer's width D (``model_dim=`` of the constructor).
        weight: a number, a schedule's ``to_dict()`` or None (a callable, not saveable).
        projector: a projector name, or None for a factory (not saveable).
        projector_dim: the MLP projector's hidden width (REPA: 2048).
        loss: a loss name, or None for a callable (not saveable).
        grid: per layer ``[h, w]`` / ``[t, h, w]`` when given, else None.
        mismatch: ``"interpolate"`` or ``"error"``.
        input_range: ``[low, high]`` of float images.
        resample: ``"target"``, ``"model"`` or None (the preset's choice).
        options: the pieces' keyword options (``kernel_size``, ``target_norm``, ``alpha``, the
            losses' and videos' options) that are set.
    """

    layers: List[str] = field(metadata=_spec(_is_names, "a list of module names"))
    encoders: List[str] = field(metadata=_spec(_is_names, "a list of encoder names"))
    encoder_dims: List[int] = field(
        metadata=_spec(lambda v: isinstance(v, list) and all(_is_int(x, 1) for x in v), "a list of positive ints")
    )
    model_dims: Dict[str, int] = field(
        metadata=_spec(
            lambda v: isinstance(v, dict) and all(_is_int(x, 1) for x in v.values()), "an object layer -> int"
        )
    )
    weight: Any = field(
        default=0.5,
        metadata=_spec(
            lambda v: v is None or _is_number(v) or isinstance(v, dict), "a number, a schedule object or null"
        ),
    )
    projector: Optional[str] = field(
        default="mlp", metadata=_spec(lambda v: v is None or isinstance(v, str), "a projector name or null")
    )
    projector_dim: int = field(default=2048, metadata=_spec(lambda v: _is_int(v, 1), "a positive int"))
    loss: Optional[str] = field(
        default="cosine", metadata=_spec(lambda v: v is None or isinstance(v, str), "a loss name or null")
    )
    mismatch: str = field(
        default="interpolate", metadata=_spec(lambda v: isinstance(v, str), "'interpolate' or 'error'")
    )
    input_range: List[float] = field(
        default_factory=lambda: [0.0, 1.0],
        metadata=_spec(lambda v: isinstance(v, list) and len(v) == 2 and all(_is_number(x) for x in v), "[low, high]"),
    )
    grid: Optional[Dict[str, List[int]]] = field(
        default=None, metadata=_spec(_is_grids, "null or an object layer -> [h, w] or [t, h, w]", optional=True)
    )
    resample: Optional[str] = field(
        default=None,
        metadata=_spec(lambda v: v is None or isinstance(v, str), "'target', 'model' or null", optional=True),
    )
    options: Dict[str, Any] = field(
        default_factory=dict,
        metadata=_spec(lambda v: v is None or isinstance(v, dict), "an object of options", optional=True),
    )

    def __post_init__(self) -> None:
        wrong = self.wrong_types(asdict(self))
        if wrong:
            raise ConfigError(f"REPAConfig got values of the wrong type: {'; '.join(wrong)}")
        if self.options is None:
            self.options = {}
        if len(self.encoder_dims) != len(self.encoders):
            raise ConfigError(
                f"encoder_dims {self.encoder_dims} must give one width per encoder {self.encoders}"
            )
        if sorted(self.model_dims) != sorted(self.layers):
            raise ConfigError(f"model_dims must give one width per layer {self.layers}, got {self.model_dims}")
        check_mismatch(self.mismatch)
        check_resample(self.resample)
        self.input_range = list(check_input_range(self.input_range))
        check_target_norm(self.options.get("target_norm"))
        unknown_grids = sorted(set(self.grid or {}) - set(self.layers))
        if unknown_grids:
            raise ConfigError(f"grid has entries for unknown layers {unknown_grids}; hooked layers are {self.layers}")

    @staticmethod
    def wrong_types(values: Mapping[str, Any]) -> List[str]:
        """``"name=value (expected ...)"`` for each present field whose value has the wrong type."""
        return [
            f"{f.name}={values[f.name]!r} (expected {f.metadata['expected']})"
            for f in fields(REPAConfig)
            if f.name in values and not f.metadata["check"](values[f.name])
        ]

    # ------------------------------------------------------------------ serialization
    def to_dict(self) -> Dict[str, Any]:
        """The JSON-serializable settings (``dataclasses.asdict``)."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "the config") -> REPAConfig:
        """Read settings written by :meth:`to_dict` (or by repa 0.1.0), checked field by field.

        Raises:
            ConfigError: missing fields, unknown fields (a newer repa's file) or values of the
                wrong type; each message names them and ``where`` they came from.
        """
        values = {_LEGACY_KEYS.get(k, k): v for k, v in data.items() if k not in _INFO_KEYS}
        names = [f.name for f in fields(cls)]
        missing = [f.name for f in fields(cls) if not f.metadata["optional"] and f.name not in values]
        if missing:
            raise ConfigError(
                f"{where} lacks the field(s) {missing}; save the regularizer again with reg.save_pretrained(dir)"
            )
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ConfigError(
                f"{where} holds unknown setting(s) {unknown} (written by repa {data.get('repa_version', '?')}); "
                "upgrade repa to load it, or save the regularizer again with this version"
            )
        wrong = cls.wrong_types(values)
        if wrong:
            raise ConfigError(f"{where} holds values of the wrong type: {'; '.join(wrong)}; save the regularizer again")
        try:
            return cls(**values)
        except ConfigError as exc:
            raise ConfigError(f"{where} holds an invalid setting ({exc}); save the regularizer again") from exc

    def to_kwargs(self) -> Dict[str, Any]:
        """Keyword arguments of ``REPARegularizer(model, layers, encoders, **kwargs)`` that rebuild it.

        Raises:
            TypeError, ValueError: a saved schedule with unknown fields.
        """
        skip = {"layers", "encoders", "encoder_dims", "model_dims", "options", "weight", "grid", "input_range"}
        kwargs: Dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        kwargs["weight"] = schedule_from_dict(self.weight) if isinstance(self.weight, dict) else self.weight
        kwargs["grid"] = {k: tuple(v) for k, v in (self.grid or {}).items()} or None
        kwargs["input_range"] = tuple(self.input_range)
        kwargs["model_dim"] = dict(self.model_dims)
        kwargs.update(self.options)
        return kwargs


def read_saved_config(config_path: str, weights_path: str) -> REPAConfig:
    """The config ``save_pretrained`` wrote: ``repa_config.json``, else the weights file's metadata.

    Raises:
        ConfigError: not valid JSON, not an object, missing or unknown fields, values of the
            wrong type.
        StateDictError: neither the JSON file nor the weights file's metadata holds a config.
    """
    if os.path.isfile(config_path):
        try:
            with open(config_path, encoding="utf-8") as fh:
                text = fh.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read {config_path!r} ({type(exc).__name__}: {exc})") from exc
        where = repr(config_path)
    else:  # save_pretrained also stores the config in the safetensors metadata
        from safetensors import safe_open

        try:
            with safe_open(weights_path, "pt") as fh:
                stored = (fh.metadata() or {}).get("repa_config")
        except Exception as exc:  # SafetensorError
            raise StateDictError(
                f"cannot read {weights_path!r} ({type(exc).__name__}: {exc}); the file is damaged"
            ) from exc
        if stored is None:
            raise StateDictError(
                f"no {CONFIG_NAME} beside {weights_path!r} and no config in its metadata; save the regularizer "
                "again with reg.save_pretrained(dir)"
            )
        text, where = stored, f"the metadata of {weights_path!r}"
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ConfigError(
            f"{where} is not valid JSON ({exc}); restore it (save_pretrained also stores it in the metadata of "
            f"{WEIGHTS_NAME}: delete the damaged file to use that copy) or save the regularizer again"
        ) from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must hold a JSON object of settings, got {type(data).__name__}")
    return REPAConfig.from_dict(data, where)
