"""`repa probe` (CKNNA and linear probes per layer and noise level) and `repa fd` (Frechet distance).

Known cases: a layer that IS the encoder has CKNNA 1 and the encoder's probe accuracy; the probe
of a real SiT equals CKNNA computed here from hooks of our own; FD(x, x) = 0; FD from saved
statistics equals FD from images; FD equals the closed form computed with scipy.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from torch import nn

from repa.cli import main as repa_main
from repa.encoders import EncoderSpec, create_encoder, register_encoder, save_encoder_weights
from repa.encoders.builtin import timm_factory
from repa.errors import ConfigError, ShapeMismatchError
from repa.fd import fd_between, load_stats, pooled_features
from repa.metrics import cknna, linear_probe
from repa.probe import probe_alignment, resolve_probe_layers
from repa.sit import create_sit
from repa.sit.data import load_idx_split, write_idx


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class _MeanConv(nn.Module):
    """normalized (B, 3, H, W) -> map (B, 6, H/4, W/4)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, 6, 4, stride=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.proj(x))  # (B, 6, h, w)


register_encoder("test-fd-conv", embed_dim=6, patch_size=4, license="test", overwrite=True)(lambda spec, **kw: _MeanConv())
register_encoder(
    EncoderSpec(
        name="test-fd-vit", embed_dim=16, patch_size=4, prefix_tokens=1, extract="vit", arch="VisionTransformer",
        arch_kwargs=dict(img_size=16, patch_size=4, embed_dim=16, depth=1, num_heads=2, mlp_ratio=2.0), license="test",
    ),
    overwrite=True,
)(timm_factory)


@pytest.fixture(scope="module")
def idx_folder(tmp_path_factory):
    src = "/usr/share/datasets/fashion-mnist"
    if not os.path.exists(os.path.join(src, "train-images-idx3-ubyte.gz")):
        pytest.fail(f"Fashion-MNIST not found in {src}; install it with `apt-get install -y dataset-fashion-mnist`")
    images, labels = load_idx_split(src, "train")
    root = tmp_path_factory.mktemp("idx")
    write_idx(root / "train-images-idx3-ubyte.gz", images[:60, 0])
    write_idx(root / "train-labels-idx1-ubyte.gz", labels[:60].astype(np.uint8))
    return root


# ----------------------------------------------------------------------------- probe


class _Block(nn.Module):
    """'echo': the encoder's tokens of the model input mapped back to [0, 1]; 'noise': input-independent tokens."""

    def __init__(self, mode: str, encoder=None) -> None:
        super().__init__()
        self.mode = mode
        self.encoder = [encoder]  # not a submodule
        self.lin = nn.Linear(1, 1)  # a parameter, so the model has a device

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.mode == "echo":
            return self.encoder[0]((h + 1) / 2)  # (B, N, D)
        # seeded by a call counter, never by the values: independent of the input and of the
        # machine's floating-point path
        self.calls = getattr(self, "calls", 0) + 1
        g = torch.Generator().manual_seed(self.calls)
        return torch.randn(h.shape[0], 49, 8, generator=g)  # (B, N, 8)


class _EchoModel(nn.Module):
    def __init__(self, encoder) -> None:
        super().__init__()
        self.num_classes = 10
        self.blocks = nn.ModuleList([_Block("echo", encoder), _Block("noise")])
        self.labels_seen = []

    def forward(self, x, t, y):
        self.labels_seen.append(y)
        h = x
        for block in self.blocks:
            h = block(h)
        return h


