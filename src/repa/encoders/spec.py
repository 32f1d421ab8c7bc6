"""`EncoderSpec`: everything `repa` must know about one frozen encoder, in one dataclass.

A spec is the encoder's contract, read by every other part of the package (no per-name ``if``
chains anywhere): where its weights come from, how an image in [0, 1] becomes the encoder's
input (mean/std, the resize rule from the training-image size R to the encoder's input size,
interpolation, and whether the resize comes before or after normalization), which output is the
REPA target (final-norm or pre-norm tokens), how many prefix tokens (CLS, registers) to drop,
and the license of the weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

from ..errors import ConfigError

__all__ = [
    "EncoderSpec",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CLIP_MEAN",
    "CLIP_STD",
    "SIGLIP_MEAN",
    "SIGLIP_STD",
    "CHECKPOINT_LAYOUTS",
    "OVERRIDABLE_FIELDS",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

# layouts of original (non-timm) checkpoint files that `weights=` understands; see checkpoints.py
CHECKPOINT_LAYOUTS = ("timm", "dinov2", "mae", "ijepa", "mocov3", "dino")
_INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "area")
_EXTRACTS = ("vit", "forward")

# spec fields a caller may override per call: create_encoder(name, input_size=None, input_scale=1.0)
OVERRIDABLE_FIELDS = frozenset(
    {"input_size", "input_scale", "interpolation", "antialias", "normalize_first", "mean", "std", "final_norm"}
)

ImageSize = Union[int, Sequence[int]]


def _pair(value: ImageSize, what: str) -> Tuple[int, int]:
    if isinstance(value, bool):
        raise ConfigError(f"{what} must be an int or a pair (h, w) of ints, got {value!r}")
    if isinstance(value, int):
        h = w = value
    else:
        try:
            h, w = (int(v) for v in value)
        except (TypeError, ValueError):
            raise ConfigError(f"{what} must be an int or a pair (h, w) of ints, got {value!r}") from None
    if h <= 0 or w <= 0:
        raise ConfigError(f"{what} must be positive, got {(h, w)}")
    return h, w


@dataclass(frozen=True)
class EncoderSpec:
    """The contract of one registered encoder.

    Attributes:
        name: registry name (looked up case-insensitively).
        embed_dim: width D of the returned tokens (B, N, D).
        patch_size: side of one patch in encoder-input pixels.
        family: short family name (``"dinov2"``, ``"clip"``, ...), shown by ``repa encoders``.
        prefix_tokens: tokens before the patch tokens in the network's output (CLS + registers);
            they are dropped, so REPA aligns patch tokens only.
        final_norm: ``True``: the target is the output after the network's final norm;
            ``False``: the last block's output before it (MAE; CLIP before ``ln_post``).
        mean, std: per-channel normalization of [0, 1] images.
        in_chans: channels the network expects (a 1-channel image is repeated to 3).
        input_size: fixed encoder input side (CLIP and I-JEPA in REPA: 224), or ``None``.
        input_scale: when ``input_size`` is ``None``, the input side is ``R * input_scale``
            rounded to a multiple of the patch (DINOv2: 224/256, so 256 -> 224 and 512 -> 448;
            1.0 is the native size).
        interpolation: ``F.interpolate`` mode of the resize (REPA: bicubic).
        antialias: anti-aliasing of the resize (REPA's ``F.interpolate`` calls: off).
        normalize_first: ``True``: normalize then resize (REPA's DINOv2 order);
            ``False``: resize then normalize (its CLIP order). Both interpolations are affine
            per channel with weights summing to one, so the two orders agree up to rounding.
        extract: ``"vit"``: a timm ViT's ``forward_intermediates`` of the last block (final norm
            per ``final_norm``, prefix tokens dropped by timm); ``"forward"``: ``model(x)``
            returns all tokens (B, N_all, D) (or a map (B, D, h, w)) and the first
            ``prefix_tokens`` are dropped.
        arch: the timm model name built (``"vit_base_patch14_dinov2.lvd142m"``), or
            ``"VisionTransformer"`` for a ViT configured by ``arch_kwargs`` alone.
        arch_kwargs: keywords for the network's constructor.
        hf_hub_id: Hugging Face Hub repository of the weights (timm layout), or ``None``.
        hf_filenames: files tried in that repository, in order.
        url: the original checkpoint's URL, or ``None``.
        checkpoint_layout: layout of original checkpoint files (one of ``CHECKPOINT_LAYOUTS``);
            timm-layout files load whatever the layout.
        shipped_asset: file name under ``repa/encoders/assets`` that may ship with the package.
        license: license of the weights.
        params: parameter count of the network (``repa encoders`` shows it without building).
        pretrained_size: input side the weights were trained at (information only).
        notes: anything a user should know (deviations from the reference, how to get weights).
    """

    name: str
    embed_dim: int
    patch_size: int
    family: str = "custom"
    prefix_tokens: int = 0
    final_norm: bool = True
    mean: Tuple[float, ...] = IMAGENET_MEAN
    std: Tuple[float, ...] = IMAGENET_STD
    in_chans: int = 3
    input_size: Optional[int] = None
    input_scale: float = 1.0
    interpolation: str = "bicubic"
    antialias: bool = False
    normalize_first: bool = True
    extract: str = "forward"
    arch: Optional[str] = None
    arch_kwargs: Mapping[str, Any] = field(default_factory=dict)
    hf_hub_id: Optional[str] = None
    hf_filenames: Tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")
    url: Optional[str] = None
    checkpoint_layout: str = "timm"
    shipped_asset: Optional[str] = None
    license: str = "unknown"
    params: Optional[int] = None
    pretrained_size: Optional[int] = None
    notes: str = ""

    def __post_init__(self) -> None:
        where = f"encoder spec {self.name!r}"
        if not isinstance(self.name, str) or not self.name.strip():
            raise ConfigError(f"encoder spec name must be a non-empty string, got {self.name!r}")
        for attr in ("embed_dim", "patch_size", "in_chans"):
            value = getattr(self, attr)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{where}: {attr} must be a positive int, got {value!r}")
        if not isinstance(self.prefix_tokens, int) or self.prefix_tokens < 0:
            raise ConfigError(f"{where}: prefix_tokens must be an int >= 0, got {self.prefix_tokens!r}")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise ConfigError(
                f"{where}: mean {self.mean} and std {self.std} must have in_chans={self.in_chans} entries each"
            )
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"{where}: std must be positive, got {self.std}")
        if self.input_size is not None and (not isinstance(self.input_size, int) or self.input_size <= 0):
            raise ConfigError(f"{where}: input_size must be a positive int or None, got {self.input_size!r}")
        if not (isinstance(self.input_scale, (int, float)) and self.input_scale > 0):
            raise ConfigError(f"{where}: input_scale must be a positive number, got {self.input_scale!r}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ConfigError(f"{where}: interpolation must be one of {_INTERPOLATIONS}, got {self.interpolation!r}")
        if self.extract not in _EXTRACTS:
            raise ConfigError(f"{where}: extract must be one of {_EXTRACTS}, got {self.extract!r}")
        if self.checkpoint_layout not in CHECKPOINT_LAYOUTS:
            raise ConfigError(
                f"{where}: checkpoint_layout must be one of {CHECKPOINT_LAYOUTS}, got {self.checkpoint_layout!r}"
            )
        object.__setattr__(self, "arch_kwargs", dict(self.arch_kwargs))
        object.__setattr__(self, "hf_filenames", tuple(self.hf_filenames))

    # ------------------------------------------------------------------ geometry
    def encoder_input_size(self, image_size: ImageSize) -> Tuple[int, int]:
        """The encoder's input (H, W) for training images of ``image_size`` (R or (H, W)).

        Fixed (``input_size``) or ``round(side * input_scale / patch) * patch`` per side, at
        least one patch: DINOv2 maps 256 -> 224 and 512 -> 448 (224 * R / 256).
        """
        h, w = _pair(image_size, "image_size")
        if self.input_size is not None:
            return (self.input_size, self.input_size)
        p = self.patch_size
        sides = [max(1, int(math.floor(side * self.input_scale / p + 0.5))) * p for side in (h, w)]
        return (sides[0], sides[1])

    def grid(self, image_size: ImageSize) -> Tuple[int, int]:
        """Token grid (h, w) the encoder returns for images of ``image_size``."""
        h, w = self.encoder_input_size(image_size)
        return (h // self.patch_size, w // self.patch_size)

    def num_tokens(self, image_size: ImageSize) -> int:
        """Number of patch tokens N returned for images of ``image_size``."""
        h, w = self.grid(image_size)
        return h * w

    # ------------------------------------------------------------------ descriptions
    @property
    def resize_rule(self) -> str:
        """The resize rule in words: ``"224"``, ``"R"`` or ``"224*R/256"``."""
        if self.input_size is not None:
            return f"{self.input_size}"
        if self.input_scale == 1.0:
            return "R"
        frac = self.input_scale * 256
        if abs(frac - round(frac)) < 1e-9:
            return f"{int(round(frac))}*R/256"
        return f"{self.input_scale:g}*R"

    @property
    def preprocessing(self) -> str:
        """One line describing the preprocessing of a uint8 image, in order."""
        norm = "mean/std " + _short(self.mean) + "/" + _short(self.std)
        if self.resize_rule == "R":
            return f"/255, {norm}, no resize (native R)"
        resize = f"{self.interpolation} resize to {self.resize_rule}" + (" (antialias)" if self.antialias else "")
        steps = [norm, resize] if self.normalize_first else [resize, norm]
        return "/255, " + ", then ".join(steps)

    @property
    def target(self) -> str:
        """Which tokens are the target, in words."""
        where = "after the final norm" if self.final_norm else "before the final norm"
        drop = f", {self.prefix_tokens} prefix token(s) dropped" if self.prefix_tokens else ""
        return f"patch tokens {where}{drop}"

    @property
    def weights_source(self) -> str:
        """``"hf:<repo>"``, ``"url:<url>"`` or ``"local"``."""
        if self.hf_hub_id:
            return f"hf:{self.hf_hub_id}"
        if self.url:
            return f"url:{self.url}"
        return "local"

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-friendly dict of every field plus the derived descriptions."""
        out: Dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        out.update(resize_rule=self.resize_rule, preprocessing=self.preprocessing, target=self.target)
        out["weights_source"] = self.weights_source
        return out


def _short(values: Tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"
