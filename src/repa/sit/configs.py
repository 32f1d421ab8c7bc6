"""Configurations of ``repa train``: the settings dataclass, the built-in recipes, config files.

A run's settings are resolved in three layers, later ones winning:

1. the defaults of :class:`TrainConfig` (the offline CPU demo: SiT-T/4 + REPA on Fashion-MNIST);
2. ``--config NAME`` (a built-in recipe from :data:`CONFIGS`) or ``--config FILE.json``
   (a JSON object of :class:`TrainConfig` fields; ``"base": "imagenet256"`` starts from a recipe);
3. the flags given on the command line.

``imagenet256`` is the paper's recipe (REPA_FACTS sections 2-3): SiT-XL/2 on 32x32x4 SD-VAE
latents of ImageNet 256, DINOv2-B aligned at encoder depth 8, lambda 0.5, batch 256, AdamW
1e-4 constant, betas (0.9, 0.999), no weight decay, grad clip 1.0, EMA 0.9999, fp16, class
dropout 0.1, linear path, uniform time, 4M steps.

Encoder depth is 1-based as in the paper and the reference flag: ``--encoder-depth 8`` aligns
the output of the 8th block, module ``blocks.7``, i.e. ``REPARegularizer(..., layers=7)``
(:meth:`TrainConfig.repa_layer` does the conversion).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from ..errors import ConfigError, UnknownNameError
from .models import SiT, SiT_models, create_sit
from .sampling import METHODS
from .transport import PATHS, TIME_SAMPLERS

__all__ = [
    "TrainConfig",
    "CONFIGS",
    "MIXED_PRECISION",
    "TRAIN_MODELS",
    "model_names",
    "build_model",
    "load_config",
    "resolve_config",
]

MIXED_PRECISION = ("no", "fp16", "bf16")

#: Extra sizes for small images, built through ``create_sit`` overrides:
#: name -> (registered base name, overrides). "T" (tiny): depth 6, width 128, 4 heads, made for
#: 28x28 Fashion-MNIST (patch 4 -> 7x7 tokens, the grid of the fmnist-vit teacher).
TRAIN_MODELS: Dict[str, Tuple[str, Dict[str, Any]]] = {
    "SiT-T/2": ("SiT-S/2", dict(depth=6, hidden_size=128, num_heads=4, input_size=28)),
    "SiT-T/4": ("SiT-S/4", dict(depth=6, hidden_size=128, num_heads=4, input_size=28)),
    "SiT-T/7": ("SiT-S/4", dict(depth=6, hidden_size=128, num_heads=4, input_size=28, patch_size=7)),
}


def model_names() -> List[str]:
    """Every ``--model`` value: the SiT sizes of :mod:`repa.sit.models` and the tiny training sizes."""
    return list(SiT_models) + list(TRAIN_MODELS)


def build_model(name: str, **kwargs: Any) -> SiT:
    """A SiT by ``--model`` name (``"SiT-XL/2"``, ``"SiT-T/4"``, ...); ``kwargs`` are :class:`SiT` arguments."""
    if name in TRAIN_MODELS:
        base, overrides = TRAIN_MODELS[name]
        return create_sit(base, **{**overrides, **kwargs})
    if name not in SiT_models:
        raise UnknownNameError(f"unknown model {name!r}; valid names are {', '.join(model_names())}")
    return create_sit(name, **kwargs)


#: the representation objectives ``--regularizer`` combines, in the order they are added
OBJECTIVES = ("repa", "dispersive", "sra", "vae")


@dataclass
class TrainConfig:
    """Every setting of ``repa train``; field ``foo_bar`` is the flag ``--foo-bar``.

    The defaults are the offline CPU demo (a few minutes on 2 cores): a 1.9M-parameter SiT-T/4
    on 28x28 Fashion-MNIST pixels, REPA at block 2 with the fmnist-vit teacher (lambda 4, a
    128-wide projector), 1000 steps of 64 images. Its EMA decay (0.99) suits a 1000-step run;
    the paper's 0.9999 is for millions of steps.
    """

    # model
    model: str = "SiT-T/4"
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    # data
    data: Optional[str] = None
    resolution: Optional[int] = None
    vae: Optional[str] = None
    latent_scale: float = 0.18215
    num_workers: int = 0
    skip_bad_images: bool = False
    verify_cache: bool = True  # a feature cache --data: sha256 of each shard before its first read
    # REPA
    repa: bool = True
    enc_type: str = "fmnist-vit"
    enc_weights: Optional[str] = None
    encoder_depth: int = 2
    # the demo's lambda and projector width: what benchmarks/convergence_sweep.py found at this
    # scale (the paper's 0.5 gains 1.08x here, 4.0 1.28x; a 128-wide projector costs nothing);
    # the imagenet256 configs set the paper's 0.5 and 2048
    proj_coeff: float = 4.0
    projector_dim: int = 128
    # representation objectives (repa, dispersive, sra, vae, none; comma-separated to combine)
    regularizer: str = "repa"
    disp_weight: float = 0.5
    disp_variant: str = "infonce-l2"
    disp_temperature: float = 0.5
    disp_depth: Optional[int] = None
    sra_weight: float = 0.2
    sra_student_depth: Optional[int] = None
    sra_teacher_depth: Optional[int] = None
    sra_max_gap: float = 0.2
    vae_weight: float = 0.5
    vae_depth: Optional[int] = None
    # objective
    path_type: str = "linear"
    weighting: str = "uniform"
    cfg_prob: float = 0.1
    # optimization
    batch_size: int = 64
    learning_rate: float = 1e-3
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 0.0
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    ema_decay: float = 0.99
    mixed_precision: str = "no"
    allow_tf32: bool = False
    max_train_steps: int = 1000
    seed: int = 0
    # outputs
    output_dir: str = "runs"
    exp_name: Optional[str] = None
    checkpointing_steps: int = 500
    log_every: int = 10
    sample_every: int = 500
    sample_count: int = 100
    sample_steps: int = 50
    sample_mode: str = "ode"
    sample_cfg: float = 1.0
    tensorboard: bool = False
    resume: Optional[str] = None
    # start from an official REPA checkpoint (weights of the SiT, its EMA and the projectors)
    init_from: Optional[str] = None
    # which recipe these settings came from (set by resolve_config; part of the default run name)
    config_name: str = "fmnist"

    # ------------------------------------------------------------------ derived values
    @property
    def encoder_names(self) -> List[str]:
        """``--enc-type`` split on commas (REPA's reference accepts several encoders)."""
        return [n.strip() for n in self.enc_type.split(",") if n.strip()]

    @property
    def objectives(self) -> List[str]:
        """``--regularizer`` split on commas, in a fixed order; ``--no-repa`` removes ``repa``."""
        names = [n.strip().lower() for n in self.regularizer.split(",") if n.strip()]
        chosen = [n for n in OBJECTIVES if n in names]
        return [n for n in chosen if n != "repa" or self.repa]

    def objective_depths(self, num_blocks: int) -> Dict[str, int]:
        """1-based block depths of the objectives, with the papers' defaults filled in.

        Dispersive: num_blocks // 4 (the paper's JAX runs); SRA: student at --encoder-depth,
        teacher at twice that (SiT-B/2: 4 -> 8 in the paper), capped at the last block; VAE:
        --encoder-depth.
        """
        student = self.sra_student_depth or self.encoder_depth
        return {
            "dispersive": self.disp_depth or max(1, num_blocks // 4),
            "sra_student": student,
            "sra_teacher": self.sra_teacher_depth or min(num_blocks, 2 * student),
            "vae": self.vae_depth or self.encoder_depth,
        }

    def repa_layer(self) -> int:
        """The 0-based block index for ``REPARegularizer(layers=...)``: encoder depth 8 -> 7 (``blocks.7``)."""
        return self.encoder_depth - 1

    @property
    def run_name(self) -> str:
        """``exp_name``, or ``<config>-<model>-repa`` / ``-baseline``."""
        if self.exp_name:
            return self.exp_name
        model = self.model.lower().replace("/", "")
        return f"{self.config_name}-{model}-{'+'.join(self.objectives) or 'baseline'}"

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ validation
    def validate(self) -> TrainConfig:
        """Check every value; raises :class:`ConfigError` naming the field, the value and the choices."""
        choices: Dict[str, Tuple[Any, ...]] = {
            "model": tuple(model_names()),
            "path_type": tuple(PATHS),
            "weighting": tuple(TIME_SAMPLERS),
            "mixed_precision": MIXED_PRECISION,
            "sample_mode": tuple(METHODS),
        }
        for name, allowed in choices.items():
            value = getattr(self, name)
            if value not in allowed:
                cls = UnknownNameError if name == "model" else ConfigError
                raise cls(f"--{_flag(name)} {value!r} is not valid; choose from {', '.join(map(str, allowed))}")
        positive = [
            "batch_size", "max_train_steps", "checkpointing_steps", "log_every", "sample_every",
            "sample_count", "sample_steps", "projector_dim", "encoder_depth",
        ]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"--{_flag(name)} must be a positive integer, got {value!r}")
        floats = [
            "latent_scale", "proj_coeff", "cfg_prob", "learning_rate", "adam_beta1", "adam_beta2",
            "adam_weight_decay", "adam_epsilon", "max_grad_norm", "ema_decay", "sample_cfg",
        ]
        for name in floats:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"--{_flag(name)} must be a finite number, got {value!r}")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ConfigError(f"--num-workers must be >= 0, got {self.num_workers!r}")
        if not 0.0 <= self.cfg_prob < 1.0:
            raise ConfigError(f"--cfg-prob must lie in [0, 1), got {self.cfg_prob} (REPA: 0.1)")
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ConfigError(f"--ema-decay must lie in [0, 1], got {self.ema_decay} (REPA: 0.9999)")
        if self.learning_rate <= 0:
            raise ConfigError(f"--learning-rate must be > 0, got {self.learning_rate}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"--{_flag(name)} must lie in [0, 1), got {getattr(self, name)} (REPA: 0.9 / 0.999)")
        if self.adam_epsilon <= 0 or self.adam_weight_decay < 0:
            raise ConfigError(
                f"--adam-epsilon must be > 0 and --adam-weight-decay >= 0, got {self.adam_epsilon} and "
                f"{self.adam_weight_decay}"
            )
        if self.proj_coeff < 0:
            raise ConfigError(f"--proj-coeff must be >= 0, got {self.proj_coeff} (REPA: 0.5)")
        names = [n.strip().lower() for n in self.regularizer.split(",") if n.strip()]
        unknown = [n for n in names if n not in (*OBJECTIVES, "none")]
        if unknown or not names or ("none" in names and len(names) > 1):
            raise ConfigError(
                f"--regularizer {self.regularizer!r} is not valid; use one of {', '.join((*OBJECTIVES, 'none'))} "
                "or several comma-separated (e.g. repa,dispersive)"
            )
        for name in ("disp_depth", "sra_student_depth", "sra_teacher_depth", "vae_depth"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"--{_flag(name)} must be a positive integer (1-based block), got {value!r}")
        for name in ("disp_weight", "sra_weight", "vae_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{_flag(name)} must be >= 0, got {getattr(self, name)}")
        if self.disp_temperature <= 0:
            raise ConfigError(f"--disp-temperature must be > 0, got {self.disp_temperature} (the paper: 0.5)")
        if not 0.0 <= self.sra_max_gap <= 1.0:
            raise ConfigError(f"--sra-max-gap must lie in [0, 1], got {self.sra_max_gap} (the paper: 0.2)")
        from ..dispersive import DISPERSIVE_VARIANTS

        if self.disp_variant not in DISPERSIVE_VARIANTS:
            raise ConfigError(f"--disp-variant {self.disp_variant!r} is not valid; choose from {', '.join(DISPERSIVE_VARIANTS)}")
        if self.repa and "repa" in names and not self.encoder_names:
            raise ConfigError("--enc-type is empty; name an encoder (e.g. dinov2-vit-b) or pass --no-repa")
        if self.enc_weights is not None and len(self.encoder_names) != 1:
            raise ConfigError(
                f"--enc-weights loads one file but --enc-type names {len(self.encoder_names)} encoders; "
                "use one encoder, or put each encoder's weights where `repa encoders` looks"
            )
        if not isinstance(self.model_kwargs, dict):
            raise ConfigError(f"model_kwargs must be a JSON object of SiT arguments, got {self.model_kwargs!r}")
        derived = sorted(set(self.model_kwargs) & {"input_size", "in_channels", "num_classes", "class_dropout_prob"})
        if derived:
            raise ConfigError(
                f"model_kwargs may not set {derived}: input size, channels and classes follow from the data, "
                "the label dropout from --cfg-prob; remove them"
            )
        _check_model_kwargs(self.model_kwargs)
        return self


# range checks of the SiT arguments --model-kwargs may set (any other SiT argument is accepted as is)
_MODEL_KWARG_CHECKS = {
    "depth": ("a positive integer (number of blocks)", lambda v: _is_int(v) and v >= 1),
    "hidden_size": ("a positive integer", lambda v: _is_int(v) and v >= 1),
    "num_heads": ("a positive integer", lambda v: _is_int(v) and v >= 1),
    "patch_size": ("a positive integer", lambda v: _is_int(v) and v >= 1),
    "mlp_ratio": ("a positive number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0),
    "learn_sigma": ("true or false", lambda v: isinstance(v, bool)),
    "qk_norm": ("true, false, or a norm name", lambda v: isinstance(v, (bool, str))),
}
_DERIVED_KWARGS = ("input_size", "in_channels", "num_classes", "class_dropout_prob")


def _model_kwarg_names() -> List[str]:
    """The SiT constructor's arguments that --model-kwargs may set."""
    import inspect

    return [n for n in inspect.signature(SiT.__init__).parameters if n not in ("self", *_DERIVED_KWARGS)]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_model_kwargs(kwargs: Mapping[str, Any]) -> None:
    """Unknown or out-of-range ``--model-kwargs`` are a :class:`ConfigError` naming the key and the valid ones."""
    for key, value in kwargs.items():
        valid = _model_kwarg_names()
        if key not in valid:
            import difflib

            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"--model-kwargs: unknown SiT argument {key!r}{hint}; valid keys are {', '.join(valid)}")
        what, ok = _MODEL_KWARG_CHECKS.get(key, ("", lambda v: True))
        if not ok(value):
            raise ConfigError(f"--model-kwargs: {key} must be {what}, got {value!r}")
    if "hidden_size" in kwargs and "num_heads" in kwargs and kwargs["hidden_size"] % kwargs["num_heads"]:
        raise ConfigError(
            f"--model-kwargs: hidden_size {kwargs['hidden_size']} is not divisible by num_heads {kwargs['num_heads']}"
        )


def _flag(name: str) -> str:
    return name.replace("_", "-")


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(TrainConfig))