def test_a_layer_equal_to_the_encoder_has_cknna_one_and_its_probe_accuracy(idx_folder):
    images, labels = load_idx_split(idx_folder, "train")
    # 64 gray levels, k / 64: every step of the model's input path is then exact in float32
    # (x0 = 2v - 1 = k/32 - 1 and (x0 + 1) / 2 = k/64), so the echo block feeds the encoder the
    # very tensor the probe encodes, on any machine, and both probes see identical features
    levels = torch.from_numpy(images).float().div(255).mul(64).round()  # (60, 1, 28, 28) in 0..64
    images, labels = levels / 64, torch.from_numpy(labels)  # float in [0, 1], (60,)
    assert torch.equal(((images * 2 - 1) + 1) / 2, images)
    torch.manual_seed(0)
    enc = create_encoder("fmnist-vit", pretrained=False, resolution=28)
    model = _EchoModel(enc)
    # t = 0 on the linear path: x_t = x, so block 0 sees exactly the clean images
    res = probe_alignment(model, enc, images, labels, layers="all", ts=[0.0], topk=5, batch_size=25, seed=1)
    assert res.layers == ["blocks.0", "blocks.1"] and res.to_dict()["depth"] == [1, 2]
    assert res.cknna[0][0] == pytest.approx(1.0, abs=1e-6)
    assert abs(res.cknna[0][1]) < 0.3  # input-independent tokens: no alignment
    # identical features, identical deterministic probe: the same accuracy exactly, not "within a sample"
    assert res.linear_probe[0][0] == res.encoder_probe
    assert res.num_train == 48 and res.num_samples == 60
    # REPA's analysis uses the null class label
    assert all(bool((y == 10).all()) for y in model.labels_seen)


def test_probe_of_a_sit_equals_cknna_of_our_own_hooks(idx_folder):
    images, labels = load_idx_split(idx_folder, "train")
    images, labels = torch.from_numpy(images[:40]), torch.from_numpy(labels[:40])
    torch.manual_seed(0)
    enc = create_encoder("fmnist-vit", pretrained=False, resolution=28)
    model = create_sit("SiT-S/4", input_size=28, in_channels=1, num_classes=10, depth=3, hidden_size=32, num_heads=2)
    for p in model.parameters():  # leave adaLN-Zero's identity start: every block does something
        nn.init.normal_(p, std=0.05)
    res = probe_alignment(model, enc, images, labels, layers="0,2", ts=[0.0, 0.5, 1.0], topk=5)
    assert res.layers == ["blocks.0", "blocks.2"] and res.ts == [0.0, 0.5, 1.0]
    assert len(res.cknna) == 3 and all(len(row) == 2 for row in res.cknna)

    # independent: at t = 0 the input is the clean image in [-1, 1]; hook the blocks ourselves
    outs = {}
    hooks = [model.blocks[i].register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o)) for i in (0, 2)]
    with torch.no_grad():
        model(images.float() / 127.5 - 1, torch.zeros(40), torch.full((40,), 10))
        target = enc(images).mean(1)  # (40, D_e)
    for h in hooks:
        h.remove()
    for j, i in enumerate((0, 2)):
        assert res.cknna[0][j] == pytest.approx(cknna(outs[i].mean(1), target, topk=5), abs=1e-9)
        feats = outs[i].mean(1).double()
        perm = torch.randperm(40, generator=torch.Generator().manual_seed(1))
        tr, te = perm[:32], perm[32:]
        acc = linear_probe(feats[tr], labels[tr], feats[te], labels[te], num_classes=int(labels.max()) + 1)
        assert res.linear_probe[0][j] == pytest.approx(acc)
    assert res.cknna[2] != res.cknna[0]  # the noise level matters


def test_probe_argument_errors():
    torch.manual_seed(0)
    model = create_sit("SiT-S/4", input_size=8, in_channels=1, num_classes=2, depth=2, hidden_size=16, num_heads=2)
    enc = lambda x: torch.randn(x.shape[0], 4, 3)  # noqa: E731
    imgs = torch.zeros(12, 1, 8, 8, dtype=torch.uint8)
    with pytest.raises(ConfigError, match=r"ts must be noise levels in \[0, 1\], got \[1.5\]"):
        probe_alignment(model, enc, imgs, None, ts=[1.5])
    with pytest.raises(ConfigError, match=r"needs more than 10 samples, got 8"):
        probe_alignment(model, enc, imgs[:8], None)
    with pytest.raises(ShapeMismatchError, match=r"labels has 3 entries for 12 images"):
        probe_alignment(model, enc, imgs, [0, 1, 0], topk=3)
    assert [n for n, _ in resolve_probe_layers(model, "-1")] == ["blocks.1"]


