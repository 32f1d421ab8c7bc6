"""`repa train --regularizer ...`: Dispersive, SRA, the VAE teacher and combinations in the recipe."""

from __future__ import annotations

import argparse

import pytest
import torch

from repa.errors import CheckpointError, ConfigError
from repa.sit.checkpoint import load_checkpoint
from repa.sit.train import add_arguments, config_from_args, train
from sit_fixtures import TinyEncoder, read_log, tiny_config, write_synthetic_idx


@pytest.fixture
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def idx_data(tmp_path):
    return write_synthetic_idx(tmp_path / "data", n=64)


def test_flag_parses_and_names_the_run():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = config_from_args(parser.parse_args(["--regularizer", "repa,dispersive", "--disp-weight", "0.25"]))
    assert cfg.objectives == ["repa", "dispersive"] and cfg.disp_weight == 0.25
    assert cfg.run_name.endswith("-repa+dispersive")
    assert config_from_args(parser.parse_args(["--no-repa"])).run_name.endswith("-baseline")
    assert config_from_args(parser.parse_args(["--regularizer", "none"])).objectives == []
    assert cfg.objective_depths(12) == {"dispersive": 3, "sra_student": 2, "sra_teacher": 4, "vae": 2}
    with pytest.raises(ConfigError, match="--regularizer 'repa,disp' is not valid"):
        config_from_args(parser.parse_args(["--regularizer", "repa,disp"])).validate()
    with pytest.raises(ConfigError, match="--disp-variant 'l1' is not valid"):
        config_from_args(parser.parse_args(["--disp-variant", "l1"])).validate()


@pytest.mark.parametrize("objectives", ["dispersive", "sra", "repa,dispersive"])
def test_each_objective_trains_logs_checkpoints_and_resumes(tmp_path, idx_data, one_thread, objectives):
    kw = dict(regularizer=objectives, checkpointing_steps=3, log_every=1)
    train(tiny_config(idx_data, tmp_path / "a", max_train_steps=6, **kw), encoders=[TinyEncoder()], progress=False)
    train(tiny_config(idx_data, tmp_path / "b", max_train_steps=3, **kw), encoders=[TinyEncoder()], progress=False)
    resumed = train(
        tiny_config(idx_data, tmp_path / "b", max_train_steps=6, resume="latest", **kw), encoders=[TinyEncoder()], progress=False
    )
    full_log, resumed_log = read_log(tmp_path / "a" / "run"), read_log(resumed.run_dir)
    names = [n for n in objectives.split(",") if n != "repa"]
    for name in names:
        assert all(f"loss_{name}" in r for r in full_log)
    assert ("loss_align" in full_log[0]) == ("repa" in objectives)
    # a resumed run repeats the uninterrupted one (objectives' steps and EMA teacher included)
    assert [r["loss"] for r in resumed_log] == pytest.approx([r["loss"] for r in full_log], rel=1e-5)
    ckpt = load_checkpoint(resumed.checkpoint)
    assert sorted(ckpt["objectives"]) == sorted(names)
    assert int(ckpt["objectives"][names[0]]["step"]) == 6
    with pytest.raises(CheckpointError, match=f"--regularizer: saved '{objectives}', given 'repa'"):
        train(tiny_config(idx_data, tmp_path / "b", max_train_steps=8, resume="latest", regularizer="repa"),
              encoders=[TinyEncoder()], progress=False)


def test_vae_objective_needs_a_latent_run(tmp_path, idx_data):
    with pytest.raises(ConfigError, match="--regularizer vae aligns a block with the VAE's latent"):
        train(tiny_config(idx_data, tmp_path / "r", regularizer="vae", max_train_steps=1), progress=False)


def test_vae_objective_on_a_tiny_latent_run(tmp_path, one_thread):
    """Functional check of --regularizer vae: a random 2-level AutoencoderKL encodes images on the fly."""
    diffusers = pytest.importorskip("diffusers")
    import numpy as np
    from PIL import Image

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )
    vae.save_pretrained(tmp_path / "vae")
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / "img" / name).mkdir(parents=True)
        for k in range(8):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "img" / name / f"{k}.png")
    cfg = tiny_config(tmp_path / "img", tmp_path / "runs", regularizer="vae,dispersive", vae=str(tmp_path / "vae"),
                      resolution=16, batch_size=8, max_train_steps=3, model_kwargs={"depth": 2, "hidden_size": 32,
                      "num_heads": 2, "patch_size": 2})
    result = train(cfg, progress=False)
    log = read_log(result.run_dir)
    assert len(log) == 3 and all(np.isfinite(r["loss_vae"]) and np.isfinite(r["loss_dispersive"]) for r in log)
    ckpt = load_checkpoint(result.checkpoint)
    assert "vae_projectors" in {k.split(".")[1] for k in ckpt["ema"]}  # the projector is averaged too



@pytest.mark.slow
def test_convergence_benchmark_runs_the_encoder_free_arms(tmp_path):
    """The benchmark's Dispersive, SRA and REPA + Dispersive arms run (tiny mode: numbers mean nothing)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "convergence.py"
    out = tmp_path / "out"
    arms = ["vanilla", "dispersive", "sra", "repa-dispersive"]
    proc = subprocess.run(
        [sys.executable, str(bench), "--tiny", "--seeds", "1", "--arms", ",".join(arms), "--out", str(out),
         "--evaluator-dir", str(tmp_path / "ev"), "--no-progress"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((out / "result.json").read_text())
    assert set(result["summary"]["arms"]) == set(arms) and "| SRA |" in proc.stdout
    assert all(r["final_loss_align"] is not None for r in result["runs"] if r["arm"] != "vanilla")


def test_objective_cost_benchmark_times_every_arm():
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "objective_cost.py"
    proc = subprocess.run([sys.executable, str(bench), "--rounds", "1", "--steps-per-round", "1", "--batch-size", "4"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for arm in ("vanilla", "repa", "dispersive", "sra", "repa-dispersive"):
        assert f"| {arm} |" in proc.stdout
