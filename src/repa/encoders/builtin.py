"""The built-in encoders: REPA's reference names and the timm families, as specs.

Reference names (REPA's ``--enc-type``) keep the reference's preprocessing exactly:

- ``dinov2-vit-{s,b,l,g}`` / ``dinov2reg-vit-*``: normalize, then bicubic resize to 224*R/256
  (16x16 tokens at 256 px, 32x32 at 512 px); final-norm patch tokens (CLS, registers dropped).
- ``clip-vit-L``: bicubic resize to 224, then CLIP mean/std; tokens before ``ln_post`` (timm's
  ``norm``) and the projection, CLS dropped. OpenAI's CLIP MLPs use QuickGELU
  (x * sigmoid(1.702 x)), so every OpenAI entry is built from timm's ``*_clip_quickgelu_*``
  twin, which reads the same weights; LAION's OpenCLIP models were trained with plain GELU and
  keep it.
- ``mae-vit-l``: native R, no resize; tokens WITHOUT the final norm, CLS dropped.
- ``jepa-vit-h``: resize to 224; all tokens after the final norm (no CLS exists).
- ``mocov3-vit-{s,b,l}``: native R; final-norm tokens, CLS dropped; local weights only.
- ``dinov1-vit-b``: native R; final-norm patch tokens, CLS dropped (the reference's DINOv1
  path was broken and returned the CLS token only).

The same weights under their timm names (``vit_base_patch14_dinov2.lvd142m`` ...) behave the same.
Other timm families pick the resize giving R/16 tokens per side, like SiT-*/2 on SD-VAE latents:
native R for patch 16, 224*R/256 for patch 14, native for DINO's patch 8 (R/8 per side); CLIP and
I-JEPA keep REPA's fixed 224. ``fmnist-vit`` is a small 1-channel ViT for 28x28 Fashion-MNIST
whose weights are trained locally (``repa teacher``).
"""

from __future__ import annotations

from typing import Any, Dict

from torch import nn

from ..errors import require
from .registry import register_encoder
from .spec import CLIP_MEAN, CLIP_STD, SIGLIP_MEAN, SIGLIP_STD, EncoderSpec

__all__ = ["timm_factory"]

_DINOV2_SCALE = 224 / 256  # REPA: 224 * R / 256 -> R/16 patches of 14 px per side
_DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2"


def timm_factory(spec: EncoderSpec, **kwargs: Any) -> nn.Module:
    """Build ``spec.arch`` with timm, random weights, no classifier, any input size.

    ``arch == "VisionTransformer"`` builds timm's ``VisionTransformer(**spec.arch_kwargs)``
    (architectures timm does not register, such as MoCo v3's ViTs and ``fmnist-vit``).
    """
    timm = require("timm")
    args: Dict[str, Any] = {"num_classes": 0, "dynamic_img_size": True}
    args.update(spec.arch_kwargs)
    args.update(kwargs)
    if spec.arch == "VisionTransformer":
        from timm.models.vision_transformer import VisionTransformer

        return VisionTransformer(**args)
    return timm.create_model(spec.arch, pretrained=False, **args)


