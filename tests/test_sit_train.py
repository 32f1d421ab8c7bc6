"""Specification of `repa train` (repa.sit.train, configs, checkpoint, ema).

Tiny SiTs (~0.1M parameters) on 16x16 synthetic images; every run is in-process except the
SIGTERM and DDP checks, which need real processes.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import json
import logging
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from repa.errors import CheckpointError, ConfigError, UnknownNameError, WeightsNotFoundError
from repa.sit import get_path, sample_time
from repa.sit.checkpoint import atomic_save, latest_checkpoint, list_checkpoints, load_checkpoint
from repa.sit.configs import CONFIGS, TrainConfig, build_model, load_config, resolve_config
from repa.sit.ema import EMA
from repa.sit.sampling import sample
from repa.sit.train import add_arguments, config_from_args, precision_settings, step_generator, train
from sit_fixtures import (
    SIZE,
    TinyEncoder,
    read_log,
    run_module,
    save_random_teacher,
    subprocess_env,
    synthetic_images,
    tiny_config,
    write_synthetic_idx,
)


@pytest.fixture
def one_thread():
    """Tests run on 2 shared cores: one intra-op thread avoids oversubscription stalls."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def idx_data(tmp_path):
    return write_synthetic_idx(tmp_path / "data", n=128)


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser, parser.parse_args(argv)


# --------------------------------------------------------------------------------------------
# A short run: outputs, the first loss from first principles, the loss falls
# --------------------------------------------------------------------------------------------


def test_tiny_run_learns_and_writes_log_checkpoint_and_samples(tmp_path, idx_data, one_thread):
    cfg = tiny_config(idx_data, tmp_path / "runs", max_train_steps=40, checkpointing_steps=20, sample_every=20)
    result = train(cfg, encoders=[TinyEncoder()], progress=False)
    run = tmp_path / "runs" / "run"
    assert result.run_dir == run and result.step == 40 and result.stopped_by is None

    log = read_log(run)
    assert [r["step"] for r in log] == list(range(1, 41))
    assert {"step", "loss", "loss_denoise", "loss_align", "cos_sim", "grad_norm", "images_per_sec", "lr"} <= set(log[0])
    # loss = denoising loss + lambda (the demo default, 4.0) * alignment loss (negative cosine); cos_sim = -alignment loss
    assert cfg.proj_coeff == 4.0
    for r in log:
        assert r["loss"] == pytest.approx(r["loss_denoise"] + cfg.proj_coeff * r["loss_align"], rel=1e-5, abs=1e-6)
        assert r["cos_sim"] == pytest.approx(-r["loss_align"], abs=1e-5)

    # Step 1 from first principles: the zero-initialized SiT predicts v = 0, so the loss is
    # mean |eps - x|^2 over the first global batch: items perm[:16] of torch.randperm(N) seeded
    # by seed + epoch (0), x = image / 127.5 - 1, and t then eps drawn from the step-0 generator.
    images, _ = synthetic_images(128)
    perm = torch.randperm(128, generator=torch.Generator().manual_seed(cfg.seed))
    x = torch.from_numpy(images[perm[:16].numpy()]).float()[:, None] / 127.5 - 1  # (16, 1, 16, 16)
    g = step_generator(cfg.seed, 0, torch.device("cpu"))
    torch.rand(16, generator=g)  # t, uniform
    eps = torch.randn(16, 1, SIZE, SIZE, generator=g)
    assert log[0]["loss_denoise"] == pytest.approx(((eps - x) ** 2).mean().item(), rel=1e-5)

    first = np.mean([r["loss_denoise"] for r in log[:5]])
    last = np.mean([r["loss_denoise"] for r in log[-5:]])
    assert last < 0.8 * first, (first, last)
    assert log[-1]["cos_sim"] > log[0]["cos_sim"]

    assert [p.name for p in list_checkpoints(run)] == ["0000020.pt", "0000040.pt"]
    ckpt = load_checkpoint(run / "checkpoints" / "0000040.pt")
    assert ckpt["step"] == 40
    for key in ("model", "ema", "optimizer", "scaler", "regularizer", "config", "rng", "model_kwargs"):
        assert ckpt[key] is not None, key
    # --encoder-depth 1 (1-based) aligns the output of the first block: module blocks.0
    assert ckpt["regularizer_config"]["layers"] == ["blocks.0"]
    # the EMA holds the projectors too
    assert any(k.startswith("shadows.projectors.") for k in ckpt["ema"])
    assert {"python", "numpy", "torch"} <= set(ckpt["rng"][0])

    from PIL import Image

    for name in ("0000020.png", "0000040.png"):
        with Image.open(run / "samples" / name) as im:
            # 8 samples of 16x16, 4 classes per row -> 2 rows x 4 columns with 2-pixel padding
            assert im.size == (4 * (SIZE + 2) + 2, 2 * (SIZE + 2) + 2)
    cfg_file = json.loads((run / "config.json").read_text())
    assert cfg_file["config"]["batch_size"] == 16 and cfg_file["data"]["num_classes"] == 4


