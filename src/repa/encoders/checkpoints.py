"""Read weights files and remap original checkpoint layouts to the timm modules `repa` builds.

``create_encoder(name, weights=PATH)`` accepts a timm-layout state dict (what
``encoder.model.state_dict()`` saves, and what the Hugging Face ``timm/...`` repositories hold)
and the layouts the original projects released:

- ``dinov2`` (torch hub ``dinov2_vit*14[_reg4]_pretrain.pth``): ``mask_token`` is dropped;
  ``register_tokens`` becomes ``reg_token``; for register models, whose timm module keeps
  position embeddings for patches only, the CLS position embedding is folded into
  ``cls_token``; chunked ``blocks.<chunk>.<i>.`` keys and the giant's SwiGLU
  ``mlp.w12``/``mlp.w3`` are renamed (``blocks.<i>.``, ``mlp.fc1``/``mlp.fc2``).
- ``mae``: weights under ``"model"``; ``decoder_*`` and ``mask_token`` (the pixel decoder) dropped.
- ``ijepa``: the context encoder under ``"encoder"`` (else ``"target_encoder"``), keys
  prefixed ``module.`` (DDP); the predictor is not used.
- ``mocov3``: ``"state_dict"`` with ``module.base_encoder.`` keys; the momentum encoder,
  predictor and projection head are dropped; the released ViT checkpoints' misnamed
  ``blocks.13.norm13`` / ``mlp.fc13`` / ``blocks.14.norm14`` / ``mlp.fc14`` are fixed.
- ``dino``: a plain backbone state dict, or a training checkpoint's ``"teacher"`` with
  ``backbone.`` keys (the DINO projection head dropped).

Every layout also unwraps ``state_dict``/``model``/``module`` containers, strips ``module.``
and ``_orig_mod.`` prefixes and the ``model.`` prefix of a state dict saved from the
:class:`~repa.encoders.FrozenEncoder` wrapper itself (``torch.save(encoder.state_dict(), path)``),
drops heads the built trunk does not have, and resamples a position embedding trained at
another grid. Anything else that does not match is an error.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Union

import torch
from torch import nn

from .._io import atomic_write
from ..errors import ConfigError, StateDictError, WeightsNotFoundError

__all__ = ["read_weights_file", "convert_checkpoint", "load_encoder_state_dict", "save_encoder_weights"]

StateDict = Dict[str, torch.Tensor]

# keys an original checkpoint may carry that a frozen trunk does not need (dropped only when the
# built module has no such key)
_DROPPABLE = re.compile(
    r"^(head\.|head_dist\.|fc_norm\.|decoder|mask_token$|predictor|momentum_encoder\.|attn_pool\.|fc\.|pre_logits\.)"
)


# ---------------------------------------------------------------------- reading files
def read_weights_file(path: Union[str, os.PathLike[str]]) -> Any:
    """Load a ``.safetensors`` file or a torch pickle (``.pth``/``.pt``/``.pth.tar``/``.bin``) on CPU.

    Pickles are read with ``weights_only=True`` (no arbitrary code runs); a checkpoint that
    stores other Python objects is refused with the way to load it deliberately.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsNotFoundError(
            f"weights file {str(path)!r} does not exist; pass the path of a .safetensors or .pth file "
            "(see `repa encoders` for where each encoder's weights are looked up)"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # SafetensorError (header, truncation), OSError
            raise StateDictError(
                f"cannot read {str(path)!r} as a safetensors file ({_first_line(exc)}); "
                "the file is damaged or is not safetensors: download or save it again"
            ) from exc
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError and friends
        raise StateDictError(
            f"cannot read {str(path)!r} safely as weights ({_first_line(exc)}). "
            "It stores Python objects besides tensors, and unpickling those could run code from the file; nothing "
            "was run. Save the encoder's tensors alone (safetensors.torch.save_file(state_dict, 'enc.safetensors') "
            "where the file was made) and pass that file, or pass a state dict: create_encoder(name, weights=dict)"
        ) from exc


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


# ---------------------------------------------------------------------- generic unwrapping
def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def _unwrap(obj: Any, keys: tuple) -> Any:
    """Descend into the first container key present until a flat tensor dict is reached."""
    while isinstance(obj, Mapping) and not _is_tensor_dict(obj):
        for key in keys:
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
        else:
            break
    return obj


def _strip_prefix(sd: StateDict, prefix: str) -> StateDict:
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _only_prefix(sd: StateDict, prefix: str) -> StateDict:
    if any(k.startswith(prefix) for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


# ---------------------------------------------------------------------- layouts
def _dinov2(sd: StateDict, model: nn.Module) -> StateDict:
    original = "mask_token" in sd or "register_tokens" in sd  # timm-layout files have neither
    out: StateDict = {}
    for key, value in sd.items():
        if key == "mask_token":
            continue
        key = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", key)  # chunked (FSDP) blocks
        key = re.sub(r"\.mlp\.w12\.", ".mlp.fc1.", key)  # SwiGLU (ViT-g): packed gate + value
        key = re.sub(r"\.mlp\.w3\.", ".mlp.fc2.", key)
        out["reg_token" if key == "register_tokens" else key] = value
    # timm's register models keep position embeddings for patches only (no_embed_class); the
    # original adds the CLS position embedding to the CLS token: fold it in once, here.
    pos = out.get("pos_embed")
    if original and pos is not None and "cls_token" in out and getattr(model, "no_embed_class", False):
        out["cls_token"] = out["cls_token"] + pos[:, :1]
        out["pos_embed"] = pos[:, 1:]
    return out


def _mae(sd: StateDict, model: nn.Module) -> StateDict:
    return {k: v for k, v in sd.items() if not (k.startswith("decoder") or k == "mask_token")}


def _ijepa(sd: StateDict, model: nn.Module) -> StateDict:
    return _strip_prefix(sd, "module.")


_MOCOV3_FIXES = (
    ("blocks.13.norm13.", "blocks.13.norm1."),
    ("blocks.13.mlp.fc13.", "blocks.13.mlp.fc1."),
    ("blocks.14.norm14.", "blocks.14.norm2."),
    ("blocks.14.mlp.fc14.", "blocks.14.mlp.fc2."),
)


def _mocov3(sd: StateDict, model: nn.Module) -> StateDict:
    sd = _only_prefix(sd, "module.base_encoder.")
    sd = _only_prefix(sd, "base_encoder.")
    out: StateDict = {}
    for key, value in sd.items():
        for old, new in _MOCOV3_FIXES:
            if key.startswith(old):
                key = new + key[len(old):]
        out[key] = value
    return out


def _dino(sd: StateDict, model: nn.Module) -> StateDict:
    sd = _strip_prefix(sd, "module.")
    return _only_prefix(sd, "backbone.")


_LAYOUTS: Dict[str, Callable[[StateDict, nn.Module], StateDict]] = {
    "timm": lambda sd, model: sd,
    "dinov2": _dinov2,
    "mae": _mae,
    "ijepa": _ijepa,
    "mocov3": _mocov3,
    "dino": _dino,
}
_CONTAINERS = {
    "timm": ("state_dict", "model", "module"),
    "dinov2": ("teacher", "model", "state_dict"),
    "mae": ("model", "state_dict"),
    "ijepa": ("encoder", "target_encoder", "state_dict"),
    "mocov3": ("state_dict", "model"),
    "dino": ("teacher", "state_dict", "model"),
}


def convert_checkpoint(checkpoint: Any, layout: str, model: nn.Module) -> StateDict:
    """Turn a loaded checkpoint of ``layout`` into a state dict for the timm ``model``.

    Args:
        checkpoint: what ``torch.load``/``safetensors`` returned (a state dict or a dict
            wrapping one).
        layout: one of ``"timm"``, ``"dinov2"``, ``"mae"``, ``"ijepa"``, ``"mocov3"``, ``"dino"``.
        model: the module the weights are for (its keys decide what may be dropped and its
            grid how a position embedding is resampled).
    """
    if layout not in _LAYOUTS:
        raise ConfigError(f"unknown checkpoint layout {layout!r}; expected one of {sorted(_LAYOUTS)}")
    sd = _unwrap(checkpoint, _CONTAINERS[layout])
    if not _is_tensor_dict(sd):
        found = sorted(checkpoint)[:12] if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise StateDictError(
            f"no tensor state dict found in the checkpoint (layout {layout!r}); top-level entries: {found}. "
            "Pass the state dict itself, e.g. weights=checkpoint['model']"
        )
    sd = {k: v for k, v in sd.items()}
    sd = _strip_prefix(sd, "model.")  # saved from the FrozenEncoder wrapper: its network is .model
    for prefix in ("_orig_mod.", "module."):
        if layout not in ("mocov3",):  # MoCo v3 prefixes select the base encoder
            sd = _strip_prefix(sd, prefix)
    sd = _LAYOUTS[layout](sd, model)
    return _fit_to_model(sd, model)


def _fit_to_model(sd: StateDict, model: nn.Module) -> StateDict:
    own = model.state_dict()
    out: StateDict = {}
    for key, value in sd.items():
        if key not in own and _DROPPABLE.match(key):
            continue
        out[key] = value
    pos, own_pos = out.get("pos_embed"), own.get("pos_embed")
    if pos is not None and own_pos is not None and pos.shape != own_pos.shape and pos.ndim == 3:
        out["pos_embed"] = _resample_pos_embed(pos, own_pos, model)
    return out


def _resample_pos_embed(pos: torch.Tensor, own: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """Resample an absolute position embedding (1, prefix + h*w, D) to the model's grid.

    An embedding that cannot be resampled (another width, a non-square grid) is returned
    unchanged; the strict load then reports the shape mismatch with the other keys.
    """
    from timm.layers import resample_abs_pos_embed

    num_prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 0))
    src = pos.shape[1] - num_prefix
    side = int(round(max(src, 0) ** 0.5))
    new_grid = tuple(getattr(getattr(model, "patch_embed", None), "grid_size", ()))
    if src <= 0 or side * side != src or len(new_grid) != 2 or pos.shape[-1] != own.shape[-1]:
        return pos
    return resample_abs_pos_embed(pos, new_size=list(new_grid), old_size=[side, side], num_prefix_tokens=num_prefix)


# ---------------------------------------------------------------------- loading
def load_encoder_state_dict(
    model: nn.Module, weights: Any, layout: str = "timm", *, name: str = "encoder", source: str = "weights="
) -> None:
    """Load ``weights`` (a path or a loaded checkpoint) of ``layout`` into ``model``, strictly.

    Raises:
        StateDictError: keys are missing or unexpected after remapping, or shapes differ; the
            message lists them and the layout used.
    """
    if isinstance(weights, (str, os.PathLike)):
        source = str(weights)
        weights = read_weights_file(weights)
    sd = convert_checkpoint(weights, layout, model)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in sd and sd[k].shape != own[k].shape
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:5]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:5]})")
        if wrong:
            parts.append(f"{len(wrong)} with another shape (e.g. {wrong[:3]})")
        raise StateDictError(
            f"weights from {source} do not fit encoder {name!r} (read as the {layout!r} checkpoint layout): "
            + "; ".join(parts)
            + ". Check that the file belongs to this encoder (same size variant and patch size); "
            "layouts understood: timm, dinov2, mae, ijepa, mocov3, dino"
        )
    broken = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if broken:
        raise StateDictError(
            f"weights from {source} hold NaN or infinite values in {len(broken)} tensor(s) (e.g. {broken[:5]}); "
            "the file is damaged: download or save it again"
        )
    model.load_state_dict(sd, strict=True)


def save_encoder_weights(encoder: nn.Module, path: Union[str, os.PathLike[str], None] = None) -> Path:
    """Save an encoder's network weights as safetensors, atomically; returns the path.

    ``encoder`` is a :class:`~repa.encoders.FrozenEncoder` (its ``.model`` is saved) or a bare
    network. ``path`` defaults to :func:`~repa.encoders.local_weights_path` of the encoder's
    name, where ``create_encoder(name)`` finds it.
    """
    from safetensors.torch import save_file

    model = getattr(encoder, "model", encoder)
    if path is None:
        name = getattr(encoder, "name", None)
        if not name:
            raise ConfigError("save_encoder_weights needs path= for a module without a registry .name")
        from .weights import repa_home

        spec = getattr(encoder, "spec", None)  # a FrozenEncoder: its registry name, aliases resolved
        path = repa_home() / "encoders" / f"{str(getattr(spec, 'name', name)).lower()}.safetensors"
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"encoder": str(getattr(encoder, "name", ""))}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
