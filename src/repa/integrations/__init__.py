"""Model presets for libraries users already train with (diffusers; timm ViTs live in repa.presets).

Importing this package registers presets by model CLASS NAME only: it imports neither diffusers
nor timm. ``repa.presets.preset_for(model)`` imports it once, so

    reg = REPARegularizer(transformer, layers=7, encoders="dinov2-vit-b")

picks the right block list and image-token slice for a diffusers ``FluxTransformer2DModel``,
``SD3Transformer2DModel``, ``UNet2DConditionModel``, ... without the user naming internals.
"""

# importing the two modules registers the diffusers image and video presets
from .diffusers_presets import (
    DIFFUSERS_PRESETS,
    FluxImageTokens,
    joint_image_stream,
    unet_block_hidden_states,
)
from .diffusers_video import DIFFUSERS_VIDEO_PRESETS, video_stream

__all__ = ["DIFFUSERS_PRESETS", "DIFFUSERS_VIDEO_PRESETS", "video_stream", "FluxImageTokens", "joint_image_stream", "unet_block_hidden_states"]