def test_batches_carrying_features_skip_the_encoder_and_give_the_same_losses(tmp_path, one_thread):
    from repa.sit.data import DataInfo, ImageArrayDataset

    images, labels = synthetic_images(64)
    base = ImageArrayDataset(images[:, None], labels)
    encoder = TinyEncoder()

    class WithFeatures(torch.utils.data.Dataset):
        """A cache-like dataset: each item also carries the encoder's targets for its image."""

        def __len__(self):
            return len(base)

        def __getitem__(self, i):
            item = dict(base[i])
            with torch.no_grad():
                item["features"] = encoder(item["image"][None].float() / 255)[0]  # (N, D)
            return item

    class Forbidden(TinyEncoder):
        def forward(self, x):
            raise AssertionError("the encoder ran although the batch carried features")

    info = DataInfo("pixels", 1, SIZE, 1, SIZE, 4)
    online = tiny_config(Path("unused"), tmp_path / "a", max_train_steps=4)
    train(online, encoders=[encoder], dataset=base, data_info=info, progress=False)
    cached = tiny_config(Path("unused"), tmp_path / "b", max_train_steps=4)
    train(cached, encoders=[Forbidden()], dataset=WithFeatures(), data_info=info, progress=False)
    for a, b in zip(read_log(tmp_path / "a" / "run"), read_log(tmp_path / "b" / "run")):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6) and a["cos_sim"] == pytest.approx(b["cos_sim"], abs=1e-6)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_runs_train(tmp_path, idx_data, one_thread, precision):
    # lambda 0.5: with the demo's 4.0 the first fp16 steps can overflow the initial loss scale, which
    # GradScaler answers by skipping them (grad_norm logged as null); this test wants three real steps
    cfg = tiny_config(idx_data, tmp_path / "runs", mixed_precision=precision, max_train_steps=3, proj_coeff=0.5)
    train(cfg, encoders=[TinyEncoder()], progress=False)
    log = read_log(tmp_path / "runs" / "run")
    assert len(log) == 3 and all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) for r in log)
    scaler = load_checkpoint(latest_checkpoint(tmp_path / "runs" / "run"))["scaler"]
    assert bool(scaler) == (precision == "fp16")  # only fp16 has a (non-empty) grad-scaler state


def test_baseline_run_has_no_alignment_terms(tmp_path, idx_data, one_thread):
    cfg = tiny_config(idx_data, tmp_path / "runs", repa=False, max_train_steps=3)
    train(cfg, progress=False)
    log = read_log(tmp_path / "runs" / "run")
    assert all("loss_align" not in r and r["loss"] == r["loss_denoise"] for r in log)
    ckpt = load_checkpoint(latest_checkpoint(tmp_path / "runs" / "run"))
    assert ckpt["regularizer"] is None and not any(k.startswith("shadows.projectors.") for k in ckpt["ema"])


def test_tensorboard_logs_when_installed_and_says_how_to_install_otherwise(tmp_path, idx_data, one_thread):
    import importlib.util

    from repa.errors import MissingDependencyError

    cfg = tiny_config(idx_data, tmp_path / "runs", tensorboard=True, max_train_steps=2)
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(MissingDependencyError, match='pip install "repa\\[tensorboard\\]"'):
            train(cfg, encoders=[TinyEncoder()], progress=False)
    else:
        train(cfg, encoders=[TinyEncoder()], progress=False)
        assert any((tmp_path / "runs" / "run" / "tensorboard").iterdir())


# --------------------------------------------------------------------------------------------
# Resume exactness and checkpoint safety
# --------------------------------------------------------------------------------------------


