"""Specification of video REPA's core: 3D grids, frame grouping, per-frame targets, the TRD loss.

Every numeric check compares with a hand-computed case or a formula written out here
(loops over frames, groups and token pairs), never with the library's own output.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from repa import REPARegularizer
from repa.errors import ConfigError, NonFiniteInputError, ShapeMismatchError
from repa.grid import as_token_grid, format_grid, grid_cells, resample_tokens
from repa.losses import build_loss, token_relation_distillation
from repa.video import (
    VideoOptions,
    detect_video_layout,
    group_frame_tokens,
    latent_frame_groups,
    num_latent_frames,
)
from tiny_models import ConvEncoder


# --------------------------------------------------------------------------- 3D grids
def test_token_grids_accept_triples_and_count_their_cells():
    assert as_token_grid((3, 4, 5)) == (3, 4, 5)
    assert as_token_grid([2, 6]) == (2, 6)
    assert as_token_grid(4) == (4, 4)
    assert grid_cells((3, 4, 5)) == 60 and format_grid((21, 30, 52)) == "21x30x52"
    with pytest.raises(ConfigError, match=r"grid sides must be positive, got \(2, 0, 3\)"):
        as_token_grid((2, 0, 3))
    with pytest.raises(ConfigError, match=r"grid must be \(h, w\) or \(t, h, w\), got 4 sides"):
        as_token_grid((1, 2, 3, 4))


def test_resample_3d_in_space_by_hand():
    # grid (1, 2, 4): one frame, values 0..7 row-major; 2x4 -> 1x2 is the mean of 2x2 blocks
    x = torch.arange(8.0).reshape(1, 8, 1)
    out = resample_tokens(x, (1, 2, 4), (1, 1, 2)).flatten().tolist()
    assert out == pytest.approx([(0 + 1 + 4 + 5) / 4, (2 + 3 + 6 + 7) / 4])


def test_resample_3d_in_time_by_hand():
    # grid (4, 1, 2): 4 frames of 2 tokens; token k of frame f holds 10 f + k
    x = torch.tensor([[10.0 * f + k for f in range(4) for k in range(2)]]).reshape(1, 8, 1)
    down = resample_tokens(x, (4, 1, 2), (2, 1, 2)).flatten().tolist()
    assert down == pytest.approx([5, 6, 25, 26])  # frames (0, 1) and (2, 3) averaged
    # 2 -> 4 frames, linear with align_corners=False: positions (i + 0.5) / 2 - 0.5, clamped
    two = torch.tensor([[0.0, 1.0, 10.0, 11.0]]).reshape(1, 4, 1)  # frame 0: (0, 1), frame 1: (10, 11)
    up = resample_tokens(two, (2, 1, 2), (4, 1, 2)).reshape(4, 2)
    expected = [[0, 1], [2.5, 3.5], [7.5, 8.5], [10, 11]]
    assert up.tolist() == [pytest.approx(r) for r in expected]


def test_resample_3d_in_space_and_time_by_hand():
    # (2, 2, 2) -> (1, 1, 1): the mean of all 8 tokens; 2 channels
    x = torch.arange(16.0).reshape(1, 8, 2)
    out = resample_tokens(x, (2, 2, 2), (1, 1, 1))
    assert out.shape == (1, 1, 2)
    assert out.flatten().tolist() == pytest.approx([sum(range(0, 16, 2)) / 8, sum(range(1, 16, 2)) / 8])


def test_resample_refuses_mixed_grid_ranks():
    with pytest.raises(ShapeMismatchError, match="between a 2D grid 2x2 and a 3D grid 1x2x2"):
        resample_tokens(torch.zeros(1, 4, 3), (2, 2), (1, 2, 2))
    with pytest.raises(ShapeMismatchError, match="do not fill the source grid 2x2x2"):
        resample_tokens(torch.zeros(1, 7, 3), (2, 2, 2), (1, 2, 2))


# --------------------------------------------------------------------------- frames -> latent frames
def test_latent_frame_groups_first_frame_alone_then_runs_of_k():
    assert latent_frame_groups(9, 4) == [[0], [1, 2, 3, 4], [5, 6, 7, 8]]
    assert latent_frame_groups(17, 8) == [[0], list(range(1, 9)), list(range(9, 17))]
    assert latent_frame_groups(3, 1) == [[0], [1], [2]]
    assert num_latent_frames(81, 4) == 21 and num_latent_frames(121, 8) == 16
    with pytest.raises(ShapeMismatchError, match=r"8 frames does not fit .* compression 4: it needs 1 \+ 4 \* n frames \(e.g. 5 or 9\)"):
        latent_frame_groups(8, 4)


def _reference_grouping(tokens: torch.Tensor, k: int, pick: str) -> torch.Tensor:
    """Hand-written: walk the frames, open a new latent frame at 0, 1, 1+k, 1+2k, ..."""
    b, t, n, d = tokens.shape
    latents = []
    frame = 0
    size = 1
    while frame < t:
        members = list(range(frame, frame + size))
        if pick == "mean":
            acc = torch.zeros(b, n, d)
            for f in members:
                acc += tokens[:, f]
            latents.append(acc / len(members))
        else:
            f = {"first": members[0], "last": members[-1], "middle": members[(len(members) - 1) // 2]}[pick]
            latents.append(tokens[:, f])
        frame += size
        size = k
    return torch.stack(latents, dim=1)


@pytest.mark.parametrize("pick", ["mean", "first", "middle", "last"])
def test_group_frame_tokens_matches_a_hand_written_walk(pick):
    tokens = torch.randn(2, 9, 3, 4)
    got = group_frame_tokens(tokens, 4, pick)
    assert got.shape == (2, 3, 3, 4)
    assert torch.allclose(got, _reference_grouping(tokens, 4, pick), atol=1e-6)


def test_video_layout_is_detected_or_refused():
    assert detect_video_layout(torch.zeros(2, 3, 9, 8, 8)) == "BCTHW"
    assert detect_video_layout(torch.zeros(2, 9, 3, 8, 8)) == "BTCHW"
    with pytest.raises(ShapeMismatchError, match="cannot tell the layout of videos of shape \\(2, 3, 3, 8, 8\\).*video_layout='BCTHW'"):
        detect_video_layout(torch.zeros(2, 3, 3, 8, 8))
    assert detect_video_layout(torch.zeros(2, 3, 3, 8, 8), "BTCHW") == "BTCHW"
    with pytest.raises(ShapeMismatchError, match="video_layout='BCTHW' reads 9 colour channels"):
        detect_video_layout(torch.zeros(2, 9, 3, 8, 8), "BCTHW")
    with pytest.raises(ShapeMismatchError, match="videos must be a 5-D tensor"):
        detect_video_layout(torch.zeros(2, 3, 8, 8))


def test_video_options_are_validated():
    with pytest.raises(ConfigError, match="video_layout must be 'BCTHW'"):
        VideoOptions(video_layout="NCHW")
    with pytest.raises(ConfigError, match="temporal_compression must be a positive int"):
        VideoOptions(temporal_compression=0)
    with pytest.raises(ConfigError, match="frame_pooling must be one of"):
        VideoOptions(frame_pooling="max")
    with pytest.raises(ConfigError, match="frame_chunk must be a positive int"):
        VideoOptions(frame_chunk=0)


# --------------------------------------------------------------------------- a tiny 3D model
class TinyVideoDiT(nn.Module):
    """Patchify (B, C, F, H, W) latents in (1, p, p) patches, a few blocks, a linear head."""

    def __init__(self, in_ch: int = 4, patch: int = 2, dim: int = 16, depth: int = 3) -> None:
        super().__init__()
        self.patch = patch
        self.embed = nn.Conv3d(in_ch, dim, (1, patch, patch), stride=(1, patch, patch))
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim)) for _ in range(depth)
        )
        self.head = nn.Linear(dim, in_ch * patch * patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, f, h, w = x.shape
        tok = self.embed(x).flatten(2).transpose(1, 2)  # (B, f*h/p*w/p, D): frame-major
        for block in self.blocks:
            tok = tok + block(tok)
        return self.head(tok)  # (B, N, C*p*p)


class CountingEncoder(ConvEncoder):
    """ConvEncoder that records how many frames it saw per call."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.calls = []

    def forward(self, x):
        self.calls.append(x.shape[0])
        return super().forward(x)