# parameter counts of the trunks (num_classes=0), shown by `repa encoders` without building
_PARAMS: Dict[str, int] = {
    "fmnist-vit": 453_888,
    "mocov3-vit-b": 85_798_656,
    "mocov3-vit-l": 303_301_632,
    "mocov3-vit-s": 21_665_664,
    "vit_base_patch14_dinov2.lvd142m": 86_579_712,
    "vit_base_patch14_reg4_dinov2.lvd142m": 86_582_016,
    "vit_base_patch16_224.dino": 85_798_656,
    "vit_base_patch16_224.mae": 85_798_656,
    "vit_base_patch16_clip_224.laion2b": 85_799_424,
    "vit_base_patch16_clip_224.openai": 85_799_424,
    "vit_base_patch16_dinov3.lvd1689m": 85_641_216,
    "vit_base_patch16_siglip_256.v2_webli": 92_930_304,
    "vit_base_patch16_siglip_256.webli": 92_930_304,
    "vit_base_patch8_224.dino": 85_807_872,
    "vit_giant_patch14_dinov2.lvd142m": 1_136_479_232,
    "vit_giant_patch14_reg4_dinov2.lvd142m": 1_136_483_840,
    "vit_giant_patch16_gap_224.in22k_ijepa": 1_011_368_576,
    "vit_huge_patch14_224.mae": 630_764_800,
    "vit_huge_patch14_gap_224.in1k_ijepa": 630_762_240,
    "vit_huge_patch14_gap_224.in22k_ijepa": 630_762_240,
    "vit_huge_plus_patch16_dinov3.lvd1689m": 840_509_440,
    "vit_large_patch14_clip_224.laion2b": 303_179_776,
    "vit_large_patch14_clip_224.openai": 303_179_776,
    "vit_base_patch16_clip_quickgelu_224.openai": 85_799_424,
    "vit_large_patch14_clip_quickgelu_224.openai": 303_179_776,
    "vit_large_patch14_dinov2.lvd142m": 304_367_616,
    "vit_large_patch14_reg4_dinov2.lvd142m": 304_370_688,
    "vit_large_patch16_224.mae": 303_301_632,
    "vit_large_patch16_dinov3.lvd1689m": 303_079_424,
    "vit_large_patch16_siglip_256.v2_webli": 315_956_224,
    "vit_large_patch16_siglip_256.webli": 315_956_224,
    "vit_small_patch14_dinov2.lvd142m": 22_056_192,
    "vit_small_patch14_reg4_dinov2.lvd142m": 22_057_344,
    "vit_small_patch16_224.dino": 21_665_664,
    "vit_small_patch16_dinov3.lvd1689m": 21_586_944,
    "vit_small_patch8_224.dino": 21_670_272,
    "vit_so400m_patch14_siglip_224.v2_webli": 427_680_704,
    "vit_so400m_patch14_siglip_224.webli": 427_680_704,
    "vit_so400m_patch16_siglip_256.v2_webli": 427_888_064,
}


def _add(names: tuple, **fields: Any) -> None:
    """Register one timm-built spec under each of ``names`` (a REPA name and its timm name)."""
    for name in names:
        key = name if fields["arch"] == "VisionTransformer" else fields["arch"]
        spec = EncoderSpec(name=name, extract="vit", params=_PARAMS.get(key), **fields)
        register_encoder(spec)(timm_factory)


# ------------------------------------------------------------------ DINOv2 (+ registers)
_SIZES = {"s": ("small", 384), "b": ("base", 768), "l": ("large", 1024), "g": ("giant", 1536)}
for _s, (_word, _dim) in _SIZES.items():
    for _reg in (False, True):
        _arch = f"vit_{_word}_patch14_{'reg4_' if _reg else ''}dinov2.lvd142m"
        _add(
            (f"dinov2{'reg' if _reg else ''}-vit-{_s}", _arch),
            family="dinov2",
            embed_dim=_dim,
            patch_size=14,
            prefix_tokens=5 if _reg else 1,
            final_norm=True,
            input_scale=_DINOV2_SCALE,
            normalize_first=True,
            arch=_arch,
            hf_hub_id=f"timm/{_arch}",
            url=f"{_DINOV2_URL}/dinov2_vit{_s}14/dinov2_vit{_s}14{'_reg4' if _reg else ''}_pretrain.pth",
            checkpoint_layout="dinov2",
            license="apache-2.0",
            pretrained_size=518,
        )

# ------------------------------------------------------------------ DINOv3 (timm names only)
for _arch, _dim in (
    ("vit_small_patch16_dinov3.lvd1689m", 384),
    ("vit_base_patch16_dinov3.lvd1689m", 768),
    ("vit_large_patch16_dinov3.lvd1689m", 1024),
    ("vit_huge_plus_patch16_dinov3.lvd1689m", 1280),
):
    _add(
        (_arch,),
        family="dinov3",
        embed_dim=_dim,
        patch_size=16,
        prefix_tokens=5,
        final_norm=True,
        input_scale=1.0,
        normalize_first=True,
        arch=_arch,
        hf_hub_id=f"timm/{_arch}",
        license="dinov3-license",
        pretrained_size=256,
        notes="DINOv3 weights are gated on the Hugging Face Hub: accept the license on the model page first.",
    )

