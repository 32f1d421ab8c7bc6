"""Presets for diffusers models: DiT, PixArt, SD3 (MMDiT), Flux, Sana and the 2D U-Nets.

Each preset is registered by class name, so nothing here imports diffusers. What a preset
answers for ``REPARegularizer(model, layers=k)``:

- which blocks an int ``k`` indexes (0-based: REPA's depth 8 is ``layers=7``);
- which part of a block's output holds the image tokens (joint text+image blocks return
  ``(text, image)`` pairs; U-Net down blocks return ``(hidden_states, skip_states)``);
- the hooked width, read from the model's config (the parameter vote can pick an MLP or
  skip-concatenation width instead);
- for U-Nets, U-REPA's grid handling: the projected features are resampled to the
  encoder's grid (``resample="model"``).

Block outputs as read in diffusers 0.42:

=========================  ========================================  ===============================
class                      blocks (what an int indexes)              block output -> image tokens
=========================  ========================================  ===============================
DiTTransformer2DModel      ``transformer_blocks.i``                  (B, N, D), all image tokens
PixArtTransformer2DModel   ``transformer_blocks.i``                  (B, N, D), text enters by cross-attn
SanaTransformer2DModel     ``transformer_blocks.i``                  (B, N, D), text enters by cross-attn
SD3Transformer2DModel      ``transformer_blocks.i``                  ``(text, image)``: the image stream
FluxTransformer2DModel     ``transformer_blocks.i`` then             ``(text, image)`` from both kinds;
                           ``single_transformer_blocks.j``           older single blocks: joint [text; image]
UNet2DModel,               ``down_blocks.i``, ``mid_block``,         down: ``(h, skips)`` -> h (B, C, H, W);
UNet2DConditionModel       ``up_blocks.i``                           mid/up: (B, C, H, W)
=========================  ========================================  ===============================
"""

from __future__ import annotations

import inspect
import re
from typing import Any, List, Optional, Tuple

import torch
from torch import nn

from ..capture import strip_wrapper_prefixes
from ..errors import CaptureError, ShapeMismatchError
from ..presets import ModelPreset, register_preset

__all__ = [
    "DIFFUSERS_PRESETS",
    "FluxImageTokens",
    "joint_image_stream",
    "unet_block_hidden_states",
]

_TRANSFORMER_BLOCK = re.compile(r"transformer_blocks\.\d+")
_FLUX_BLOCK = re.compile(r"(?:single_)?transformer_blocks\.\d+")
_UNET_BLOCK = re.compile(r"(down_blocks|up_blocks)\.(\d+)|mid_block")


# --------------------------------------------------------------------------- shared helpers
def _numbered(prefix: str, container: Any) -> List[str]:
    return [f"{prefix}.{i}" for i in range(len(container))]


def _submodule(model: nn.Module, name: str) -> nn.Module:
    """``model``'s module called ``name`` once wrapper prefixes are stripped."""
    for full, module in model.named_modules():
        if strip_wrapper_prefixes(full) == name:
            return module
    raise KeyError(name)  # unreachable for names resolve_layers returned


def _transformer_width(model: nn.Module) -> Optional[int]:
    """Token width of a diffusers transformer: heads * head_dim from its config."""
    config = getattr(model, "config", None)
    heads = getattr(config, "num_attention_heads", None)
    head_dim = getattr(config, "attention_head_dim", None)
    if isinstance(heads, int) and isinstance(head_dim, int):
        return heads * head_dim
    width = getattr(model, "inner_dim", None)
    return width if isinstance(width, int) else None


def _block_width(pattern: re.Pattern[str]):
    """``hidden_dim`` hook: the transformer width for block-level names, else the vote."""

    def hidden_dim(model: nn.Module, layer: str) -> Optional[int]:
        return _transformer_width(model) if pattern.fullmatch(layer) else None

    return hidden_dim