def _hand_targets(encoder: nn.Module, video_btchw: torch.Tensor, k: int) -> torch.Tensor:
    """Encode each frame alone, average the frames of each latent frame: (B, T_lat*N, D)."""
    b, t = video_btchw.shape[:2]
    per_frame = torch.stack([encoder(video_btchw[:, f]) for f in range(t)], dim=1)  # (B, T, N, D)
    latents = [per_frame[:, [0]].mean(1)] + [per_frame[:, 1 + k * i : 1 + k * (i + 1)].mean(1) for i in range((t - 1) // k)]
    return torch.stack(latents, 1).flatten(1, 2)


def test_video_targets_are_per_frame_encodings_averaged_per_latent_frame():
    torch.manual_seed(0)
    model, enc = TinyVideoDiT(), CountingEncoder(dim=6, stride=4)
    reg = REPARegularizer(model, layers="blocks.1", encoders=enc, grid=(3, 4, 4), temporal_compression=4,
                          loss="cosine", frame_chunk=4)
    video = torch.rand(2, 9, 3, 16, 16)  # (B, T, C, H, W): 9 frames -> 3 latent frames; encoder grid 4x4
    targets = reg._targets(video, None, {})
    y, grid = targets[reg.encoder_names[0]]
    assert grid == (3, 4, 4)
    # frame_chunk=4 frames per call, 2 clips -> 2 frames of each clip per call: 9 frames in 5 calls
    assert enc.calls == [4, 4, 4, 4, 2]
    with torch.no_grad():
        expected = _hand_targets(enc, video, 4)
    assert torch.allclose(y, expected, atol=1e-5)


def test_both_layouts_and_any_chunk_give_the_same_targets():
    torch.manual_seed(0)
    enc = ConvEncoder(dim=6, stride=4)
    video = torch.rand(1, 5, 3, 16, 16)
    outs = []
    for layout, chunk, v in (("BTCHW", 64, video), ("BCTHW", 1, video.transpose(1, 2).contiguous())):
        reg = REPARegularizer(TinyVideoDiT(), layers="blocks.1", encoders=enc, grid=(2, 4, 4), temporal_compression=4,
                              video_layout=layout, frame_chunk=chunk)
        outs.append(reg._targets(v, None, {})[reg.encoder_names[0]][0])
    assert torch.allclose(outs[0], outs[1], atol=1e-6)


def test_picking_one_frame_encodes_only_the_picked_frames():
    enc = CountingEncoder(dim=6, stride=4)
    reg = REPARegularizer(TinyVideoDiT(), layers="blocks.1", encoders=enc, grid=(3, 4, 4), temporal_compression=4,
                          frame_pooling="last")
    video = torch.rand(1, 9, 3, 16, 16)
    y, _ = reg._targets(video, None, {})[reg.encoder_names[0]]
    assert sum(enc.calls) == 3  # frames 0, 4 and 8
    with torch.no_grad():
        expected = torch.stack([enc(video[:, f]) for f in (0, 4, 8)], 1).flatten(1, 2)
    assert torch.allclose(y, expected, atol=1e-6)


def test_videos_without_a_known_temporal_compression_are_refused():
    reg = REPARegularizer(TinyVideoDiT(), layers="blocks.1", encoders=ConvEncoder(dim=6), grid=(3, 4, 4))
    model = reg._model_ref[0]  # a model without a preset: no VAE factor is known
    model(torch.randn(1, 4, 3, 8, 8))
    with pytest.raises(ConfigError, match=r"temporal_compression=4\) \(Wan, CogVideoX, HunyuanVideo\) or 8"):
        reg(torch.rand(1, 3, 9, 16, 16))


def test_video_range_is_checked_per_chunk():
    reg = REPARegularizer(TinyVideoDiT(), layers="blocks.1", encoders=ConvEncoder(dim=6), grid=(3, 4, 4),
                          temporal_compression=4)
    reg._model_ref[0](torch.randn(1, 4, 3, 8, 8))
    with pytest.raises(ConfigError, match=r"float images span .* input_range=\(0, 1\)"):
        reg(torch.rand(1, 3, 9, 16, 16) * 2 - 1)


# --------------------------------------------------------------------------- the TRD loss
def _trd_by_hand(pred: torch.Tensor, target: torch.Tensor, margin: float) -> float:
    """Loop over samples and ordered token pairs; cosines from dot products and norms."""
    total, count = 0.0, 0
    for b in range(pred.shape[0]):
        p, t = pred[b].double(), target[b].double()
        n = p.shape[0]
        for i, j in itertools.product(range(n), range(n)):
            cp = float(p[i] @ p[j]) / (float(p[i].norm()) * float(p[j].norm()))
            ct = float(t[i] @ t[j]) / (float(t[i].norm()) * float(t[j].norm()))
            total += max(abs(cp - ct) - margin, 0.0)
            count += 1
    return total / count


@pytest.mark.parametrize("margin", [0.0, 0.1, 0.5])
def test_trd_matches_the_pairwise_formula(margin):
    torch.manual_seed(1)
    pred, target = torch.randn(2, 12, 5), torch.randn(2, 12, 7)  # e.g. a (3, 2, 2) video grid
    got = token_relation_distillation(pred, target, margin=margin, chunk_size=5)
    assert float(got) == pytest.approx(_trd_by_hand(pred, target, margin), rel=1e-5, abs=1e-7)


def test_trd_is_zero_for_equal_relations_and_ignores_token_scale():
    torch.manual_seed(2)
    target = torch.randn(1, 10, 4)
    rotation = torch.linalg.qr(torch.randn(4, 4))[0]
    pred = (target @ rotation) * torch.rand(1, 10, 1).add(0.5)  # same cosines, other basis and norms
    assert float(token_relation_distillation(pred, target, margin=0.0)) == pytest.approx(0.0, abs=1e-6)


def test_trd_chunked_equals_unchunked_in_value_and_gradient():
    torch.manual_seed(3)
    target = torch.randn(2, 37, 6)
    grads, values = [], []
    for chunk in (1024, 8, 1):
        pred = torch.randn(2, 37, 5, generator=torch.Generator().manual_seed(4)).requires_grad_()
        loss = token_relation_distillation(pred, target, margin=0.05, chunk_size=chunk)
        loss.backward()
        values.append(float(loss.detach()))
        grads.append(pred.grad.clone())
    assert values[1] == pytest.approx(values[0], rel=1e-6) and values[2] == pytest.approx(values[0], rel=1e-6)
    assert torch.allclose(grads[1], grads[0], atol=1e-7) and torch.allclose(grads[2], grads[0], atol=1e-7)
    assert grads[0].abs().sum() > 0


def test_trd_is_a_named_loss_with_options():
    fn = build_loss("trd", {"margin": 0.2, "relation_chunk": 3})
    pred, target = torch.randn(1, 6, 3), torch.randn(1, 6, 3)
    assert float(fn(pred, target)) == pytest.approx(_trd_by_hand(pred, target, 0.2), rel=1e-5, abs=1e-7)
    with pytest.raises(ConfigError, match="margin must be >= 0"):
        token_relation_distillation(pred, target, margin=-1.0)
    with pytest.raises(ConfigError, match="chunk_size must be a positive int"):
        token_relation_distillation(pred, target, chunk_size=0)


# --------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("loss", ["cosine", "trd"])
def test_gradients_reach_the_hooked_blocks_and_the_projector_only(loss):
    torch.manual_seed(0)
    model = TinyVideoDiT()
    reg = REPARegularizer(model, layers="blocks.1", encoders=ConvEncoder(dim=6, stride=4), grid=(3, 4, 4),
                          temporal_compression=4, loss=loss, weight=1.0)
    model(torch.randn(2, 4, 3, 8, 8))  # latents (B, C, F, H, W): 3 latent frames of 4x4 tokens
    out = reg(torch.rand(2, 3, 9, 16, 16), return_breakdown=True)  # encoder grid 4x4: no resampling
    out.total.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in reg.parameters())
    for i, block in enumerate(model.blocks):
        got = any(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters())
        assert got == (i <= 1), f"blocks.{i}"
    assert model.head.weight.grad is None


def test_cosine_on_video_equals_the_per_token_formula_after_resampling():
    torch.manual_seed(0)
    model, enc = TinyVideoDiT(), ConvEncoder(dim=6, stride=2)  # encoder grid 8x8 -> resampled to 4x4
    reg = REPARegularizer(model, layers="blocks.0", encoders=enc, grid=(3, 4, 4), temporal_compression=4,
                          weight=1.0, projector="linear")
    latents, video = torch.randn(1, 4, 3, 8, 8), torch.rand(1, 9, 3, 16, 16)
    model(latents)
    hidden = reg._captures["blocks.0"].detach()
    loss = reg(video)
    with torch.no_grad():
        y = _hand_targets(enc, video, 4).reshape(1, 3, 8, 8, 6)
        y = y.reshape(1, 3, 4, 2, 4, 2, 6).mean(dim=(3, 5)).reshape(1, 48, 6)  # 2x2 block means per frame
        pred = reg.projectors[0](hidden)
        expected = -F.cosine_similarity(pred, y, dim=-1).mean()
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)