# ------------------------------------------------------------------ DINO (v1)
_DINO_URLS = {
    "vit_small_patch16_224.dino": "dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth",
    "vit_base_patch16_224.dino": "dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
    "vit_small_patch8_224.dino": "dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth",
    "vit_base_patch8_224.dino": "dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth",
}
for _arch, _rel in _DINO_URLS.items():
    _add(
        ("dinov1-vit-b", _arch) if _arch == "vit_base_patch16_224.dino" else (_arch,),
        family="dino",
        embed_dim=768 if "base" in _arch else 384,
        patch_size=8 if "patch8" in _arch else 16,
        prefix_tokens=1,
        final_norm=True,
        input_scale=1.0,
        normalize_first=True,
        arch=_arch,
        hf_hub_id=f"timm/{_arch}",
        url=f"https://dl.fbaipublicfiles.com/dino/{_rel}",
        checkpoint_layout="dino",
        license="apache-2.0",
        pretrained_size=224,
    )

# ------------------------------------------------------------------ CLIP: REPA's fixed 224, resize then normalize
# OpenAI CLIP was trained with QuickGELU: its entries build timm's quickgelu twin (same weights,
# same hub repository); OpenCLIP's LAION-2B models use plain GELU.
_QUICKGELU = {
    "vit_base_patch16_clip_224.openai": "vit_base_patch16_clip_quickgelu_224.openai",
    "vit_large_patch14_clip_224.openai": "vit_large_patch14_clip_quickgelu_224.openai",
}
for _name, _dim, _patch, _mean, _std in (
    ("vit_base_patch16_clip_224.openai", 768, 16, CLIP_MEAN, CLIP_STD),
    ("vit_large_patch14_clip_224.openai", 1024, 14, CLIP_MEAN, CLIP_STD),
    ("vit_base_patch16_clip_224.laion2b", 768, 16, CLIP_MEAN, CLIP_STD),
    ("vit_large_patch14_clip_224.laion2b", 1024, 14, SIGLIP_MEAN, SIGLIP_STD),  # OpenCLIP's L/14 uses 0.5/0.5
):
    _arch = _QUICKGELU.get(_name, _name)
    _add(
        ("clip-vit-L", _name) if _name == "vit_large_patch14_clip_224.openai" else (_name,),
        family="clip",
        embed_dim=_dim,
        patch_size=_patch,
        prefix_tokens=1,
        final_norm=False,  # REPA: transformer output before ln_post (timm `norm`) and the projection
        mean=_mean,
        std=_std,
        input_size=224,
        normalize_first=False,
        arch=_arch,
        hf_hub_id=f"timm/{_name}",  # the quickgelu twin reads the same repository's weights
        license="mit",
        pretrained_size=224,
    )

# ------------------------------------------------------------------ SigLIP / SigLIP 2 (no CLS; MAP head unused)
for _arch, _dim, _patch, _size in (
    ("vit_base_patch16_siglip_256.webli", 768, 16, 256),
    ("vit_large_patch16_siglip_256.webli", 1024, 16, 256),
    ("vit_so400m_patch14_siglip_224.webli", 1152, 14, 224),
    ("vit_base_patch16_siglip_256.v2_webli", 768, 16, 256),
    ("vit_large_patch16_siglip_256.v2_webli", 1024, 16, 256),
    ("vit_so400m_patch14_siglip_224.v2_webli", 1152, 14, 224),
    ("vit_so400m_patch16_siglip_256.v2_webli", 1152, 16, 256),
):
    _add(
        (_arch,),
        family="siglip2" if "v2_" in _arch else "siglip",
        embed_dim=_dim,
        patch_size=_patch,
        prefix_tokens=0,
        final_norm=True,
        mean=SIGLIP_MEAN,
        std=SIGLIP_STD,
        input_scale=_patch / 16,
        normalize_first=False,
        arch=_arch,
        hf_hub_id=f"timm/{_arch}",
        license="apache-2.0",
        pretrained_size=_size,
    )