def test_resume_continues_exactly(tmp_path, one_thread):
    # 64 items / batch 16 = 4 steps per epoch: the checkpoint at step 6 is mid-epoch 1
    data = write_synthetic_idx(tmp_path / "data", n=64)
    full = tiny_config(data, tmp_path / "a", max_train_steps=12, checkpointing_steps=6)
    train(full, encoders=[TinyEncoder()], progress=False)

    part = tiny_config(data, tmp_path / "b", max_train_steps=6, checkpointing_steps=6)
    train(part, encoders=[TinyEncoder()], progress=False)
    resumed = tiny_config(data, tmp_path / "b", max_train_steps=12, checkpointing_steps=6, resume="latest")
    result = train(resumed, encoders=[TinyEncoder()], progress=False)
    assert result.step == 12

    a, b = read_log(tmp_path / "a" / "run"), read_log(tmp_path / "b" / "run")
    assert [r["step"] for r in b] == list(range(1, 13))
    for ra, rb in zip(a, b):
        for key in ("loss", "loss_denoise", "loss_align", "cos_sim", "grad_norm"):
            assert ra[key] == rb[key], (ra["step"], key, ra[key], rb[key])  # bit for bit
    ca = load_checkpoint(tmp_path / "a" / "run" / "checkpoints" / "0000012.pt")
    cb = load_checkpoint(tmp_path / "b" / "run" / "checkpoints" / "0000012.pt")
    for part_name in ("model", "ema", "regularizer"):
        for key, value in ca[part_name].items():
            assert torch.equal(value, cb[part_name][key]), (part_name, key)


def test_resume_refuses_changed_settings_and_fresh_start_refuses_existing_run(tmp_path, idx_data, one_thread):
    train(tiny_config(idx_data, tmp_path / "r", max_train_steps=2), encoders=[TinyEncoder()], progress=False)
    with pytest.raises(CheckpointError, match="--resume latest"):
        train(tiny_config(idx_data, tmp_path / "r", max_train_steps=4), encoders=[TinyEncoder()], progress=False)
    with pytest.raises(CheckpointError, match="--batch-size: saved 16, given 32"):
        train(
            tiny_config(idx_data, tmp_path / "r", max_train_steps=4, batch_size=32, resume="latest"),
            encoders=[TinyEncoder()],
            progress=False,
        )
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train(tiny_config(idx_data, tmp_path / "empty", resume="latest"), encoders=[TinyEncoder()], progress=False)


def test_atomic_save_failure_keeps_previous_file(tmp_path):
    target = tmp_path / "checkpoints" / "0000001.pt"
    atomic_save({"format": "repa-sit-train/1", "step": 1}, target)

    def dies_half_way(obj, path):
        with open(path, "wb") as fh:
            fh.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_save({"format": "repa-sit-train/1", "step": 2}, target, save=dies_half_way)
    assert load_checkpoint(target)["step"] == 1
    assert sorted(p.name for p in target.parent.iterdir()) == ["0000001.pt"]  # no temp file left

    # a process killed during a write leaves a hidden temp file: discovery ignores it
    (target.parent / ".0000002.pt.tmp999").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path) == target
    # a damaged file is reported as such
    (target.parent / "0000003.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="damaged or not a checkpoint"):
        load_checkpoint(target.parent / "0000003.pt")


def test_write_killed_mid_way_during_training_leaves_previous_checkpoint_resumable(tmp_path, idx_data, monkeypatch, one_thread):
    import repa.sit.checkpoint as ckpt_module

    real_save = torch.save
    calls = {"n": 0}

    def flaky_save(obj, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint dies after writing part of the file
            with open(path, "wb") as fh:
                fh.write(b"PK\x03\x04 truncated")
            raise KeyboardInterrupt("killed during the write")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(ckpt_module.torch, "save", flaky_save)
    cfg = tiny_config(idx_data, tmp_path / "runs", max_train_steps=8, checkpointing_steps=4)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, encoders=[TinyEncoder()], progress=False)
    run = tmp_path / "runs" / "run"
    assert [p.name for p in list_checkpoints(run)] == ["0000004.pt"]
    assert load_checkpoint(latest_checkpoint(run))["step"] == 4

    monkeypatch.setattr(ckpt_module.torch, "save", real_save)
    result = train(tiny_config(idx_data, tmp_path / "runs", max_train_steps=8, checkpointing_steps=4, resume="latest"),
                   encoders=[TinyEncoder()], progress=False)
    assert result.step == 8 and [r["step"] for r in read_log(run)] == list(range(1, 9))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "ctrl-c"])
