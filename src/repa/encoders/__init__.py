"""Frozen target encoders for REPA: a registry of specs, factories and weights lookup.

    from repa.encoders import create_encoder, list_encoders
    enc = create_encoder("dinov2-vit-b")          # weights from the local caches, else a clear error
    tokens = enc(images)                          # uint8 / [0, 1] (B, 3, 256, 256) -> (B, 256, 768) float32
    enc.grid(256), enc.grid(512)                  # (16, 16), (32, 32)

Importing this package registers the built-in entries; it imports neither timm nor
huggingface-hub (they load when an encoder is built or its weights are looked up).
"""

from . import builtin as _builtin  # noqa: F401  (registers the built-in encoders)
from .checkpoints import convert_checkpoint, load_encoder_state_dict, read_weights_file, save_encoder_weights
from .frozen import FrozenEncoder
from .registry import create_encoder, get_encoder_spec, list_encoders, local_weights_path, register_encoder
from .spec import EncoderSpec
from .weights import locate_weights, repa_home

__all__ = [
    "EncoderSpec",
    "FrozenEncoder",
    "register_encoder",
    "create_encoder",
    "list_encoders",
    "get_encoder_spec",
    "local_weights_path",
    "locate_weights",
    "repa_home",
    "read_weights_file",
    "convert_checkpoint",
    "load_encoder_state_dict",
    "save_encoder_weights",
]