def test_precomputed_video_targets_enter_as_features():
    torch.manual_seed(0)
    model = TinyVideoDiT()
    reg = REPARegularizer(model, layers="blocks.1", encoders=6, grid=(3, 4, 4), weight=1.0, projector="linear")
    model(torch.randn(2, 4, 3, 8, 8))
    hidden = reg._captures["blocks.1"].detach()
    feats = torch.randn(2, 3, 16, 6)  # (B, T_lat, N, D) as a video cache stores them
    loss = reg(features=feats)
    expected = -F.cosine_similarity(reg.projectors[0](hidden), feats.reshape(2, 48, 6), dim=-1).mean()
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    model(torch.randn(2, 4, 3, 8, 8))
    bad = feats.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteInputError, match="features= for encoder .* hold 1 NaN"):
        reg(features=bad)


def test_tiny_wan_config_trains_a_step_with_repa_end_to_end():
    """A tiny diffusers WanTransformer3DModel, a registry image encoder on the frames, one optimizer step."""
    diffusers = pytest.importorskip("diffusers")
    from repa import create_encoder

    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=12, freq_dim=16, ffn_dim=32, num_layers=3, rope_max_seq_len=32,
    )
    encoder = create_encoder("dinov2-vit-s", pretrained=False, depth=1, resolution=56)
    reg = REPARegularizer(model, layers=1, encoders=encoder, weight=0.5)
    assert reg.layer_names == ["blocks.1"]
    params = list(model.parameters()) + list(reg.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)
    videos = torch.rand(2, 3, 5, 56, 56)  # 5 frames -> 2 latent frames; DINOv2/14 at 56 px: 4x4 tokens per frame
    x0 = torch.randn(2, 4, 2, 8, 8)  # latents (B, C, F_lat, H, W) -> grid (2, 4, 4)
    noise, t = torch.randn_like(x0), torch.rand(2)
    x_t = (1 - t.view(-1, 1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1, 1) * noise
    before = [p.detach().clone() for p in reg.parameters()]
    pred = model(x_t, t * 1000, torch.randn(2, 5, 12)).sample
    diff = F.mse_loss(pred, noise - x0)
    out = reg(videos, return_breakdown=True)
    (diff + out.total).backward()
    opt.step()
    assert reg._grid_tracker.grid == (2, 4, 4)
    assert math.isfinite(float(out.loss)) and -1.0 <= float(out.loss) <= 1.0
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, reg.parameters()))


