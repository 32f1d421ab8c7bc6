"""`repa teacher`: the offline Fashion-MNIST teacher ``fmnist-vit`` (training, kNN, saving, lookup)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from repa.encoders import create_encoder, local_weights_path, registry
from repa.errors import ConfigError, DataNotFoundError
from repa.sit import teacher
from repa.sit.data import write_idx

TINY = dict(depth=1, mlp_ratio=1.0)  # constructor overrides: one block keeps tests fast
SUBSET = (10000, 2000)  # training images as the kNN memory, test images as queries


@pytest.fixture
def fake_fmnist(tmp_path):
    """A Fashion-MNIST-shaped IDX folder: 10 classes, each a bright square at its own place, plus noise."""
    rng = np.random.default_rng(0)

    def split(n):
        labels = np.arange(n) % 10
        images = rng.integers(0, 40, size=(n, 28, 28)).astype(np.uint8)
        for i, c in enumerate(labels):
            r, col = 2 + 5 * (c // 5), 2 + 5 * (c % 5)
            images[i, r : r + 8, col : col + 8] = 230
        return images, labels.astype(np.uint8)

    root = tmp_path / "fmnist"
    for prefix, n in (("train", 64), ("t10k", 30)):
        images, labels = split(n)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


@pytest.fixture
def repa_home(tmp_path, monkeypatch):
    monkeypatch.setenv("REPA_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _hide_shipped_asset(monkeypatch):
    """Look at an install without the shipped weights file."""
    spec, factory = registry._REGISTRY["fmnist-vit"]
    monkeypatch.setitem(
        registry._REGISTRY, "fmnist-vit", (dataclasses.replace(spec, shipped_asset="not-shipped.safetensors"), factory)
    )


# ---------------------------------------------------------------------------------------------
# kNN against a hand computation
# ---------------------------------------------------------------------------------------------
def test_knn_accuracy_matches_a_hand_computation():
    # memory bank: directions at 0, 10, 80, 90 and 180 degrees
    deg = torch.tensor([0.0, 10.0, 80.0, 90.0, 180.0])
    bank = torch.stack([torch.cos(deg * math.pi / 180), torch.sin(deg * math.pi / 180)], 1) * torch.tensor(
        [[1.0], [3.0], [0.5], [2.0], [1.0]]
    )  # lengths differ: cosine ignores them
    labels = torch.tensor([0, 0, 1, 1, 2])
    # query at 50 deg, k=3: neighbours 80 (cos 30 = 0.866, class 1), 10 (cos 40 = 0.766, class 0),
    # 90 (cos 40 = 0.766, class 1) -> class 1 (1.632 vs 0.766)
    # query at 20 deg, k=3: 10 (0.985, class 0), 0 (0.940, class 0), 80 (0.5, class 1) -> class 0
    # query at 30 deg, k=4: 10 (0.940, c0), 0 (0.866, c0), 80 (0.643, c1), 90 (0.5, c1) -> 1.806 vs 1.143: class 0
    # query at 60 deg, k=3: 80 (0.940, c1), 90 (0.866, c1), 10 (0.643, c0) -> class 1
    q = torch.tensor([[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in (50, 20, 60)])
    assert teacher.knn_accuracy(bank, labels, q, torch.tensor([1, 0, 1]), k=3) == 1.0
    assert teacher.knn_accuracy(bank, labels, q, torch.tensor([0, 0, 1]), k=3) == pytest.approx(2 / 3)
    q30 = torch.tensor([[math.cos(math.radians(30)), math.sin(math.radians(30))]])
    assert teacher.knn_accuracy(bank, labels, q30, torch.tensor([0]), k=4) == 1.0
    # votes are weighted by similarity, not counted: one close class-0 neighbour beats two far class-1 ones
    bank2 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])  # one c0 along x, two c1 along y
    query = torch.tensor([[1.0, 0.2]])  # sims: 0.981 (c0), 0.196, 0.196 (c1 total 0.392)
    assert teacher.knn_accuracy(bank2, torch.tensor([0, 1, 1]), query, torch.tensor([0]), k=3) == 1.0
    with pytest.raises(ConfigError, match=r"k must be in \[1, 5\].*got 6"):
        teacher.knn_accuracy(bank, labels, q, torch.tensor([1, 0, 1]), k=6)


def test_pixel_neighbours_find_the_near_duplicates():
    rng = np.random.default_rng(1)
    base = rng.integers(0, 200, size=(3, 1, 28, 28))
    images = torch.from_numpy(np.concatenate([base, base + rng.integers(0, 5, size=base.shape)]).astype(np.uint8))
    nn_index = teacher.pixel_neighbours(images, k=1)  # (6, 1)
    assert nn_index[:, 0].tolist() == [3, 4, 5, 0, 1, 2]


# ---------------------------------------------------------------------------------------------
# the dense term's geometry: token correspondences between two views
# ---------------------------------------------------------------------------------------------
def test_view_correspondence_for_a_flip_and_a_half_crop():
    centres = (2 * torch.arange(7) + 1) / 7 - 1  # token centres, normalized
    ident = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0]]])
    flip = torch.tensor([[[-1.0, 0, 0], [0, 1.0, 0]]])
    left_half = torch.tensor([[[0.5, 0, -0.5], [0, 1.0, 0]]])  # view = the left half of the image
    where = teacher._view_to_view_grid(ident, flip, (7, 7))  # (1, 7, 7, 2)
    torch.testing.assert_close(where[0, 3, :, 0], -centres)
    torch.testing.assert_close(where[0, :, 2, 1], centres)
    where = teacher._view_to_view_grid(left_half, ident, (7, 7))
    torch.testing.assert_close(where[0, 0, :, 0], 0.5 * centres - 0.5)
    where = teacher._view_to_view_grid(ident, left_half, (7, 7))  # right-half tokens fall outside the view
    torch.testing.assert_close(where[0, 0, :, 0], (centres + 0.5) / 0.5)


def test_augment_keeps_range_and_identity_theta_reproduces_the_image():
    x = torch.rand(4, 1, 28, 28)
    gen = torch.Generator().manual_seed(0)
    views, theta = teacher.augment(x, gen)
    assert views.shape == x.shape and theta.shape == (4, 2, 3)
    assert views.min() >= 0 and views.max() <= 1
    same, theta = teacher.augment(x, gen, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=0.0, erase=0.0, brightness=0.0)
    torch.testing.assert_close(same, x, atol=1e-5, rtol=0)
    torch.testing.assert_close(theta, torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).expand(4, 2, 3))


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("objective", ["simclr", "supervised"])
def test_loss_decreases_on_a_fixed_batch(objective):
    torch.manual_seed(0)
    enc = create_encoder("fmnist-vit", pretrained=False, resolution=28, **TINY)
    enc.model.requires_grad_(True).train()
    heads = teacher.TeacherHeads(enc.embed_dim)
    images = (torch.rand(8, 1, 28, 28) * 255).to(torch.uint8)
    labels = torch.arange(8) % 10
    opt = torch.optim.AdamW(list(enc.model.parameters()) + list(heads.parameters()), lr=1e-3)
    losses = []
    for _ in range(24):
        gen = torch.Generator().manual_seed(123)  # the same views every step: a fixed batch
        loss = teacher.teacher_loss(objective, enc, heads, images, labels, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses


def test_tiny_run_trains_saves_atomically_and_reloads_identically(fake_fmnist, tmp_path, monkeypatch):
    result = teacher.train_teacher(
        fake_fmnist, objective="simclr-nn", max_steps=3, batch_size=16, progress=False, encoder_kwargs=TINY
    )
    enc, acc, record = result
    assert 0.0 <= acc <= 1.0 and record["knn_accuracy"] == acc and record["steps"] == 3
    assert 0.0 <= record["pixel_knn_accuracy"] <= 1.0
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    out = tmp_path / "out" / "teacher.safetensors"
    path = teacher.save_teacher(result, out, command="repa teacher --test")
    assert path == out and sorted(p.name for p in out.parent.iterdir()) == ["teacher.json", "teacher.safetensors"]
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["objective"] == "simclr-nn" and meta["seed"] == 0 and meta["command"] == "repa teacher --test"
    assert meta["knn_accuracy"] == acc and meta["weights_dtype"] == "float16"

    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(str(out)).values()} == {torch.float16}  # half the size
    again = create_encoder("fmnist-vit", weights=out, resolution=28, **TINY)
    x = torch.rand(3, 1, 28, 28)
    torch.testing.assert_close(again(x), enc(x), atol=0, rtol=0)

    # a write that fails midway leaves the previous file in place and no temporary file behind
    before = out.read_bytes()
    import safetensors.torch

    def broken(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        teacher.save_teacher(result, out)
    assert out.read_bytes() == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["teacher.json", "teacher.safetensors"]


def test_bad_objective_and_missing_data_are_explained(tmp_path):
    with pytest.raises(ConfigError, match=r"objective must be one of .*'simclr-nn'.*got 'mae'"):
        teacher.train_teacher(tmp_path, objective="mae")
    with pytest.raises(DataNotFoundError, match=r"does not exist.*dataset-fashion-mnist.*--data"):
        teacher.train_teacher(tmp_path / "nowhere")


def test_command_writes_weights_and_record(fake_fmnist, tmp_path, capsys):
    from repa import cli

    out = tmp_path / "t.safetensors"
    argv = ["teacher", "--data", str(fake_fmnist), "--epochs", "2", "--out", str(out), "--no-progress", "--seed", "3"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "kNN accuracy" in printed and "raw pixels" in printed and "simclr-nn" in printed
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["objective"] == "simclr-nn" and meta["self_supervised"] is True and meta["seed"] == 3
    assert meta["command"] == f"repa teacher --data {fake_fmnist} --objective simclr-nn --epochs 2.0 --seed 3 --out {out}"
    assert meta["steps"] == 2  # 64 images, one batch of 64 per epoch
    create_encoder("fmnist-vit", weights=out)  # the full-size architecture loads it


def test_init_starts_from_a_saved_teacher_and_records_it(fake_fmnist, tmp_path):
    import hashlib

    from repa.encoders import save_encoder_weights

    start = create_encoder("fmnist-vit", pretrained=False, resolution=28, **TINY)
    with torch.no_grad():  # weights exactly representable in float16, far from a fresh init
        for i, p in enumerate(start.model.parameters()):
            p.copy_(torch.full_like(p, 0.125 * (i % 7 + 1)))
    init = save_encoder_weights(start.model, tmp_path / "start.safetensors")
    # lr 0: AdamW's step (and its decoupled weight decay, scaled by lr) leaves the weights as loaded
    enc, _, record = teacher.train_teacher(fake_fmnist, objective="supervised", max_steps=1, batch_size=16, lr=0.0,
                                           progress=False, encoder_kwargs=TINY, init=init)
    for (name, a), b in zip(enc.model.named_parameters(), start.model.parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)
    assert record["init"] == {"file": "start.safetensors", "sha256": hashlib.sha256(init.read_bytes()).hexdigest()}

    # without init the same run starts elsewhere
    fresh, _, record = teacher.train_teacher(fake_fmnist, objective="supervised", max_steps=1, batch_size=16, lr=0.0,
                                             progress=False, encoder_kwargs=TINY)
    assert "init" not in record
    assert not torch.equal(next(fresh.model.parameters()), next(start.model.parameters()))

    with pytest.raises(DataNotFoundError, match=r"init weights .*nowhere.safetensors.* not found"):
        teacher.train_teacher(fake_fmnist, max_steps=1, init=tmp_path / "nowhere.safetensors")


def test_command_init_is_in_the_record_and_its_command(fake_fmnist, tmp_path, capsys):
    from repa import cli

    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    base = ["teacher", "--data", str(fake_fmnist), "--epochs", "1", "--no-progress"]
    assert cli.main([*base, "--out", str(first)]) == 0
    assert cli.main([*base, "--objective", "supervised", "--init", str(first), "--out", str(second)]) == 0
    meta = json.loads(second.with_suffix(".json").read_text())
    assert meta["init"]["file"] == "a.safetensors" and meta["init"]["objective"] == "simclr-nn"
    assert meta["init"]["knn_accuracy"] == json.loads(first.with_suffix(".json").read_text())["knn_accuracy"]
    assert f"--init {first}" in meta["command"]


# ---------------------------------------------------------------------------------------------
# the demo's entry point and the shipped weights
# ---------------------------------------------------------------------------------------------
def test_ensure_teacher_returns_an_existing_file_without_training(repa_home, monkeypatch):
    save = create_encoder("fmnist-vit", pretrained=False)
    from repa.encoders import save_encoder_weights

    path = save_encoder_weights(save)
    assert path == local_weights_path("fmnist-vit") == repa_home / "encoders" / "fmnist-vit.safetensors"

    def no_training(*args, **kwargs):
        raise AssertionError("ensure_teacher trained although weights exist")

    monkeypatch.setattr(teacher, "train_teacher", no_training)
    assert teacher.ensure_teacher(quiet=True) == path


def test_shipped_weights_load_by_name_when_the_user_has_none(repa_home, monkeypatch):
    assert not (repa_home / "encoders").exists()
    shipped = Path(teacher.__file__).resolve().parents[1] / "encoders" / "assets" / "fmnist-vit.safetensors"
    assert shipped.is_file(), "the package must ship fmnist-vit.safetensors (produced by `repa teacher`)"
    monkeypatch.setattr(teacher, "train_teacher", lambda *a, **k: pytest.fail("trained although weights ship"))
    assert teacher.ensure_teacher(quiet=True) == shipped
    enc = create_encoder("fmnist-vit", resolution=28)  # pretrained=True
    fresh = create_encoder("fmnist-vit", pretrained=False, weights=shipped, resolution=28)
    x = torch.rand(2, 1, 28, 28)
    tokens = enc(x)
    assert tokens.shape == (2, 49, 96) and torch.isfinite(tokens).all()
    torch.testing.assert_close(tokens, fresh(x), atol=0, rtol=0)
    random = create_encoder("fmnist-vit", pretrained=False, resolution=28)
    assert not torch.allclose(enc.model.pos_embed, random.model.pos_embed)  # trained, not a random init


def test_ensure_teacher_trains_when_nothing_is_found(repa_home, monkeypatch, fake_fmnist):
    _hide_shipped_asset(monkeypatch)
    real = teacher.train_teacher
    calls = []

    def tiny(data=None, **kwargs):
        calls.append(data)
        return real(fake_fmnist, max_steps=2, batch_size=16, encoder_kwargs=TINY, **kwargs)

    monkeypatch.setattr(teacher, "train_teacher", tiny)
    path = teacher.ensure_teacher(quiet=True)
    assert calls == [None] and path == local_weights_path("fmnist-vit") and path.is_file()
    assert json.loads(path.with_suffix(".json").read_text())["objective"] == teacher.DEFAULT_OBJECTIVE


def _cosine_knn(bank, bank_labels, queries, query_labels, k=20, classes=10):
    """An independent kNN: cosine similarity, k nearest, votes weighted by similarity (loops over queries)."""
    bank = bank.double() / bank.double().norm(dim=1, keepdim=True)
    correct = 0
    for q, y in zip(queries.double(), query_labels.tolist()):
        sim = bank @ (q / q.norm())  # (n,)
        top = torch.argsort(sim, descending=True)[:k]
        votes = [0.0] * classes
        for i in top.tolist():
            votes[int(bank_labels[i])] += float(sim[i])
        correct += int(max(range(classes), key=lambda c: (votes[c], -c)) == y)
    return correct / len(queries)


@pytest.mark.slow
def test_shipped_teacher_is_self_supervised_and_beats_raw_pixels(fashion_mnist_dir):
    """The record beside the shipped weights, and an independent re-measurement on a subset."""
    from repa.sit.data import load_idx_split

    assets = Path(teacher.__file__).resolve().parents[1] / "encoders" / "assets"
    record = json.loads((assets / "fmnist-vit.json").read_text())
    assert record["self_supervised"] is True and record["objective"] in ("simclr-nn", "simclr")
    assert record["knn_accuracy"] > record["pixel_knn_accuracy"], record

    images, labels = load_idx_split(fashion_mnist_dir, "train")
    test_images, test_labels = load_idx_split(fashion_mnist_dir, "test")
    n_bank, n_query = SUBSET
    bank, bank_y = torch.from_numpy(images[:n_bank]), torch.from_numpy(labels[:n_bank]).long()
    query, query_y = torch.from_numpy(test_images[:n_query]), torch.from_numpy(test_labels[:n_query]).long()
    enc = create_encoder("fmnist-vit", weights=assets / "fmnist-vit.safetensors")
    with torch.no_grad():
        feats_bank = torch.cat([enc(bank[i : i + 1000]).mean(1) for i in range(0, n_bank, 1000)])  # (n, 96)
        feats_query = enc(query).mean(1)
    ours = _cosine_knn(feats_bank, bank_y, feats_query, query_y)
    pixels = _cosine_knn(bank.flatten(1).float(), bank_y, query.flatten(1).float(), query_y)
    assert ours > pixels, (ours, pixels)
