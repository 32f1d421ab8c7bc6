"""Specification of the diffusers video presets (Wan, CogVideoX, HunyuanVideo, LTX-Video).

Each model is a tiny diffusers model built from a config with random weights (nothing is
downloaded). For each family the tests check which blocks an int ``layers=`` hooks, that the
(t, h, w) grid comes from the forward's input and the config's patch sizes, that only video
tokens reach the projector (never text tokens, whatever the text length), that gradients stop
after the hooked block, and that one training step with a registry image encoder on the clean
frames runs through the preset.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

diffusers = pytest.importorskip("diffusers")  # an optional dependency: the [diffusers] extra

from repa import REPARegularizer, create_encoder  # noqa: E402
from repa.errors import ShapeMismatchError  # noqa: E402
from repa.presets import preset_for  # noqa: E402

B = 2
TEXT_DIM = 12


def tiny_wan():
    return diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=TEXT_DIM, freq_dim=16, ffn_dim=32, num_layers=3, rope_max_seq_len=32,
    )


def tiny_cogvideox():
    return diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=3, sample_width=8,
        sample_height=8, sample_frames=9, patch_size=2, text_embed_dim=TEXT_DIM, time_embed_dim=8,
        max_text_seq_length=7, use_rotary_positional_embeddings=True,
    )


def tiny_hunyuan():
    return diffusers.HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2, num_single_layers=2,
        num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=TEXT_DIM, pooled_projection_dim=6,
        rope_axes_dim=(2, 2, 4), guidance_embeds=False,
    )


def tiny_ltx():
    return diffusers.LTXVideoTransformer3DModel(
        in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, num_layers=3, caption_channels=TEXT_DIM,
    )


BUILDERS = {"wan": tiny_wan, "cogvideox": tiny_cogvideox, "hunyuan": tiny_hunyuan, "ltx": tiny_ltx}
PRESET_NAMES = {
    "wan": "diffusers-wan", "cogvideox": "diffusers-cogvideox", "hunyuan": "diffusers-hunyuan-video",
    "ltx": "diffusers-ltx-video",
}
# latents of 3 frames, 8x8: (t, h, w) after patching; LTX uses 1x1 patches
GRIDS = {"wan": (3, 4, 4), "cogvideox": (3, 4, 4), "hunyuan": (3, 4, 4), "ltx": (3, 8, 8)}
# VAE temporal compression: clean clips have 1 + k * (3 - 1) frames for 3 latent frames
FACTORS = {"wan": 4, "cogvideox": 4, "hunyuan": 4, "ltx": 8}
# blocks an int indexes
BLOCKS = {
    "wan": ["blocks.0", "blocks.1", "blocks.2"],
    "cogvideox": ["transformer_blocks.0", "transformer_blocks.1", "transformer_blocks.2"],
    "hunyuan": ["transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0",
                "single_transformer_blocks.1"],
    "ltx": ["transformer_blocks.0", "transformer_blocks.1", "transformer_blocks.2"],
}
OUTPUT_LAYERS = {"wan": ["proj_out"], "cogvideox": ["proj_out"], "hunyuan": ["proj_out"], "ltx": ["proj_out"]}


def latents(name: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if name == "cogvideox":
        return torch.randn(B, 3, 4, 8, 8, generator=g)  # (B, F, C, H, W)
    if name == "ltx":
        return torch.randn(B, 3 * 8 * 8, 4, generator=g)  # packed (B, F*H*W, C)
    return torch.randn(B, 4, 3, 8, 8, generator=g)  # (B, C, F, H, W)


def run(name: str, model: nn.Module, x: torch.Tensor, text_len: int = 5) -> torch.Tensor:
    """One forward of the tiny model ``name`` on latents ``x`` with ``text_len`` text tokens."""
    t = torch.tensor([3.0, 7.0])
    text = torch.randn(B, text_len, TEXT_DIM)
    if name == "wan":
        return model(x, t, text).sample
    if name == "cogvideox":
        return model(x, text, t.long()).sample
    if name == "hunyuan":
        return model(x, t, text, torch.ones(B, text_len, dtype=torch.bool), torch.randn(B, 6)).sample
    if name == "ltx":
        return model(x, text, t, encoder_attention_mask=torch.ones(B, text_len), num_frames=3, height=8, width=8).sample
    raise KeyError(name)


def has_grad(module: nn.Module) -> bool:
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


# --------------------------------------------------------------------------- registration and blocks
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_preset_found_with_its_video_tracker_and_recommended_layer(name):
    model = BUILDERS[name]()
    preset = preset_for(model)
    assert preset is not None and preset.name == PRESET_NAMES[name]
    assert preset.video is not None
    assert preset.blocks(model) == BLOCKS[name]
    assert "recommended" in preset.recommended_layer or "VideoREPA's released" in preset.recommended_layer


def test_hunyuan_ints_index_dual_then_single_stream_blocks():
    model = tiny_hunyuan()
    reg = REPARegularizer(model, layers=[1, 2, -1], encoders=6)
    assert reg.layer_names == ["transformer_blocks.1", "single_transformer_blocks.0", "single_transformer_blocks.1"]


# --------------------------------------------------------------------------- grids and tokens
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_grid_is_read_from_each_forward_and_only_video_tokens_are_selected(name):
    model = BUILDERS[name]()
    layer = BLOCKS[name][-1]  # for HunyuanVideo a single-stream block (joint sequence inside)
    reg = REPARegularizer(model, layers=layer, encoders=6)
    assert reg._grid_tracker.temporal_compression == FACTORS[name]
    t, h, w = GRIDS[name]
    counts = []
    for text_len in (3, 7):  # the text length must not change what is aligned
        run(name, model, latents(name), text_len=text_len)
        assert reg._grid_tracker.grid == GRIDS[name]
        tokens, grid = reg._hidden_tokens(layer, reg._captures[layer])
        assert grid == GRIDS[name]
        counts.append(tokens.shape[1])
        reg.clear()
    assert counts == [t * h * w, t * h * w]


@pytest.mark.parametrize("name", ["cogvideox", "hunyuan"])
def test_joint_video_text_blocks_give_the_video_stream_never_the_text(name):
    model = BUILDERS[name]()
    layer = BLOCKS[name][1]
    reg = REPARegularizer(model, layers=layer, encoders=6)
    run(name, model, latents(name), text_len=5)
    raw = reg._captures[layer]
    assert isinstance(raw, tuple) and raw[1].shape[1] == 5  # (video, text): the text stream has 5 tokens
    tokens, _ = reg._hidden_tokens(layer, raw)
    assert tokens is raw[0]
    assert tokens.shape[1] == math.prod(GRIDS[name])


def test_grid_follows_the_input_shape_of_each_forward():
    model = tiny_wan()
    reg = REPARegularizer(model, layers=1, encoders=6)
    run("wan", model, torch.randn(B, 4, 5, 8, 12))
    assert reg._grid_tracker.grid == (5, 4, 6)
    with torch.no_grad():  # a sampling forward must not replace the grid of the captured one
        run("wan", model, torch.randn(B, 4, 2, 8, 8))
    assert reg._grid_tracker.grid == (5, 4, 6)
    with reg.disabled():
        run("wan", model, torch.randn(B, 4, 2, 8, 8))
    assert reg._grid_tracker.grid == (5, 4, 6)


def test_cogvideox_temporal_patches_divide_the_latent_frames():
    model = diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=2, sample_width=8,
        sample_height=8, sample_frames=9, patch_size=2, patch_size_t=2, text_embed_dim=TEXT_DIM, time_embed_dim=8,
        max_text_seq_length=7, use_rotary_positional_embeddings=True,
    )
    reg = REPARegularizer(model, layers=0, encoders=6)
    run("cogvideox", model, torch.randn(B, 4, 4, 8, 8))  # 4 latent frames in temporal patches of 2
    tokens, grid = reg._hidden_tokens("transformer_blocks.0", reg._captures["transformer_blocks.0"])
    assert grid == (2, 4, 4) and tokens.shape[1] == 32


def test_ltx_without_latent_sizes_asks_for_a_grid():
    model = tiny_ltx()
    reg = REPARegularizer(model, layers=0, encoders=6)
    t = torch.tensor([3.0, 7.0])
    model(latents("ltx"), torch.randn(B, 5, TEXT_DIM), t, torch.ones(B, 5), video_coords=torch.zeros(B, 3, 192))
    assert reg._grid_tracker.grid is None
    with pytest.raises(ShapeMismatchError, match="pass grid="):
        reg(features=torch.randn(B, 3, 64, 6))


# --------------------------------------------------------------------------- training through the preset
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_tiny_video_model_trains_a_step_through_its_preset(name):
    """Clean clips of 1 + k * 2 frames -> 3 latent frames; a registry encoder runs on every frame."""
    torch.manual_seed(0)
    model = BUILDERS[name]()
    encoder = create_encoder("dinov2-vit-s", pretrained=False, depth=1, resolution=56)  # 4x4 tokens per frame
    layer_index = 1
    reg = REPARegularizer(model, layers=layer_index, encoders=encoder, weight=0.5, frame_chunk=8)
    hooked = BLOCKS[name][layer_index]
    assert reg.layer_names == [hooked]
    frames = 1 + FACTORS[name] * 2
    videos = torch.randint(0, 256, (B, 3, frames, 56, 56), dtype=torch.uint8)  # (B, C, T, H, W)
    opt = torch.optim.AdamW(list(model.parameters()) + list(reg.parameters()), lr=1e-3)
    x0 = latents(name)
    noise = torch.randn_like(x0)
    pred = run(name, model, 0.5 * x0 + 0.5 * noise)
    diffusion = F.mse_loss(pred, noise - x0)
    out = reg(videos, return_breakdown=True)
    (diffusion + out.total).backward()
    assert math.isfinite(float(out.loss))
    # REPA's gradient reaches the hooked block and its projector; the output layer gets only the diffusion loss
    assert has_grad(model.get_submodule(hooked)) and has_grad(reg.projectors)
    opt.step()
    opt.zero_grad()
    # a REPA-only backward reaches the blocks up to the hooked one and none after it
    run(name, model, 0.5 * x0 + 0.5 * noise)
    reg(videos).backward()
    blocks = BLOCKS[name]
    for i, block in enumerate(blocks):
        assert has_grad(model.get_submodule(block)) == (i <= layer_index), block
    for layer in OUTPUT_LAYERS[name]:
        assert not has_grad(model.get_submodule(layer))


def test_an_ema_copy_of_the_model_never_replaces_the_grid():
    import copy

    model = tiny_wan()
    reg = REPARegularizer(model, layers=1, encoders=6)
    ema = copy.deepcopy(model)
    run("wan", model, torch.randn(B, 4, 3, 8, 8))
    run("wan", ema, torch.randn(B, 4, 5, 8, 8))  # the copy runs with grad enabled too
    assert reg._grid_tracker.grid == (3, 4, 4)
    assert set(reg._captures) == {"blocks.1"}
