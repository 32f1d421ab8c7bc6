"""Specification of video caches: `repa cache --video` over folders of clip frames.

Targets are checked against a hand computation (each frame encoded alone by the same random
encoder, frames averaged per latent frame); the cache must continue, refuse other settings,
refuse a second concurrent build, and catch corrupted files on read.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from repa import REPARegularizer, create_encoder
from repa.cli import main as cli_main
from repa.errors import CacheMismatchError, CorruptCacheError, ShapeMismatchError
from repa.video_cache import CachedVideoFeatureDataset, build_video_cache, list_clips, verify_video_cache

SIZE = 28  # DINOv2/14 at 28 px: 2x2 tokens per frame


def make_clips(root: Path, frames=(5, 5), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for c, n in enumerate(frames):
        clip = root / f"clip_{c}"
        clip.mkdir(parents=True)
        for f in range(n):  # names whose natural order differs from the string order past 9
            Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(clip / f"frame_{f}.png")
    return root


def hand_targets(clip: Path, k: int) -> torch.Tensor:
    torch.manual_seed(0)
    enc = create_encoder("dinov2-vit-s", pretrained=False)
    paths = sorted(clip.glob("*.png"), key=lambda p: int(p.stem.split("_")[1]))
    frames = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1) for p in paths])
    with torch.no_grad():
        per = [enc(frames[i : i + 1].float() / 255)[0] for i in range(len(paths))]  # each (N, D)
    groups = [[0]] + [list(range(1 + k * i, 1 + k * (i + 1))) for i in range((len(paths) - 1) // k)]
    return torch.stack([sum(per[i] for i in g) / len(g) for g in groups])  # (T_lat, N, D)


def build(data: Path, out: Path, **kw):
    kw.setdefault("pretrained", False)
    kw.setdefault("progress", False)
    kw.setdefault("device", "cpu")
    return build_video_cache(data, out, "dinov2-vit-s", **kw)


def test_frames_are_read_in_natural_order(tmp_path):
    clip = tmp_path / "v" / "a"
    clip.mkdir(parents=True)
    for name in ("f10.png", "f2.png", "f1.png"):
        Image.new("RGB", (4, 4)).save(clip / name)
    assert [p.name for p in list_clips(tmp_path / "v")[0][1]] == ["f1.png", "f2.png", "f10.png"]


def test_video_cache_stores_per_latent_frame_targets(tmp_path):
    data = make_clips(tmp_path / "clips", frames=(5, 13))  # frame_10.png sorts after frame_9.png
    index = build(data, tmp_path / "cache", temporal_compression=4, dtype="fp32", frame_chunk=3)
    assert index["count"] == 2
    ds = CachedVideoFeatureDataset(tmp_path / "cache")
    item = ds[1]
    assert item["clip"] == "clip_1"
    y = item["features"]["dinov2-vit-s"]
    assert y.shape == (4, 4, 384)  # 13 frames -> 4 latent frames of 2x2 tokens
    assert torch.allclose(y, hand_targets(data / "clip_1", 4), atol=1e-4)
    assert ds[0]["features"]["dinov2-vit-s"].shape == (2, 4, 384)


def test_cached_targets_feed_the_regularizer(tmp_path):
    data = make_clips(tmp_path / "clips", frames=(5, 5))
    build(data, tmp_path / "cache", temporal_compression=4)
    ds = CachedVideoFeatureDataset(tmp_path / "cache")
    feats = torch.stack([ds[i]["features"]["dinov2-vit-s"] for i in range(2)])  # (B, T_lat, N, D) fp16
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    reg = REPARegularizer(model, layers="0", encoders=384, grid=(2, 2, 2))
    model(torch.randn(2, 8, 8))
    loss = reg(features=feats)
    assert torch.isfinite(loss)


def test_rerun_continues_and_other_settings_are_refused(tmp_path):
    data = make_clips(tmp_path / "clips")
    out = tmp_path / "cache"
    first = build(data, out, temporal_compression=4)
    again = build(data, out, temporal_compression=4)
    assert again["fingerprint"] == first["fingerprint"]
    with pytest.raises(CacheMismatchError, match="made with other settings or data"):
        build(data, out, temporal_compression=2)
    # an interrupted build (records, no index) continues only with its own settings
    (out / "index.json").unlink()
    (out / "clip-00001.json").unlink()
    with pytest.raises(CacheMismatchError, match="unfinished video cache made with other settings"):
        build(data, out, temporal_compression=4, frame_pooling="first")
    resumed = build(data, out, temporal_compression=4)
    assert [r["sha256"] for r in resumed["records"]] == [r["sha256"] for r in first["records"]]


def test_a_second_concurrent_build_is_refused(tmp_path):
    data = make_clips(tmp_path / "clips")
    out = tmp_path / "cache"
    out.mkdir()
    (out / ".lock").write_text("12345")
    with pytest.raises(CacheMismatchError, match="another build is writing"):
        build(data, out)


def test_clips_must_fit_the_vae_grouping(tmp_path):
    data = make_clips(tmp_path / "clips", frames=(5, 6))
    with pytest.raises(ShapeMismatchError, match="clip 'clip_1': a clip of 6 frames does not fit"):
        build(data, tmp_path / "cache", temporal_compression=4)
    index = build(data, tmp_path / "cache2", temporal_compression=4, num_frames=5)
    assert index["count"] == 2


def test_corruption_is_caught_on_read_and_by_verify(tmp_path, capsys):
    data = make_clips(tmp_path / "clips")
    out = tmp_path / "cache"
    build(data, out, temporal_compression=4)
    assert verify_video_cache(out) == []
    assert cli_main(["cache", "verify", str(out)]) == 0
    path = out / "clip-00000.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert any("does not match its sha256" in p for p in verify_video_cache(out))
    with pytest.raises(CorruptCacheError, match="does not match its sha256"):
        CachedVideoFeatureDataset(out)[0]
    assert cli_main(["cache", "verify", str(out)]) == 1


def test_repa_cache_video_command_line(tmp_path, capsys):
    data = make_clips(tmp_path / "clips")
    out = tmp_path / "cache"
    code = cli_main([
        "cache", "--video", "--data", str(data), "--encoders", "dinov2-vit-s", "--out", str(out),
        "--no-pretrained", "--temporal-compression", "4", "--no-progress", "--device", "cpu",
    ])
    assert code == 0
    assert "video cache of 2 clips" in capsys.readouterr().err
    assert len(CachedVideoFeatureDataset(out)) == 2
    code = cli_main(["cache", "--video", "--data", str(data), "--encoders", "dinov2-vit-s", "--out", str(tmp_path / "o2"),
                     "--resolution", "28"])
    assert code == 1
    assert "for videos pass --frame-size H,W" in capsys.readouterr().err


def test_frame_size_resizes_and_mixed_sizes_are_refused(tmp_path):
    data = make_clips(tmp_path / "clips", frames=(5,))
    Image.new("RGB", (14, 14)).save(data / "clip_0" / "frame_5.png")  # one odd-sized frame
    with pytest.raises(ShapeMismatchError, match=r"different sizes .* pass --frame-size H,W"):
        build(data, tmp_path / "c1", num_frames=6, temporal_compression=5)
    index = build(data, tmp_path / "c2", num_frames=6, temporal_compression=5, frame_size=(28, 56))
    rec = index["records"][0]["targets"]["dinov2-vit-s"]
    assert rec["shape"] == [2, 2 * 4, 384] and rec["grid"] == [2, 2, 4]  # 28 x 56 px -> 2 x 4 tokens
