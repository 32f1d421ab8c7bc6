"""Feature caches (`repa cache`, `CachedFeatureDataset`): exact targets, resumable atomic shards, clear errors.

What must hold: cached targets equal the online encoder's within the storage dtype's rounding;
a REPA loss from cached features equals the loss from the online encoder; a deleted shard is
rebuilt alone; two processes write disjoint shards whose union equals a one-process build;
every mismatch or damage is named with the file and the rebuild command.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from torch import nn

from repa import REPARegularizer
from repa.cache import CachedFeatureDataset, build_cache, bytes_per_image, is_feature_cache, load_index, verify_cache
from repa.cli import main as repa_main
from repa.encoders import create_encoder, register_encoder, save_encoder_weights
from repa.errors import CacheMismatchError, ConfigError, CorruptCacheError
from repa.sit import create_sit
from repa.sit.data import ImageFolderDataset, load_idx_split, write_idx
from tiny_models import exit_spawned_worker

N_IDX = 36  # Fashion-MNIST items of the small IDX folder


@pytest.fixture(autouse=True)
def _one_thread():
    """The machine is shared: one intra-op thread keeps these small tensors fast and the numerics fixed."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class _PatchConv(nn.Module):
    """A registry-style network: normalized (B, 3, H, W) -> feature map (B, 12, H/4, W/4)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, 12, 4, stride=4)
        self.mix = nn.Conv2d(12, 12, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(torch.tanh(self.proj(x)))  # (B, 12, h, w)


register_encoder("test-cache-conv", embed_dim=12, patch_size=4, license="test", overwrite=True)(
    lambda spec, **kw: _PatchConv()
)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Two classes of random 20x24 RGB PNGs (center-cropped to 16 by the dataset)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c, name in enumerate(["cat", "dog"]):
        (root / name).mkdir()
        for i in range(9 + c):  # 9 + 10 = 19 images: the last shard is partial
            arr = rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / name / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def conv_weights(tmp_path_factory):
    torch.manual_seed(1)
    enc = create_encoder("test-cache-conv", pretrained=False, resolution=16)
    return str(save_encoder_weights(enc, tmp_path_factory.mktemp("w") / "conv.safetensors"))


@pytest.fixture(scope="module")
def idx_folder(tmp_path_factory):
    """The first N_IDX Fashion-MNIST training images as an IDX folder."""
    src = "/usr/share/datasets/fashion-mnist"
    if not os.path.exists(os.path.join(src, "train-images-idx3-ubyte.gz")):
        pytest.fail(f"Fashion-MNIST not found in {src}; install it with `apt-get install -y dataset-fashion-mnist`")
    images, labels = load_idx_split(src, "train")
    root = tmp_path_factory.mktemp("idx")
    write_idx(root / "train-images-idx3-ubyte.gz", images[:N_IDX, 0])
    write_idx(root / "train-labels-idx1-ubyte.gz", labels[:N_IDX].astype(np.uint8))
    return root


@pytest.fixture(scope="module")
def fmnist_cache(idx_folder, tmp_path_factory):
    """fmnist-vit (random, seed 0) targets of the IDX folder in fp16, shards of 16 items."""
    out = tmp_path_factory.mktemp("fm") / "cache"
    build_cache(idx_folder, out, "fmnist-vit", pretrained=False, dtype="fp16", shard_size=16, batch_size=8, progress=False)
    return out


def _online_fmnist():
    torch.manual_seed(0)  # what --no-pretrained --seed 0 builds for the first encoder
    return create_encoder("fmnist-vit", pretrained=False, resolution=28)


def _sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


# ----------------------------------------------------------------------------- storage arithmetic


def test_bytes_per_image_is_tokens_times_dim_times_itemsize():
    # DINOv2-B/14: 256 px -> 224 px input -> 16 x 16 tokens of width 768; 512 px -> 448 -> 32 x 32
    assert bytes_per_image("dinov2-vit-b", 256, "fp16") == 16 * 16 * 768 * 2 == 393_216
    assert bytes_per_image("dinov2-vit-b", 512, "fp32") == 32 * 32 * 768 * 4
    assert bytes_per_image("dinov2-vit-g", 256, "bf16") == 256 * 1536 * 2
    # CLIP-L/14 always sees 224 px: 256 tokens of width 1024 at any resolution
    assert bytes_per_image("clip-vit-L", 512, "fp16") == 256 * 1024 * 2
    # MAE-L/16 at native resolution: 512 px -> 32 x 32 tokens
    assert bytes_per_image("mae-vit-l", 512, "fp16") == 1024 * 1024 * 2


# ----------------------------------------------------------------------------- exactness


def test_cli_cache_fp32_equals_online_encoder_and_index_describes_it(image_folder, conv_weights, tmp_path, capsys):
    out = tmp_path / "cache"
    argv = ["cache", "--data", str(image_folder), "--encoders", "test-cache-conv", "--resolution", "16",
            "--out", str(out), "--dtype", "fp32", "--shard-size", "8", "--batch-size", "3",
            "--weights", f"test-cache-conv={conv_weights}", "--num-workers", "0", "--no-progress"]
    assert repa_main(argv) == 0

    index = json.loads((out / "index.json").read_text())
    source = ImageFolderDataset(image_folder, 16)
    assert index["count"] == len(source) == 19
    assert index["resolution"] == 16 and index["dtype"] == "fp32" and index["num_shards"] == 3
    assert [s["count"] for s in index["shards"]] == [8, 8, 3]
    assert index["labels"] == [label for _, label in source.items]
    assert index["classes"] == ["cat", "dog"] and index["num_classes"] == 2
    assert index["repa_version"] and index["images"] == {"shape": [3, 16, 16], "dtype": "uint8"}
    (enc,) = index["encoders"]
    assert enc["name"] == "test-cache-conv" and enc["shape"] == [16, 12] and enc["grid"] == [4, 4]
    assert enc["spec"]["embed_dim"] == 12 and enc["weights"]["source"] == "file"
    assert enc["weights"]["sha256"] == _sha256(conv_weights)
    for shard in index["shards"]:  # checksums match the files, computed independently here
        assert shard["sha256"] == _sha256(out / shard["file"])
    assert index["command"].startswith("repa cache --data ")
    assert f"--weights test-cache-conv={conv_weights}" in index["command"]

    online = create_encoder("test-cache-conv", weights=conv_weights, resolution=16)
    images = torch.stack([source[i]["image"] for i in range(len(source))])  # (19, 3, 16, 16)
    expected = online(images)  # (19, 16, 12)
    assert is_feature_cache(out) and not is_feature_cache(image_folder)
    ds = CachedFeatureDataset(out, encoders="test-cache-conv", dtype="fp32", resolution=16)
    assert len(ds) == 19
    for i in (0, 7, 8, 18):
        item = ds[i]
        assert torch.equal(item["image"], images[i])  # the pixels are stored exactly
        assert int(item["y"]) == source.items[i][1]
        feats = item["features"]["test-cache-conv"]
        assert feats.dtype == torch.float32 and feats.shape == (16, 12)
        torch.testing.assert_close(feats, expected[i], rtol=1e-5, atol=1e-6)
    info = ds.data_info()
    assert (info.kind, info.image_channels, info.image_size, info.num_classes) == ("pixels", 3, 16, 2)


@pytest.mark.parametrize("dtype, rel", [("fp16", 2.0**-11), ("bf16", 2.0**-8)])
def test_half_precision_targets_within_storage_rounding(idx_folder, tmp_path, dtype, rel):
    out = tmp_path / dtype
    build_cache(idx_folder, out, ["fmnist-vit"], pretrained=False, dtype=dtype, shard_size=16, batch_size=8, progress=False)
    images, _ = load_idx_split(idx_folder, "train")
    expected = _online_fmnist()(torch.from_numpy(images))  # (36, 49, D) float32
    ds = CachedFeatureDataset(out, dtype=dtype)
    got = torch.stack([ds[i]["features"]["fmnist-vit"] for i in range(len(ds))])
    assert got.dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    err = (got.float() - expected).abs()
    # round-to-nearest: |x - q(x)| <= 2^-(mantissa bits + 1) |x| (plus a margin for batch-order round-off)
    assert bool((err <= rel * expected.abs() + 1e-5).all()), float((err / expected.abs().clamp(min=1e-3)).max())
    assert float(err.max()) > 0  # really stored in reduced precision


def test_cached_features_give_the_online_repa_loss(idx_folder, tmp_path):
    """A SiT step with reg(features=batch["features"]) equals reg(images) with the online encoder."""
    torch.manual_seed(3)
    teacher = create_encoder("fmnist-vit", pretrained=False, resolution=28)
    weights = save_encoder_weights(teacher, tmp_path / "teacher.safetensors")
    out = tmp_path / "cache"
    build_cache(idx_folder, out, "fmnist-vit", weights={"fmnist-vit": weights}, dtype="fp32", shard_size=16,
                batch_size=8, progress=False)
    ds = CachedFeatureDataset(out, encoders=["fmnist-vit"], dtype=torch.float32, resolution=28)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=12, shuffle=False)))
    assert batch["image"].shape == (12, 1, 28, 28) and batch["features"]["fmnist-vit"].shape == (12, 49, teacher.embed_dim)

    torch.manual_seed(0)
    model = create_sit("SiT-S/4", input_size=28, in_channels=1, num_classes=10, depth=2, hidden_size=32, num_heads=2)
    reg = REPARegularizer(model, layers=1, encoders="fmnist-vit", projector_dim=16,
                          encoder_kwargs={"weights": str(weights), "resolution": 28})
    g = torch.Generator().manual_seed(0)
    x = batch["image"].float() / 127.5 - 1  # (12, 1, 28, 28)
    t = torch.rand(12, generator=g)
    x_t = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * torch.randn(x.shape, generator=g)

    model(x_t, t, batch["y"])
    online = reg(batch["image"])
    model(x_t, t, batch["y"])
    cached = reg(features=batch["features"])
    assert online.ndim == 0 and float(online.detach()) != 0.0
    torch.testing.assert_close(cached, online, rtol=1e-5, atol=1e-6)
    # and with fp16 storage the loss moves by no more than the storage rounding allows
    half = CachedFeatureDataset(out, dtype="fp32")[0]["features"]["fmnist-vit"].half()
    model(x_t[:1], t[:1], batch["y"][:1])
    a = reg(features={"fmnist-vit": half[None]})
    model(x_t[:1], t[:1], batch["y"][:1])
    b = reg(batch["image"][:1])
    assert abs(a.item() - b.item()) <= 1e-3 * abs(b.item()) + 1e-5


# ----------------------------------------------------------------------------- resumable, atomic, parallel


def test_deleted_shard_is_rebuilt_alone(idx_folder, tmp_path):
    out = tmp_path / "cache"
    first = build_cache(idx_folder, out, "fmnist-vit", pretrained=False, shard_size=16, batch_size=8, progress=False)
    assert first.built == [0, 1, 2] and first.skipped == []
    files = [out / f"shard-0000{i}.safetensors" for i in range(3)]
    before = {f.name: (f.stat().st_ino, f.stat().st_mtime_ns, _sha256(f)) for f in files}
    files[1].unlink()
    (out / "index.json").unlink()  # an interrupted build also lacks the index

    again = build_cache(idx_folder, out, "fmnist-vit", pretrained=False, shard_size=16, batch_size=8, progress=False)
    assert again.built == [1] and again.skipped == [0, 2]
    for f in (files[0], files[2]):  # untouched: same inode, same mtime
        assert (f.stat().st_ino, f.stat().st_mtime_ns) == before[f.name][:2]
    assert _sha256(files[1]) == before[files[1].name][2]  # rebuilt to the same bytes
    assert verify_cache(out) == []
    assert not [p for p in os.listdir(out) if ".tmp" in p]  # no temporary files left behind


def test_other_settings_in_the_same_folder_are_refused(fmnist_cache, idx_folder):
    with pytest.raises(CacheMismatchError, match=r"already holds a feature cache built with other settings.*--dtype fp32"):
        build_cache(idx_folder, fmnist_cache, "fmnist-vit", pretrained=False, dtype="fp32", shard_size=16, progress=False)


def _build_worker(rank, world, init_file, idx, out, report_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        report = build_cache(idx, out, "fmnist-vit", pretrained=False, shard_size=8, batch_size=8, progress=False)
        with open(os.path.join(report_dir, f"rank{rank}.json"), "w") as fh:
            json.dump({"built": report.built, "skipped": report.skipped, "world": report.world_size}, fh)
    finally:
        dist.destroy_process_group()
    exit_spawned_worker()  # only after success: see tiny_models.exit_spawned_worker


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_write_disjoint_shards_equal_to_one_process(idx_folder, tmp_path):
    out2 = tmp_path / "two"
    mp.spawn(_build_worker, args=(2, str(tmp_path / "init"), str(idx_folder), str(out2), str(tmp_path)), nprocs=2, join=True)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0 == {"built": [0, 2, 4], "skipped": [], "world": 2}  # ceil(36 / 8) = 5 shards, i % 2 == rank
    assert r1 == {"built": [1, 3], "skipped": [], "world": 2}

    out1 = tmp_path / "one"
    build_cache(idx_folder, out1, "fmnist-vit", pretrained=False, shard_size=8, batch_size=8, progress=False)
    i1, i2 = load_index(out1), load_index(out2)
    assert [s["sha256"] for s in i2["shards"]] == [s["sha256"] for s in i1["shards"]]
    assert i2["labels"] == i1["labels"] and len(i2["labels"]) == N_IDX


# ----------------------------------------------------------------------------- errors


def test_dataset_refuses_another_encoder_resolution_or_dtype(fmnist_cache):
    with pytest.raises(CacheMismatchError, match=r"holds targets of \['fmnist-vit'\], not of encoder 'dinov2-vit-b'.*repa cache"):
        CachedFeatureDataset(fmnist_cache, encoders=["dinov2-vit-b"])
    with pytest.raises(CacheMismatchError, match=r"built at resolution 28, the run asks for 256"):
        CachedFeatureDataset(fmnist_cache, resolution=256)
    with pytest.raises(CacheMismatchError, match=r"stores targets in fp16, the run asks for fp32.*--dtype fp32"):
        CachedFeatureDataset(fmnist_cache, dtype=torch.float32)
    with pytest.raises(ConfigError, match=r"dtype must be one of"):
        CachedFeatureDataset(fmnist_cache, dtype="int8")
    # names are matched case-insensitively and yielded as asked
    ds = CachedFeatureDataset(fmnist_cache, encoders="FMNIST-VIT", dtype="float16", resolution=28)
    assert list(ds[0]["features"]) == ["FMNIST-VIT"]


def _copy_cache(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_missing_shard_names_file_and_rebuild_command(fmnist_cache, tmp_path):
    cache = _copy_cache(fmnist_cache, tmp_path / "c")
    (cache / "shard-00001.safetensors").unlink()
    command = load_index(cache)["command"]
    with pytest.raises(CorruptCacheError, match=r"shard-00001\.safetensors' is missing; rebuild it with `repa cache --data"):
        CachedFeatureDataset(cache)
    with pytest.raises(CorruptCacheError) as info:
        CachedFeatureDataset(cache)
    assert command in str(info.value)


def test_corrupt_shards_are_detected_and_named(fmnist_cache, tmp_path, capsys):
    cache = _copy_cache(fmnist_cache, tmp_path / "c")
    assert repa_main(["cache", "verify", str(cache)]) == 0
    assert "OK: 3 shard(s), 36 items" in capsys.readouterr().out

    # same size, one byte flipped inside the data: only the checksum can tell
    shard = cache / "shard-00002.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-5] ^= 0xFF
    shard.write_bytes(bytes(raw))
    assert CachedFeatureDataset(cache, verify="none")[33]["y"] is not None  # the opt-out does not hash
    with pytest.raises(CorruptCacheError, match=r"shard-00002\.safetensors' has sha256 .* the index says"):
        CachedFeatureDataset(cache)[33]  # the default hashes each shard before its first read
    assert repa_main(["cache", "verify", str(cache)]) == 1
    err = capsys.readouterr().err
    assert "shard-00002.safetensors" in err and "repa cache --data" in err and "shard-00000" not in err

    # truncated: the size is wrong, caught on first access without hashing
    shard0 = cache / "shard-00000.safetensors"
    shard0.write_bytes(shard0.read_bytes()[:1000])
    with pytest.raises(CorruptCacheError, match=r"shard-00000\.safetensors' has 1000 bytes, the index says \d+"):
        CachedFeatureDataset(cache)[0]
    assert len(verify_cache(cache)) == 2


def test_unfinished_build_says_how_to_finish(fmnist_cache, tmp_path):
    cache = _copy_cache(fmnist_cache, tmp_path / "c")
    (cache / "index.json").unlink()
    with pytest.raises(CorruptCacheError, match=r"has no index\.json: its build did not finish or the index was deleted; finish or repair it with: repa cache"):
        CachedFeatureDataset(cache)
    assert repa_main(["cache", "verify", str(cache)]) == 2  # a CorruptCacheError: one line, status 2
    from repa.errors import DataNotFoundError

    with pytest.raises(DataNotFoundError, match=r"is not a feature cache"):
        CachedFeatureDataset(tmp_path)


def test_cli_argument_errors(capsys):
    assert repa_main(["cache", "--encoders", "fmnist-vit"]) == 2
    assert "needs --data, --out" in capsys.readouterr().err
    assert repa_main(["cache", "verify"]) == 2
    assert "usage: repa cache verify DIR" in capsys.readouterr().err


def test_dataset_pickles_without_open_handles(fmnist_cache):
    ds = CachedFeatureDataset(fmnist_cache)
    first = ds[20]
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._handles == {}
    again = clone[20]
    assert torch.equal(again["features"]["fmnist-vit"], first["features"]["fmnist-vit"])
    assert torch.equal(again["image"], first["image"])


# ----------------------------------------------------------------------------- SD-VAE moments


def _tiny_vae(folder):
    """A random 2-level diffusers AutoencoderKL (16 px -> 4 x 8 x 8 latents), saved to ``folder``."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=16,
    ).eval()
    vae.save_pretrained(folder)
    return vae