#: Built-in recipes: name -> field overrides of the :class:`TrainConfig` defaults.
CONFIGS: Dict[str, Dict[str, Any]] = {
    # the offline CPU demo: the TrainConfig defaults as they are
    "fmnist": {},
    # REPA's ImageNet 256 recipe for SiT-XL/2 (REPA_FACTS sections 2-4): FID 5.9 without CFG,
    # 1.42 with CFG 1.8 + guidance interval, at 4M iterations
    "imagenet256": dict(
        model="SiT-XL/2",
        resolution=256,
        vae="stabilityai/sd-vae-ft-ema",
        num_workers=4,
        enc_type="dinov2-vit-b",
        encoder_depth=8,
        proj_coeff=0.5,
        projector_dim=2048,
        path_type="linear",
        weighting="uniform",
        cfg_prob=0.1,
        batch_size=256,
        learning_rate=1e-4,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_weight_decay=0.0,
        adam_epsilon=1e-8,
        max_grad_norm=1.0,
        ema_decay=0.9999,
        mixed_precision="fp16",
        allow_tf32=True,
        max_train_steps=4_000_000,
        checkpointing_steps=50_000,
        log_every=100,
        sample_every=10_000,
        sample_count=64,
        sample_steps=50,
        sample_mode="ode",
        sample_cfg=1.0,
    ),
    # the same recipe for SiT-B/2 (encoder depth 4, the paper's 400K-step comparison)
    "imagenet256-sit-b2": dict(
        base="imagenet256",
        config_name="imagenet256",
        model="SiT-B/2",
        encoder_depth=4,
        max_train_steps=400_000,
    ),
}


