"""Checkpoints of REPA's official code (github.com/sihyun-yu/REPA): read them, sample, probe, fine-tune.

Three layouts exist, all read with ``torch.load(weights_only=True)`` (``argparse.Namespace``
is the only class allowed, for the training checkpoints' ``args``):

- **the released model** (``last.pt``, SiT-XL/2 + REPA at 4M iterations, FID 1.42): a bare
  state dict of the EMA SiT, its projectors included as ``projectors.{i}.{0,2,4}.{weight,bias}``
  (one Linear-SiLU-Linear-SiLU-Linear per encoder). It carries no settings: the model size,
  path and encoder come from flags (defaults: the paper's SiT-XL/2, linear path, DINOv2-B at
  depth 8), and shapes that do not fit them are an error naming the fix.
- **training checkpoints** of the reference's ``train.py``: ``{"model", "ema", "opt", "args",
  "steps"}`` with ``args`` its ``argparse.Namespace``; the args map onto ``repa``'s settings
  (:func:`official_train_settings`).
- **legacy** checkpoints (either of the above) whose blocks after the aligned depth are named
  ``decoder_blocks.{j}``; they are ``blocks.{j + encoder_depth}`` and are renamed on reading
  (the reference's ``--legacy``). The legacy model kept ``encoder_depth`` blocks in ``blocks``,
  so the depth is read off the names.

The SiT's parameter names are the reference's (``repa.sit.models``), so its weights load by
name once the projectors are split off; ``repa``'s MLP projector has the same ``0, 2, 4``
Linears, so :func:`load_official_projectors` loads them into a :class:`REPARegularizer`.

    repa sample --ckpt last.pt --mode sde --steps 250 --cfg-scale 1.8 --guidance-high 0.7
    repa probe --ckpt last.pt --encoder dinov2-vit-b --data IMAGES
    repa train --config imagenet256 --data LATENTS --init-from 0400000.pt
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from .configs import build_model, model_names

__all__ = [
    "OFFICIAL_DEFAULTS",
    "OfficialCheckpoint",
    "read_official_checkpoint",
    "convert_legacy_state_dict",
    "split_projectors",
    "infer_sit_shape",
    "official_sit",
    "official_train_settings",
    "load_official_projectors",
    "init_from_official",
    "to_repa_checkpoint",
    "load_any_checkpoint",
    "add_official_arguments",
]

logger = logging.getLogger("repa")
PathLike = Union[str, "os.PathLike[str]"]

#: What the released ``last.pt`` was trained and is sampled with (the reference's defaults).
OFFICIAL_DEFAULTS: Dict[str, Any] = dict(
    model="SiT-XL/2",
    enc_type="dinov2-vit-b",
    encoder_depth=8,
    path_type="linear",
    resolution=256,
    vae="stabilityai/sd-vae-ft-ema",  # generate.py's default --vae ema
    latent_scale=0.18215,
)

_PROJ = re.compile(r"^projectors\.(\d+)\.(.+)$")
_DECODER = re.compile(r"^decoder_blocks\.(\d+)\.(.+)$")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")

# reference train.py argument -> repa TrainConfig field, for the settings that carry over
_ARG_TO_SETTING = {
    "model": "model",
    "enc_type": "enc_type",
    "encoder_depth": "encoder_depth",
    "proj_coeff": "proj_coeff",
    "path_type": "path_type",
    "weighting": "weighting",
    "cfg_prob": "cfg_prob",
    "resolution": "resolution",
    "batch_size": "batch_size",
    "learning_rate": "learning_rate",
    "adam_beta1": "adam_beta1",
    "adam_beta2": "adam_beta2",
    "adam_weight_decay": "adam_weight_decay",
    "adam_epsilon": "adam_epsilon",
    "max_grad_norm": "max_grad_norm",
    "mixed_precision": "mixed_precision",
    "allow_tf32": "allow_tf32",
    "seed": "seed",
}


@dataclass
class OfficialCheckpoint:
    """An official checkpoint, read and normalized to ``repa``'s names.

    ``model`` / ``ema`` are SiT state dicts without the projectors (for the released bare state
    dict both are its EMA weights); ``projectors`` / ``ema_projectors`` hold one state dict per
    encoder with keys ``"0.weight"`` ... ``"4.bias"``.
    """

    path: Path
    layout: str  # "state_dict" (the released EMA weights) or "train" (train.py's dict)
    legacy: bool
    model: Dict[str, torch.Tensor]
    ema: Dict[str, torch.Tensor]
    projectors: List[Dict[str, torch.Tensor]]
    ema_projectors: List[Dict[str, torch.Tensor]]
    args: Optional[Dict[str, Any]] = None
    steps: int = 0
    shape: Dict[str, Any] = field(default_factory=dict)

    @property
    def projector_dims(self) -> List[Tuple[int, int, int]]:
        """(in, hidden, out) widths of each projector."""
        out = []
        for p in self.ema_projectors:
            w0, w4 = p.get("0.weight"), p.get("4.weight")
            if w0 is None or w4 is None:
                raise CheckpointError(
                    f"{str(self.path)!r}: projector keys {sorted(p)} are not the reference's Linear-SiLU-Linear-SiLU-Linear "
                    "(0, 2, 4); this is not a REPA checkpoint"
                )
            out.append((int(w0.shape[1]), int(w0.shape[0]), int(w4.shape[0])))
        return out


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _torch_load(path: PathLike) -> Any:
    """``torch.load(weights_only=True)`` allowing ``argparse.Namespace`` and nothing else.

    Memory-mapped where the file allows it (zip format), so reading a large file to find out
    what it is costs little.
    """
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            try:
                return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except FileNotFoundError:
                raise
            except Exception:  # not a zip-format file (cannot be mapped): read it whole
                return torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist; pass the path of the .pt file") from None
    except Exception as exc:
        raise CheckpointError(
            f"cannot read {str(path)!r} as a checkpoint with weights_only=True ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); only tensors, plain containers and argparse.Namespace "
            "are accepted (nothing else is unpickled)"
        ) from exc


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _official_layout(obj: Any) -> Optional[str]:
    """``"state_dict"``, ``"train"`` or None (not an official checkpoint)."""
    if isinstance(obj, Mapping) and "format" in obj:
        return None  # repa's own
    if _is_state_dict(obj) and "x_embedder.proj.weight" in obj:
        return "state_dict"
    if isinstance(obj, Mapping) and {"model", "ema", "args", "steps"} <= set(obj) and _is_state_dict(obj.get("ema")):
        return "train"
    return None


def convert_legacy_state_dict(
    state: Mapping[str, torch.Tensor], encoder_depth: Optional[int] = None
) -> Tuple[Dict[str, torch.Tensor], bool]:
    """Rename ``decoder_blocks.{j}.*`` to ``blocks.{j + encoder_depth}.*``; returns (state, was_legacy).

    A legacy model kept the first ``encoder_depth`` blocks in ``blocks``, so the depth is the
    number of ``blocks.{i}`` found; a given ``encoder_depth`` must agree with it.
    """
    if not any(_DECODER.match(k) for k in state):
        return dict(state), False
    found = len({int(m.group(1)) for k in state if (m := _BLOCK.match(k))})
    if encoder_depth is not None and int(encoder_depth) != found:
        raise CheckpointError(
            f"legacy checkpoint: it holds {found} encoder blocks before its decoder_blocks, but encoder depth "
            f"{encoder_depth} was given; pass --encoder-depth {found} (or drop the flag)"
        )
    out: Dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = _DECODER.match(key)
        out[f"blocks.{int(m.group(1)) + found}.{m.group(2)}" if m else key] = value
    return out, True


def split_projectors(state: Mapping[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], List[Dict[str, torch.Tensor]]]:
    """A reference SiT state dict -> (SiT weights, [projector i's ``{"0.weight": ...}``])."""
    sit: Dict[str, torch.Tensor] = {}
    projs: Dict[int, Dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        m = _PROJ.match(key)
        if m:
            projs.setdefault(int(m.group(1)), {})[m.group(2)] = value
        else:
            sit[key] = value
    if projs and sorted(projs) != list(range(len(projs))):
        raise CheckpointError(f"projector indices {sorted(projs)} are not 0..{len(projs) - 1}; the checkpoint is damaged")
    return sit, [projs[i] for i in range(len(projs))]


def infer_sit_shape(state: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    """What the SiT weights say about the model: depth, width, patch, channels, input size, classes, qk-norm.

    The number of heads is not in the weights (it comes from the model name).
    """
    try:
        conv = state["x_embedder.proj.weight"]  # (D, C, p, p)
        pos = state["pos_embed"]  # (1, N, D)
        table = state["y_embedder.embedding_table.weight"]  # (num_classes + 1, D)
        fc1 = state["blocks.0.mlp.fc1.weight"]  # (r D, D)
    except KeyError as exc:
        raise CheckpointError(f"the weights lack {exc.args[0]!r}: not a SiT checkpoint of the REPA code") from None
    hidden, channels, patch = int(conv.shape[0]), int(conv.shape[1]), int(conv.shape[2])
    side = int(round(int(pos.shape[1]) ** 0.5))
    return dict(
        depth=len({int(m.group(1)) for k in state if (m := _BLOCK.match(k))}),
        hidden_size=hidden,
        patch_size=patch,
        in_channels=channels,
        input_size=side * patch,
        table_rows=int(table.shape[0]),
        mlp_ratio=int(fc1.shape[0]) / hidden,
        qk_norm="blocks.0.attn.q_norm.weight" in state,
    )


def _size_of(name: str) -> Tuple[int, int, int]:
    """(depth, width, patch) of the ``--model`` size ``name``."""
    with torch.device("meta"):
        m = build_model(name, input_size=56, in_channels=1, num_classes=1)  # 56: divisible by every patch size
    return len(m.blocks), m.hidden_size, m.patch_size


def _size_name(shape: Mapping[str, Any]) -> Optional[str]:
    """The SiT size whose depth, width and patch match ``shape`` (e.g. ``"SiT-XL/2"``), or None."""
    want = (shape["depth"], shape["hidden_size"], shape["patch_size"])
    for name in model_names():
        if _size_of(name) == want:
            return name
    return None


def read_official_checkpoint(path: PathLike, *, encoder_depth: Optional[int] = None, obj: Any = None) -> OfficialCheckpoint:
    """Read an official checkpoint of any of the three layouts (see the module docstring).

    Raises :class:`CheckpointError` for a file that is none of them (a ``repa train``
    checkpoint included: load those with :func:`repa.sit.checkpoint.load_checkpoint`).
    """
    path = Path(path)
    if obj is None:
        obj = _torch_load(path)
    layout = _official_layout(obj)
    if layout is None:
        raise CheckpointError(
            f"{str(path)!r} is not a checkpoint of the official REPA code: expected its released EMA state dict "
            "(x_embedder.*, blocks.*, projectors.*) or a train.py checkpoint (model, ema, opt, args, steps)"
        )
    args: Optional[Dict[str, Any]] = None
    steps = 0
    if layout == "train":
        raw_args = obj.get("args")
        args = vars(raw_args) if isinstance(raw_args, argparse.Namespace) else dict(raw_args or {})
        steps = int(obj.get("steps") or 0)
        if encoder_depth is None and args.get("encoder_depth") is not None:
            encoder_depth = int(args["encoder_depth"])
        ema_state, model_state = obj["ema"], obj["model"]
        if not _is_state_dict(model_state):
            raise CheckpointError(f"{str(path)!r}: its 'model' entry is not a state dict of tensors")
    else:
        ema_state = model_state = obj
    ema_state, legacy = convert_legacy_state_dict(ema_state, encoder_depth)
    model_state, _ = convert_legacy_state_dict(model_state, encoder_depth)
    ema_sit, ema_projs = split_projectors(ema_state)
    model_sit, model_projs = split_projectors(model_state)
    ckpt = OfficialCheckpoint(
        path=path, layout=layout, legacy=legacy, model=model_sit, ema=ema_sit, projectors=model_projs,
        ema_projectors=ema_projs, args=args, steps=steps, shape=infer_sit_shape(ema_sit),
    )
    _ = ckpt.projector_dims  # validates the projector keys
    return ckpt


# --------------------------------------------------------------------------------------------
# The SiT and the settings
# --------------------------------------------------------------------------------------------


def official_sit(ckpt: OfficialCheckpoint, model: Optional[str] = None, class_dropout_prob: float = 0.1) -> Tuple[str, Dict[str, Any]]:
    """``(model name, SiT kwargs)`` that rebuild the checkpoint's SiT with ``build_model``.

    ``model`` is the size name (the flag ``--model``; a training checkpoint's ``args.model``
    otherwise; else the size matching the weights' depth, width and patch). A name that does not
    fit the weights raises :class:`CheckpointError` naming the size that does.
    """
    shape = ckpt.shape
    guess = _size_name(shape)
    name = model or (ckpt.args or {}).get("model") or guess
    if name is None:
        raise CheckpointError(
            f"{str(ckpt.path)!r}: no SiT size has depth {shape['depth']}, width {shape['hidden_size']} and patch "
            f"{shape['patch_size']}; the checkpoint is not a SiT of the REPA code"
        )
    if name not in model_names():
        raise CheckpointError(f"model {name!r} is not a SiT size; choose from {', '.join(model_names())}")
    depth, width, patch = _size_of(name)
    if (depth, width, patch) != (shape["depth"], shape["hidden_size"], shape["patch_size"]):
        hint = f"pass --model {guess}" if guess else "pass the --model it was trained as"
        raise CheckpointError(
            f"{str(ckpt.path)!r} holds a SiT of depth {shape['depth']}, width {shape['hidden_size']}, patch "
            f"{shape['patch_size']}, which is not {name} (depth {depth}, width {width}, patch {patch}); {hint}"
        )
    num_classes = shape["table_rows"] - 1
    if ckpt.args and ckpt.args.get("num_classes") is not None:
        num_classes = int(ckpt.args["num_classes"])  # the table lacks the null row when cfg_prob was 0
    kwargs: Dict[str, Any] = dict(
        input_size=shape["input_size"],
        in_channels=shape["in_channels"],
        num_classes=num_classes,
        class_dropout_prob=class_dropout_prob,
    )
    if shape["mlp_ratio"] != 4.0:
        kwargs["mlp_ratio"] = shape["mlp_ratio"]
    if shape["qk_norm"]:
        kwargs["qk_norm"] = True
    return name, kwargs


def _fit_label_table(state: Dict[str, torch.Tensor], num_classes: int) -> Dict[str, torch.Tensor]:
    """A reference trained with cfg_prob 0 has no null row; ``repa``'s SiT always has one (zeros here)."""
    key = "y_embedder.embedding_table.weight"
    table = state.get(key)
    if table is not None and table.shape[0] == num_classes:
        state = dict(state)
        state[key] = torch.cat([table, table.new_zeros(1, table.shape[1])])  # (num_classes + 1, D)
        logger.info("the checkpoint has no null-class row (trained without label dropout); added a zero row")
    return state


def _mismatch(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> List[str]:
    """What differs between a model's state dict and the checkpoint's: names and shapes, a few of each."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if k in state and state[k].shape != v.shape]
    parts = []
    for label, items in (("shapes differ (checkpoint vs model)", wrong), ("missing", missing), ("unexpected", unexpected)):
        if items:
            parts.append(f"{label}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}")
    return parts


def _mismatch_error(parts: List[str], what: str, path: Path) -> CheckpointError:
    return CheckpointError(
        f"the {what} weights of {str(path)!r} do not fit the model ({'; '.join(parts)}); the model size (--model), "
        "the data (classes, latent size and channels) and --model-kwargs (qk_norm) must match the checkpoint"
    )


def load_sit_weights(module: nn.Module, state: Mapping[str, torch.Tensor], what: str, path: Path) -> None:
    """``module.load_state_dict(state)`` with a :class:`CheckpointError` that names the mismatch and the fix."""
    state = _fit_label_table(dict(state), getattr(module, "num_classes", -1))
    parts = _mismatch(module.state_dict(), state)
    if parts:
        raise _mismatch_error(parts, what, path)
    module.load_state_dict(state)


def official_train_settings(path: PathLike, obj: Any = None) -> Dict[str, Any]:
    """The :class:`repa.sit.configs.TrainConfig` settings a checkpoint implies (``repa train --init-from``).

    From a training checkpoint's ``args``: model, encoder(s), encoder depth, lambda, path,
    time weighting, label dropout, resolution, batch size, AdamW settings, grad clip, precision,
    TF32, seed; and always: the projector width read off the weights, ``qk_norm`` when the
    weights have q/k norms, and the reference's EMA decay 0.9999. A bare state dict implies
    only the weights' settings; model and encoder then come from the flags.
    """
    ckpt = read_official_checkpoint(path, obj=obj)
    settings: Dict[str, Any] = {}
    for arg, name in _ARG_TO_SETTING.items():
        if ckpt.args and ckpt.args.get(arg) is not None:
            settings[name] = ckpt.args[arg]
    if ckpt.projector_dims:
        settings["projector_dim"] = ckpt.projector_dims[0][1]
    if ckpt.shape.get("qk_norm"):
        settings["model_kwargs"] = {"qk_norm": True}
    settings["ema_decay"] = 0.9999  # the reference's update_ema default
    return settings


# --------------------------------------------------------------------------------------------
# Projectors, fine-tuning
# --------------------------------------------------------------------------------------------


def load_official_projectors(reg: nn.Module, source: Union[PathLike, OfficialCheckpoint, List[Dict[str, torch.Tensor]]], *, ema: bool = True) -> None:
    """Load the reference's ``projectors.{i}.{0,2,4}`` into a :class:`repa.REPARegularizer`.

    ``source`` is an official checkpoint (path or :class:`OfficialCheckpoint`; ``ema`` picks its
    EMA or raw projectors) or the list of per-encoder state dicts. The regularizer must align one
    layer with the checkpoint's encoders in the same order, with ``projector="mlp"`` of the same
    widths: projector i of the reference is the i-th (layer, encoder) pair.
    """
    if isinstance(source, (str, os.PathLike)):
        source = read_official_checkpoint(source)
    where = str(source.path) if isinstance(source, OfficialCheckpoint) else "the given projectors"
    states = (source.ema_projectors if ema else source.projectors) if isinstance(source, OfficialCheckpoint) else list(source)
    projectors = getattr(reg, "projectors", None)
    if not isinstance(projectors, nn.ModuleList):
        raise ConfigError(f"expected a REPARegularizer (with .projectors), got {type(reg).__name__}")
    if len(states) != len(projectors):
        raise CheckpointError(
            f"{where} has {len(states)} projector(s) (one per encoder) but the regularizer has {len(projectors)} "
            f"(layers x encoders = {len(projectors)}); align one layer with the checkpoint's encoders, in its order"
        )
    for i, (state, module) in enumerate(zip(states, projectors)):
        own = module.state_dict()
        bad = sorted(set(own) ^ set(state)) or [k for k in own if own[k].shape != state[k].shape]
        if bad:
            got = {k: tuple(v.shape) for k, v in state.items()}
            want = {k: tuple(v.shape) for k, v in own.items()}
            raise CheckpointError(
                f"projector {i} of {where} does not fit the regularizer's ({got} vs {want}); use projector='mlp' with "
                "projector_dim and the encoder of the checkpoint (the reference: 2048 wide)"
            )
        module.load_state_dict(state)


def init_from_official(path: PathLike, model: nn.Module, reg: Optional[nn.Module], ema: Any, encoder_depth: Optional[int] = None) -> OfficialCheckpoint:
    """Start a ``repa train`` run from an official checkpoint: SiT, EMA and projectors.

    The training weights go into ``model`` and ``reg``'s projectors, the EMA weights into the
    EMA shadows (``ema["model"]``, ``ema["projectors"]``). The released bare state dict has only
    EMA weights, which then initialize both. The optimizer starts fresh.
    """
    ckpt = read_official_checkpoint(path, encoder_depth=encoder_depth)
    load_sit_weights(model, ckpt.model, "model", ckpt.path)
    load_sit_weights(ema["model"], ckpt.ema, "EMA", ckpt.path)
    if reg is not None:
        load_official_projectors(reg, ckpt, ema=False)
        load_official_projectors_into(ema["projectors"], ckpt.ema_projectors, ckpt.path)
    elif ckpt.ema_projectors:
        logger.info("--init-from: the checkpoint's projectors are not used (REPA is off)")
    logger.info("initialized from the official checkpoint %s (%s layout%s, step %d)", ckpt.path, ckpt.layout,
                ", legacy names" if ckpt.legacy else "", ckpt.steps)
    return ckpt


def load_official_projectors_into(projectors: nn.ModuleList, states: List[Dict[str, torch.Tensor]], path: Path) -> None:
    """Projector state dicts into a bare ``nn.ModuleList`` (the EMA's shadow of the projectors)."""

    class _Holder(nn.Module):
        def __init__(self, mods: nn.ModuleList) -> None:
            super().__init__()
            self.projectors = mods

    load_official_projectors(_Holder(projectors), states)


# --------------------------------------------------------------------------------------------
# repa sample / repa probe
# --------------------------------------------------------------------------------------------


def to_repa_checkpoint(
    ckpt: OfficialCheckpoint,
    *,
    model: Optional[str] = None,
    path_type: Optional[str] = None,
) -> Dict[str, Any]:
    """The entries of a ``repa train`` checkpoint that ``repa sample`` and ``repa probe`` read.

    ``model`` / ``path_type`` (flags) override a training checkpoint's args; a bare state dict
    defaults to :data:`OFFICIAL_DEFAULTS`.
    """
    args = ckpt.args or {}
    name, kwargs = official_sit(ckpt, model, class_dropout_prob=float(args.get("cfg_prob", 0.1) or 0.0))
    with torch.device("meta"):
        _check_fits(build_model(name, **kwargs), ckpt)
    path_type = path_type or args.get("path_type") or OFFICIAL_DEFAULTS["path_type"]
    latent = kwargs["in_channels"] == 4
    resolution = int(args.get("resolution") or kwargs["input_size"] * (8 if latent else 1))
    enc_type = args.get("enc_type") or OFFICIAL_DEFAULTS["enc_type"]
    return {
        "format": "official",
        "step": ckpt.steps,
        "data": {
            "kind": "latents" if latent else "pixels",
            "num_classes": kwargs["num_classes"],
            "input_channels": kwargs["in_channels"],
            "input_size": kwargs["input_size"],
            "image_size": resolution,
            "vae": OFFICIAL_DEFAULTS["vae"] if latent else None,
            "latent_scale": OFFICIAL_DEFAULTS["latent_scale"],
        },
        "config": {
            "model": name,
            "path_type": path_type,
            "enc_type": enc_type,
            "encoder_depth": int(args.get("encoder_depth") or OFFICIAL_DEFAULTS["encoder_depth"]),
        },
        "model_name": name,
        "model_kwargs": kwargs,
        "model": _fit_label_table(ckpt.model, kwargs["num_classes"]),
        "ema": {f"shadows.model.{k}": v for k, v in _fit_label_table(ckpt.ema, kwargs["num_classes"]).items()},
        "official": {"path": str(ckpt.path), "layout": ckpt.layout, "legacy": ckpt.legacy},
    }


def _check_fits(module: nn.Module, ckpt: OfficialCheckpoint) -> None:
    """Raise the error of :func:`load_sit_weights` when the EMA weights do not fit ``module`` (may be on meta)."""
    parts = _mismatch(module.state_dict(), _fit_label_table(ckpt.ema, getattr(module, "num_classes", -1)))
    if parts:
        raise _mismatch_error(parts, "EMA", ckpt.path)


def add_official_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for a bare official state dict (``last.pt``), which carries no settings."""
    g = parser.add_argument_group("official REPA checkpoints (the released last.pt carries no settings)")
    g.add_argument("--model", default=None,
                   help="SiT size of an official checkpoint (default: its args, else the size matching its weights)")
    g.add_argument("--path-type", default=None, choices=["linear", "cosine"],
                   help="interpolant of an official checkpoint (default: its args, else linear)")
    g.add_argument("--encoder-depth", type=int, default=None,
                   help="aligned depth of a legacy official checkpoint (default: read off its decoder_blocks names)")


def load_any_checkpoint(path: PathLike, args: Optional[argparse.Namespace] = None) -> Dict[str, Any]:
    """A ``repa train`` checkpoint as :func:`repa.sit.checkpoint.load_checkpoint` returns it, or an
    official one converted by :func:`to_repa_checkpoint` (flags from ``args``: model, path_type,
    encoder_depth)."""
    from .checkpoint import load_checkpoint

    model = getattr(args, "model", None)
    path_type = getattr(args, "path_type", None)
    depth = getattr(args, "encoder_depth", None)
    try:
        obj = _torch_load(path)
    except CheckpointError:
        obj = None  # not weights-only loadable: only repa's own format may be (its loader decides)
    if obj is None or _official_layout(obj) is None:
        if model is not None or path_type is not None or depth is not None:
            raise ConfigError(
                f"--model / --path-type / --encoder-depth apply to official REPA checkpoints only; {str(path)!r} is a "
                "`repa train` checkpoint, whose settings are stored in it: drop these flags"
            )
        del obj
        return load_checkpoint(path)
    ckpt = read_official_checkpoint(path, encoder_depth=depth, obj=obj)
    del obj
    return to_repa_checkpoint(ckpt, model=model, path_type=path_type)