# --------------------------------------------------------------------------- token selectors
def joint_image_stream(output: Any) -> torch.Tensor:
    """Image tokens of a joint text+image block: the second of its ``(text, image)`` pair.

    diffusers' ``JointTransformerBlock`` (SD3) and Flux blocks return
    ``(encoder_hidden_states, hidden_states)``; the last SD3 block returns ``(None, image)``.
    """
    if isinstance(output, (tuple, list)):
        if len(output) < 2 or not isinstance(output[1], torch.Tensor):
            raise ShapeMismatchError(
                f"a joint text+image block returned a {type(output).__name__} of {len(output)} items; expected "
                "(text_tokens, image_tokens). Pass tokens=<callable output -> image tokens (B, N, D)>"
            )
        return output[1]  # (B, N_img, D)
    if isinstance(output, torch.Tensor):
        return output
    raise ShapeMismatchError(
        f"a joint text+image block returned {type(output).__name__}; expected a (text, image) pair. "
        "Pass tokens=<callable output -> image tokens (B, N, D)>"
    )


def unet_block_hidden_states(output: Any) -> torch.Tensor:
    """A U-Net block's hidden states (B, C, H, W): down blocks return ``(h, skip_states)``."""
    if isinstance(output, (tuple, list)):
        return output[0]  # (B, C, H, W); output[1] holds the skip connections
    return output