def test_vae_moments_are_stored_and_pixels_optional(image_folder, conv_weights, tmp_path):
    vae_dir = tmp_path / "vae"
    vae = _tiny_vae(vae_dir)

    out = tmp_path / "cache"
    build_cache(image_folder, out, "test-cache-conv", resolution=16, weights=[f"test-cache-conv={conv_weights}"],
                vae=str(vae_dir), store_images=False, dtype="fp32", shard_size=8, batch_size=4, progress=False)
    index = load_index(out)
    assert index["images"] is None and index["moments"]["shape"] == [8, 8, 8]
    assert "--no-images" in index["command"] and "--vae" in index["command"]
    ds = CachedFeatureDataset(out)
    source = ImageFolderDataset(image_folder, 16)
    item = ds[5]
    assert "image" not in item and item["moments"].shape == (8, 8, 8)
    x = source[5]["image"][None].float() / 127.5 - 1  # (1, 3, 16, 16) in [-1, 1]
    with torch.no_grad():
        post = vae.encode(x).latent_dist
    torch.testing.assert_close(item["moments"], torch.cat([post.mean, post.std], 1)[0], rtol=1e-4, atol=1e-5)
    info = ds.data_info()
    assert (info.kind, info.input_channels, info.input_size, info.vae) == ("latents", 4, 8, str(vae_dir.resolve()))
    with pytest.raises(CacheMismatchError, match=r"built with --no-images"):
        CachedFeatureDataset(out, load_images=True)
    with pytest.raises(ConfigError, match=r"--no-images drops the pixels, but without --vae"):
        build_cache(image_folder, tmp_path / "x", "test-cache-conv", resolution=16, store_images=False,
                    pretrained=False, progress=False)


