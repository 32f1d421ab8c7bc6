"""Specification of REPARegularizer: hooks, projectors, losses, grids, weights, lifecycle."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from repa import REPAOutput, REPARegularizer, schedules
from repa.errors import (
    CaptureError,
    ConfigError,
    GridMismatchError,
    HiddenDimError,
    InputRangeError,
    LayerNotFoundError,
    REPAError,
    ShapeMismatchError,
    StateDictError,
    UnknownNameError,
)
from tiny_models import ConvEncoder, TinyDiT


def run(model, x, t=None):
    t = torch.rand(x.shape[0]) if t is None else t
    return model(torch.randn_like(x), t)


@pytest.fixture
def setup():
    model = TinyDiT(depth=4)
    enc = ConvEncoder(dim=24)
    x = torch.rand(3, 3, 16, 16)
    return model, enc, x


# --------------------------------------------------------------------------- the loss itself
def test_cosine_loss_matches_paper_formula(setup):
    """L_REPA = -(1/N) sum_n cos(h_phi(h)[n], y[n]), averaged over the batch, times lambda."""
    model, enc, x = setup
    reg = REPARegularizer(model, layers="blocks.1", encoders=enc, weight=0.5, projector_dim=16)
    captured = {}
    model.blocks[1].register_forward_hook(lambda m, a, o: captured.setdefault("h", o))
    run(model, x)
    out = reg(x, return_breakdown=True)

    h = captured["h"].detach()
    y = enc(x).detach()
    pred = reg.projectors[0](h)
    b, n, _ = y.shape
    total = 0.0
    for i in range(b):
        per_image = 0.0
        for j in range(n):
            p, q = pred[i, j], y[i, j]
            per_image += float((p @ q / (p.norm() * q.norm())).detach())
        total += -per_image / n
    expected = total / b
    assert out.loss.item() == pytest.approx(expected, abs=1e-5)
    assert out.total.item() == pytest.approx(0.5 * expected, abs=1e-5)
    assert out.weight == 0.5
    assert out.cosine["blocks.1/convencoder"].item() == pytest.approx(-expected, abs=1e-5)


def test_gradients_reach_earlier_blocks_and_projector_only(setup):
    model, enc, x = setup
    reg = REPARegularizer(model, layers=1, encoders=enc, projector_dim=16)
    run(model, x)
    reg(x).backward()
    for i, block in enumerate(model.blocks):
        grads = [p.grad for p in block.parameters()]
        if i <= 1:
            assert any(g is not None and g.abs().sum() > 0 for g in grads), f"block {i} got no gradient"
        else:
            assert all(g is None for g in grads), f"block {i} after the hooked one got a gradient"
    assert all(p.grad is None for p in model.out.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in reg.parameters())
    assert all(p.grad is None and not p.requires_grad for p in enc.parameters())
    assert not enc.training


def test_encoder_not_in_parameters_or_state_dict(setup):
    model, enc, _ = setup
    reg = REPARegularizer(model, layers=1, encoders=enc, projector_dim=16)
    enc_params = {id(p) for p in enc.parameters()}
    assert not enc_params & {id(p) for p in reg.parameters()}
    assert set(reg.state_dict()) == {"step"} | {f"projectors.0.{i}.{w}" for i in (0, 2, 4) for w in ("weight", "bias")}
    model_params = {id(p) for p in model.parameters()}
    assert not model_params & {id(p) for p in reg.parameters()}
    reg.train()
    assert not enc.training


# --------------------------------------------------------------------------- layers
def test_depth_semantics_layers_7_is_blocks_7_the_8th_block():
    model = TinyDiT(depth=10)
    a = REPARegularizer(model, layers=7, encoders=ConvEncoder(), projector_dim=8)
    b = REPARegularizer(model, layers="blocks.7", encoders=ConvEncoder(), projector_dim=8)
    assert a.layer_names == b.layer_names == ["blocks.7"]
    order = []
    for i, blk in enumerate(model.blocks):
        blk.register_forward_hook(lambda m, a_, o, i=i: order.append(i))
    x = torch.rand(2, 3, 16, 16)
    seen = {}
    model.blocks[7].register_forward_hook(lambda m, a_, o: seen.setdefault("h", o))
    run(model, x)
    assert order.index(7) == 7  # the 8th block to run
    assert a._captures["blocks.7"] is seen["h"]


def test_layer_forms_regex_list_negative_and_wrapper_prefixes():
    model = TinyDiT(depth=4)
    enc = ConvEncoder()
    assert REPARegularizer(model, layers=-1, encoders=enc, projector_dim=8).layer_names == ["blocks.3"]
    assert REPARegularizer(model, layers=r"blocks\.[13]", encoders=enc, projector_dim=8).layer_names == [
        "blocks.1",
        "blocks.3",
    ]
    reg = REPARegularizer(model, layers=[0, "blocks.2"], encoders=enc, projector_dim=8)
    assert reg.layer_names == ["blocks.0", "blocks.2"]
    assert len(reg.projectors) == 2
    assert REPARegularizer(model, layers="module.blocks.2", encoders=enc, projector_dim=8).layer_names == ["blocks.2"]
    compiled_like = nn.Module()
    compiled_like._orig_mod = model  # what torch.compile's wrapper looks like
    assert REPARegularizer(model, layers="_orig_mod.blocks.1", encoders=enc, projector_dim=8).layer_names == ["blocks.1"]


def test_unknown_layer_names_closest_matches():
    model = TinyDiT(depth=4)
    with pytest.raises(LayerNotFoundError, match=r"layers='block\.7'.*closest names.*blocks\.") as info:
        REPARegularizer(model, layers="block.7", encoders=ConvEncoder())
    assert isinstance(info.value, ValueError) and isinstance(info.value, REPAError)
    with pytest.raises(LayerNotFoundError, match=r"layers=9 is out of range for the model's 4 blocks"):
        REPARegularizer(model, layers=9, encoders=ConvEncoder())
    with pytest.raises(LayerNotFoundError, match="no nn.ModuleList"):
        REPARegularizer(nn.Sequential(nn.Linear(2, 2)), layers=0, encoders=ConvEncoder(), model_dim=2)
    with pytest.raises(ConfigError, match="layers= is empty"):
        REPARegularizer(model, layers=[], encoders=ConvEncoder())


def test_hidden_dim_inference_and_error():
    model = TinyDiT(dim=40)
    reg = REPARegularizer(model, layers=1, encoders=ConvEncoder(), projector_dim=8)
    assert reg.model_dims == {"blocks.1": 40}  # not the 4x MLP or 2x modulation width
    seq = nn.Sequential(nn.Identity(), nn.Linear(4, 4))
    with pytest.raises(HiddenDimError, match=r"pass model_dim="):
        REPARegularizer(seq, layers="0", encoders=ConvEncoder())
    reg = REPARegularizer(seq, layers="0", encoders=ConvEncoder(), model_dim=4, projector="linear")
    assert reg.projectors[0].in_features == 4


# --------------------------------------------------------------------------- projectors
def test_mlp_projector_is_exactly_repas():
    reg = REPARegularizer(TinyDiT(dim=32), layers=1, encoders=ConvEncoder(dim=24))
    proj = reg.projectors[0]
    kinds = [type(m) for m in proj]
    assert kinds == [nn.Linear, nn.SiLU, nn.Linear, nn.SiLU, nn.Linear]
    assert (proj[0].in_features, proj[0].out_features) == (32, 2048)
    assert (proj[2].in_features, proj[2].out_features) == (2048, 2048)
    assert (proj[4].in_features, proj[4].out_features) == (2048, 24)


def test_projector_kinds(setup):
    model, enc, x = setup
    lin = REPARegularizer(model, layers=1, encoders=enc, projector="linear")
    assert isinstance(lin.projectors[0], nn.Linear)
    lin.remove()
    conv = REPARegularizer(model, layers=1, encoders=enc, projector="conv", kernel_size=3)
    assert conv.projectors[0].conv.kernel_size == (3, 3)
    run(model, x)
    # the conv projector mixes neighbouring tokens: compare with a manual conv over the 4x4 grid
    h = conv._captures["blocks.1"].detach()
    out = conv(x, return_breakdown=True)
    fmap = h.transpose(1, 2).reshape(3, 32, 4, 4)
    manual = F.conv2d(fmap, conv.projectors[0].conv.weight, conv.projectors[0].conv.bias, padding=1)
    y = enc(x)
    expected = -F.cosine_similarity(manual.flatten(2).transpose(1, 2), y, dim=-1).mean()
    assert out.loss.item() == pytest.approx(expected.item(), abs=1e-5)
    conv.remove()
    custom = REPARegularizer(model, layers=1, encoders=enc, projector=lambda i, o: nn.Linear(i, o, bias=False))
    assert custom.projectors[0].bias is None
    with pytest.raises(UnknownNameError, match=r"unknown projector 'mpl'.*\['conv', 'linear', 'mlp'\]"):
        REPARegularizer(model, layers=1, encoders=enc, projector="mpl")
    with pytest.raises(ConfigError, match="kernel_size=3 only applies to projector='conv'"):
        REPARegularizer(model, layers=1, encoders=enc, kernel_size=3)
    with pytest.raises(ConfigError, match="unknown option"):
        REPARegularizer(model, layers=1, encoders=enc, temprature=0.1)


# --------------------------------------------------------------------------- losses
def _pair(seed=0, b=4, n=5, d=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, d, generator=g), torch.randn(b, n, d, generator=g)


def test_nt_xent_matches_hand_formula():
    from repa.losses import nt_xent_alignment

    p, t = _pair()
    tau = 0.2
    b, n, _ = p.shape
    total = 0.0
    for j in range(n):
        for i in range(b):
            logits = torch.tensor([float(F.cosine_similarity(p[i, j], t[k, j], dim=0)) / tau for k in range(b)])
            total += float(-(logits[i] - torch.logsumexp(logits, 0)))
    assert nt_xent_alignment(p, t, temperature=tau).item() == pytest.approx(total / (b * n), rel=1e-5)


def test_vf_relation_and_zscore_match_hand_formulas():
    from repa.losses import relation_alignment, vf_alignment, zscore_targets

    p, t = _pair(1, b=2, n=3, d=4)
    cos = lambda a, b_: float(a @ b_ / (a.norm() * b_.norm()))  # noqa: E731
    l_cos = l_dist = l_rel = 0.0
    for b in range(2):
        for i in range(3):
            l_cos += max(0.0, 1 - 0.5 - cos(p[b, i], t[b, i]))
            for j in range(3):
                d = abs(cos(p[b, i], p[b, j]) - cos(t[b, i], t[b, j]))
                l_dist += max(0.0, d - 0.25)
                l_rel += (cos(p[b, i], p[b, j]) - cos(t[b, i], t[b, j])) ** 2
    assert vf_alignment(p, t).item() == pytest.approx(l_cos / 6 + l_dist / 18, rel=1e-5)
    assert relation_alignment(p, t).item() == pytest.approx(l_rel / 18, rel=1e-5)
    z = zscore_targets(t, alpha=0.7)
    b, i, c = 1, 2, 3
    col = t[b, :, c]
    mean = sum(col.tolist()) / 3
    std = (sum((v - mean) ** 2 for v in col.tolist()) / 3) ** 0.5
    assert z[b, i, c].item() == pytest.approx((t[b, i, c].item() - 0.7 * mean) / (std + 1e-6), rel=1e-5)


@pytest.mark.parametrize("loss", ["cosine", "nt-xent", "smooth-l1", "mse", "vf", "relation"])
def test_every_named_loss_trains(setup, loss):
    model, enc, x = setup
    reg = REPARegularizer(model, layers=1, encoders=enc, loss=loss, projector_dim=16)
    run(model, x)
    out = reg(x)
    assert out.ndim == 0 and torch.isfinite(out)
    out.backward()
    assert all(p.grad is not None for p in reg.parameters())


def test_loss_options_and_errors(setup):
    model, enc, x = setup
    reg = REPARegularizer(model, layers=1, encoders=enc, loss="nt-xent", temperature=0.05, projector_dim=8)
    assert reg.loss_fn.keywords == {"temperature": 0.05}
    with pytest.raises(UnknownNameError, match=r"unknown loss 'cos'.*'cosine'"):
        REPARegularizer(model, layers=1, encoders=enc, loss="cos")
    with pytest.raises(ConfigError, match=r"\['temperature'\] do not apply to loss 'cosine'"):
        REPARegularizer(model, layers=1, encoders=enc, temperature=0.1)
    seen = {}

    def my_loss(pred, target):
        seen["shapes"] = (pred.shape, target.shape)
        return (pred - target).abs().mean()

    reg = REPARegularizer(model, layers=1, encoders=enc, loss=my_loss, projector_dim=8)
    run(model, x)
    reg(x)
    assert seen["shapes"] == (torch.Size([3, 16, 24]), torch.Size([3, 16, 24]))


def test_zscore_target_norm_option(setup):
    model, enc, x = setup
    reg = REPARegularizer(model, layers=1, encoders=enc, target_norm="zscore", alpha=0.8, loss=lambda p, t: t.mean())
    run(model, x)
    y = enc(x)
    expected = ((y - 0.8 * y.mean(1, keepdim=True)) / (y.std(1, keepdim=True, unbiased=False) + 1e-6)).mean()
    assert reg(x, return_breakdown=True).loss.item() == pytest.approx(expected.item(), abs=1e-5)
    with pytest.raises(ConfigError, match="target_norm must be None or 'zscore'"):
        REPARegularizer(model, layers=1, encoders=enc, target_norm="layer")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_loss_under_autocast(setup, dtype):
    model, enc, x = setup
    reg = REPARegularizer(model, layers=1, encoders=enc, projector_dim=16)
    with torch.autocast("cpu", dtype=dtype):
        run(model, x)
        out = reg(x, return_breakdown=True)
    assert out.total.dtype == torch.float32 and torch.isfinite(out.total)
    out.total.backward()
    assert all(torch.isfinite(p.grad).all() for p in reg.parameters())


# --------------------------------------------------------------------------- tokens and grids
class JointModel(nn.Module):
    """Text tokens (7) concatenated before image tokens (16), as in an MMDiT joint sequence."""

    def __init__(self, dim=16):
        super().__init__()
        self.img = nn.Conv2d(3, dim, 4, stride=4)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim)) for _ in range(2))

    def forward(self, x, text):
        h = torch.cat([text, self.img(x).flatten(2).transpose(1, 2)], dim=1)  # (B, 7 + 16, D)
        for blk in self.blocks:
            h = h + blk(h)
        return h


def test_tokens_slice_aligns_only_image_tokens():
    model = JointModel()
    enc = ConvEncoder(dim=8)
    x, text = torch.rand(2, 3, 16, 16), torch.randn(2, 7, 16)
    reg = REPARegularizer(model, layers=0, encoders=enc, tokens=slice(7, None), loss=lambda p, t: p.sum() * 0 + p.shape[1])
    model(x, text)
    assert reg(x, return_breakdown=True).loss.item() == 16
    # text tokens get no gradient from the alignment term
    text.requires_grad_(True)
    reg2 = REPARegularizer(model, layers=0, encoders=enc, tokens=slice(7, None), projector_dim=8)
    model(x, text)
    reg2(x).backward()
    assert text.grad is None or text.grad.abs().sum() == 0
    reg3 = REPARegularizer(model, layers=0, encoders=enc, tokens=lambda out: out[:, 7:], projector_dim=8)
    model(x, torch.randn(2, 7, 16))
    assert torch.isfinite(reg3(x))


class TupleBlock(nn.Module):
    def __init__(self, dim=16):
        super().__init__()
        self.lin = nn.Linear(dim, dim)

    def forward(self, h):
        return self.lin(h), "aux"


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Conv2d(3, 12, 3, padding=1), nn.Conv2d(12, 12, 3, stride=2, padding=1)])

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def test_tuple_and_feature_map_outputs():
    blk = nn.ModuleDict({"a": TupleBlock()})
    enc = ConvEncoder(dim=8)
    reg = REPARegularizer(blk, layers="a", encoders=enc, projector_dim=8)
    x = torch.rand(2, 3, 16, 16)
    blk["a"](torch.randn(2, 16, 16))
    assert torch.isfinite(reg(x))
    net = ConvNet()  # (B, 12, 8, 8) feature map at blocks.1 for 16px input; encoder gives 4x4
    reg = REPARegularizer(net, layers=1, encoders=enc, projector_dim=8)
    assert reg.model_dims == {"blocks.1": 12}
    net(x)
    out = reg(x, return_breakdown=True)
    assert torch.isfinite(out.total)


def test_grid_mismatch_interpolate_and_error():
    model = TinyDiT(size=16, patch=2)  # 8x8 tokens
    enc = ConvEncoder(dim=8, stride=4)  # 4x4 tokens at 16px
    x = torch.rand(2, 3, 16, 16)
    reg = REPARegularizer(model, layers=1, encoders=enc, projector_dim=8, loss=lambda p, t: p.sum() * 0 + t.shape[1])
    run(model, x)
    assert reg(x, return_breakdown=True).loss.item() == 64  # targets resampled to the model's 8x8 grid
    reg.remove()
    strict = REPARegularizer(model, layers=1, encoders=enc, projector_dim=8, mismatch="error")
    run(model, x)
    with pytest.raises(GridMismatchError, match=r"8x8 token grid but encoder 'convencoder' gives 4x4 for 16x16 images; images of 32x32"):
        strict(x)
    with pytest.raises(ConfigError, match="mismatch must be"):
        REPARegularizer(model, layers=1, encoders=enc, mismatch="crop")


def test_resample_tokens_against_manual_average():
    from repa.grid import resample_tokens

    tokens = torch.arange(16.0).view(1, 16, 1)  # 4x4 grid of values 0..15
    down = resample_tokens(tokens, (4, 4), (2, 2))  # antialiased bilinear = 2x2 mean here
    manual = torch.tensor([[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]).float().mean(1)
    assert torch.allclose(down.view(4), manual)
    assert resample_tokens(tokens, 4, 4) is tokens


def test_explicit_non_square_grid():
    model = TinyDiT(size=16, patch=4)
    enc = ConvEncoder(dim=8)
    x = torch.rand(2, 3, 16, 16)
    reg = REPARegularizer(model, layers=1, encoders=enc, projector_dim=8, grid=(2, 8), mismatch="error")
    run(model, x)
    with pytest.raises(GridMismatchError, match="2x8 token grid"):
        reg(x)
    reg.remove()
    bad = REPARegularizer(model, layers=1, encoders=enc, projector_dim=8, grid=(3, 3))
    run(model, x)
    with pytest.raises(ShapeMismatchError, match=r"grid=\(3, 3\) of layer 'blocks.1' has 9 cells but the layer gives 16"):
        bad(x)


# --------------------------------------------------------------------------- weights and steps
def test_step_counter_and_schedules(setup):
    model, enc, x = setup
    seen = []
    reg = REPARegularizer(model, layers=1, encoders=enc, projector_dim=8, weight=lambda s: seen.append(s) or 0.25)
    for _ in range(3):
        run(model, x)
        reg(x)
    assert seen == [0, 1, 2] and reg.state_dict()["step"].item() == 3
    run(model, x)
    out = reg(x, step=10, return_breakdown=True)
    assert seen[-1] == 10 and out.weight == 0.25 and reg.step.item() == 11
    sched = REPARegularizer(model, layers=1, encoders=enc, projector_dim=8, weight=schedules.Warmup(1.0, 4))
    run(model, x)
    assert sched(x, step=2, return_breakdown=True).weight == pytest.approx(0.5)
    # the counter is restored from a state dict
    fresh = REPARegularizer(model, layers=1, encoders=enc, projector_dim=8, weight=lambda s: seen.append(s) or 1.0)
    fresh.load_state_dict(reg.state_dict())
    run(model, x)
    fresh(x)
    assert seen[-1] == 11


def test_schedule_values():
    assert [schedules.StopAt(0.5, 2)(s) for s in range(4)] == [0.5, 0.5, 0.0, 0.0]
    assert schedules.LinearDecay(1.0, 10, 20)(15) == pytest.approx(0.5)
    assert schedules.CosineDecay(1.0, 0, 10)(5) == pytest.approx(0.5)
    assert schedules.CosineDecay(1.0, 0, 10)(0) == 1.0 and schedules.CosineDecay(1.0, 0, 10)(10) == 0.0
    assert schedules.Warmup(0.5, 10)(20) == 0.5
    assert schedules.from_dict(schedules.StopAt(0.5, 7).to_dict()) == schedules.StopAt(0.5, 7)
    with pytest.raises(ConfigError, match="weight must be a finite number >= 0"):
        schedules.Constant(-1)
    with pytest.raises(ConfigError, match="need 0 <= start < end"):
        schedules.LinearDecay(1.0, 5, 5)


def test_zero_weight_skips_encoder_but_touches_every_projector_param(setup):
    model, enc, x = setup
    calls = []
    enc.register_forward_hook(lambda *a: calls.append(1))
    reg = REPARegularizer(model, layers=[0, 1], encoders=enc, projector_dim=8, weight=schedules.StopAt(0.5, 1))
    run(model, x)
    assert reg(x) != 0 and len(calls) == 1
    run(model, x)
    zero = reg(x)
    assert zero.item() == 0 and len(calls) == 1  # encoder skipped
    zero.backward()
    for p in reg.parameters():
        assert p.grad is not None and p.grad.abs().sum() == 0  # used, so DDP sees no unused params


# --------------------------------------------------------------------------- inputs
def test_uint8_and_input_range(setup):
    model, enc, _ = setup
    reg = REPARegularizer(model, layers=1, encoders=enc, projector_dim=8, weight=1.0)
    x8 = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    t = torch.rand(3)
    torch.manual_seed(1)
    run(model, x8.float(), t)
    a = reg(x8, step=0)
    torch.manual_seed(1)
    run(model, x8.float(), t)
    b = reg(x8.float() / 255, step=0)
    assert torch.allclose(a, b, atol=1e-6)
    run(model, x8.float(), t)
    with pytest.raises(InputRangeError, match=r"float images span \[-1, .*input_range=\(-1, 1\)"):
        reg(x8.float() / 127.5 - 1)
    signed = REPARegularizer(model, layers=1, encoders=enc, projector_dim=8, input_range=(-1, 1))
    signed.projectors.load_state_dict(reg.projectors.state_dict())
    torch.manual_seed(1)
    run(model, x8.float(), t)
    c = signed(x8.float() / 127.5 - 1, step=0)
    assert torch.allclose(a * 0.5, c, atol=1e-5)  # default weight 0.5 vs 1.0
    with pytest.raises(ConfigError, match="input_range must be"):
        REPARegularizer(model, layers=1, encoders=enc, input_range=(1, 0))


def test_features_instead_of_images(setup):
    model, enc, x = setup
    reg = REPARegularizer(model, layers=1, encoders=enc, projector_dim=8)
    t = torch.rand(3)
    torch.manual_seed(1)
    run(model, x, t)
    online = reg(x, step=0)
    feats = enc(x).detach()
    for given in (feats, [feats], {"convencoder": feats}, feats.transpose(1, 2).reshape(3, 24, 4, 4)):
        torch.manual_seed(1)
        run(model, x, t)
        assert torch.allclose(reg(features=given, step=0), online, atol=1e-6)
    run(model, x, t)
    with pytest.raises(ShapeMismatchError, match="have width 5, expected 24"):
        reg(features=torch.randn(3, 16, 5))
    run(model, x, t)
    with pytest.raises(ConfigError, match="exactly one of images= .* or features="):
        reg()
    feature_only = REPARegularizer(model, layers=1, encoders={"dino": 24}, projector_dim=8)
    run(model, x, t)
    assert torch.isfinite(feature_only(features={"dino": feats}))
    run(model, x, t)
    with pytest.raises(ConfigError, match="given as a width only"):
        feature_only(x)


def test_several_encoders_mean_over_pairs(setup):
    model, _, x = setup
    e1, e2 = ConvEncoder(dim=8), ConvEncoder(dim=12, fmap=True)
    reg = REPARegularizer(model, layers=[0, 1], encoders=[e1, e2], projector_dim=8)
    assert reg.encoder_names == ["convencoder", "convencoder_2"] and len(reg.projectors) == 4
    run(model, x)
    out = reg(x, return_breakdown=True)
    assert set(out.cosine) == {f"blocks.{i}/{e}" for i in (0, 1) for e in ("convencoder", "convencoder_2")}
    assert out.loss.item() == pytest.approx(-sum(v.item() for v in out.cosine.values()) / 4, abs=1e-5)


def test_callable_encoder_width_by_probe(setup):
    model, _, x = setup
    conv = nn.Conv2d(3, 10, 8, stride=8)
    reg = REPARegularizer(model, layers=1, encoders=lambda im: conv(im), projector_dim=8)
    assert reg.encoder_dims == [10]
    run(model, x)
    assert torch.isfinite(reg(x))  # 2x2 encoder grid interpolated to the model's 4x4
    with pytest.raises(ConfigError, match="must be registry names, nn.Modules, callables or ints"):
        REPARegularizer(model, layers=1, encoders=3.5)


# --------------------------------------------------------------------------- capture lifecycle
def test_capture_errors_and_release(setup):
    model, enc, x = setup
    reg = REPARegularizer(model, layers=1, encoders=enc, projector_dim=8)
    with pytest.raises(CaptureError, match="has not run since the last reg\\(\\) call: run the model's forward"):
        reg(x)
    run(model, x)
    reg(x)
    assert reg._captures == {}  # released after each call
    with pytest.raises(CaptureError, match="has not run since the last"):
        reg(x)
    with torch.no_grad():
        run(model, x)
    assert reg._captures == {}
    with pytest.raises(CaptureError, match="ran with gradients disabled"):
        reg(x)
    with reg.disabled():
        run(model, x)
    assert reg._captures == {}


def test_reentrant_checkpointing_is_reported_and_non_reentrant_matches_eager(setup):
    from torch.utils.checkpoint import checkpoint

    model, enc, x = setup
    reg = REPARegularizer(model, layers=1, encoders=enc, projector_dim=8)
    t = torch.rand(3)
    noise = torch.randn_like(x)

    def forward(ckpt):
        h = model.embed(noise).flatten(2).transpose(1, 2)
        c = model.t_embed(t.view(-1, 1))
        for blk in model.blocks:
            h = checkpoint(blk, h, c, use_reentrant=ckpt == "reentrant") if ckpt else blk(h, c)
        return h

    def grads(ckpt):
        model.zero_grad()
        reg.zero_grad()
        forward(ckpt).sum().mul(0).backward(retain_graph=False) if False else None
        forward(ckpt)
        loss = reg(x, step=0)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in list(model.blocks[0].parameters()) + list(reg.parameters())]

    eager_loss, eager_grads = grads(None)
    ck_loss, ck_grads = grads("non-reentrant")
    assert torch.allclose(eager_loss, ck_loss)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(eager_grads, ck_grads))
    assert reg._captures == {}  # the recompute during backward captured nothing
    with pytest.raises(CaptureError, match="use_reentrant=False"):
        forward("reentrant")
        reg(x)


def test_remove_idempotent_and_context_manager(setup):
    model, enc, x = setup
    with REPARegularizer(model, layers=1, encoders=enc, projector_dim=8) as reg:
        assert len(model.blocks[1]._forward_hooks) == 1
    assert len(model.blocks[1]._forward_hooks) == 0
    reg.remove()
    run(model, x)
    assert reg._captures == {}


def test_deepcopy_model_ema_copy(setup):
    model, enc, x = setup
    reg = REPARegularizer(model, layers=1, encoders=enc, projector_dim=8)
    ema = copy.deepcopy(model)
    ema_params = {id(p) for p in ema.parameters()}
    assert not ema_params & {id(p) for p in reg.parameters()}
    run(model, x)
    original = reg._captures["blocks.1"]
    run(ema, x)  # the copy's forward must not overwrite the original's capture
    assert reg._captures["blocks.1"] is original
    assert torch.isfinite(reg(x))


def test_attach_to_makes_projectors_part_of_the_model(setup):
    model, enc, x = setup
    reg = REPARegularizer(model, layers=1, encoders=enc, projector_dim=8)
    reg.attach_to(model)
    assert any(k.startswith("repa_projectors.0.") for k in model.state_dict())
    ids = {id(p) for p in model.parameters()}
    assert all(id(p) in ids for p in reg.parameters())
    ema = copy.deepcopy(model)
    assert torch.equal(ema.repa_projectors[0][0].weight, reg.projectors[0][0].weight)
    reg.attach_to(model)  # idempotent
    with pytest.raises(ConfigError, match="already has an attribute 'blocks'"):
        reg.attach_to(model, name="blocks")


# --------------------------------------------------------------------------- save / load
def test_save_and_load_round_trip(tmp_path, setup):
    model, enc, x = setup
    reg = REPARegularizer(model, layers=[0, 1], encoders=enc, projector="conv", kernel_size=3, weight=schedules.StopAt(0.5, 9))
    run(model, x)
    reg(x)
    reg.save_pretrained(tmp_path)
    assert (tmp_path / "repa_config.json").exists()
    from safetensors import safe_open

    with safe_open(tmp_path / "repa_projectors.safetensors", "pt") as fh:
        assert '"kernel_size": 3' in fh.metadata()["repa_config"]
        assert '"repa_version"' in fh.metadata()["repa_config"]
    reg.remove()
    loaded = REPARegularizer.from_pretrained(tmp_path, model, encoders=enc)
    assert loaded.weight_fn == schedules.StopAt(0.5, 9) and loaded._step == 1
    for a, b in zip(reg.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    t = torch.rand(3)
    loaded.remove()
    reg2 = REPARegularizer.from_pretrained(tmp_path, model, encoders=enc)
    run(model, x, t)
    assert torch.isfinite(reg2(x))
    other = REPARegularizer(model, layers=[0], encoders=enc, projector="conv")
    with pytest.raises(StateDictError, match=r"unexpected keys \['projectors.1.conv.bias', 'projectors.1.conv.weight'\]"):
        other.load_state_dict(reg.state_dict())
    with pytest.raises(StateDictError, match="encoder widths"):
        REPARegularizer.from_pretrained(tmp_path, model, encoders=ConvEncoder(dim=5))
    with pytest.raises(StateDictError, match="no repa_projectors.safetensors"):
        REPARegularizer.from_pretrained(tmp_path / "nope", model, encoders=enc)


def test_custom_weight_must_be_given_when_loading(tmp_path, setup):
    model, enc, _ = setup
    reg = REPARegularizer(model, layers=1, encoders=enc, projector_dim=8, weight=lambda s: 0.1)
    reg.save_pretrained(tmp_path)
    reg.remove()
    with pytest.raises(ConfigError, match="custom weight; pass weight="):
        REPARegularizer.from_pretrained(tmp_path, model, encoders=enc)
    assert REPARegularizer.from_pretrained(tmp_path, model, encoders=enc, weight=0.1).weight_at() == 0.1


# --------------------------------------------------------------------------- compile, timm, import
def test_torch_compile_after_attaching_matches_eager(setup):
    model, enc, x = setup
    reg = REPARegularizer(model, layers=1, encoders=enc, projector_dim=8)
    t, noise = torch.rand(3), torch.randn_like(x)
    model(noise, t)
    eager = reg(x, step=0)
    compiled = torch.compile(model)
    compiled(noise, t)
    out = reg(x, step=0)
    assert torch.allclose(out, eager, atol=1e-5)
    out.backward()
    assert model.blocks[0].mlp[0].weight.grad is not None


def test_attaching_to_an_already_compiled_model_says_how_to_fix(setup):
    model, enc, x = setup
    compiled = torch.compile(model)
    t, noise = torch.rand(3), torch.randn_like(x)
    compiled(noise, t)  # compiled before the hooks exist
    reg = REPARegularizer(compiled, layers="_orig_mod.blocks.1", encoders=enc, projector_dim=8)
    compiled(noise, t)
    with pytest.raises(CaptureError, match="attach to the plain model first, then call torch.compile"):
        reg(x)


def test_timm_vit_as_the_diffusion_model_drops_prefix_tokens():
    import timm

    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2, num_classes=0, reg_tokens=2
    )
    reg = REPARegularizer(vit, layers=1, encoders=ConvEncoder(dim=8), projector_dim=8)
    assert reg.layer_names == ["blocks.1"] and reg._tokens["blocks.1"] == slice(3, None)
    x = torch.rand(2, 3, 16, 16)
    vit(x)
    out = reg(x)
    out.backward()
    assert vit.blocks[0].attn.qkv.weight.grad is not None and vit.blocks[2].attn.qkv.weight.grad is None


def test_errors_subclass_builtins():
    assert issubclass(LayerNotFoundError, ValueError)
    assert issubclass(CaptureError, RuntimeError)
    from repa.errors import WeightsNotFoundError

    assert issubclass(WeightsNotFoundError, FileNotFoundError)
    assert issubclass(GridMismatchError, ShapeMismatchError)


def test_import_repa_is_light():
    code = "import sys, repa; print(sorted(m for m in sys.modules if m.split('.')[0] in ('timm', 'huggingface_hub', 'diffusers')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_breakdown_is_a_named_tuple(setup):
    model, enc, x = setup
    reg = REPARegularizer(model, layers=1, encoders=enc, projector_dim=8)
    run(model, x)
    out = reg(x, return_breakdown=True)
    assert isinstance(out, REPAOutput) and out._fields == ("total", "loss", "weight", "cosine")


def test_tiny_random_timm_vit_encoder_from_the_registry():
    """A registry ViT (random init, one block) as the frozen encoder, end to end."""
    model = TinyDiT(size=64, patch=16)  # 4x4 tokens
    reg = REPARegularizer(
        model, layers=1, encoders="dinov2-vit-s", encoder_kwargs={"pretrained": False, "depth": 1}, projector_dim=16
    )
    enc = reg.encoders[0]
    assert reg.encoder_dims == [384] and enc.grid(64) == (4, 4)  # 224 * 64 / 256 = 56 px -> 4x4 patches of 14
    x = torch.rand(2, 3, 64, 64)
    run(model, x)
    out = reg(x)
    out.backward()
    assert torch.isfinite(out)
    assert all(p.grad is None and not p.requires_grad for p in enc.parameters())
    assert model.blocks[0].mlp[0].weight.grad is not None and model.blocks[2].mlp[0].weight.grad is None