def _normalize_keys(raw: Mapping[str, Any], origin: str) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name == "no_repa":  # accept the flag's spelling
            name, value = "repa", not value
        if name not in FIELD_NAMES and name != "base":
            import difflib

            close = difflib.get_close_matches(name, FIELD_NAMES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{origin}: unknown setting {key!r}{hint}; valid settings are {', '.join(FIELD_NAMES)}")
        out[name] = value
    return out


def load_config(name_or_path: str, _seen: Optional[List[str]] = None) -> Dict[str, Any]:
    """The field overrides of a built-in recipe or of a JSON config file (``"base"`` resolved)."""
    seen = list(_seen or [])
    if name_or_path in seen:
        raise ConfigError(f"config 'base' chain loops: {' -> '.join(seen + [name_or_path])}")
    seen.append(name_or_path)
    if name_or_path in CONFIGS:
        raw: Dict[str, Any] = dict(CONFIGS[name_or_path])
        origin, stem = f"config {name_or_path!r}", name_or_path
    else:
        path = Path(os.path.expanduser(name_or_path))
        if not path.is_file():
            raise UnknownNameError(
                f"--config {name_or_path!r} is neither a built-in config ({', '.join(CONFIGS)}) nor a JSON file"
            )
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a JSON object of settings, got {type(raw).__name__}")
        origin, stem = f"config file {str(path)!r}", path.stem
    values = _normalize_keys(raw, origin)
    base = values.pop("base", None)
    merged = load_config(base, seen) if base else {}
    merged.update(values)
    if "config_name" not in values:  # the outermost config names the run
        merged["config_name"] = stem
    return merged


def resolve_config(config: Optional[str] = None, overrides: Optional[Mapping[str, Any]] = None) -> TrainConfig:
    """Defaults <- ``config`` (built-in name or JSON file) <- ``overrides`` (the given flags), validated."""
    values: Dict[str, Any] = load_config(config) if config else {}
    if overrides:
        values.update(_normalize_keys(overrides, "flags"))
    return TrainConfig(**values).validate()
