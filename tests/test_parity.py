"""Parity with the official REPA code (github.com/sihyun-yu/REPA): each test pins one behaviour of
the reference that `repa` follows, against a hand-written formula (see docs/parity.md, "Parity with the
official code")."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
import torch.nn.functional as F

from repa import REPARegularizer
from repa.encoders import create_encoder, get_encoder_spec, list_encoders
from repa.projectors import LinearProjector, MLPProjector, build_projector
from repa.sit.configs import build_model
from repa.sit.images import to_uint8
from repa.sit.models import SiT
from repa.sit.sampling import guided_velocity, sample

# ---------------------------------------------------------------------------------------- projectors


def _check_xavier(linear: torch.nn.Linear) -> None:
    """U(-a, a) with a = sqrt(6 / (fan_in + fan_out)), zero bias (the reference's initialize_weights)."""
    fan_out, fan_in = linear.weight.shape
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    w = linear.weight.detach()
    assert w.abs().max() <= bound
    assert w.abs().max() > 0.95 * bound  # fills the interval (PyTorch's default would stop at 1/sqrt(fan_in))
    assert abs(w.std().item() - bound / math.sqrt(3)) < 0.05 * bound / math.sqrt(3)  # a uniform's std
    assert linear.bias is not None and torch.count_nonzero(linear.bias) == 0


def test_mlp_projector_is_initialized_like_the_reference():
    proj = MLPProjector(256, 16, projector_dim=256)  # default init bounds differ: 1/16 vs xavier 0.108 / 0.149
    linears = [m for m in proj if isinstance(m, torch.nn.Linear)]
    assert [i for i, m in enumerate(proj) if isinstance(m, torch.nn.Linear)] == [0, 2, 4]
    for linear in linears:
        _check_xavier(linear)


def test_linear_projector_and_the_regularizers_projectors_follow_the_same_rule():
    _check_xavier(LinearProjector(256, 16))
    _check_xavier(build_projector("linear", 256, 16))
    model = build_model("SiT-T/4", in_channels=1, num_classes=4)
    reg = REPARegularizer(model, layers=1, encoders={"e": 16}, projector_dim=256)
    for m in reg.projectors[0]:
        if isinstance(m, torch.nn.Linear):
            _check_xavier(m)


# ---------------------------------------------------------------------------------------- qk-norm


def test_qk_norm_layernorm_uses_eps_1e5():
    model = SiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=2,
                qk_norm=True)
    norm = model.blocks[0].attn.q_norm
    assert isinstance(norm, torch.nn.LayerNorm) and norm.eps == 1e-5
    # on a small-variance input the eps shows: (x - mean) / sqrt(var + 1e-5), by hand
    x = torch.randn(3, 16) * 1e-3
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    expected = (x - mean) / torch.sqrt(var + 1e-5)
    with_1e6 = (x - mean) / torch.sqrt(var + 1e-6)
    with torch.no_grad():
        got = norm(x)
    assert torch.allclose(got, expected, atol=1e-5) and not torch.allclose(got, with_1e6, atol=1e-2)


# ---------------------------------------------------------------------------------------- guidance


def _affine_field(calls):
    """v(x, t, y) = x * (1 + y) + t, recording each call's batch size."""

    def field(x, t, y):
        calls.append(x.shape[0])
        return x * (1.0 + y.view(-1, 1).float()) + t.view(-1, 1)

    return field


@pytest.mark.parametrize("scale", [0.0, 0.5, 1.0])
def test_guidance_only_above_one(scale):
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    calls = []
    got = guided_velocity(_affine_field(calls), x, 0.5, y, cfg_scale=scale, null_label=3)
    assert calls == [4]  # never the doubled batch
    assert torch.allclose(got, x * (1.0 + y.view(-1, 1).float()) + 0.5)  # the conditional velocity
    # a whole sampler run at this scale is the unguided run
    a = sample(_affine_field([]), x, y, method="ode", steps=3, cfg_scale=scale, null_label=3, guidance_high=1.0)
    b = sample(_affine_field([]), x, y, method="ode", steps=3, cfg_scale=1.0, null_label=3, guidance_high=1.0)
    assert torch.equal(a, b)


def test_guidance_above_one_is_the_cfg_formula():
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    calls = []
    got = guided_velocity(_affine_field(calls), x, 0.5, y, cfg_scale=1.8, null_label=3)
    v_c, v_u = x * (1.0 + y.view(-1, 1).float()) + 0.5, x * 4.0 + 0.5
    assert calls == [8] and torch.allclose(got, v_u + 1.8 * (v_c - v_u))