# ------------------------------------------------------------------ MAE: native R, tokens without the final norm
for _arch, _dim, _patch, _file in (
    ("vit_base_patch16_224.mae", 768, 16, "mae_pretrain_vit_base.pth"),
    ("vit_large_patch16_224.mae", 1024, 16, "mae_pretrain_vit_large.pth"),
    ("vit_huge_patch14_224.mae", 1280, 14, "mae_pretrain_vit_huge.pth"),
):
    _add(
        ("mae-vit-l", _arch) if _arch == "vit_large_patch16_224.mae" else (_arch,),
        family="mae",
        embed_dim=_dim,
        patch_size=_patch,
        prefix_tokens=1,
        final_norm=False,
        input_scale=_patch / 16,
        normalize_first=True,
        arch=_arch,
        hf_hub_id=f"timm/{_arch}",
        url=f"https://dl.fbaipublicfiles.com/mae/pretrain/{_file}",
        checkpoint_layout="mae",
        license="cc-by-nc-4.0",
        pretrained_size=224,
    )

# ------------------------------------------------------------------ I-JEPA: fixed 224, all tokens, URL-only weights
for _arch, _dim, _patch, _file in (
    ("vit_huge_patch14_gap_224.in1k_ijepa", 1280, 14, "IN1K-vit.h.14-300e.pth.tar"),
    ("vit_huge_patch14_gap_224.in22k_ijepa", 1280, 14, "IN22K-vit.h.14-900e.pth.tar"),
    ("vit_giant_patch16_gap_224.in22k_ijepa", 1408, 16, "IN22K-vit.g.16-600e.pth.tar"),
):
    _add(
        ("jepa-vit-h", _arch) if _arch == "vit_huge_patch14_gap_224.in1k_ijepa" else (_arch,),
        family="ijepa",
        embed_dim=_dim,
        patch_size=_patch,
        prefix_tokens=0,
        final_norm=True,
        input_size=224,
        normalize_first=True,
        arch=_arch,
        url=f"https://dl.fbaipublicfiles.com/ijepa/{_file}",
        checkpoint_layout="ijepa",
        license="cc-by-nc-4.0",
        pretrained_size=224,
    )

# ------------------------------------------------------------------ MoCo v3: not in timm, local weights only
for _s, _dim, _depth, _heads in (("s", 384, 12, 12), ("b", 768, 12, 12), ("l", 1024, 24, 16)):
    _add(
        (f"mocov3-vit-{_s}",),
        family="mocov3",
        embed_dim=_dim,
        patch_size=16,
        prefix_tokens=1,
        final_norm=True,
        input_scale=1.0,
        normalize_first=True,
        arch="VisionTransformer",
        arch_kwargs=dict(
            img_size=224, patch_size=16, embed_dim=_dim, depth=_depth, num_heads=_heads, mlp_ratio=4.0, qkv_bias=True
        ),
        checkpoint_layout="mocov3",
        license="cc-by-nc-4.0",
        pretrained_size=224,
        notes=(
            "MoCo v3 weights are not on the Hugging Face Hub: use the checkpoint released with MoCo v3 "
            "(a 'state_dict' with 'module.base_encoder.' keys is accepted as is)."
        ),
    )

# ------------------------------------------------------------------ Fashion-MNIST teacher
_add(
    ("fmnist-vit",),
    family="fmnist",
    embed_dim=96,
    patch_size=4,
    prefix_tokens=0,
    final_norm=True,
    mean=(0.2860,),
    std=(0.3530,),
    in_chans=1,
    input_scale=1.0,
    normalize_first=True,
    arch="VisionTransformer",
    arch_kwargs=dict(
        img_size=28, patch_size=4, in_chans=1, embed_dim=96, depth=4, num_heads=3, mlp_ratio=4.0,
        class_token=False, global_pool="avg",
    ),
    shipped_asset="fmnist-vit.safetensors",
    license="apache-2.0",
    pretrained_size=28,
    notes="fmnist-vit is trained locally: `repa teacher` writes $REPA_HOME/encoders/fmnist-vit.safetensors.",
)
