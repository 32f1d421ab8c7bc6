"""Model presets: where the blocks are and which tokens are image tokens, per model class.

A preset is found from the model's class name (no import of the model's library), so
``REPARegularizer(transformer, layers=7)`` picks the right block list and image-token slice of
a known architecture. A model without a preset still works with explicit module names.

Add one with :func:`register_preset`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

from torch import nn

__all__ = ["ModelPreset", "register_preset", "find_preset", "list_presets"]

TokenSelector = Any  # None | slice | Callable[[output], Tensor]


@dataclass(frozen=True)
class ModelPreset:
    """How `repa` attaches to one family of models.

    Attributes:
        name: short family name shown in docs and errors.
        class_names: model class names this preset applies to (matched over the MRO).
        blocks: ``model -> [module names]``, the ordered blocks an int in ``layers=`` indexes.
        tokens: ``(model, layer_name) -> selector`` giving the default ``tokens=`` per layer
            (``None`` keeps all tokens).
        hidden_dim: ``(model, layer_name) -> int | None``, the hooked output's width when the
            parameter vote would be ambiguous.
        resample: which side is resampled when grids differ: ``"target"`` (REPA) or
            ``"model"`` (U-REPA: model features are upsampled to the encoder grid).
        recommended_layer: the REPA default for this family, as documentation.
        video: for video models, ``model -> repa.video.VideoGridTracker``: records each
            forward's (t, h, w) token grid from the model's input and carries the video VAE's
            temporal compression.
    """

    name: str
    class_names: Sequence[str]
    blocks: Callable[[nn.Module], List[str]]
    tokens: Optional[Callable[[nn.Module, str], TokenSelector]] = None
    hidden_dim: Optional[Callable[[nn.Module, str], Optional[int]]] = None
    resample: str = "target"
    recommended_layer: str = ""
    notes: str = field(default="", compare=False)
    video: Optional[Callable[[nn.Module], Any]] = None


_PRESETS: List[ModelPreset] = []


def register_preset(preset: ModelPreset) -> ModelPreset:
    """Register ``preset``; later registrations win over earlier ones for the same class."""
    _PRESETS.insert(0, preset)
    return preset


def find_preset(model: nn.Module) -> Optional[ModelPreset]:
    """The preset whose class names match ``type(model)`` or one of its base classes."""
    mro = [cls.__name__ for cls in type(model).__mro__]
    for cls_name in mro:
        for preset in _PRESETS:
            if cls_name in preset.class_names:
                return preset
    return None


def list_presets() -> List[ModelPreset]:
    """All registered presets, most recent first."""
    return list(_PRESETS)


def _numbered(prefix: str, container: Any) -> List[str]:
    return [f"{prefix}.{i}" for i in range(len(container))]


# timm VisionTransformer (and subclasses): blocks.i, drop the CLS/register prefix tokens.
register_preset(
    ModelPreset(
        name="timm-vit",
        class_names=("VisionTransformer",),
        blocks=lambda m: _numbered("blocks", m.blocks),
        tokens=lambda m, layer: slice(int(getattr(m, "num_prefix_tokens", 0)), None),
        recommended_layer="depth 8 of 24 (layers=7); 4 of 12 (layers=3)",
    )
)

# repa's own SiT: blocks.i, all tokens are image tokens.
register_preset(
    ModelPreset(
        name="repa-sit",
        class_names=("SiT",),
        blocks=lambda m: _numbered("blocks", m.blocks),
        recommended_layer="SiT-B: layers=3 (depth 4); SiT-L/XL: layers=7 (depth 8)",
    )
)


_PRESETS_LOADED = False


def _load_builtin_presets() -> None:
    """Import optional preset modules (e.g. diffusers models) once, if present."""
    global _PRESETS_LOADED
    if _PRESETS_LOADED:
        return
    _PRESETS_LOADED = True
    import importlib

    for module in ("repa.integrations",):
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module)


def preset_for(model: nn.Module) -> Optional[ModelPreset]:
    """:func:`find_preset` after loading the built-in optional presets."""
    _load_builtin_presets()
    return find_preset(model)


Registry = Dict[str, ModelPreset]