def _takes_encoder_states(block: nn.Module) -> bool:
    try:
        return "encoder_hidden_states" in inspect.signature(block.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtin forward without a signature
        return True


class FluxImageTokens:
    """Image tokens of a Flux block's output.

    Both kinds of Flux block in current diffusers return ``(text, image)``: the image stream
    is taken. Single-stream blocks of older diffusers versions take and return the joint
    sequence ``[text; image]`` (B, N_txt + N_img, D); the text length then comes from the
    ``encoder_hidden_states`` the model was called with, recorded by a forward pre-hook on
    the model and stamped on the block's output as it is produced, so the slice always
    belongs to the forward that made the captured tensor.
    """

    def __init__(self, model: nn.Module, layer: str) -> None:
        self.layer = layer
        self.legacy = False
        self._text_len: Optional[int] = None
        self._handles: List[Any] = []
        if layer.startswith("single_transformer_blocks."):
            block = _submodule(model, layer)
            if not _takes_encoder_states(block):
                self.legacy = True
                self._signature = inspect.signature(model.forward)
                self._handles = [
                    model.register_forward_pre_hook(self._record_text_len, with_kwargs=True),
                    block.register_forward_hook(self._stamp_output),
                ]

    def _record_text_len(self, module: nn.Module, args: Tuple[Any, ...], kwargs: dict) -> None:
        try:
            bound = self._signature.bind_partial(*args, **kwargs).arguments
        except TypeError:
            bound = kwargs
        text = bound.get("encoder_hidden_states")
        self._text_len = int(text.shape[1]) if isinstance(text, torch.Tensor) else None

    def _stamp_output(self, module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            output._repa_text_len = self._text_len  # read back by __call__

    def remove(self) -> None:
        """Remove the hooks of the older-diffusers path (no-op otherwise)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __call__(self, output: Any) -> torch.Tensor:
        if isinstance(output, (tuple, list)):
            return joint_image_stream(output)  # (B, N_img, D)
        if isinstance(output, torch.Tensor):
            text_len = getattr(output, "_repa_text_len", None)
            if text_len is None:
                raise CaptureError(
                    f"layer {self.layer!r} returned the joint [text; image] sequence {tuple(output.shape)} but the "
                    "text length of that forward is unknown: call the Flux model with encoder_hidden_states "
                    "(positionally or by keyword), or pass tokens=slice(text_len, None)"
                )
            return output[:, text_len:]  # (B, N_img, D)
        raise ShapeMismatchError(
            f"layer {self.layer!r} returned {type(output).__name__}; expected (text, image) or a joint sequence"
        )

    def __repr__(self) -> str:
        return f"FluxImageTokens(layer={self.layer!r}, legacy={self.legacy})"


# --------------------------------------------------------------------------- block lists
def _transformer_blocks(model: nn.Module) -> List[str]:
    return _numbered("transformer_blocks", model.transformer_blocks)


def _flux_blocks(model: nn.Module) -> List[str]:
    # double-stream blocks run first, then single-stream ones: an int indexes the concatenation
    return _numbered("transformer_blocks", model.transformer_blocks) + _numbered(
        "single_transformer_blocks", model.single_transformer_blocks
    )


def _unet_blocks(model: nn.Module) -> List[str]:
    names = _numbered("down_blocks", model.down_blocks)
    if getattr(model, "mid_block", None) is not None:
        names.append("mid_block")
    return names + _numbered("up_blocks", model.up_blocks)


def _unet_width(model: nn.Module, layer: str) -> Optional[int]:
    """Output channels of a U-Net block, from ``config.block_out_channels``.

    Up blocks take skip connections, so their parameters vote for concatenated widths.
    """
    match = _UNET_BLOCK.fullmatch(layer)
    channels = getattr(getattr(model, "config", None), "block_out_channels", None)
    if match is None or not channels:
        return None
    channels = [int(c) for c in channels]
    if layer == "mid_block":
        return channels[-1]
    kind, index = match.group(1), int(match.group(2))
    ordered = channels if kind == "down_blocks" else channels[::-1]
    return ordered[index] if index < len(ordered) else None


def _only_blocks(pattern: re.Pattern[str], selector: Any):
    """``tokens`` hook applying ``selector`` to block-level names only (other names: all tokens)."""

    def tokens(model: nn.Module, layer: str) -> Any:
        return selector if pattern.fullmatch(layer) else None

    return tokens


def _flux_tokens(model: nn.Module, layer: str) -> Any:
    return FluxImageTokens(model, layer) if _FLUX_BLOCK.fullmatch(layer) else None


# --------------------------------------------------------------------------- the presets
_DEPTH8 = "layers=7 (depth 8, the REPA setting for 24-28 blocks); 12 blocks: layers=3"

DIFFUSERS_PRESETS: Tuple[ModelPreset, ...] = (
    register_preset(
        ModelPreset(
            name="diffusers-dit",
            class_names=("DiTTransformer2DModel",),
            blocks=_transformer_blocks,
            hidden_dim=_block_width(_TRANSFORMER_BLOCK),
            recommended_layer=_DEPTH8 + " (DiT-XL/2: 28 blocks)",
            notes="all tokens are image patches (no class token)",
        )
    ),
    register_preset(
        ModelPreset(
            name="diffusers-pixart",
            class_names=("PixArtTransformer2DModel",),
            blocks=_transformer_blocks,
            hidden_dim=_block_width(_TRANSFORMER_BLOCK),
            recommended_layer=_DEPTH8 + " (PixArt-alpha/sigma: 28 blocks)",
            notes="text enters by cross-attention; block outputs are image tokens only",
        )
    ),
    register_preset(
        ModelPreset(
            name="diffusers-sana",
            class_names=("SanaTransformer2DModel",),
            blocks=_transformer_blocks,
            hidden_dim=_block_width(_TRANSFORMER_BLOCK),
            recommended_layer=_DEPTH8 + " (Sana 0.6B: 28 blocks, 1.6B: 20)",
            notes="text enters by cross-attention; block outputs are image tokens only",
        )
    ),
    register_preset(
        ModelPreset(
            name="diffusers-sd3",
            class_names=("SD3Transformer2DModel",),
            blocks=_transformer_blocks,
            tokens=_only_blocks(_TRANSFORMER_BLOCK, joint_image_stream),
            hidden_dim=_block_width(_TRANSFORMER_BLOCK),
            recommended_layer=_DEPTH8 + " (SD3-medium: 24 joint blocks)",
            notes="joint blocks return (text, image): the image stream is aligned",
        )
    ),
    register_preset(
        ModelPreset(
            name="diffusers-flux",
            class_names=("FluxTransformer2DModel",),
            blocks=_flux_blocks,
            tokens=_flux_tokens,
            hidden_dim=_block_width(_FLUX_BLOCK),
            recommended_layer="layers=7 (the 8th of 19 double-stream blocks; ints continue into the 38 single-stream blocks)",
            notes="ints index transformer_blocks then single_transformer_blocks; image tokens only",
        )
    ),
    register_preset(
        ModelPreset(
            name="diffusers-unet",
            class_names=("UNet2DModel", "UNet2DConditionModel"),
            blocks=_unet_blocks,
            tokens=_only_blocks(_UNET_BLOCK, unet_block_hidden_states),
            hidden_dim=_unet_width,
            resample="model",
            recommended_layer="layers='mid_block' (U-REPA: the middle stage, upsampled to the encoder grid)",
            notes="(B, C, H, W) features; ints index down_blocks, mid_block, up_blocks",
        )
    ),
)