def test_signal_writes_a_checkpoint_and_exits_cleanly(tmp_path, sig):
    data = write_synthetic_idx(tmp_path / "data", n=128)
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"model": "SiT-T/4", "model_kwargs": {"depth": 2, "hidden_size": 32, "num_heads": 2},
                                  "batch_size": 16, "projector_dim": 32, "encoder_depth": 1}))
    args = ["-m", "repa.sit.train", "--config", str(config), "--data", str(data), "--no-repa",
            "--output-dir", str(tmp_path / "runs"), "--exp-name", "run", "--max-train-steps", "100000",
            "--log-every", "1", "--checkpointing-steps", "100000", "--sample-every", "100000", "--no-progress"]
    proc = subprocess.Popen([sys.executable, *args], cwd=tmp_path, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log_file = tmp_path / "runs" / "run" / "log.jsonl"
    deadline = time.time() + 90
    while time.time() < deadline and proc.poll() is None:
        if log_file.exists() and len(log_file.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    os.kill(proc.pid, sig)
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 0, err
    assert f"stopped by {signal.Signals(sig).name}" in err and "--resume latest" in err
    last_logged = read_log(tmp_path / "runs" / "run")[-1]["step"]
    ckpt_file = latest_checkpoint(tmp_path / "runs" / "run")
    assert ckpt_file is not None and ckpt_file.name == f"{last_logged:07d}.pt"
    assert load_checkpoint(ckpt_file)["step"] == last_logged >= 3


# --------------------------------------------------------------------------------------------
# Distributed: 2 gloo processes on a global batch == 1 process on it
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_two_processes_equal_one_process(tmp_path):
    data = write_synthetic_idx(tmp_path / "data", n=128)
    weights = save_random_teacher(tmp_path / "fmnist-vit-random.safetensors")
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"model": "SiT-T/4", "model_kwargs": {"depth": 2, "hidden_size": 32, "num_heads": 2},
                                  "batch_size": 16, "projector_dim": 32, "encoder_depth": 1, "max_train_steps": 3,
                                  "log_every": 1, "learning_rate": 1e-3}))
    common = ["--config", str(config), "--data", str(data), "--enc-weights", str(weights),
              "--output-dir", str(tmp_path / "runs"), "--no-progress"]
    run_module(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "repa.sit.train", *common, "--exp-name", "ddp"], cwd=tmp_path)
    run_module(["-m", "repa.sit.train", *common, "--exp-name", "single"], cwd=tmp_path)

    ddp = load_checkpoint(tmp_path / "runs" / "ddp" / "checkpoints" / "0000003.pt")
    one = load_checkpoint(tmp_path / "runs" / "single" / "checkpoints" / "0000003.pt")
    assert ddp["world_size"] == 2 and one["world_size"] == 1
    fresh = build_model(one["model_name"], **one["model_kwargs"]).state_dict()
    moved = max((one["model"][k] - fresh[k]).abs().max().item() for k in fresh if k != "pos_embed")
    assert moved > 1e-3  # training changed the weights, so equal weights mean equal updates
    for part in ("model", "ema", "regularizer"):
        for key, value in one[part].items():
            assert torch.allclose(ddp[part][key].float(), value.float(), atol=1e-6), (part, key)
    for a, b in zip(read_log(tmp_path / "runs" / "ddp"), read_log(tmp_path / "runs" / "single")):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    assert len(ddp["rng"]) == 2  # every rank's RNG state is in the checkpoint


# --------------------------------------------------------------------------------------------
# Configuration: layers, recipes, every choice resolves
# --------------------------------------------------------------------------------------------