# ---------------------------------------------------------------------------------------- pixels, labels


def test_pixels_truncate_like_the_reference_and_round_on_request():
    x = torch.tensor([-1.0, -0.5, 0.0, 0.5, 0.999, 1.0, 2.0, -3.0]).view(1, 1, 1, 8)
    # the reference: clamp(255 * (x + 1) / 2, 0, 255).to(uint8) -> the fraction is dropped
    assert to_uint8(x, "truncate").flatten().tolist() == [0, 63, 127, 191, 254, 255, 255, 0]
    assert to_uint8(x, "round").flatten().tolist() == [0, 64, 128, 191, 255, 255, 255, 0]
    from repa.errors import ConfigError

    with pytest.raises(ConfigError, match="pixel rounding must be one of"):
        to_uint8(x, "floor")


def test_sample_defaults_follow_the_reference_fid_protocol():
    from repa.sit.sample import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--ckpt", "x"])
    assert args.classes == "random" and args.pixels == "truncate"
    assert parser.parse_args(["--ckpt", "x", "--classes", "balanced", "--pixels", "round"]).pixels == "round"


def test_a_sample_folder_is_not_completed_with_other_settings(tmp_path):
    from repa.errors import ConfigError
    from repa.sit.sample import add_arguments, sample_settings, write_record

    parser = argparse.ArgumentParser()
    add_arguments(parser)

    def settings(*flags):
        return sample_settings(parser.parse_args(["--ckpt", "x", *flags]), tmp_path / "x", "ab" * 32, 5, None, 1)

    write_record(tmp_path, settings())
    write_record(tmp_path, settings())  # same settings: continue
    with pytest.raises(ConfigError, match="other settings .*pixels: 'truncate' there, 'round' now"):
        write_record(tmp_path, settings("--pixels", "round"))


# ---------------------------------------------------------------------------------------- CLIP


def _openai(name: str) -> bool:
    return name == "clip-vit-L" or name.endswith(".openai")


def test_every_openai_clip_uses_quickgelu_and_laion_keeps_gelu():
    from timm.layers.activations import QuickGELU

    clips = [n for n in list_encoders() if get_encoder_spec(n).family == "clip"]
    assert {"clip-vit-L", "vit_base_patch16_clip_224.openai", "vit_base_patch16_clip_224.laion2b"} <= set(clips)
    for name in clips:
        enc = create_encoder(name, pretrained=False, device="meta")
        acts = {type(b.mlp.act) for b in enc.model.blocks}
        if _openai(name):
            assert acts == {QuickGELU}, name
            # the quickgelu twin reads the OpenAI weights of the same hub repository
            assert get_encoder_spec(name).hf_hub_id == "timm/" + name.replace("clip-vit-L", "vit_large_patch14_clip_224.openai")
        else:
            assert acts == {torch.nn.GELU}, name


def _hand_block(block, x: torch.Tensor) -> torch.Tensor:
    """A CLIP residual block written out: pre-LN attention, then pre-LN MLP with x * sigmoid(1.702 x)."""
    b, n, d = x.shape
    heads = block.attn.num_heads
    h = F.layer_norm(x, (d,), block.norm1.weight, block.norm1.bias, eps=1e-5)
    qkv = (h @ block.attn.qkv.weight.T + block.attn.qkv.bias).view(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]  # (B, H, N, Dh)
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1)  # (B, H, N, N)
    a = (att @ v).transpose(1, 2).reshape(b, n, d) @ block.attn.proj.weight.T + block.attn.proj.bias
    x = x + a
    h = F.layer_norm(x, (d,), block.norm2.weight, block.norm2.bias, eps=1e-5)
    h = h @ block.mlp.fc1.weight.T + block.mlp.fc1.bias
    h = h * torch.sigmoid(1.702 * h)  # QuickGELU
    return x + h @ block.mlp.fc2.weight.T + block.mlp.fc2.bias


def test_clip_block_equals_a_hand_written_quickgelu_block():
    enc = create_encoder("clip-vit-L", pretrained=False, device="meta")
    block = enc.model.blocks[0].to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    block.eval()
    x = torch.randn(2, 5, 1024, generator=g)
    with torch.no_grad():
        got, want = block(x), _hand_block(block, x)
    assert torch.allclose(got, want, atol=1e-4)
    # plain GELU would differ: the activation matters at this scale
    with torch.no_grad():
        block.mlp.act = torch.nn.GELU()
        assert not torch.allclose(block(x), want, atol=1e-3)
