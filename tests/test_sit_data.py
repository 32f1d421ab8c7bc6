"""Specification of repa.sit.data: IDX files, image folders, SD-VAE latents, and what the encoder sees."""

from __future__ import annotations

import gzip
import json
import struct

import numpy as np
import pytest
import torch

from repa.errors import ConfigError, DataNotFoundError, WeightsNotFoundError
from repa.sit.data import (
    FASHION_MNIST_DIR,
    ImageFolderDataset,
    LatentDataset,
    center_crop,
    encode_moments,
    load_idx_split,
    open_dataset,
    prepare_latents,
    read_idx,
    sample_latents,
    write_idx,
)
from sit_fixtures import TinyEncoder, read_log, tiny_config

# --------------------------------------------------------------------------------------------
# IDX (Fashion-MNIST)
# --------------------------------------------------------------------------------------------


def test_read_idx_parses_the_format_by_hand(tmp_path):
    # magic 0x00000803 (uint8, 3 dims), dims 2 x 2 x 3 big-endian, then the bytes row-major
    payload = bytes(range(12))
    raw = bytes([0, 0, 0x08, 3]) + struct.pack(">3i", 2, 2, 3) + payload
    (tmp_path / "a-idx3-ubyte").write_bytes(raw)
    with gzip.open(tmp_path / "a-idx3-ubyte.gz", "wb") as fh:
        fh.write(raw)
    expected = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    assert np.array_equal(read_idx(tmp_path / "a-idx3-ubyte"), expected)
    assert np.array_equal(read_idx(tmp_path / "a-idx3-ubyte.gz"), expected)
    write_idx(tmp_path / "b.gz", expected)
    with gzip.open(tmp_path / "b.gz", "rb") as fh:
        assert fh.read() == raw  # write_idx writes exactly that layout
    (tmp_path / "bad").write_bytes(b"\x00\x00\x08\x03" + struct.pack(">3i", 2, 2, 3) + payload[:5])
    with pytest.raises(DataNotFoundError, match="truncated"):
        read_idx(tmp_path / "bad")


def test_fashion_mnist_loads_as_the_default(fashion_mnist_dir):
    images, labels = load_idx_split(fashion_mnist_dir, "train")
    assert images.shape == (60_000, 1, 28, 28) and images.dtype == np.uint8
    assert np.array_equal(np.bincount(labels), np.full(10, 6000))  # Fashion-MNIST: 6,000 train images per class
    ds, info = open_dataset(None)
    assert len(ds) == 60_000 and (info.kind, info.input_channels, info.input_size, info.num_classes) == ("pixels", 1, 28, 10)
    item = ds[0]
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (1, 28, 28)
    assert torch.equal(item["image"], torch.from_numpy(images[0])) and int(item["y"]) == labels[0]
    assert fashion_mnist_dir == FASHION_MNIST_DIR


def test_open_dataset_errors_name_the_fix(tmp_path):
    with pytest.raises(DataNotFoundError, match="does not exist"):
        open_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataNotFoundError, match="holds no images, no IDX files"):
        open_dataset(tmp_path / "empty")
    write_idx(tmp_path / "idx" / "train-images-idx3-ubyte.gz", np.zeros((4, 8, 8), np.uint8))
    write_idx(tmp_path / "idx" / "train-labels-idx1-ubyte.gz", np.zeros(4, np.uint8))
    with pytest.raises(ConfigError, match="drop --vae"):
        open_dataset(tmp_path / "idx", vae="some/vae")
    with pytest.raises(ConfigError, match="--resolution 16 does not match the IDX images"):
        open_dataset(tmp_path / "idx", resolution=16)
    _write_folder(tmp_path / "folder")
    with pytest.raises(ConfigError, match="pass --resolution"):
        open_dataset(tmp_path / "folder")


# --------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------


def _write_folder(root, n_per_class=3):
    """Class subfolders 'cat' and 'dog' of 32x16 RGB PNGs whose red channel is 4 * column + class."""
    from PIL import Image

    for c, name in enumerate(["dog", "cat"]):  # created out of order: labels follow sorted names
        (root / name).mkdir(parents=True)
        for k in range(n_per_class):
            arr = np.zeros((16, 32, 3), np.uint8)
            arr[..., 0] = 4 * np.arange(32)[None, :] + c
            arr[..., 1] = 10 * k
            Image.fromarray(arr).save(root / name / f"{k}.png")
    return root


def test_image_folder_labels_and_center_crop(tmp_path):
    root = _write_folder(tmp_path / "folder")
    ds = ImageFolderDataset(root, 16)
    assert ds.classes == ["cat", "dog"] and len(ds) == 6
    item = ds[0]  # cat/0.png (class "cat" is label 0, written with c = 1)
    assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.uint8 and int(item["y"]) == 0
    # a 32x16 image at resolution 16 needs no resize: the crop keeps columns 8..23
    assert item["image"][0, 0].tolist() == [4 * col + 1 for col in range(8, 24)]
    assert int(ds[3]["y"]) == 1 and ds[3]["image"][0, 0, 0] == 4 * 8 + 0

    from PIL import Image

    # ADM's rule on a large image: halve with a box filter while the short side >= 2R, then resize
    img = Image.new("L", (130, 70), color=77)  # grayscale in, RGB out
    out = center_crop(img, 16)
    assert out.shape == (16, 16, 3) and (out == 77).all()


