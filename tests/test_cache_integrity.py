"""A damaged feature cache never trains: it is detected when read and repaired by its build command.

What must hold: bytes set to NaN inside a shard's targets are caught before the first item of
that shard is used (sha256 against the index by default; a finite check on every item with
``verify="none"``), also through DataLoader workers and ``repa train``; re-running the build
rebuilds a damaged shard to the same bytes instead of keeping it; a missing or truncated
``index.json`` is rewritten from the shard records by the same command, and ``repa train`` on
such a folder raises :class:`CorruptCacheError` with that command.
"""

from __future__ import annotations

import json
import os
import shutil
import struct

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from repa.cache import CachedFeatureDataset, build_cache, is_feature_cache, load_index, verify_cache
from repa.encoders import register_encoder
from repa.errors import CacheError, CacheMismatchError, ConfigError, CorruptCacheError
from repa.sit.data import load_idx_split, write_idx

N = 24  # Fashion-MNIST items; shards of 8 -> 3 shards
BUILD = dict(encoders="fmnist-vit", pretrained=False, dtype="fp16", shard_size=8, batch_size=8, progress=False)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def idx_folder(tmp_path_factory):
    src = "/usr/share/datasets/fashion-mnist"
    if not os.path.exists(os.path.join(src, "train-images-idx3-ubyte.gz")):
        pytest.fail(f"Fashion-MNIST not found in {src}; install it with `apt-get install -y dataset-fashion-mnist`")
    images, labels = load_idx_split(src, "train")
    root = tmp_path_factory.mktemp("idx")
    write_idx(root / "train-images-idx3-ubyte.gz", images[:N, 0])
    write_idx(root / "train-labels-idx1-ubyte.gz", labels[:N].astype(np.uint8))
    return root


