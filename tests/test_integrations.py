"""Specification of the diffusers model presets (repa.integrations).

Every model here is a tiny diffusers model built from a config with random weights (nothing is
downloaded). For each family the tests check: which blocks an int ``layers=`` hooks, that only
image tokens reach the projector (their count is the image patch count whatever the text),
that gradients reach the blocks up to the hooked one and none after it, and that the loss is
finite. Targets come precomputed (``reg(features=...)``) so no encoder is involved.
"""

from __future__ import annotations

import math
import subprocess
import sys
from typing import Dict, List

import pytest
import torch
import torch.nn.functional as F
from torch import nn

diffusers = pytest.importorskip("diffusers")  # an optional dependency: the [diffusers] extra

from repa import REPARegularizer  # noqa: E402
from repa.errors import LayerNotFoundError  # noqa: E402
from repa.integrations import FluxImageTokens  # noqa: E402
from repa.presets import find_preset, preset_for  # noqa: E402

TARGET_DIM = 12  # width of the precomputed encoder targets


# --------------------------------------------------------------------------- tiny models
def tiny_dit():
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=3,
        sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=2,
    )


def tiny_pixart():
    return diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=3,
        sample_size=8, patch_size=2, cross_attention_dim=16, caption_channels=12, norm_num_groups=2,
    )


def tiny_sana():
    return diffusers.SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=3,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
        caption_channels=12, sample_size=8, patch_size=1, mlp_ratio=2.0,
    )


def tiny_sd3():
    return diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=6,
        pos_embed_max_size=16,
    )


def tiny_flux():
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=6, axes_dims_rope=(2, 2, 4),
    )


def tiny_unet():
    return diffusers.UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(8, 16, 24), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=8,
    )


def tiny_unet_cond():
    return diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=4, cross_attention_dim=12, attention_head_dim=2,
    )


B = 2


def run(name: str, model: nn.Module, text_len: int = 5):
    """One forward of the tiny model ``name`` on random inputs with ``text_len`` text tokens."""
    t = torch.tensor([3.0, 7.0])
    text = torch.randn(B, text_len, 12)
    if name == "dit":
        return model(torch.randn(B, 4, 8, 8), timestep=t, class_labels=torch.tensor([1, 2])).sample
    if name == "pixart":
        cond = {"resolution": None, "aspect_ratio": None}
        return model(torch.randn(B, 4, 8, 8), encoder_hidden_states=text, timestep=t, added_cond_kwargs=cond).sample
    if name == "sana":
        return model(torch.randn(B, 4, 8, 8), encoder_hidden_states=text, timestep=t).sample
    if name == "sd3":
        return model(torch.randn(B, 4, 8, 8), encoder_hidden_states=text, pooled_projections=torch.randn(B, 6),
                     timestep=t).sample
    if name == "flux":
        return model(torch.randn(B, 16, 8), encoder_hidden_states=text, pooled_projections=torch.randn(B, 6),
                     timestep=t / 10, img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(text_len, 3)).sample
    if name == "unet":
        return model(torch.randn(B, 3, 16, 16), timestep=t).sample
    if name == "unet_cond":
        return model(torch.randn(B, 4, 16, 16), timestep=t, encoder_hidden_states=text).sample
    raise KeyError(name)


BUILDERS = {"dit": tiny_dit, "pixart": tiny_pixart, "sana": tiny_sana, "sd3": tiny_sd3, "flux": tiny_flux}
# image tokens per sample: DiT/PixArt/SD3 8x8 latents in 2x2 patches, Sana 8x8 in 1x1, Flux 16 packed tokens
IMAGE_TOKENS = {"dit": 16, "pixart": 16, "sana": 64, "sd3": 16, "flux": 16}
PRESET_NAMES = {
    "dit": "diffusers-dit", "pixart": "diffusers-pixart", "sana": "diffusers-sana", "sd3": "diffusers-sd3",
    "flux": "diffusers-flux", "unet": "diffusers-unet", "unet_cond": "diffusers-unet",
}


def selected_tokens(reg: REPARegularizer, layer: str) -> torch.Tensor:
    """What the regularizer would project for ``layer`` from its current capture: (B, N, D)."""
    tokens, _ = reg._hidden_tokens(layer, reg._captures[layer])
    return tokens


def has_grad(module: nn.Module) -> bool:
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def no_grad(module: nn.Module) -> bool:
    return all(p.grad is None or p.grad.abs().sum() == 0 for p in module.parameters())