def test_repa_train_runs_on_a_latent_cache_without_pixels_and_never_loads_the_encoder(image_folder, conv_weights,
                                                                                      tmp_path, monkeypatch):
    """`repa train --data CACHE` on a --vae --no-images cache: latents from the moments, targets from the cache."""
    import repa.encoders
    from repa.sit.configs import TrainConfig
    from repa.sit.train import train

    vae_dir = tmp_path / "vae"
    _tiny_vae(vae_dir)
    out = tmp_path / "cache"
    build_cache(image_folder, out, "test-cache-conv", resolution=16, weights=[f"test-cache-conv={conv_weights}"],
                vae=str(vae_dir), store_images=False, dtype="fp16", shard_size=8, batch_size=4, progress=False)

    def forbidden(name, **kw):
        raise AssertionError(f"create_encoder({name!r}) was called although --data is a feature cache")

    monkeypatch.setattr(repa.encoders, "create_encoder", forbidden)
    cfg = TrainConfig(
        model="SiT-T/2", model_kwargs={"depth": 2, "hidden_size": 32, "num_heads": 2}, data=str(out),
        enc_type="test-cache-conv", encoder_depth=1, projector_dim=16, batch_size=6, max_train_steps=3,
        log_every=1, checkpointing_steps=3, sample_every=1000, output_dir=str(tmp_path / "runs"), exp_name="run",
    ).validate()
    result = train(cfg, progress=False)
    assert result.step == 3
    run = tmp_path / "runs" / "run"
    saved = json.loads((run / "config.json").read_text())
    assert (saved["data"]["kind"], saved["data"]["input_channels"], saved["data"]["input_size"]) == ("latents", 4, 8)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and all(math.isfinite(r["loss_align"]) and r["loss_align"] != 0.0 for r in log)

    # a cache with neither pixels nor latents cannot feed a run; the error says so
    (out / "index.json").write_text(json.dumps({**load_index(out), "moments": None}))
    with pytest.raises(CacheMismatchError, match=r"holds neither pixels nor VAE latents"):
        train(TrainConfig(**{**cfg.to_dict(), "exp_name": "run2"}).validate(), progress=False)