@pytest.fixture(scope="module")
def pristine(idx_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("pristine") / "cache"
    build_cache(idx_folder, out, **BUILD)
    return out


@pytest.fixture
def cache(pristine, tmp_path):
    """A fresh copy of the pristine cache for a test to damage."""
    return shutil.copytree(pristine, tmp_path / "cache")


def _tensor_offset(path, key: str) -> tuple:
    """(absolute byte offset, dtype, shape) of tensor ``key`` in a safetensors file, from its header.

    The format: 8 bytes little-endian header length, the JSON header, then the data; each
    tensor's ``data_offsets`` count from the end of the header.
    """
    raw = open(path, "rb").read(8)
    (n,) = struct.unpack("<Q", raw)
    header = json.loads(open(path, "rb").read(8 + n)[8:])
    entry = header[key]
    return 8 + n + entry["data_offsets"][0], entry["dtype"], entry["shape"]


def _poison_targets(cache, shard: int, item: int, token: int = 3) -> None:
    """Overwrite one fp16 target value of ``item`` (index inside the shard) with NaN, file size unchanged."""
    path = cache / f"shard-{shard:05d}.safetensors"
    offset, dtype, shape = _tensor_offset(path, "features.0")
    assert dtype == "F16" and len(shape) == 3
    _, n_tok, dim = shape
    pos = offset + 2 * ((item * n_tok + token) * dim + 5)
    with open(path, "r+b") as fh:
        fh.seek(pos)
        fh.write(struct.pack("<H", 0x7E00))  # fp16 quiet NaN


def _train_cfg(data, tmp_path, **kw):
    from repa.sit.configs import TrainConfig

    settings = dict(
        model="SiT-T/4", model_kwargs={"depth": 2, "hidden_size": 32, "num_heads": 2}, data=str(data),
        enc_type="fmnist-vit", encoder_depth=1, projector_dim=16, batch_size=8, max_train_steps=2, log_every=1,
        checkpointing_steps=2, sample_every=1000, output_dir=str(tmp_path / "runs"), exp_name="run",
    )
    return TrainConfig(**{**settings, **kw}).validate()


# ----------------------------------------------------------------------------- detected when read


def test_nan_bytes_in_targets_are_caught_by_the_default_checksum(cache):
    _poison_targets(cache, shard=1, item=2)
    ds = CachedFeatureDataset(cache)
    assert ds.verify == "sha256"
    assert torch.isfinite(ds[0]["features"]["fmnist-vit"].float()).all()  # other shards still read
    with pytest.raises(CorruptCacheError, match=r"shard-00001\.safetensors' has sha256 .*the index says.*repa cache --data"):
        ds[8]  # the first item of the damaged shard, not only the damaged item


def test_without_checksum_the_finite_check_stops_the_damaged_item(cache):
    _poison_targets(cache, shard=1, item=2)
    ds = CachedFeatureDataset(cache, verify="none")
    ds[8], ds[9]  # intact items of the damaged shard are read
    with pytest.raises(CorruptCacheError, match=r"shard-00001\.safetensors': item 10 holds non-finite features of "
                                                r"'fmnist-vit' \(NaN or Inf\).*repa cache verify"):
        ds[10]
    assert CachedFeatureDataset(cache, verify=False).verify == "none"  # the old boolean spelling still works
    assert CachedFeatureDataset(cache, verify=True).verify == "sha256"
    with pytest.raises(ConfigError, match=r"verify must be one of \['sha256', 'none'\], got 'md5'"):
        CachedFeatureDataset(cache, verify="md5")


def test_dataloader_workers_raise_the_error_and_share_the_verification(cache):
    ds = CachedFeatureDataset(cache)
    loader = DataLoader(ds, batch_size=4, num_workers=2)
    assert sum(b["y"].shape[0] for b in loader) == N
    assert ds._verified.tolist() == [True, True, True]  # hashed in the workers, seen by every process

    _poison_targets(cache, shard=2, item=0)
    fresh = CachedFeatureDataset(cache)
    with pytest.raises(CorruptCacheError, match=r"shard-00002\.safetensors' has sha256"):
        for _ in DataLoader(fresh, batch_size=4, num_workers=2):
            pass


@pytest.mark.slow
def test_repa_train_on_a_damaged_cache_stops_before_training(cache, tmp_path):
    """Before: NaN targets trained to NaN losses with exit 0. Now the first read stops the run."""
    from repa.sit.train import train

    for shard in range(3):  # every item: whichever batch comes first holds a damaged one
        for item in range(8):
            _poison_targets(cache, shard=shard, item=item)
    with pytest.raises(CorruptCacheError, match=r"has sha256"):
        train(_train_cfg(cache, tmp_path), progress=False)
    # the opt-out skips the hash; the finite check still refuses the damaged item
    with pytest.raises(CorruptCacheError, match=r"non-finite features"):
        train(_train_cfg(cache, tmp_path, exp_name="run-nv", verify_cache=False), progress=False)


def test_no_verify_cache_flag_reaches_the_config():
    import argparse

    from repa.sit.train import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert config_from_args(parser.parse_args([])).verify_cache is True
    assert config_from_args(parser.parse_args(["--no-verify-cache"])).verify_cache is False


# ----------------------------------------------------------------------------- repaired by the build


def test_rerunning_the_build_rebuilds_a_damaged_shard(cache, pristine, idx_folder, caplog):
    _poison_targets(cache, shard=1, item=4)
    before = {i: (cache / f"shard-{i:05d}.safetensors").stat().st_mtime_ns for i in (0, 2)}
    with caplog.at_level("WARNING", logger="repa"):
        report = build_cache(idx_folder, cache, **BUILD)
    assert report.built == [1] and report.repaired == [1] and report.skipped == [0, 2]
    assert "shard-00001.safetensors does not match its record" in caplog.text
    for i in (0, 2):  # intact shards are kept, not rewritten
        assert (cache / f"shard-{i:05d}.safetensors").stat().st_mtime_ns == before[i]
    assert (cache / "shard-00001.safetensors").read_bytes() == (pristine / "shard-00001.safetensors").read_bytes()
    assert verify_cache(cache) == []
    assert torch.isfinite(CachedFeatureDataset(cache)[12]["features"]["fmnist-vit"].float()).all()


def _index_without_time(root):
    index = load_index(root)
    index.pop("created")
    assert index.pop("command").endswith(f"--out {root} --dtype fp16 --shard-size 8 --no-pretrained --seed 0")
    return index


@pytest.mark.parametrize("damage", ["missing", "truncated", "empty"])
def test_a_missing_or_truncated_index_is_repaired_by_the_same_command(cache, pristine, idx_folder, tmp_path, damage):
    from repa.sit.train import train

    index_file = cache / "index.json"
    if damage == "missing":
        index_file.unlink()
    else:
        text = index_file.read_text()
        index_file.write_text(text[: len(text) // 2] if damage == "truncated" else "")

    assert is_feature_cache(cache)
    with pytest.raises(CorruptCacheError, match=rf"repa cache --data .*--encoders fmnist-vit .*--out {cache} "):
        CachedFeatureDataset(cache)
    # `repa train --data CACHE`: a damaged cache, not "holds no images"
    with pytest.raises(CorruptCacheError, match=r"index.*repa cache --data"):
        train(_train_cfg(cache, tmp_path), progress=False)

    report = build_cache(idx_folder, cache, **BUILD)
    assert report.built == [] and report.skipped == [0, 1, 2]
    assert _index_without_time(cache) == _index_without_time(pristine)
    assert verify_cache(cache) == []


def test_an_index_missing_fields_is_corrupt_not_a_key_error(cache):
    index = json.loads((cache / "index.json").read_text())
    del index["shards"]
    (cache / "index.json").write_text(json.dumps(index))
    with pytest.raises(CorruptCacheError, match=r"index\.json' is damaged \(no \['shards'\]\).*repa cache --data"):
        CachedFeatureDataset(cache)


def test_a_damaged_index_does_not_let_other_settings_overwrite_the_shards(cache, idx_folder):
    (cache / "index.json").write_text("{")
    before = (cache / "shard-00000.safetensors").read_bytes()
    with pytest.raises(CacheMismatchError, match=r"already holds a feature cache built with other settings.*--dtype fp32"):
        build_cache(idx_folder, cache, **{**BUILD, "dtype": "fp32"})
    assert (cache / "shard-00000.safetensors").read_bytes() == before


# ----------------------------------------------------------------------------- never written


class _NaNEncoder(nn.Module):
    """Returns NaN for every token: a broken teacher (bad weights, an fp16 overflow)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(1, 8, 4, stride=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) * float("nan")  # (B, 8, h, w)


register_encoder("test-nan-conv", embed_dim=8, patch_size=4, in_chans=1, mean=(0.5,), std=(0.5,), license="test",
                 overwrite=True)(
    lambda spec, **kw: _NaNEncoder()
)


def test_the_build_refuses_to_write_non_finite_targets(idx_folder, tmp_path):
    out = tmp_path / "nan"
    with pytest.raises(CacheError, match=r"encoder 'test-nan-conv' gave non-finite targets for images of shard 0; "
                                         r"nothing was written for it; the encoder itself returned them"):
        build_cache(idx_folder, out, **{**BUILD, "encoders": "test-nan-conv"})
    assert not list(out.glob("shard-*"))


# ----------------------------------------------------------------------------- the cost benchmark


def test_the_cost_benchmark_runs_in_its_small_mode(tmp_path):
    """benchmarks/cache_verify.py end to end on a 16-image shard; timings are reported, never asserted."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "cache_verify.py"), "--images", "16", "--repeats", "1",
         "--json", str(out), "--dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    # 16 items of 256 px RGB (196,608 bytes) and 256 x 768 fp16 targets (393,216 bytes) plus a header
    assert 16 * (196_608 + 393_216) < result["shard_bytes"] < 16 * (196_608 + 393_216) + 4096
    assert result["hash_MB_per_s"] > 0 and "| first read, verify=sha256 |" in proc.stdout