def test_cli_probe_on_a_training_checkpoint(idx_folder, tmp_path, capsys):
    from repa.sit.checkpoint import CHECKPOINT_FORMAT, atomic_save, checkpoint_path
    from repa.sit.data import DataInfo
    from repa.sit.ema import EMA

    kwargs = dict(input_size=28, in_channels=1, num_classes=10, depth=2, hidden_size=32, num_heads=2)
    torch.manual_seed(0)
    model = create_sit("SiT-S/4", **kwargs)
    run = tmp_path / "run"
    atomic_save(
        {
            "format": CHECKPOINT_FORMAT, "step": 5, "config": {"model": "SiT-S/4", "path_type": "linear"},
            "data": DataInfo("pixels", 1, 28, 1, 28, 10, source=str(idx_folder)).to_dict(),
            "model_name": "SiT-S/4", "model_kwargs": kwargs, "model": model.state_dict(),
            "ema": EMA({"model": model}).state_dict(),
        },
        checkpoint_path(run, 5),
    )
    torch.manual_seed(2)
    weights = save_encoder_weights(create_encoder("fmnist-vit", pretrained=False), tmp_path / "t.safetensors")
    argv = ["probe", "--ckpt", str(run), "--encoder", "fmnist-vit", "--weights", str(weights), "--data", str(idx_folder),
            "--t", "0.3,0.7", "--num-samples", "30", "--topk", "5", "--no-progress"]
    assert repa_main(argv) == 0
    out = run / "probe" / "0000005-fmnist-vit"
    result = json.loads((out / "alignment.json").read_text())
    assert result["layers"] == ["blocks.0", "blocks.1"] and result["ts"] == [0.3, 0.7]
    assert result["step"] == 5 and result["encoder"] == "fmnist-vit" and result["num_samples"] == 30
    assert all(-1.0 <= v <= 1.0 for row in result["cknna"] for v in row)
    assert all(0.0 <= v <= 1.0 for row in result["linear_probe"] for v in row)
    assert (out / "alignment.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "highest CKNNA" in capsys.readouterr().err


# ----------------------------------------------------------------------------- fd


@pytest.fixture(scope="module")
def image_sets(tmp_path_factory):
    """Two sets of 24 RGB 16x16 images (b is brighter), as PNG folders and as ADM-style npz files."""
    root = tmp_path_factory.mktemp("sets")
    rng = np.random.default_rng(0)
    a = rng.integers(0, 200, size=(24, 16, 16, 3), dtype=np.uint8)
    b = (rng.integers(0, 200, size=(24, 16, 16, 3)) + 55).astype(np.uint8)
    for name, arr in (("a", a), ("b", b)):
        (root / name / "sub").mkdir(parents=True)
        for i, img in enumerate(arr):
            Image.fromarray(img).save(root / name / "sub" / f"{i:03d}.png")
        np.savez(root / f"{name}.npz", arr_0=arr)
    return root, a, b


@pytest.fixture(scope="module")
def conv_weights(tmp_path_factory):
    torch.manual_seed(4)
    return str(save_encoder_weights(create_encoder("test-fd-conv", pretrained=False), tmp_path_factory.mktemp("w") / "c.safetensors"))


def _closed_form_fd(x: np.ndarray, y: np.ndarray) -> float:
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_fd_equals_the_closed_form_and_zero_for_one_set(image_sets, conv_weights):
    root, a, b = image_sets
    enc = create_encoder("test-fd-conv", weights=conv_weights)
    with torch.no_grad():
        fa = enc(torch.from_numpy(a).permute(0, 3, 1, 2)).mean(1).double().numpy()  # (24, 6)
        fb = enc(torch.from_numpy(b).permute(0, 3, 1, 2)).mean(1).double().numpy()
    value, summary = fd_between(root / "b", root / "a.npz", enc, batch_size=10)
    assert value == pytest.approx(_closed_form_fd(fb, fa), rel=1e-6)
    assert value > 0.01
    assert summary["samples"]["count"] == 24 and summary["samples"]["image_size"] == [16, 16]
    same, _ = fd_between(root / "a", root / "a.npz", enc)  # a folder and an npz of the same images agree
    assert abs(same) < 1e-9 * np.trace(np.cov(fa, rowvar=False))
    feats, size = pooled_features(enc, root / "a", batch_size=7)
    np.testing.assert_allclose(feats.numpy(), fa, rtol=1e-6, atol=1e-7)


def test_cli_fd_saved_stats_give_the_same_distance(image_sets, conv_weights, tmp_path, capsys):
    root, _, _ = image_sets
    stats = tmp_path / "ref.npz"
    base = ["fd", "--encoder", "test-fd-conv", "--weights", conv_weights, "--no-progress"]
    assert repa_main(base + ["--samples", str(root / "b.npz"), "--ref", str(root / "a"), "--save-stats", str(stats)]) == 0
    from_images = float(capsys.readouterr().out.strip())
    mu, sigma, meta = load_stats(stats)
    assert mu.shape == (6,) and sigma.shape == (6, 6) and meta["encoder"] == "test-fd-conv" and meta["count"] == 24
    assert repa_main(base + ["--samples", str(root / "b.npz"), "--ref", str(stats), "--out", str(tmp_path / "r.json")]) == 0
    from_stats = float(capsys.readouterr().out.strip())
    assert from_stats == pytest.approx(from_images, rel=1e-6) and from_images > 0
    assert json.loads((tmp_path / "r.json").read_text())["fd"] == pytest.approx(from_stats, rel=1e-6)
    # statistics of another encoder or pooling are refused
    assert repa_main(["fd", "--encoder", "test-fd-vit", "--no-pretrained", "--no-progress",
                      "--samples", str(root / "b.npz"), "--ref", str(stats)]) == 1
    assert "were computed with encoder 'test-fd-conv'" in capsys.readouterr().err


def test_cls_pooling_uses_the_class_token(image_sets):
    root, a, _ = image_sets
    torch.manual_seed(0)
    vit = create_encoder("test-fd-vit", pretrained=False, resolution=16)
    feats, _ = pooled_features(vit, root / "a.npz", pool="cls")
    with torch.no_grad():
        x = (torch.from_numpy(a).permute(0, 3, 1, 2).float() / 255 - vit.mean) / vit.std  # native size: no resize
        expected = vit.model.forward_features(x)[:, 0]  # (24, 16): class token after the final norm
    np.testing.assert_allclose(feats.numpy(), expected.double().numpy(), rtol=1e-5, atol=1e-6)
    conv = create_encoder("test-fd-conv", pretrained=False)
    with pytest.raises(ConfigError, match=r"--pool cls needs an encoder with a class token; 'test-fd-conv' has none"):
        pooled_features(conv, root / "a.npz", pool="cls")


def test_fd_input_errors(image_sets, tmp_path):
    root, _, _ = image_sets
    enc = create_encoder("test-fd-conv", pretrained=False)
    np.savez(tmp_path / "inception.npz", mu=np.zeros(3), sigma=np.eye(3))  # ADM-style stats without repa's metadata
    with pytest.raises(Exception, match=r"no 'arr_0' array of images"):
        fd_between(root / "a", tmp_path / "inception.npz", enc)
    (tmp_path / "mixed").mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "mixed" / "0.png")
    Image.fromarray(np.zeros((20, 16, 3), np.uint8)).save(tmp_path / "mixed" / "1.png")
    with pytest.raises(ShapeMismatchError, match=r"pass\s+--resolution R"):
        pooled_features(enc, tmp_path / "mixed")
    feats, size = pooled_features(enc, tmp_path / "mixed", resolution=12)  # center-cropped to one size
    assert size == (12, 12) and feats.shape == (2, 6)
    from repa.fd import compute_stats, save_stats

    mu, sigma, meta = compute_stats(enc, tmp_path / "mixed", resolution=12)
    save_stats(tmp_path / "s.npz", mu, sigma, meta)
    with pytest.raises(ConfigError, match=r"the samples are \[16, 16\] images but the reference was \[12, 12\]"):
        fd_between(root / "a", tmp_path / "s.npz", enc)