def assert_gradients_stop_after(model: nn.Module, blocks: List[str], hooked: str, after: List[str]) -> None:
    """Blocks up to ``hooked`` get gradient, later blocks and the output layers ``after`` none."""
    k = blocks.index(hooked)
    for i, name in enumerate(blocks):
        module = model.get_submodule(name)
        if i <= k:
            assert has_grad(module), f"{name} (up to the hooked {hooked}) got no gradient"
        else:
            assert no_grad(module), f"{name} (after the hooked {hooked}) got a gradient"
    for name in after:
        assert no_grad(model.get_submodule(name)), f"{name} got a gradient from the alignment loss"


# --------------------------------------------------------------------------- registration
def test_presets_register_by_class_name_without_importing_diffusers():
    code = (
        "import sys, repa.integrations as i\n"
        "assert 'diffusers' not in sys.modules, 'repa.integrations imported diffusers'\n"
        "from repa.presets import list_presets\n"
        "names = {c for p in list_presets() for c in p.class_names}\n"
        "need = {'DiTTransformer2DModel', 'PixArtTransformer2DModel', 'SD3Transformer2DModel',\n"
        "        'FluxTransformer2DModel', 'SanaTransformer2DModel', 'UNet2DModel', 'UNet2DConditionModel',\n"
        "        'VisionTransformer'}\n"
        "assert need <= names, need - names\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize("name", sorted(PRESET_NAMES))
def test_each_model_class_finds_its_preset(name):
    model = {**BUILDERS, "unet": tiny_unet, "unet_cond": tiny_unet_cond}[name]()
    assert preset_for(model).name == PRESET_NAMES[name]


def test_subclasses_inherit_the_preset_and_unknown_models_have_none():
    class MyFlux(diffusers.FluxTransformer2DModel):
        pass

    assert preset_for(MyFlux(**tiny_flux().config)).name == "diffusers-flux"
    assert find_preset(nn.Linear(2, 2)) is None


# --------------------------------------------------------------------------- transformers
@pytest.mark.parametrize("name", ["dit", "pixart", "sana", "sd3"])
def test_transformer_int_layers_hook_transformer_blocks_and_train_up_to_them(name):
    model = BUILDERS[name]()
    reg = REPARegularizer(model, layers=1, encoders=TARGET_DIM, projector_dim=16)
    assert reg.layer_names == ["transformer_blocks.1"]  # 0-based: the 2nd block
    assert reg.model_dims == {"transformer_blocks.1": 16}  # heads * head_dim from the config

    run(name, model)
    n = IMAGE_TOKENS[name]
    tokens = selected_tokens(reg, "transformer_blocks.1")
    assert tokens.shape == (B, n, 16)  # image tokens only: the image patch count
    loss = reg(features=torch.randn(B, n, TARGET_DIM))
    assert torch.isfinite(loss)
    loss.backward()

    blocks = [f"transformer_blocks.{i}" for i in range(3)]
    after = ["proj_out"] if name in ("sd3", "sana", "pixart") else ["proj_out_2"]
    assert_gradients_stop_after(model, blocks, "transformer_blocks.1", after)
    assert all(p.grad is not None for p in reg.parameters())


@pytest.mark.parametrize("name", ["pixart", "sana", "sd3", "flux"])
def test_text_length_never_changes_the_aligned_image_tokens(name):
    model = BUILDERS[name]()
    reg = REPARegularizer(model, layers=1, encoders=TARGET_DIM, projector_dim=16)
    layer = reg.layer_names[0]
    counts = []
    for text_len in (3, 9):
        run(name, model, text_len=text_len)
        counts.append(selected_tokens(reg, layer).shape[1])
        reg.clear()
    assert counts == [IMAGE_TOKENS[name]] * 2


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_joint_blocks_align_the_image_stream_not_the_text_stream(name):
    """In a joint block, only the image half (attn image path + ``ff``) shapes the image stream.

    If the text stream were aligned, ``ff_context`` of the hooked block would get gradient and
    ``ff`` none; with the image stream it is the other way round.
    """
    model = BUILDERS[name]()
    reg = REPARegularizer(model, layers=1, encoders=TARGET_DIM, projector_dim=16)
    seen = {}
    block = model.transformer_blocks[1]
    block.register_forward_hook(lambda m, a, out: seen.setdefault("out", out))
    run(name, model)
    text_out, image_out = seen["out"]  # diffusers 0.42: (encoder_hidden_states, hidden_states)
    assert selected_tokens(reg, "transformer_blocks.1") is image_out
    assert text_out.shape[1] == 5 and image_out.shape[1] == IMAGE_TOKENS[name]

    reg(features=torch.randn(B, IMAGE_TOKENS[name], TARGET_DIM)).backward()
    assert has_grad(block.ff)
    assert no_grad(block.ff_context) and no_grad(block.norm2_context)


def test_sd3_last_block_without_text_output_is_supported():
    model = tiny_sd3()  # the last joint block is context_pre_only: it returns (None, image)
    reg = REPARegularizer(model, layers=-1, encoders=TARGET_DIM, projector_dim=16)
    assert reg.layer_names == ["transformer_blocks.2"]
    run("sd3", model)
    loss = reg(features=torch.randn(B, 16, TARGET_DIM))
    assert torch.isfinite(loss)


def test_non_block_names_on_a_preset_model_keep_the_default_selection():
    model = tiny_sd3()  # the joint attention module returns (image, text): the default takes [0]
    reg = REPARegularizer(model, layers="transformer_blocks.1.attn", encoders=TARGET_DIM, projector_dim=16)
    run("sd3", model, text_len=7)
    assert selected_tokens(reg, "transformer_blocks.1.attn").shape[1] == 16


def test_user_tokens_override_the_preset():
    model = tiny_sd3()
    reg = REPARegularizer(model, layers=1, encoders=TARGET_DIM, projector_dim=16, tokens=lambda out: out[0], grid=(1, 5))
    run("sd3", model, text_len=5)
    assert selected_tokens(reg, "transformer_blocks.1").shape[1] == 5  # the text stream, as asked


# --------------------------------------------------------------------------- Flux
def test_flux_ints_index_double_then_single_blocks():
    model = tiny_flux()  # 2 double-stream + 2 single-stream blocks

    def hooked(layers):
        return REPARegularizer(model, layers=layers, encoders=TARGET_DIM, projector_dim=8).layer_names

    assert hooked(1) == ["transformer_blocks.1"]
    assert hooked(2) == ["single_transformer_blocks.0"]
    assert hooked(-1) == ["single_transformer_blocks.1"]
    assert hooked([0, 3]) == ["transformer_blocks.0", "single_transformer_blocks.1"]
    with pytest.raises(LayerNotFoundError, match=r"layers=4 is out of range for the model's 4 blocks"):
        hooked(4)


def test_flux_single_block_aligns_image_tokens_and_trains_up_to_it():
    model = tiny_flux()
    reg = REPARegularizer(model, layers=2, encoders=TARGET_DIM, projector_dim=16)
    assert reg.layer_names == ["single_transformer_blocks.0"]
    assert isinstance(reg._tokens["single_transformer_blocks.0"], FluxImageTokens)
    seen = {}
    model.single_transformer_blocks[0].register_forward_hook(lambda m, a, out: seen.setdefault("out", out))
    run("flux", model, text_len=5)
    text_out, image_out = seen["out"]
    assert text_out.shape[1] == 5
    assert selected_tokens(reg, "single_transformer_blocks.0") is image_out  # (B, 16, 16)

    loss = reg(features=torch.randn(B, 16, TARGET_DIM))
    assert torch.isfinite(loss)
    loss.backward()
    blocks = ["transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0", "single_transformer_blocks.1"]
    assert_gradients_stop_after(model, blocks, "single_transformer_blocks.0", ["norm_out", "proj_out"])


class _LegacyDouble(nn.Module):
    """A double-stream block: (text, image) in, (text, image) out, mixing the two."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.img, self.txt = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, hidden_states, encoder_hidden_states, temb):
        mix = hidden_states.mean(1, keepdim=True) + encoder_hidden_states.mean(1, keepdim=True)  # (B, 1, D)
        return self.txt(encoder_hidden_states) + mix, self.img(hidden_states) + mix + temb[:, None]


class _LegacySingle(nn.Module):
    """A single-stream block of older diffusers: the joint sequence [text; image] in and out."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim)

    def forward(self, hidden_states, temb):
        return hidden_states + self.proj(hidden_states + hidden_states.mean(1, keepdim=True))  # (B, L+N, D)


class FluxTransformer2DModel(nn.Module):
    """Stands in for a Flux model of older diffusers, whose single blocks return the joint sequence.

    Presets match by class name, so this plain module gets the Flux preset.
    """

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.x_embedder, self.context_embedder = nn.Linear(4, dim), nn.Linear(6, dim)
        self.transformer_blocks = nn.ModuleList(_LegacyDouble(dim) for _ in range(2))
        self.single_transformer_blocks = nn.ModuleList(_LegacySingle(dim) for _ in range(2))
        self.proj_out = nn.Linear(dim, 4)

    def forward(self, hidden_states, encoder_hidden_states, timestep):
        x, c = self.x_embedder(hidden_states), self.context_embedder(encoder_hidden_states)
        temb = timestep[:, None].expand(-1, x.shape[-1])  # (B, D)
        for block in self.transformer_blocks:
            c, x = block(x, c, temb)
        x = torch.cat([c, x], dim=1)  # (B, L + N, D)
        for block in self.single_transformer_blocks:
            x = block(x, temb)
        return self.proj_out(x[:, c.shape[1] :])  # (B, N, 4)


@pytest.mark.parametrize("by_keyword", [True, False])
def test_flux_joint_sequence_of_older_diffusers_is_sliced_by_the_forwards_text_length(by_keyword):
    model = FluxTransformer2DModel()
    reg = REPARegularizer(model, layers=[2, 3], encoders=TARGET_DIM, projector_dim=8)
    assert reg.layer_names == ["single_transformer_blocks.0", "single_transformer_blocks.1"]
    assert all(sel.legacy for sel in reg._tokens.values())
    joint = {}
    model.single_transformer_blocks[1].register_forward_hook(lambda m, a, out: joint.__setitem__("out", out))
    for text_len in (3, 6):
        x, text, t = torch.randn(B, 9, 4), torch.randn(B, text_len, 6), torch.rand(B)
        model(x, encoder_hidden_states=text, timestep=t) if by_keyword else model(x, text, t)
        assert joint["out"].shape[1] == text_len + 9
        tokens = selected_tokens(reg, "single_transformer_blocks.1")
        assert torch.equal(tokens, joint["out"][:, text_len:])  # the 9 image tokens, text cut off
        loss = reg(features=torch.randn(B, 9, TARGET_DIM))
        assert torch.isfinite(loss)
    loss.backward()
    assert has_grad(model.transformer_blocks) and has_grad(model.single_transformer_blocks)
    assert no_grad(model.proj_out)
    # reg.remove() takes the selectors' pre-hook (on the model) and stamp hooks (on the blocks) too
    assert model._forward_pre_hooks
    reg.remove()
    assert not model._forward_pre_hooks
    assert all(not b._forward_hooks for b in model.single_transformer_blocks[:1])


def test_flux_modern_blocks_register_no_extra_hooks():
    model = tiny_flux()
    REPARegularizer(model, layers=[1, 2], encoders=TARGET_DIM, projector_dim=8)
    assert not model._forward_pre_hooks  # the text-length hook exists only for joint-sequence blocks


# --------------------------------------------------------------------------- U-Nets
UNET_BLOCKS = ["down_blocks.0", "down_blocks.1", "down_blocks.2", "mid_block", "up_blocks.0", "up_blocks.1", "up_blocks.2"]


def test_unet_ints_index_down_mid_up_and_widths_come_from_the_config():
    model = tiny_unet()
    reg = REPARegularizer(model, layers=list(range(7)), encoders=TARGET_DIM, projector_dim=8)
    assert reg.layer_names == UNET_BLOCKS
    assert reg.resample == "model"  # U-REPA: model features go to the encoder grid

    seen: Dict[str, torch.Tensor] = {}
    for name in UNET_BLOCKS:
        model.get_submodule(name).register_forward_hook(
            lambda m, a, out, name=name: seen.__setitem__(name, out[0] if isinstance(out, tuple) else out)
        )
    run("unet", model)
    for name in UNET_BLOCKS:
        assert reg.model_dims[name] == seen[name].shape[1], name  # the channels each block outputs
        tokens = selected_tokens(reg, name)  # (B, H*W, C), flattened from the (B, C, H, W) hidden states
        h, w = seen[name].shape[-2:]
        assert torch.equal(tokens, seen[name].flatten(2).transpose(1, 2)), name
        assert tokens.shape[1] == h * w


def test_unet_mid_block_is_projected_then_upsampled_to_the_encoder_grid():
    """U-REPA: project the (B, C, 4, 4) mid features, upsample the prediction to the 8x8 target grid."""
    model = tiny_unet()  # 16 px -> 4x4 mid block
    reg = REPARegularizer(model, layers="mid_block", encoders=TARGET_DIM, projector_dim=16)
    mid = {}
    model.mid_block.register_forward_hook(lambda m, a, out: mid.setdefault("h", out))
    run("unet", model)
    target = torch.randn(B, 64, TARGET_DIM)  # an 8x8 encoder grid
    out = reg(features=target, return_breakdown=True)

    h = mid["h"].detach()  # (B, 24, 4, 4)
    pred = reg.projectors[0](h.flatten(2).transpose(1, 2))  # (B, 16, D_e)
    pred_map = pred.transpose(1, 2).reshape(B, TARGET_DIM, 4, 4)
    up = F.interpolate(pred_map, size=(8, 8), mode="bilinear", align_corners=False)  # (B, D_e, 8, 8)
    up = up.flatten(2).transpose(1, 2)  # (B, 64, D_e)
    expected = -F.cosine_similarity(up, target, dim=-1).mean()
    assert out.loss.item() == pytest.approx(expected.item(), abs=1e-5)
    assert math.isfinite(out.total.item())


def test_unet_down_block_aligns_its_hidden_states_and_trains_only_up_to_it():
    model = tiny_unet_cond()  # CrossAttnDownBlock2D returns (hidden_states, skip_states)
    reg = REPARegularizer(model, layers=0, encoders=TARGET_DIM, projector_dim=16)
    assert reg.layer_names == ["down_blocks.0"]
    seen = {}
    model.down_blocks[0].register_forward_hook(lambda m, a, out: seen.setdefault("out", out))
    run("unet_cond", model)
    hidden, skips = seen["out"]
    assert isinstance(skips, tuple)
    assert torch.equal(selected_tokens(reg, "down_blocks.0"), hidden.flatten(2).transpose(1, 2))  # 8x8 grid
    loss = reg(features=torch.randn(B, 64, TARGET_DIM))
    assert torch.isfinite(loss)
    loss.backward()
    blocks = ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"]
    assert_gradients_stop_after(model, blocks, "down_blocks.0", ["conv_out"])
    assert has_grad(model.conv_in)


# --------------------------------------------------------------------------- no preset
class PlainDenoiser(nn.Module):
    """A model no preset knows: a conv stem and a trunk of residual conv layers."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 4, stride=4)
        self.trunk = nn.Sequential(*(nn.Conv2d(16, 16, 3, padding=1) for _ in range(3)))
        self.head = nn.Conv2d(16, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(self.stem(x)))


def test_model_without_preset_works_with_explicit_names():
    model = PlainDenoiser()
    assert preset_for(model) is None
    reg = REPARegularizer(model, layers="trunk.1", encoders=TARGET_DIM, projector_dim=16)
    assert reg.layer_names == ["trunk.1"] and reg.model_dims == {"trunk.1": 16}
    model(torch.rand(B, 3, 16, 16))
    loss = reg(features=torch.randn(B, 16, TARGET_DIM))  # 4x4 feature map -> 16 tokens
    assert torch.isfinite(loss)
    loss.backward()
    assert has_grad(model.stem) and has_grad(model.trunk[0]) and has_grad(model.trunk[1])
    assert no_grad(model.trunk[2]) and no_grad(model.head)


# --------------------------------------------------------------------------- training features
@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_diffusers_gradient_checkpointing_gives_the_eager_loss_and_gradients(name):
    """diffusers checkpoints blocks non-reentrantly: the capture keeps its graph, recompute is ignored."""
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = BUILDERS[name]()
        if checkpointing:
            model.enable_gradient_checkpointing()
        reg = REPARegularizer(model, layers=2, encoders=TARGET_DIM, projector_dim=16)
        calls = []
        model.get_submodule(reg.layer_names[0]).register_forward_pre_hook(lambda m, a, calls=calls: calls.append(1))
        torch.manual_seed(1)
        run(name, model)
        loss = reg(features=torch.randn(B, IMAGE_TOKENS[name], TARGET_DIM, generator=torch.Generator().manual_seed(2)))
        loss.backward()
        assert len(calls) == (2 if checkpointing else 1)  # checkpointing re-entered the block in backward
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.item(), grads))
    (eager_loss, eager_grads), (ckpt_loss, ckpt_grads) = results
    assert ckpt_loss == pytest.approx(eager_loss, abs=1e-6)
    assert eager_grads.keys() == ckpt_grads.keys() and eager_grads
    for key in eager_grads:
        assert torch.allclose(eager_grads[key], ckpt_grads[key], atol=1e-6), key