def test_flags_override_config_which_overrides_defaults(tmp_path):
    _, args = _parse([])
    assert config_from_args(args) == TrainConfig()  # no flags: the Fashion-MNIST demo defaults
    _, args = _parse(["--config", "imagenet256", "--batch-size", "512", "--no-repa"])
    cfg = config_from_args(args)
    assert (cfg.model, cfg.batch_size, cfg.repa, cfg.learning_rate) == ("SiT-XL/2", 512, False, 1e-4)
    assert cfg.run_dir == Path("runs") / "imagenet256-sit-xl2-baseline"

    file = tmp_path / "my.json"
    file.write_text(json.dumps({"base": "imagenet256", "encoder-depth": 4, "model": "SiT-B/2"}))
    _, args = _parse(["--config", str(file), "--encoder-depth", "6"])
    cfg = config_from_args(args)
    assert (cfg.model, cfg.encoder_depth, cfg.enc_type, cfg.config_name) == ("SiT-B/2", 6, "dinov2-vit-b", "my")

    file.write_text(json.dumps({"batch_szie": 8}))
    with pytest.raises(ConfigError, match="unknown setting 'batch_szie' \\(did you mean 'batch_size'\\?\\)"):
        load_config(str(file))
    with pytest.raises(UnknownNameError, match="neither a built-in config"):
        load_config("imagenet999")


def test_encoder_depth_is_one_based():
    # the paper's "encoder depth 8" is the output of the 8th block: module blocks.7, layers=7
    assert TrainConfig(encoder_depth=8).repa_layer() == 7
    assert resolve_config("imagenet256").repa_layer() == 7
    assert resolve_config("imagenet256-sit-b2").repa_layer() == 3


def test_imagenet256_recipe_is_the_papers():
    cfg = resolve_config("imagenet256")
    paper = dict(model="SiT-XL/2", enc_type="dinov2-vit-b", encoder_depth=8, proj_coeff=0.5, projector_dim=2048,
                 batch_size=256, learning_rate=1e-4, adam_beta1=0.9, adam_beta2=0.999, adam_weight_decay=0.0,
                 max_grad_norm=1.0, ema_decay=0.9999, mixed_precision="fp16", cfg_prob=0.1, path_type="linear",
                 weighting="uniform", max_train_steps=4_000_000, resolution=256, latent_scale=0.18215)
    assert {k: getattr(cfg, k) for k in paper} == paper
    for name in CONFIGS:
        resolve_config(name)  # every built-in recipe validates


# (depth, width, patch) of every model name, written out from the SiT paper's table
_SIZES = {"S": (12, 384), "B": (12, 768), "L": (24, 1024), "XL": (28, 1152), "T": (6, 128)}


def _check_model(name):
    size, patch = name[len("SiT-"):].split("/")
    with torch.device("meta"):
        model = build_model(name)
    depth, width = _SIZES[size]
    assert len(model.blocks) == depth and model.hidden_size == width and model.patch_size == int(patch), name


def _check_path(name):
    path = get_path(name)
    t = torch.tensor([0.0, 1.0])
    # both paths: data at t = 0, noise at t = 1
    assert torch.allclose(path.alpha(t), torch.tensor([1.0, 0.0]), atol=1e-6), name
    assert torch.allclose(path.sigma(t), torch.tensor([0.0, 1.0]), atol=1e-6), name


def _check_weighting(name):
    t = sample_time(2000, name, generator=torch.Generator().manual_seed(0))
    assert t.shape == (2000,) and 0 <= t.min() and t.max() <= 1
    # uniform: mean 1/2; lognormal on the linear path: logit(t) ~ N(0, 1), median 1/2
    assert abs(t.median().item() - 0.5) < 0.05