# --------------------------------------------------------------------------------------------
# SD-VAE latents (a tiny random AutoencoderKL, nothing downloaded)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory):
    diffusers = pytest.importorskip("diffusers")  # the optional extra repa[vae]; installed with [dev]
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )
    path = tmp_path_factory.mktemp("vae") / "tiny-vae"
    vae.save_pretrained(path)
    return path


@pytest.mark.parametrize("store_images", [True, False])
def test_prepare_latents_stores_moments_labels_and_the_clean_images(tmp_path, tiny_vae_dir, store_images):
    from repa.sit.data import load_vae

    root = _write_folder(tmp_path / "folder")
    out = prepare_latents(root, tmp_path / "latents", str(tiny_vae_dir), 16, batch_size=4,
                          store_images=store_images, device="cpu", progress=False)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["count"] == 6 and meta["latent_shape"] == [4, 8, 8] and meta["classes"] == ["cat", "dog"]
    assert meta["latent_scale"] == 0.18215 and (out / "images.npy").exists() == store_images
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp files left

    folder = ImageFolderDataset(root, 16)
    vae = load_vae(str(tiny_vae_dir), "cpu")
    lat = LatentDataset(out)
    assert len(lat) == 6
    for i in (0, 5):
        item = lat[i]
        # the encoder gets the same clean pixels the folder gives
        assert torch.equal(item["image"], folder[i]["image"]) and int(item["y"]) == int(folder[i]["y"])
        # moments = (mean, std) of the VAE posterior of the image mapped to [-1, 1]
        x = folder[i]["image"][None].float() / 127.5 - 1
        dist = vae.encode(x).latent_dist
        assert torch.allclose(item["moments"][:4], dist.mean[0], atol=1e-5)
        assert torch.allclose(item["moments"][4:], dist.std[0], atol=1e-5)

    ds, info = open_dataset(out)
    assert (info.kind, info.input_channels, info.input_size, info.image_size, info.num_classes) == ("latents", 4, 8, 16, 2)
    assert info.vae == str(tiny_vae_dir)


def test_latent_sampling_formula():
    mean = torch.tensor([[[[1.0]], [[2.0]]]])  # (1, 2, 1, 1)
    std = torch.tensor([[[[0.5]], [[0.1]]]])
    eps = torch.tensor([[[[2.0]], [[-1.0]]]])
    z = sample_latents(torch.cat([mean, std], 1), eps)
    assert torch.allclose(z.flatten(), torch.tensor([(1 + 0.5 * 2) * 0.18215, (2 - 0.1) * 0.18215]))


def test_training_on_latents_and_sampling_decodes_with_the_vae(tmp_path, tiny_vae_dir):
    from repa.cli import main as repa_main
    from repa.sit.checkpoint import latest_checkpoint

    root = _write_folder(tmp_path / "folder", n_per_class=8)
    out = prepare_latents(root, tmp_path / "latents", str(tiny_vae_dir), 16, batch_size=8, device="cpu", progress=False)
    # the encoder sees 16x16 RGB pixels (4x4 tokens), the SiT 8x8x4 latents with patch 2 (4x4 tokens)
    cfg = tiny_config(out, tmp_path / "runs", model="SiT-T/2", max_train_steps=3, sample_every=3, sample_count=4)
    train_result = _train(cfg, encoders=[TinyEncoder(in_chans=3)])
    assert (train_result.run_dir / "samples" / "0000003.png").is_file()
    assert [r["step"] for r in read_log(train_result.run_dir)] == [1, 2, 3]
    ckpt = latest_checkpoint(train_result.run_dir)
    status = repa_main(["sample", "--ckpt", str(ckpt), "--output", str(tmp_path / "s"), "--num-samples", "3",
                       "--mode", "ode", "--steps", "2", "--no-progress"])
    assert status == 0
    with np.load(tmp_path / "s" / "samples.npz") as f:
        assert f["arr_0"].shape == (3, 16, 16, 3) and f["arr_0"].dtype == np.uint8


def test_image_folder_encoded_on_the_fly(tmp_path, tiny_vae_dir):
    root = _write_folder(tmp_path / "folder", n_per_class=8)
    ds, info = open_dataset(root, resolution=16, vae=str(tiny_vae_dir))
    assert (info.kind, info.input_channels, info.input_size) == ("vae", 4, 8)
    cfg = tiny_config(root, tmp_path / "runs", model="SiT-T/2", resolution=16, vae=str(tiny_vae_dir), max_train_steps=2)
    result = _train(cfg, encoders=[TinyEncoder(in_chans=3)])
    assert result.step == 2
    from repa.sit.data import load_vae

    vae = load_vae(str(tiny_vae_dir))
    m = encode_moments(vae, ds[0]["image"][None])
    assert m.shape == (1, 8, 8, 8)


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks`")
def test_missing_vae_is_reported_offline(tmp_path):
    pytest.importorskip("diffusers")
    from repa.sit.data import load_vae

    with pytest.raises(WeightsNotFoundError, match="`hf download no-such-org/no-such-vae`"):
        load_vae("no-such-org/no-such-vae")


def _train(cfg, **kw):
    from repa.sit.train import train

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(cfg, progress=False, **kw)
    finally:
        torch.set_num_threads(previous)
