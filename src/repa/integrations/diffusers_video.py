"""Presets for diffusers video transformers: Wan, CogVideoX, HunyuanVideo and LTX-Video.

Registered by class name (nothing here imports diffusers). Each preset answers, besides the
block list and the video-token selection, the (t, h, w) token grid of every forward (read by a
forward pre-hook from the model's input and its config's patch sizes) and the temporal
compression of the family's video VAE, which groups clean frames into latent frames.

Block outputs and inputs as read in diffusers 0.42:

===============================  ==========================================  ==============================================
class                            blocks (what an int indexes)                block output -> video tokens; grid source
===============================  ==========================================  ==============================================
WanTransformer3DModel            ``blocks.i``                                (B, N, D), all video tokens (text enters by
                                                                             cross-attention); ``hidden_states`` (B, C, F, H, W)
                                                                             and ``config.patch_size`` (p_t, p_h, p_w)
CogVideoXTransformer3DModel      ``transformer_blocks.i``                    ``(video, text)``: the first item; ``hidden_states``
                                                                             (B, F, C, H, W), ``patch_size``, ``patch_size_t``
HunyuanVideoTransformer3DModel   ``transformer_blocks.i`` (dual-stream) then  ``(video, text)`` from both kinds: the first item;
                                 ``single_transformer_blocks.j``             ``hidden_states`` (B, C, F, H, W), ``patch_size``,
                                                                             ``patch_size_t``
LTXVideoTransformer3DModel       ``transformer_blocks.i``                    (B, N, D) packed video tokens (text by
                                                                             cross-attention); the ``num_frames``, ``height``,
                                                                             ``width`` forward arguments (latent sizes)
===============================  ==========================================  ==============================================

Temporal compression of each family's VAE (first frame alone, then groups of k frames):
Wan 2.1/2.2 ``AutoencoderKLWan`` k = 4 (``scale_factor_temporal``); CogVideoX k = 4
(``temporal_compression_ratio``, also stored in the transformer's config); HunyuanVideo k = 4;
LTX-Video k = 8 (``patch_size_t * 2 ** sum(spatio_temporal_scaling)`` = 1 * 2**3).
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..errors import ShapeMismatchError
from ..presets import ModelPreset, register_preset
from ..video import VideoGridTracker
from .diffusers_presets import _block_width, _numbered, _only_blocks, _transformer_blocks

__all__ = ["DIFFUSERS_VIDEO_PRESETS", "video_stream"]

_WAN_BLOCK = re.compile(r"blocks\.\d+")
_TRANSFORMER_BLOCK = re.compile(r"transformer_blocks\.\d+")
_HUNYUAN_BLOCK = re.compile(r"(?:single_)?transformer_blocks\.\d+")

Grid3 = Tuple[int, int, int]


def video_stream(output: Any) -> torch.Tensor:
    """Video tokens of a joint video+text block: the first of its ``(video, text)`` pair.

    diffusers' CogVideoX and HunyuanVideo blocks return ``(hidden_states, encoder_hidden_states)``
    with the video stream first (the reverse of SD3/Flux's ``(text, image)``); the text tokens
    are never aligned.
    """
    if isinstance(output, (tuple, list)):
        if not output or not isinstance(output[0], torch.Tensor):
            raise ShapeMismatchError(
                f"a video+text block returned a {type(output).__name__} of {len(output)} items; expected "
                "(video_tokens, text_tokens). Pass tokens=<callable output -> video tokens (B, N, D)>"
            )
        return output[0]  # (B, t*h*w, D)
    if isinstance(output, torch.Tensor):
        return output
    raise ShapeMismatchError(
        f"a video+text block returned {type(output).__name__}; expected a (video, text) pair. "
        "Pass tokens=<callable output -> video tokens (B, N, D)>"
    )


def _config(model: nn.Module, key: str, default: Any = None) -> Any:
    return getattr(getattr(model, "config", None), key, default)


def _shape5(bound: Dict[str, Any]) -> Optional[Tuple[int, ...]]:
    x = bound.get("hidden_states")
    return tuple(x.shape) if isinstance(x, torch.Tensor) and x.ndim == 5 else None


# --------------------------------------------------------------------------- grid readers
def _wan_grid(model: nn.Module, bound: Dict[str, Any]) -> Optional[Grid3]:
    shape = _shape5(bound)  # (B, C, F, H, W)
    if shape is None:
        return None
    p_t, p_h, p_w = (int(v) for v in _config(model, "patch_size", (1, 2, 2)))
    return (shape[2] // p_t, shape[3] // p_h, shape[4] // p_w)


def _cogvideox_grid(model: nn.Module, bound: Dict[str, Any]) -> Optional[Grid3]:
    shape = _shape5(bound)  # (B, F, C, H, W)
    if shape is None:
        return None
    p = int(_config(model, "patch_size", 2))
    p_t = _config(model, "patch_size_t", None)
    frames = shape[1] if p_t is None else shape[1] // int(p_t)  # CogVideoX 1.5 patches 2 latent frames per token
    return (frames, shape[3] // p, shape[4] // p)


def _hunyuan_grid(model: nn.Module, bound: Dict[str, Any]) -> Optional[Grid3]:
    shape = _shape5(bound)  # (B, C, F, H, W)
    if shape is None:
        return None
    p = int(_config(model, "patch_size", 2))
    p_t = int(_config(model, "patch_size_t", 1))
    return (shape[2] // p_t, shape[3] // p, shape[4] // p)


def _ltx_grid(model: nn.Module, bound: Dict[str, Any]) -> Optional[Grid3]:
    # LTX-Video takes packed tokens (B, N, C); the latent sizes come as forward arguments
    sizes = [bound.get(k) for k in ("num_frames", "height", "width")]
    if any(v is None for v in sizes):
        return None
    p = int(_config(model, "patch_size", 1))
    p_t = int(_config(model, "patch_size_t", 1))
    f, h, w = (int(v) for v in sizes)
    return (f // p_t, h // p, w // p)


def _tracker(read: Any, temporal_compression: Any):
    def build(model: nn.Module) -> VideoGridTracker:
        k = temporal_compression(model) if callable(temporal_compression) else temporal_compression
        return VideoGridTracker(model, read, temporal_compression=k)

    return build


def _hunyuan_blocks(model: nn.Module) -> List[str]:
    # dual-stream blocks run first, then single-stream ones: an int indexes the concatenation
    return _numbered("transformer_blocks", model.transformer_blocks) + _numbered(
        "single_transformer_blocks", model.single_transformer_blocks
    )


# --------------------------------------------------------------------------- the presets
DIFFUSERS_VIDEO_PRESETS: Tuple[ModelPreset, ...] = (
    register_preset(
        ModelPreset(
            name="diffusers-wan",
            class_names=("WanTransformer3DModel",),
            blocks=lambda m: _numbered("blocks", m.blocks),
            hidden_dim=_block_width(_WAN_BLOCK),
            recommended_layer=(
                "recommended, not a published setting: about a quarter of the depth, e.g. layers=7 for "
                "Wan 2.1 1.3B (30 blocks) and layers=9 for 14B (40 blocks), following REPA's image results"
            ),
            notes="all block tokens are video tokens; grid (F/p_t, H/p_h, W/p_w); VAE temporal compression 4",
            video=_tracker(_wan_grid, 4),
        )
    ),
    register_preset(
        ModelPreset(
            name="diffusers-cogvideox",
            class_names=("CogVideoXTransformer3DModel",),
            blocks=_transformer_blocks,
            tokens=_only_blocks(_TRANSFORMER_BLOCK, video_stream),
            hidden_dim=_block_width(_TRANSFORMER_BLOCK),
            recommended_layer=(
                "VideoREPA's released CogVideoX-2B script passes --align_layer 18 (of 30 blocks); other "
                "depths are a recommendation, not a published setting: about a quarter to half of the depth"
            ),
            notes="blocks return (video, text): only the video stream is aligned; VAE temporal compression 4",
            video=_tracker(_cogvideox_grid, lambda m: int(_config(m, "temporal_compression_ratio", 4))),
        )
    ),
    register_preset(
        ModelPreset(
            name="diffusers-hunyuan-video",
            class_names=("HunyuanVideoTransformer3DModel",),
            blocks=_hunyuan_blocks,
            tokens=_only_blocks(_HUNYUAN_BLOCK, video_stream),
            hidden_dim=_block_width(_HUNYUAN_BLOCK),
            recommended_layer=(
                "recommended, not a published setting: a dual-stream block about a quarter of the total "
                "depth, e.g. layers=14 (the 15th of 20 dual-stream blocks, of 60 in all)"
            ),
            notes="ints index transformer_blocks then single_transformer_blocks; both return (video, text)",
            video=_tracker(_hunyuan_grid, 4),
        )
    ),
    register_preset(
        ModelPreset(
            name="diffusers-ltx-video",
            class_names=("LTXVideoTransformer3DModel",),
            blocks=_transformer_blocks,
            hidden_dim=_block_width(_TRANSFORMER_BLOCK),
            recommended_layer=(
                "recommended, not a published setting: about a quarter of the depth, e.g. layers=6 of 28"
            ),
            notes="packed video tokens; grid from the num_frames/height/width arguments; VAE temporal compression 8",
            video=_tracker(_ltx_grid, 8),
        )
    ),
)
