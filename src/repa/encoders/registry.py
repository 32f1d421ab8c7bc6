"""The encoder registry: ``register_encoder``, ``create_encoder``, ``list_encoders``.

An entry is an :class:`EncoderSpec` plus a factory ``factory(spec, **kwargs) -> nn.Module``
that builds the bare network with random weights. ``create_encoder`` finds the weights
(before building anything, so a miss fails at once), builds, loads, freezes and wraps the
network in a :class:`FrozenEncoder`.

Register your own encoder::

    @register_encoder("my-encoder", embed_dim=256, patch_size=16, prefix_tokens=1,
                      mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), license="mine")
    def my_encoder(spec, **kwargs):
        return MyViT(**kwargs)    # forward: normalized (B, 3, H, W) -> tokens (B, 1 + N, 256)

    reg = REPARegularizer(model, layers=7, encoders="my-encoder",
                          encoder_kwargs={"weights": "my_encoder.safetensors"})
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from ..errors import ConfigError, UnknownNameError
from .frozen import FrozenEncoder
from .spec import OVERRIDABLE_FIELDS, EncoderSpec, ImageSize

__all__ = ["register_encoder", "create_encoder", "list_encoders", "get_encoder_spec", "Factory"]

Factory = Callable[..., nn.Module]
_REGISTRY: Dict[str, Tuple[EncoderSpec, Factory]] = {}


def register_encoder(
    spec: Union[EncoderSpec, str], *, overwrite: bool = False, **spec_fields: Any
) -> Callable[[Factory], Factory]:
    """Decorator registering ``factory(spec, **kwargs) -> nn.Module`` under a spec.

    Args:
        spec: an :class:`EncoderSpec`, or its name with the other fields as keywords
            (``embed_dim=`` and ``patch_size=`` are required).
        overwrite: replace an existing entry of the same name instead of raising.
        **spec_fields: the spec's fields when ``spec`` is a name.

    The factory builds the network with random weights; ``create_encoder`` loads weights into
    it. With ``extract="forward"`` (the default for user specs) the network maps normalized
    images (B, C, H, W) to tokens (B, prefix_tokens + N, D) or a map (B, D, h, w).
    """
    if isinstance(spec, str):
        try:
            spec = EncoderSpec(name=spec, **spec_fields)
        except TypeError as exc:
            raise ConfigError(f"register_encoder({spec!r}, ...): {exc}; see EncoderSpec for the fields") from None
    elif spec_fields:
        raise ConfigError("register_encoder takes either an EncoderSpec or a name with spec fields, not both")
    if not isinstance(spec, EncoderSpec):
        raise ConfigError(f"register_encoder expects an EncoderSpec or a name, got {type(spec).__name__}")
    final_spec = spec

    def decorator(factory: Factory) -> Factory:
        if not callable(factory):
            raise ConfigError(f"register_encoder({final_spec.name!r}) must decorate a callable factory")
        key = final_spec.name.lower()
        if key in _REGISTRY and not overwrite:
            raise ConfigError(
                f"an encoder named {final_spec.name!r} is already registered; "
                "choose another name or pass overwrite=True"
            )
        _REGISTRY[key] = (final_spec, factory)
        return factory

    return decorator


def _lookup(name: str) -> Tuple[EncoderSpec, Factory]:
    if not isinstance(name, str):
        raise ConfigError(f"encoder name must be a string, got {type(name).__name__}")
    key = name.strip().lower()
    if key not in _REGISTRY:
        import difflib

        close = difflib.get_close_matches(key, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(_REGISTRY[c][0].name) for c in close)}?" if close else ""
        raise UnknownNameError(
            f"unknown encoder {name!r}.{hint} See all names with list_encoders() or `repa encoders`, "
            "or register your own with @register_encoder"
        )
    return _REGISTRY[key]


def get_encoder_spec(name: str) -> EncoderSpec:
    """The :class:`EncoderSpec` registered under ``name`` (case-insensitive)."""
    return _lookup(name)[0]


def list_encoders(pattern: Optional[str] = None) -> List[str]:
    """Registered encoder names, sorted; ``pattern`` filters them, case-insensitively.

    A pattern with ``*``, ``?`` or ``[`` is a shell wildcard (``"dinov2*"``); any other
    pattern matches as a substring (``"clip"``).
    """
    names = sorted(spec.name for spec, _ in _REGISTRY.values())
    if pattern is None:
        return names
    pat = pattern.lower()
    if any(ch in pat for ch in "*?["):
        return [n for n in names if fnmatch.fnmatchcase(n.lower(), pat)]
    return [n for n in names if pat in n.lower()]


def create_encoder(
    name: str,
    *,
    pretrained: bool = True,
    weights: Union[str, os.PathLike[str], Mapping[str, Any], None] = None,
    resolution: ImageSize = 256,
    dtype: Optional[torch.dtype] = None,
    device: Union[str, torch.device, None] = None,
    cache_dir: Union[str, os.PathLike[str], None] = None,
    compile: bool = False,
    **kwargs: Any,
) -> FrozenEncoder:
    """Build the frozen encoder ``name`` with its weights.

    Args:
        name: a registry name (case-insensitive), e.g. ``"dinov2-vit-b"``; see ``list_encoders()``.
        pretrained: load the published weights from the local caches (``repa encoders`` shows
            where); a miss raises :class:`~repa.errors.WeightsNotFoundError` with the command
            that fetches them. ``False`` builds random weights (tests, or training a teacher).
        weights: a local ``.safetensors``/``.pth`` file (or a loaded state dict) to load,
            whatever ``pretrained`` says; original checkpoint layouts of the entry's family
            (DINOv2 hub, MAE, I-JEPA, MoCo v3, DINO) are remapped.
        resolution: the training-image size R the encoder serves (DINOv2: 256 -> 224 px input,
            16x16 tokens; 512 -> 448 px, 32x32); any image size still works at call time.
        dtype: compute dtype (``torch.bfloat16``/``torch.float16``); the output stays float32.
        device: where to build the network; ``"meta"`` (with ``pretrained=False``) builds
            shapes only, for checking sizes of the largest encoders without memory.
        cache_dir: the Hugging Face cache to read (default: the standard hub cache).
        compile: ``torch.compile`` the token extraction.
        **kwargs: overrides of the spec's preprocessing (``input_size``, ``input_scale``,
            ``interpolation``, ``antialias``, ``normalize_first``, ``mean``, ``std``,
            ``final_norm``); everything else goes to the factory (e.g. ``num_classes=10``).

    Returns:
        A :class:`FrozenEncoder` in eval mode with ``requires_grad=False``.
    """
    spec, factory = _lookup(name)
    overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in OVERRIDABLE_FIELDS}
    if overrides:
        spec = dataclasses.replace(spec, **overrides)
    dev = torch.device(device) if device is not None else None
    is_meta = dev is not None and dev.type == "meta"
    if is_meta and (weights is not None or pretrained):
        raise ConfigError(
            f"device='meta' builds shapes only and holds no weights; pass pretrained=False (and no weights=) "
            f"to build {spec.name!r} on the meta device"
        )

    # find the weights first: a miss must fail fast, before a large network is built
    source: Any = None
    if weights is not None:
        source = weights
        if isinstance(weights, (str, os.PathLike)) and not os.path.isfile(os.path.expanduser(str(weights))):
            from ..errors import WeightsNotFoundError

            raise WeightsNotFoundError(
                f"weights file {str(weights)!r} for encoder {spec.name!r} does not exist; pass the path of a "
                ".safetensors or .pth file, or pretrained=True to use the local caches (see `repa encoders`)"
            )
    elif pretrained:
        from .weights import resolve_weights

        source = resolve_weights(spec, cache_dir)

    with dev if dev is not None else contextlib.nullcontext():  # build in place: no CPU detour
        model = factory(spec, **kwargs)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"the factory of encoder {spec.name!r} must return an nn.Module, got {type(model).__name__}")
    if "embed_dim" in kwargs and int(kwargs["embed_dim"]) != spec.embed_dim:  # a narrower/wider variant
        spec = dataclasses.replace(spec, embed_dim=int(kwargs["embed_dim"]))
    if source is not None:
        from .checkpoints import load_encoder_state_dict

        load_encoder_state_dict(model, source, spec.checkpoint_layout, name=spec.name)
    encoder = FrozenEncoder(model, spec, resolution=resolution, dtype=dtype, compile=compile)
    if dev is not None:
        encoder.to(dev)
    return encoder


def local_weights_path(name: str) -> Path:
    """Default local weights file of encoder ``name``: ``$REPA_HOME/encoders/<name>.safetensors``.

    ``create_encoder(name)`` loads it when present (also under a ``.pth`` / ``.pt`` /
    ``.pth.tar`` / ``.bin`` suffix, original checkpoint layouts included). The Fashion-MNIST
    teacher ``"fmnist-vit"`` is saved here by its training command.
    """
    from .weights import local_weights_file

    return local_weights_file(get_encoder_spec(name))
