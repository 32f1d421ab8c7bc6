"""Specification of the encoder registry: names, published sizes, preprocessing, weights, errors.

Everything runs offline on CPU: big architectures are built on the meta device (shapes only),
small ones with random weights, and every weights file is written by the test itself.
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import pytest
import torch
from torch import nn

from repa.encoders import (
    EncoderSpec,
    FrozenEncoder,
    create_encoder,
    get_encoder_spec,
    list_encoders,
    local_weights_path,
    register_encoder,
    registry,
    save_encoder_weights,
)
from repa.errors import ConfigError, ShapeMismatchError, StateDictError, UnknownNameError, WeightsNotFoundError

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


@pytest.fixture
def isolated_home(tmp_path, monkeypatch):
    """Empty REPA_HOME, torch hub dir and HF cache: nothing can be found unless a test puts it there."""
    monkeypatch.setenv("REPA_HOME", str(tmp_path / "repa_home"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


# ---------------------------------------------------------------------------------------------
# Published numbers: name -> (embed dim, patch, prefix tokens (CLS + registers), tokens at 256 px,
# tokens at 512 px, parameters in millions as published, approximately). The token counts follow
# REPA: DINOv2 at 224*R/256 (16x16 at 256, 32x32 at 512), CLIP and I-JEPA at a fixed 224, MAE,
# MoCo v3 and DINO at the native size.
# ---------------------------------------------------------------------------------------------
PUBLISHED = {
    # REPA's reference names
    "dinov2-vit-s": (384, 14, 1, 256, 1024, 21),
    "dinov2-vit-b": (768, 14, 1, 256, 1024, 86),
    "dinov2-vit-l": (1024, 14, 1, 256, 1024, 300),
    "dinov2-vit-g": (1536, 14, 1, 256, 1024, 1100),
    "dinov2reg-vit-s": (384, 14, 5, 256, 1024, 21),
    "dinov2reg-vit-b": (768, 14, 5, 256, 1024, 86),
    "dinov2reg-vit-l": (1024, 14, 5, 256, 1024, 300),
    "dinov2reg-vit-g": (1536, 14, 5, 256, 1024, 1100),
    "clip-vit-L": (1024, 14, 1, 256, 256, 304),
    "mae-vit-l": (1024, 16, 1, 256, 1024, 304),
    "jepa-vit-h": (1280, 14, 0, 256, 256, 632),
    "mocov3-vit-s": (384, 16, 1, 256, 1024, 22),
    "mocov3-vit-b": (768, 16, 1, 256, 1024, 86),
    "mocov3-vit-l": (1024, 16, 1, 256, 1024, 304),
    "dinov1-vit-b": (768, 16, 1, 256, 1024, 86),
    "fmnist-vit": (96, 4, 0, 4096, 16384, 0.45),
    # timm names
    "vit_small_patch14_dinov2.lvd142m": (384, 14, 1, 256, 1024, 21),
    "vit_base_patch14_dinov2.lvd142m": (768, 14, 1, 256, 1024, 86),
    "vit_large_patch14_dinov2.lvd142m": (1024, 14, 1, 256, 1024, 300),
    "vit_giant_patch14_dinov2.lvd142m": (1536, 14, 1, 256, 1024, 1100),
    "vit_small_patch14_reg4_dinov2.lvd142m": (384, 14, 5, 256, 1024, 21),
    "vit_base_patch14_reg4_dinov2.lvd142m": (768, 14, 5, 256, 1024, 86),
    "vit_large_patch14_reg4_dinov2.lvd142m": (1024, 14, 5, 256, 1024, 300),
    "vit_giant_patch14_reg4_dinov2.lvd142m": (1536, 14, 5, 256, 1024, 1100),
    "vit_small_patch16_dinov3.lvd1689m": (384, 16, 5, 256, 1024, 21),
    "vit_base_patch16_dinov3.lvd1689m": (768, 16, 5, 256, 1024, 86),
    "vit_large_patch16_dinov3.lvd1689m": (1024, 16, 5, 256, 1024, 300),
    "vit_huge_plus_patch16_dinov3.lvd1689m": (1280, 16, 5, 256, 1024, 840),
    "vit_small_patch16_224.dino": (384, 16, 1, 256, 1024, 21),
    "vit_base_patch16_224.dino": (768, 16, 1, 256, 1024, 85),
    "vit_small_patch8_224.dino": (384, 8, 1, 1024, 4096, 21),
    "vit_base_patch8_224.dino": (768, 8, 1, 1024, 4096, 85),
    "vit_base_patch16_clip_224.openai": (768, 16, 1, 196, 196, 86),
    "vit_large_patch14_clip_224.openai": (1024, 14, 1, 256, 256, 304),
    "vit_base_patch16_clip_224.laion2b": (768, 16, 1, 196, 196, 86),
    "vit_large_patch14_clip_224.laion2b": (1024, 14, 1, 256, 256, 304),
    "vit_base_patch16_siglip_256.webli": (768, 16, 0, 256, 1024, 93),
    "vit_large_patch16_siglip_256.webli": (1024, 16, 0, 256, 1024, 316),
    "vit_so400m_patch14_siglip_224.webli": (1152, 14, 0, 256, 1024, 428),
    "vit_base_patch16_siglip_256.v2_webli": (768, 16, 0, 256, 1024, 93),
    "vit_large_patch16_siglip_256.v2_webli": (1024, 16, 0, 256, 1024, 316),
    "vit_so400m_patch14_siglip_224.v2_webli": (1152, 14, 0, 256, 1024, 428),
    "vit_so400m_patch16_siglip_256.v2_webli": (1152, 16, 0, 256, 1024, 428),
    "vit_base_patch16_224.mae": (768, 16, 1, 256, 1024, 86),
    "vit_large_patch16_224.mae": (1024, 16, 1, 256, 1024, 304),
    "vit_huge_patch14_224.mae": (1280, 14, 1, 256, 1024, 632),
    "vit_huge_patch14_gap_224.in1k_ijepa": (1280, 14, 0, 256, 256, 632),
    "vit_huge_patch14_gap_224.in22k_ijepa": (1280, 14, 0, 256, 256, 632),
    "vit_giant_patch16_gap_224.in22k_ijepa": (1408, 16, 0, 196, 196, 1012),
}

# REPA reference name -> the timm weights it uses; both names must behave identically
REFERENCE_TO_TIMM = {
    "dinov2-vit-b": "vit_base_patch14_dinov2.lvd142m",
    "dinov2reg-vit-l": "vit_large_patch14_reg4_dinov2.lvd142m",
    "clip-vit-L": "vit_large_patch14_clip_224.openai",
    "mae-vit-l": "vit_large_patch16_224.mae",
    "jepa-vit-h": "vit_huge_patch14_gap_224.in1k_ijepa",
    "dinov1-vit-b": "vit_base_patch16_224.dino",
}


def _builtin_names():
    return [n for n in list_encoders() if not n.startswith("test-")]


def test_every_registered_encoder_has_a_published_row():
    assert sorted(_builtin_names()) == sorted(PUBLISHED)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_builds_and_matches_published_sizes(name):
    dim, patch, prefix, n256, n512, params_m = PUBLISHED[name]
    spec = get_encoder_spec(name)
    assert (spec.embed_dim, spec.patch_size, spec.prefix_tokens) == (dim, patch, prefix)
    enc = create_encoder(name, pretrained=False, device="meta")  # shapes only: ViT-g/H/G fit anywhere
    assert isinstance(enc, FrozenEncoder) and enc.name == spec.name
    assert (enc.embed_dim, enc.patch_size) == (dim, patch)
    assert enc.model.num_prefix_tokens == prefix
    assert tuple(enc.model.patch_embed.patch_size) == (patch, patch)
    n_params = sum(p.numel() for p in enc.model.parameters())
    assert n_params == spec.params
    assert abs(n_params / 1e6 - params_m) / params_m < 0.06
    assert math.prod(enc.grid(256)) == n256 and math.prod(enc.grid(512)) == n512
    # blocks keep the token count; one block keeps the meta forward fast
    enc.model.blocks = enc.model.blocks[:1]
    for size, n in ((256, n256), (512, n512)):
        out = enc(torch.zeros(2, spec.in_chans, size, size))
        assert tuple(out.shape) == (2, n, dim)


def test_reference_names_are_case_insensitive_and_equal_their_timm_weights():
    assert get_encoder_spec("CLIP-ViT-L").name == "clip-vit-L"
    assert get_encoder_spec("DINOv2-ViT-B").name == "dinov2-vit-b"
    for ref, timm_name in REFERENCE_TO_TIMM.items():
        a, b = get_encoder_spec(ref).to_dict(), get_encoder_spec(timm_name).to_dict()
        a.pop("name"), b.pop("name")
        assert a == b, ref


def test_specs_agree_with_timm_pretrained_configs():
    import timm
    from timm.models import get_pretrained_cfg

    available = set(timm.list_models(pretrained=True))
    for name in _builtin_names():
        spec = get_encoder_spec(name)
        if spec.arch == "VisionTransformer":
            continue
        assert spec.arch in available, name
        cfg = get_pretrained_cfg(spec.arch)
        assert spec.hf_hub_id == (cfg.hf_hub_id or None), name
        assert spec.url == (cfg.url or None), name
        assert spec.mean == pytest.approx(cfg.mean) and spec.std == pytest.approx(cfg.std), name
        assert spec.interpolation == cfg.interpolation == "bicubic", name


def test_reference_preprocessing_contract():
    dino, clip = get_encoder_spec("dinov2-vit-b"), get_encoder_spec("clip-vit-L")
    mae, jepa = get_encoder_spec("mae-vit-l"), get_encoder_spec("jepa-vit-h")
    assert (dino.mean, dino.std) == IMAGENET and dino.normalize_first and dino.final_norm
    assert dino.encoder_input_size(256) == (224, 224) and dino.encoder_input_size(512) == (448, 448)
    assert (clip.mean, clip.std) == CLIP and not clip.normalize_first and not clip.final_norm
    assert clip.encoder_input_size(256) == clip.encoder_input_size(512) == (224, 224)
    assert mae.encoder_input_size(256) == (256, 256) and not mae.final_norm
    assert jepa.encoder_input_size(512) == (224, 224) and jepa.final_norm and jepa.prefix_tokens == 0
    fm = get_encoder_spec("fmnist-vit")
    assert (fm.in_chans, fm.mean, fm.std, fm.grid(28)) == (1, (0.2860,), (0.3530,), (7, 7))
    assert fm.hf_hub_id is None and fm.url is None  # local weights only
    assert {get_encoder_spec(n).license for n in ("mae-vit-l", "jepa-vit-h", "mocov3-vit-b")} == {"cc-by-nc-4.0"}


# ---------------------------------------------------------------------------------------------
# Preprocessing numerics against a hand-written bicubic resampler (Keys kernel, a = -0.75,
# half-pixel centres, border replicated), the definition F.interpolate(mode="bicubic") follows.
# ---------------------------------------------------------------------------------------------
def _keys(d: float, a: float = -0.75) -> float:
    d = abs(d)
    if d <= 1:
        return (a + 2) * d**3 - (a + 3) * d**2 + 1
    if d < 2:
        return a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a
    return 0.0


def _bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = (i + 0.5) * n_in / n_out - 0.5
        base = math.floor(src)
        for k in range(-1, 3):
            m[i, min(max(base + k, 0), n_in - 1)] += _keys(src - (base + k))
    return m


def _resize_np(img: np.ndarray, out: int) -> np.ndarray:  # (C, H, W) -> (C, out, out)
    mh, mw = _bicubic_matrix(img.shape[1], out), _bicubic_matrix(img.shape[2], out)
    return np.stack([mh @ c @ mw.T for c in img])


def _normalize_np(img: np.ndarray, mean, std) -> np.ndarray:
    return (img - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]


def _spec_only(name: str) -> FrozenEncoder:
    """Preprocessing depends on the spec alone: wrap a stand-in network."""
    return FrozenEncoder(nn.Linear(1, 1), get_encoder_spec(name))


def test_dinov2_preprocessing_matches_hand_computation():
    g = torch.Generator().manual_seed(1)
    img = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=g)
    got = _spec_only("dinov2-vit-b").preprocess(img)
    assert tuple(got.shape) == (2, 3, 56, 56)  # 224 * 64 / 256 = 56 = 4 patches of 14
    for b in range(2):
        x = img[b].double().numpy() / 255.0
        want = _resize_np(_normalize_np(x, *IMAGENET), 56)  # normalize, then resize
        np.testing.assert_allclose(got[b].numpy(), want, atol=1e-4)  # float32 source coordinates


def test_clip_preprocessing_matches_hand_computation():
    g = torch.Generator().manual_seed(2)
    img = torch.randint(0, 256, (1, 3, 40, 40), dtype=torch.uint8, generator=g)
    got = _spec_only("clip-vit-L").preprocess(img)
    assert tuple(got.shape) == (1, 3, 224, 224)  # fixed 224 whatever R
    x = img[0].double().numpy() / 255.0
    want = _normalize_np(_resize_np(x, 224), *CLIP)  # resize, then normalize
    np.testing.assert_allclose(got[0].numpy(), want, atol=1e-4)


def test_native_resolution_means_no_resize_and_uint8_equals_float():
    img = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    enc = _spec_only("mae-vit-l")
    got = enc.preprocess(img)
    mean, std = (torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1) for v in IMAGENET)
    want = (img.double() / 255 - mean) / std
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=0)
    torch.testing.assert_close(enc.preprocess(img.float() / 255), got)


def test_preprocessing_input_errors_and_grayscale():
    enc = _spec_only("dinov2-vit-s")
    gray = torch.rand(1, 1, 32, 32)
    torch.testing.assert_close(enc.preprocess(gray), enc.preprocess(gray.expand(-1, 3, -1, -1)))
    with pytest.raises(ShapeMismatchError, match=r"expects 3-channel images, got 4 channels"):
        enc.preprocess(torch.rand(1, 4, 32, 32))
    with pytest.raises(ShapeMismatchError, match=r"expects images \(B, C, H, W\)"):
        enc.preprocess(torch.rand(3, 32, 32))
    with pytest.raises(ConfigError, match=r"uint8 \(0-255\) or float"):
        enc.preprocess(torch.zeros(1, 3, 32, 32, dtype=torch.int64))


def test_spec_overrides_per_call():
    enc = create_encoder("clip-vit-L", pretrained=False, device="meta", input_size=None, input_scale=224 / 256)
    assert enc.grid(512) == (32, 32) and get_encoder_spec("clip-vit-L").grid(512) == (16, 16)


# ---------------------------------------------------------------------------------------------
# Outputs: which tokens, frozen, dtype
# ---------------------------------------------------------------------------------------------
def test_final_norm_and_prefix_tokens_dropped_dinov2_with_registers():
    enc = create_encoder("dinov2reg-vit-s", pretrained=False, depth=1)
    img = torch.rand(2, 3, 32, 32)  # -> 28 px -> 2x2 patches of 14
    out = enc(img)
    assert tuple(out.shape) == (2, 4, 384) and out.dtype == torch.float32
    full = enc.model.forward_features(enc.preprocess(img))  # (B, 1 + 4 + 4, D), final norm applied
    torch.testing.assert_close(out, full[:, 5:])


def test_pre_norm_targets_for_mae_and_clip():
    for name, prefix in (("mae-vit-l", 1), ("clip-vit-L", 1)):
        enc = create_encoder(name, pretrained=False, depth=1)
        img = torch.rand(1, 3, 32, 32)
        out = enc(img)  # before the final norm
        full = enc.model.forward_features(enc.preprocess(img))  # after it
        torch.testing.assert_close(enc.model.norm(out), full[:, prefix:])
        assert not torch.allclose(out, full[:, prefix:])


def test_frozen_eval_no_grad_even_after_parent_train():
    enc = create_encoder("fmnist-vit", pretrained=False)
    parent = nn.ModuleDict({"enc": enc, "head": nn.Linear(2, 2)})
    parent.train()
    assert not enc.training and not enc.model.training
    assert all(not m.training for m in enc.model.modules())
    assert all(not p.requires_grad for p in enc.parameters())
    x = torch.rand(2, 1, 28, 28, requires_grad=True)
    out = enc(x)
    assert not out.requires_grad and tuple(out.shape) == (2, 49, 96)
    torch.testing.assert_close(enc((x.detach() * 255).round().to(torch.uint8)), enc((x.detach() * 255).round() / 255))


def test_bfloat16_compute_returns_float32():
    ref = create_encoder("fmnist-vit", pretrained=False)
    low = create_encoder("fmnist-vit", pretrained=False, dtype=torch.bfloat16)
    low.model.load_state_dict({k: v.to(torch.bfloat16) for k, v in ref.model.state_dict().items()})
    x = torch.rand(2, 1, 28, 28)
    a, b = ref(x), low(x)
    assert b.dtype == torch.float32 and next(low.model.parameters()).dtype == torch.bfloat16
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99


def test_compile_matches_eager():
    eager = create_encoder("fmnist-vit", pretrained=False)
    compiled = create_encoder("fmnist-vit", pretrained=False, compile=True)
    compiled.model.load_state_dict(eager.model.state_dict())
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(compiled(x), eager(x), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Weights: local files, caches, the offline error
# ---------------------------------------------------------------------------------------------
def test_local_file_round_trip_safetensors_and_pth(tmp_path):
    enc = create_encoder("fmnist-vit", pretrained=False)
    x = torch.rand(3, 1, 28, 28)
    path = save_encoder_weights(enc, tmp_path / "teacher.safetensors")
    torch.save(enc.model.state_dict(), tmp_path / "teacher.pth")
    for file in (path, tmp_path / "teacher.pth"):
        again = create_encoder("fmnist-vit", weights=file)
        torch.testing.assert_close(again(x), enc(x), atol=0, rtol=0)


def test_default_local_path_and_teacher_with_head(isolated_home):
    assert local_weights_path("fmnist-vit") == isolated_home / "repa_home" / "encoders" / "fmnist-vit.safetensors"
    # the teacher is trained with a classifier head; the head is dropped when loaded as an encoder
    teacher = create_encoder("fmnist-vit", pretrained=False, num_classes=10)
    assert teacher.model.head.out_features == 10
    save_encoder_weights(teacher)  # -> local_weights_path("fmnist-vit")
    enc = create_encoder("fmnist-vit")  # pretrained=True finds it
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(enc(x), teacher(x), atol=0, rtol=0)


def test_pretrained_from_a_prefilled_hf_cache(isolated_home):
    src = create_encoder("dinov2-vit-s", pretrained=False, depth=1)
    snapshot = isolated_home / "hf" / "models--timm--vit_small_patch14_dinov2.lvd142m" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    save_encoder_weights(src, snapshot / "model.safetensors")
    enc = create_encoder("dinov2-vit-s", cache_dir=isolated_home / "hf", depth=1)
    x = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(enc(x), src(x), atol=0, rtol=0)


@pytest.mark.parametrize(
    "name, must_mention",
    [
        (
            "dinov2-vit-b",
            [
                "hf download timm/vit_base_patch14_dinov2.lvd142m",
                "models--timm--vit_base_patch14_dinov2.lvd142m",
                "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth",
            ],
        ),
        ("jepa-vit-h", ["https://dl.fbaipublicfiles.com/ijepa/IN1K-vit.h.14-300e.pth.tar", "ijepa checkpoint layout"]),
        ("mocov3-vit-b", ["local weights only", "mocov3-vit-b.safetensors", "module.base_encoder."]),
        ("fmnist-vit", ["local weights only", "repa teacher"]),
    ],
)
def test_offline_miss_fails_fast_with_the_fix(isolated_home, monkeypatch, name, must_mention):
    cache = isolated_home / "empty_hf_cache"
    spec, factory = registry._REGISTRY[name.lower()]
    if spec.shipped_asset:  # fmnist-vit ships its weights: look at an install without the file
        hidden = dataclasses.replace(spec, shipped_asset="not-shipped-" + spec.shipped_asset)
        monkeypatch.setitem(registry._REGISTRY, name.lower(), (hidden, factory))
    start = time.perf_counter()
    with pytest.raises(WeightsNotFoundError) as info:
        create_encoder(name, cache_dir=cache)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f"the offline miss took {elapsed:.2f} s"
    msg = str(info.value)
    assert f"encoder {get_encoder_spec(name).name!r}" in msg
    assert str(isolated_home / "repa_home" / "encoders") in msg  # where it looked
    assert "weights=" in msg and "pretrained=False" in msg  # the alternatives
    for text in must_mention:
        assert text in msg, (text, msg)
    if get_encoder_spec(name).hf_hub_id:
        assert str(cache) in msg
    assert isinstance(info.value, FileNotFoundError)


def test_weights_file_errors(tmp_path):
    with pytest.raises(WeightsNotFoundError, match=r"does not exist"):
        create_encoder("fmnist-vit", weights=tmp_path / "nope.safetensors")
    other = create_encoder("mocov3-vit-s", pretrained=False, depth=1)
    save_encoder_weights(other, tmp_path / "moco.safetensors")
    with pytest.raises(StateDictError, match=r"do not fit encoder 'fmnist-vit'.*missing.*unexpected"):
        create_encoder("fmnist-vit", weights=tmp_path / "moco.safetensors")


def test_unsafe_pickle_refused_but_a_loaded_dict_is_accepted(tmp_path):
    import argparse

    enc = create_encoder("fmnist-vit", pretrained=False)
    ckpt = {"model": enc.model.state_dict(), "args": argparse.Namespace(lr=1e-4)}
    torch.save(ckpt, tmp_path / "train.pt")
    with pytest.raises(StateDictError, match=r"nothing was run.*safetensors"):
        create_encoder("fmnist-vit", weights=tmp_path / "train.pt")
    again = create_encoder("fmnist-vit", weights=torch.load(tmp_path / "train.pt", weights_only=False))
    x = torch.rand(1, 1, 28, 28)
    torch.testing.assert_close(again(x), enc(x), atol=0, rtol=0)


def test_meta_device_needs_pretrained_false():
    with pytest.raises(ConfigError, match=r"pretrained=False"):
        create_encoder("dinov2-vit-g", device="meta")


def test_unknown_name_suggests_close_ones():
    with pytest.raises(UnknownNameError, match=r"unknown encoder 'dinov2-vit-x'.*dinov2-vit-"):
        create_encoder("dinov2-vit-x")


def test_list_encoders_patterns():
    assert list_encoders("dinov2-*") == [f"dinov2-vit-{s}" for s in "bgls"]
    assert set(list_encoders("CLIP")) >= {"clip-vit-L", "vit_large_patch14_clip_224.openai"}
    assert list_encoders("no-such-encoder") == []


# ---------------------------------------------------------------------------------------------
# Original checkpoint layouts, with their real key names (real widths, few blocks)
# ---------------------------------------------------------------------------------------------
def _vit_block(prefix: str, d: int, hidden: int, layerscale: bool = False) -> dict:
    r = torch.randn
    sd = {
        f"{prefix}norm1.weight": r(d), f"{prefix}norm1.bias": r(d),
        f"{prefix}attn.qkv.weight": r(3 * d, d), f"{prefix}attn.qkv.bias": r(3 * d),
        f"{prefix}attn.proj.weight": r(d, d), f"{prefix}attn.proj.bias": r(d),
        f"{prefix}norm2.weight": r(d), f"{prefix}norm2.bias": r(d),
        f"{prefix}mlp.fc1.weight": r(hidden, d), f"{prefix}mlp.fc1.bias": r(hidden),
        f"{prefix}mlp.fc2.weight": r(d, hidden), f"{prefix}mlp.fc2.bias": r(d),
    }  # fmt: skip
    if layerscale:
        sd[f"{prefix}ls1.gamma"], sd[f"{prefix}ls2.gamma"] = r(d), r(d)
    return sd


def test_dinov2_torch_hub_layout_with_registers(tmp_path):
    d, depth = 384, 2
    sd = {
        "cls_token": torch.randn(1, 1, d),
        "pos_embed": torch.randn(1, 1 + 37 * 37, d),  # CLS + 37x37 patches (518 px / 14)
        "register_tokens": torch.randn(1, 4, d),
        "mask_token": torch.randn(1, d),
        "patch_embed.proj.weight": torch.randn(d, 3, 14, 14),
        "patch_embed.proj.bias": torch.randn(d),
        "norm.weight": torch.randn(d),
        "norm.bias": torch.randn(d),
    }
    for i in range(depth):
        sd.update(_vit_block(f"blocks.{i}.", d, 4 * d, layerscale=True))
    torch.save(sd, tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    enc = create_encoder("dinov2reg-vit-s", weights=tmp_path / "dinov2_vits14_reg4_pretrain.pth", depth=depth)
    m = enc.model
    torch.testing.assert_close(m.reg_token, sd["register_tokens"])
    torch.testing.assert_close(m.cls_token, sd["cls_token"] + sd["pos_embed"][:, :1])  # CLS position folded in
    torch.testing.assert_close(m.pos_embed, sd["pos_embed"][:, 1:])
    torch.testing.assert_close(m.blocks[1].ls1.gamma, sd["blocks.1.ls1.gamma"])
    torch.testing.assert_close(m.blocks[0].attn.qkv.weight, sd["blocks.0.attn.qkv.weight"])


def test_dinov2_giant_chunked_swiglu_keys_map_onto_timm():
    from repa.encoders import convert_checkpoint

    model = create_encoder("dinov2-vit-g", pretrained=False, device="meta", depth=2).model
    own = model.state_dict()
    hidden = own["blocks.0.mlp.fc1.weight"].shape[0]
    d = 1536
    sd = {
        "cls_token": torch.zeros(1, 1, d),
        "pos_embed": torch.zeros(1, 1 + 37 * 37, d),
        "mask_token": torch.zeros(1, d),
        "patch_embed.proj.weight": torch.zeros(d, 3, 14, 14),
        "patch_embed.proj.bias": torch.zeros(d),
        "norm.weight": torch.zeros(d),
        "norm.bias": torch.zeros(d),
    }
    for i in range(2):  # training checkpoints keep blocks in FSDP chunks: blocks.<chunk>.<index>.
        block = _vit_block(f"blocks.0.{i}.", 8, 8, layerscale=True)
        block = {k: torch.zeros(0) for k in block if ".mlp." not in k}
        block[f"blocks.0.{i}.mlp.w12.weight"] = torch.zeros(hidden, d)
        block[f"blocks.0.{i}.mlp.w12.bias"] = torch.zeros(hidden)
        block[f"blocks.0.{i}.mlp.w3.weight"] = torch.zeros(d, hidden // 2)
        block[f"blocks.0.{i}.mlp.w3.bias"] = torch.zeros(d)
        sd.update(block)
    out = convert_checkpoint(sd, "dinov2", model)
    assert set(out) == set(own)
    assert out["blocks.1.mlp.fc2.weight"].shape == own["blocks.1.mlp.fc2.weight"].shape


def test_mae_layout_drops_the_decoder(tmp_path):
    d, depth = 1024, 1
    model_sd = {
        "cls_token": torch.randn(1, 1, d),
        "pos_embed": torch.randn(1, 1 + 14 * 14, d),
        "mask_token": torch.randn(1, 1, 512),
        "patch_embed.proj.weight": torch.randn(d, 3, 16, 16),
        "patch_embed.proj.bias": torch.randn(d),
        "norm.weight": torch.randn(d),
        "norm.bias": torch.randn(d),
        "decoder_embed.weight": torch.randn(512, d),
        "decoder_embed.bias": torch.randn(512),
        "decoder_pos_embed": torch.randn(1, 197, 512),
        "decoder_norm.weight": torch.randn(512),
        "decoder_norm.bias": torch.randn(512),
        "decoder_pred.weight": torch.randn(768, 512),
        "decoder_pred.bias": torch.randn(768),
    }
    model_sd.update(_vit_block("blocks.0.", d, 4 * d))
    model_sd.update(_vit_block("decoder_blocks.0.", 512, 2048))
    torch.save({"model": model_sd}, tmp_path / "mae_pretrain_vit_large.pth")
    enc = create_encoder("mae-vit-l", weights=tmp_path / "mae_pretrain_vit_large.pth", depth=depth)
    torch.testing.assert_close(enc.model.pos_embed, model_sd["pos_embed"])
    torch.testing.assert_close(enc.model.blocks[0].mlp.fc2.weight, model_sd["blocks.0.mlp.fc2.weight"])


def test_ijepa_layout_uses_the_encoder_with_module_prefix(tmp_path):
    d, depth = 1280, 1

    def encoder_sd():
        sd = {
            "module.patch_embed.proj.weight": torch.randn(d, 3, 14, 14),
            "module.patch_embed.proj.bias": torch.randn(d),
            "module.pos_embed": torch.randn(1, 16 * 16, d),  # no CLS in I-JEPA
            "module.norm.weight": torch.randn(d),
            "module.norm.bias": torch.randn(d),
        }
        sd.update(_vit_block("module.blocks.0.", d, 4 * d))
        return sd

    ckpt = {
        "encoder": encoder_sd(),
        "target_encoder": encoder_sd(),
        "predictor": {"module.predictor_embed.weight": torch.randn(384, d)},
        "epoch": 300,
    }
    torch.save(ckpt, tmp_path / "IN1K-vit.h.14-300e.pth.tar")
    enc = create_encoder("jepa-vit-h", weights=tmp_path / "IN1K-vit.h.14-300e.pth.tar", depth=depth)
    torch.testing.assert_close(enc.model.pos_embed, ckpt["encoder"]["module.pos_embed"])
    torch.testing.assert_close(enc.model.norm.weight, ckpt["encoder"]["module.norm.weight"])
    assert tuple(enc(torch.rand(1, 3, 64, 64)).shape) == (1, 256, d)  # fixed 224 input


def test_mocov3_layout_base_encoder_only_and_renamed_blocks(tmp_path):
    from repa.encoders import convert_checkpoint

    d, depth = 384, 2
    base = {
        "cls_token": torch.randn(1, 1, d),
        "pos_embed": torch.randn(1, 1 + 14 * 14, d),
        "patch_embed.proj.weight": torch.randn(d, 3, 16, 16),
        "patch_embed.proj.bias": torch.randn(d),
        "norm.weight": torch.randn(d),
        "norm.bias": torch.randn(d),
        "head.0.weight": torch.randn(4096, d),  # projection MLP: not part of the trunk
        "head.1.weight": torch.randn(4096),
    }
    for i in range(depth):
        base.update(_vit_block(f"blocks.{i}.", d, 4 * d))
    state = {f"module.base_encoder.{k}": v for k, v in base.items()}
    state.update({f"module.momentum_encoder.{k}": v + 1 for k, v in base.items()})
    state["module.predictor.0.weight"] = torch.randn(4096, 256)
    torch.save({"epoch": 300, "arch": "vit_small", "state_dict": state}, tmp_path / "vit-s-300ep.pth.tar")
    enc = create_encoder("mocov3-vit-s", weights=tmp_path / "vit-s-300ep.pth.tar", depth=depth)
    torch.testing.assert_close(enc.model.cls_token, base["cls_token"])  # base, not momentum, encoder
    torch.testing.assert_close(enc.model.blocks[1].attn.proj.weight, base["blocks.1.attn.proj.weight"])
    # the released ViT checkpoints misname two blocks: blocks.13.norm13, mlp.fc13, blocks.14.norm14, mlp.fc14
    large = create_encoder("mocov3-vit-l", pretrained=False, device="meta").model
    sd = {f"module.base_encoder.{k}": torch.zeros(0) for k in large.state_dict()}
    for old, new in (
        ("blocks.13.norm13.weight", "blocks.13.norm1.weight"),
        ("blocks.13.mlp.fc13.weight", "blocks.13.mlp.fc1.weight"),
        ("blocks.14.norm14.weight", "blocks.14.norm2.weight"),
        ("blocks.14.mlp.fc14.weight", "blocks.14.mlp.fc2.weight"),
    ):
        sd[f"module.base_encoder.{old}"] = sd.pop(f"module.base_encoder.{new}")
    assert set(convert_checkpoint({"state_dict": sd}, "mocov3", large)) == set(large.state_dict())


def test_dino_teacher_checkpoint_layout(tmp_path):
    d = 768
    backbone = {
        "cls_token": torch.randn(1, 1, d),
        "pos_embed": torch.randn(1, 197, d),
        "patch_embed.proj.weight": torch.randn(d, 3, 16, 16),
        "patch_embed.proj.bias": torch.randn(d),
        "norm.weight": torch.randn(d),
        "norm.bias": torch.randn(d),
    }
    backbone.update(_vit_block("blocks.0.", d, 4 * d))
    teacher = {f"backbone.{k}": v for k, v in backbone.items()}
    teacher["head.last_layer.weight_g"] = torch.randn(65536, 1)
    torch.save({"teacher": teacher, "epoch": 100}, tmp_path / "checkpoint.pth")
    enc = create_encoder("dinov1-vit-b", weights=tmp_path / "checkpoint.pth", depth=1)
    torch.testing.assert_close(enc.model.cls_token, backbone["cls_token"])


def test_position_embedding_of_another_grid_is_resampled(tmp_path):
    enc = create_encoder("mocov3-vit-s", pretrained=False, depth=1, img_size=256)  # 16x16 position grid
    save_encoder_weights(enc, tmp_path / "at256.safetensors")
    again = create_encoder("mocov3-vit-s", weights=tmp_path / "at256.safetensors", depth=1)  # built at 224: 14x14
    assert tuple(again.model.pos_embed.shape) == (1, 1 + 14 * 14, 384)
    torch.testing.assert_close(again.model.cls_token, enc.model.cls_token)


# ---------------------------------------------------------------------------------------------
# A user's own encoder, end to end with REPARegularizer
# ---------------------------------------------------------------------------------------------
class _PatchEncoder(nn.Module):
    """A toy encoder returning a CLS token followed by 4x4-pixel patch tokens."""

    def __init__(self, dim: int = 24) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)
        return torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1)  # (B, 1 + N, D)


register_encoder(
    "test-patch-encoder", embed_dim=24, patch_size=4, prefix_tokens=1, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
    license="test", overwrite=True,
)(lambda spec, **kw: _PatchEncoder(spec.embed_dim, **kw))  # fmt: skip


def test_user_registered_encoder_end_to_end_with_regularizer(tmp_path):
    from repa import REPARegularizer
    from tiny_models import TinyDiT

    assert "test-patch-encoder" in list_encoders("test-")
    source = create_encoder("test-patch-encoder", pretrained=False)
    weights = save_encoder_weights(source, tmp_path / "patch.safetensors")
    model = TinyDiT(size=16, patch=4, depth=3)
    reg = REPARegularizer(model, layers=1, encoders="test-patch-encoder", encoder_kwargs={"weights": str(weights)})
    (enc,) = reg.encoders
    assert isinstance(enc, FrozenEncoder) and enc.grid(16) == (4, 4)
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    # the encoder's own preprocessing and prefix dropping: (x/255 - 0.5)/0.25, CLS removed
    want = source.model((images.float() / 255 - 0.5) / 0.25)[:, 1:]
    torch.testing.assert_close(enc(images), want)
    model.train()
    reg.train()
    assert not enc.training
    x = torch.randn(2, 3, 16, 16)
    model(x, torch.rand(2))
    loss = reg(images)
    loss.backward()
    assert torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in reg.parameters())
    assert all(p.grad is None for p in enc.parameters())


def test_register_encoder_validates():
    with pytest.raises(ConfigError, match=r"already registered"):
        register_encoder("dinov2-vit-b", embed_dim=8, patch_size=2)(lambda spec: nn.Identity())
    with pytest.raises(ConfigError, match=r"mean .* must have in_chans=3 entries"):
        EncoderSpec(name="bad", embed_dim=8, patch_size=2, mean=(0.5,), std=(0.5,))
    with pytest.raises(ConfigError, match=r"interpolation must be one of"):
        EncoderSpec(name="bad", embed_dim=8, patch_size=2, interpolation="lanczos")


# ---------------------------------------------------------------------------------------------
# `repa encoders`
# ---------------------------------------------------------------------------------------------
def test_cli_table_and_json(isolated_home, capsys):
    import argparse
    import json

    from repa.encoders import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    assert cli.main(parser.parse_args(["dinov2-vit-b", "--json"])) == 0
    (row,) = json.loads(capsys.readouterr().out)
    got = (row["name"], row["embed_dim"], row["patch_size"], row["tokens"], row["input"])
    assert got == ("dinov2-vit-b", 768, 14, 256, [224, 224])
    assert row["weights_source"] == "hf:timm/vit_base_patch14_dinov2.lvd142m" and row["available"] is False
    assert row["params"] == 86_579_712 and row["license"] == "apache-2.0"

    save_encoder_weights(create_encoder("fmnist-vit", pretrained=False))
    assert cli.main(parser.parse_args(["fmnist", "--resolution", "28"])) == 0
    table = capsys.readouterr().out
    line = next(row for row in table.splitlines() if row.startswith("fmnist-vit"))
    assert line.split()[-1] == "yes" and "7x7" in line and "0.5M" in line

    assert cli.main(parser.parse_args(["no-such-encoder"])) == 1


def test_importing_the_registry_loads_neither_timm_nor_huggingface_hub():
    import subprocess
    import sys

    code = "import sys, repa.encoders; print('timm' in sys.modules, 'huggingface_hub' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_embed_dim_override_reaches_the_spec_and_the_tokens():
    enc = create_encoder("fmnist-vit", pretrained=False, embed_dim=48, num_heads=3)
    assert enc.embed_dim == 48 and enc.spec.embed_dim == 48
    tokens = enc(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))
    assert tokens.shape == (2, 49, 48)