def test_video_options_round_trip_through_save_pretrained(tmp_path):
    model = TinyVideoDiT()
    reg = REPARegularizer(model, layers="blocks.1", encoders=6, grid=(3, 4, 4), loss="trd", margin=0.2,
                          temporal_compression=8, frame_pooling="middle", video_layout="BTCHW")
    reg.save_pretrained(tmp_path)
    again = REPARegularizer.from_pretrained(tmp_path, TinyVideoDiT(), encoders=6)
    assert again.video == VideoOptions(video_layout="BTCHW", temporal_compression=8, frame_pooling="middle")
    assert again.config["options"]["margin"] == 0.2 and again.config["grid"] == {"blocks.1": [3, 4, 4]}


def test_a_3d_grid_must_hold_the_layer_tokens():
    model = TinyVideoDiT()
    reg = REPARegularizer(model, layers="blocks.1", encoders=6, grid=(2, 4, 4))
    model(torch.randn(1, 4, 3, 8, 8))  # 48 tokens, grid says 32
    with pytest.raises(ShapeMismatchError, match=r"grid=\(2, 4, 4\) of layer 'blocks.1' has 32 cells but the layer gives 48"):
        reg(features=torch.randn(1, 2, 16, 6))


def test_memory_arithmetic_of_the_readme():
    """benchmarks/video_memory.py's figures for 81 frames at 480 x 832 with DINOv2-B, by hand."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "video_memory.py"
    spec = importlib.util.spec_from_file_location("video_memory", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    a = module.arithmetic(81, 480, 832, "dinov2-vit-b", 4, 8, 2)
    # DINOv2 reads 480 x 832 at 224/256 scale: 420 x 728 -> 30 x 52 patches of 14 px
    assert a["encoder_input"] == [420, 728] and a["tokens_per_frame"] == 30 * 52
    assert a["latent_frames"] == 21
    assert a["targets_per_clip_fp16_bytes"] == 21 * 1560 * 768 * 2 == 50_319_360
    assert a["per_frame_targets_fp16_bytes"] == 81 * 1560 * 768 * 2
    assert a["model_tokens"] == 21 * 30 * 52 == 32_760
    assert a["relation_matrix_fp32_bytes"] == 32_760**2 * 4


def test_conv_projector_runs_per_latent_frame_on_video_grids():
    from repa.projectors import ConvProjector

    torch.manual_seed(0)
    proj = ConvProjector(5, 3, kernel_size=3)
    x = torch.randn(2, 3 * 4 * 4, 5)  # grid (3, 4, 4)
    out = proj(x, (3, 4, 4))
    frames = x.reshape(2, 3, 16, 5)
    by_hand = torch.stack([proj.conv(frames[:, f].transpose(1, 2).reshape(2, 5, 4, 4)).flatten(2).transpose(1, 2)
                           for f in range(3)], 1).reshape(2, 48, 3)
    assert torch.allclose(out, by_hand, atol=1e-6)
