"""repa: REPresentation Alignment (arXiv 2410.06940) as a drop-in regularizer for diffusion models.

    from repa import REPARegularizer
    reg = REPARegularizer(model, layers="blocks.7", encoders="dinov2-vit-b")
    loss = diffusion_loss + reg(clean_images)   # after the model's forward on x_t

Importing ``repa`` loads neither timm nor huggingface-hub and downloads nothing.
"""

import logging

from ._cpu import prefer_passive_openmp
from ._version import __version__

prefer_passive_openmp()  # the `repa` programs only, before torch loads: see repa/_cpu.py
# A library is silent unless its user configures logging; `repa.cli` adds a stderr handler.
logging.getLogger("repa").addHandler(logging.NullHandler())

from . import errors, schedules  # noqa: E402
from .combine import CombinedOutput, combine  # noqa: E402
from .config import REPAConfig  # noqa: E402
from .dispersive import DispersiveOutput, DispersiveRegularizer  # noqa: E402
from .encoders import create_encoder, list_encoders, register_encoder  # noqa: E402
from .losses import build_loss, list_losses, register_loss  # noqa: E402
from .presets import ModelPreset, list_presets, register_preset  # noqa: E402
from .projectors import build_projector, list_projectors, register_projector  # noqa: E402
from .regularizer import REPAOutput, REPARegularizer  # noqa: E402
from .self_alignment import SelfAlignmentOutput, SelfAlignmentRegularizer  # noqa: E402

__all__ = [
    "__version__",
    "REPARegularizer",
    "REPAOutput",
    "REPAConfig",
    "DispersiveRegularizer",
    "DispersiveOutput",
    "SelfAlignmentRegularizer",
    "SelfAlignmentOutput",
    "combine",
    "CombinedOutput",
    "create_encoder",
    "list_encoders",
    "register_encoder",
    "ModelPreset",
    "register_preset",
    "list_presets",
    "build_loss",
    "register_loss",
    "list_losses",
    "build_projector",
    "register_projector",
    "list_projectors",
    "errors",
    "schedules",
]