def _check_precision(name):
    dtype, scaler = precision_settings(name, torch.device("cpu"))
    assert dtype == {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[name]
    assert scaler.is_enabled() == (name == "fp16")
    a = torch.randn(4, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        out = (a @ a).sum()
    assert out.dtype == (dtype or torch.float32)
    scaler.scale(out.float()).backward()
    assert a.grad is not None


def _check_sampler(mode, solver="euler"):
    # the zero velocity field leaves the ODE state at the noise; the SDE then only adds noise
    noise = torch.randn(3, 2)
    out = sample(lambda x, t, y: torch.zeros_like(x), noise, method=mode, solver=solver, steps=3)
    assert out.shape == noise.shape
    if mode == "ode":
        assert torch.equal(out, noise)


def test_every_train_choice_resolves():
    parser, _ = _parse([])
    checks = {"model": _check_model, "path_type": _check_path, "weighting": _check_weighting,
              "mixed_precision": _check_precision, "sample_mode": _check_sampler}
    with_choices = {a.dest: a for a in parser._actions if a.choices}
    assert set(with_choices) == set(checks)  # a new choice flag needs a check here
    for dest, action in with_choices.items():
        for value in action.choices:
            _, args = _parse([action.option_strings[0], value])
            assert getattr(config_from_args(args), dest) == value
            checks[dest](value)
    # the encoders the built-in recipes name exist in the registry and build
    from repa.encoders import create_encoder, list_encoders

    for name in {resolve_config(c).enc_type for c in CONFIGS}:
        assert name in list_encoders()
        enc = create_encoder(name, pretrained=False, device="meta")
        assert enc.embed_dim > 0


def test_bad_values_are_rejected_with_the_choices():
    with pytest.raises(UnknownNameError, match="--model 'SiT-Q/2' is not valid; choose from SiT-S/2"):
        TrainConfig(model="SiT-Q/2").validate()
    with pytest.raises(ConfigError, match="--cfg-prob must lie in \\[0, 1\\)"):
        TrainConfig(cfg_prob=1.5).validate()
    with pytest.raises(ConfigError, match="--enc-weights loads one file but --enc-type names 2 encoders"):
        TrainConfig(enc_type="fmnist-vit,dinov2-vit-b", enc_weights="w.safetensors").validate()
    with pytest.raises(ConfigError, match="model_kwargs may not set \\['num_classes'\\]"):
        TrainConfig(model_kwargs={"num_classes": 3, "qk_norm": True}).validate()


def test_latent_recipe_without_data_says_what_to_pass(tmp_path):
    cfg = resolve_config("imagenet256", {"output_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match="pass --data with a prepared latent folder"):
        train(cfg, progress=False)


def test_encoder_depth_beyond_the_model_is_an_error(tmp_path, idx_data):
    cfg = tiny_config(idx_data, tmp_path / "runs", encoder_depth=3)  # the tiny model has 2 blocks
    with pytest.raises(ConfigError, match="--encoder-depth 3 is outside the model's 2 blocks"):
        train(cfg, encoders=[TinyEncoder()], progress=False)


# --------------------------------------------------------------------------------------------
# The demo's teacher
# --------------------------------------------------------------------------------------------


def _weights_missing_until(monkeypatch, ready):
    """Make create_encoder("fmnist-vit") miss its weights until ``ready()`` (shipped weights may exist)."""
    import repa.encoders

    real = repa.encoders.create_encoder

    def create_encoder(name, **kw):
        if name == "fmnist-vit" and not ready():
            raise WeightsNotFoundError("no weights for encoder 'fmnist-vit' on this machine")
        return real(name, **kw)

    monkeypatch.setattr(repa.encoders, "create_encoder", create_encoder)


def test_missing_teacher_is_trained_first_when_the_command_exists(tmp_path, idx_data, monkeypatch, one_thread):
    monkeypatch.setenv("REPA_HOME", str(tmp_path / "home"))
    calls = []
    fake = types.ModuleType("repa.sit.teacher")
    fake.__spec__ = importlib.machinery.ModuleSpec("repa.sit.teacher", None)
    fake.add_arguments = lambda parser: parser.add_argument("--steps", type=int, default=7)
    from repa.encoders import local_weights_path

    def fake_main(args):
        calls.append(args.steps)
        save_random_teacher(local_weights_path("fmnist-vit"))
        return 0

    fake.main = fake_main
    monkeypatch.setitem(sys.modules, "repa.sit.teacher", fake)
    _weights_missing_until(monkeypatch, lambda: bool(calls))
    cfg = tiny_config(idx_data, tmp_path / "runs", enc_type="fmnist-vit", max_train_steps=2)
    result = train(cfg, progress=False)
    assert calls == [7] and result.step == 2  # the teacher ran once, with its own defaults


# --------------------------------------------------------------------------------------------
# EMA
# --------------------------------------------------------------------------------------------


def test_ema_update_is_the_exponential_moving_average():
    net = torch.nn.Linear(2, 1)
    bn = torch.nn.BatchNorm1d(1)
    with torch.no_grad():
        net.weight.fill_(0.0)
    ema = EMA({"net": net, "bn": bn}, decay=0.9)
    with torch.no_grad():
        net.weight.fill_(1.0)
        bn.running_mean.fill_(3.0)
    ema.update({"net": net, "bn": bn})
    assert torch.allclose(ema["net"].weight, torch.full((1, 2), 0.1))  # 0.9 * 0 + 0.1 * 1
    ema.update({"net": net, "bn": bn})
    assert torch.allclose(ema["net"].weight, torch.full((1, 2), 0.19))  # 0.9 * 0.1 + 0.1 * 1
    assert torch.equal(ema["bn"].running_mean, torch.tensor([3.0]))  # buffers are copied
    assert not ema["net"].training and not ema["net"].weight.requires_grad
    ema.train()
    assert not ema["net"].training  # shadows stay in eval mode


# --------------------------------------------------------------------------------------------
# --data FEATURE_CACHE (repa cache): the encoder is never loaded, the losses are the online ones
# --------------------------------------------------------------------------------------------


def _forbid_encoder_loading(monkeypatch):
    import repa.encoders

    def create_encoder(name, **kw):
        raise AssertionError(f"create_encoder({name!r}) was called although --data is a feature cache")

    monkeypatch.setattr(repa.encoders, "create_encoder", create_encoder)


def test_training_from_a_feature_cache_matches_the_online_encoder(tmp_path, idx_data, monkeypatch, one_thread):
    from repa.cache import build_cache

    weights = save_random_teacher(tmp_path / "teacher.safetensors")  # a fixed "trained" teacher file
    cache = tmp_path / "cache"
    build_cache(idx_data, cache, "fmnist-vit", weights={"fmnist-vit": weights}, dtype="fp32", shard_size=48,
                batch_size=32, progress=False)

    online = tiny_config(idx_data, tmp_path / "online", enc_type="fmnist-vit", enc_weights=str(weights), max_train_steps=5)
    train(online, progress=False)
    _forbid_encoder_loading(monkeypatch)
    cached = tiny_config(cache, tmp_path / "cached", enc_type="fmnist-vit", max_train_steps=5)
    result = train(cached, progress=False)
    assert result.step == 5

    a, b = read_log(tmp_path / "online" / "run"), read_log(tmp_path / "cached" / "run")
    assert len(a) == len(b) == 5
    for ra, rb in zip(a, b):  # same items in the same order, same noise: the same step, fp32 targets
        assert rb["loss_denoise"] == pytest.approx(ra["loss_denoise"], rel=1e-6)
        assert rb["loss_align"] == pytest.approx(ra["loss_align"], rel=1e-4, abs=1e-6)
        assert rb["loss_align"] != 0.0
    saved = json.loads((tmp_path / "cached" / "run" / "config.json").read_text())
    assert saved["data"]["kind"] == "pixels" and saved["data"]["input_size"] == SIZE and saved["data"]["num_classes"] == 4


def test_feature_cache_mismatches_are_named(tmp_path, idx_data, caplog, one_thread):
    from repa.cache import build_cache
    from repa.errors import CacheMismatchError

    cache = tmp_path / "cache"
    build_cache(idx_data, cache, "fmnist-vit", pretrained=False, dtype="fp16", shard_size=64, batch_size=32, progress=False)
    with pytest.raises(CacheMismatchError, match=r"holds targets of \['fmnist-vit'\], not of encoder 'dinov2-vit-b'"):
        train(tiny_config(cache, tmp_path / "a", enc_type="dinov2-vit-b"), progress=False)
    with pytest.raises(CacheMismatchError, match=r"built at resolution 16, the run asks for 32"):
        train(tiny_config(cache, tmp_path / "b", enc_type="fmnist-vit", resolution=32), progress=False)
    with pytest.raises(ConfigError, match=r"--enc-weights .* has no effect with a feature cache"):
        train(tiny_config(cache, tmp_path / "c", enc_type="fmnist-vit", enc_weights="w.safetensors"), progress=False)
    with pytest.raises(CacheMismatchError, match=r"stores no latent moments; rebuild it with `repa cache \.\.\. --vae"):
        train(tiny_config(cache, tmp_path / "d", enc_type="fmnist-vit", vae="some/vae"), progress=False)
    # targets of a random-init encoder train (the convergence control) but are called out
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="repa"):
        train(tiny_config(cache, tmp_path / "e", enc_type="fmnist-vit", max_train_steps=2), progress=False)
    assert "randomly initialized encoder(s) ['fmnist-vit']" in caplog.text
    # the baseline reads the same cache and ignores its targets
    assert train(tiny_config(cache, tmp_path / "f", repa=False, max_train_steps=2), progress=False).step == 2
