"""Specification of `repa sample`: PNGs per rank and the ADM-style .npz from a training checkpoint."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from repa.cli import main as repa_main
from repa.errors import CheckpointError, ConfigError
from repa.sit.checkpoint import latest_checkpoint, load_checkpoint
from repa.sit.images import PIXEL_ROUNDINGS, make_grid, to_hwc3, to_uint8
from repa.sit.sample import CLASS_MODES, PRECISIONS, WEIGHT_CHOICES, add_arguments, load_sampling_model, sample_labels
from repa.sit.sampling import METHODS
from repa.sit.train import train
from sit_fixtures import SIZE, TinyEncoder, run_module, tiny_config, write_synthetic_idx


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint of a tiny SiT trained 6 steps on 4-class 16x16 synthetic images."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("sample")
    data = write_synthetic_idx(root / "data", n=64)
    train(tiny_config(data, root / "runs", max_train_steps=6), encoders=[TinyEncoder()], progress=False)
    torch.set_num_threads(previous)
    return latest_checkpoint(root / "runs" / "run")


def _sample(ckpt, out, *extra):
    status = repa_main(["sample", "--ckpt", str(ckpt), "--output", str(out), "--no-progress", *extra])
    assert status == 0
    with np.load(out / "samples.npz") as f:
        return f["arr_0"]


def test_sample_writes_pngs_and_an_adm_npz(checkpoint, tmp_path):
    arr = _sample(checkpoint, tmp_path / "out", "--num-samples", "10", "--mode", "ode", "--steps", "4",
                  "--per-proc-batch", "4")
    assert arr.shape == (10, SIZE, SIZE, 3) and arr.dtype == np.uint8
    # grayscale samples are repeated to 3 channels
    assert np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])
    from PIL import Image

    pngs = sorted((tmp_path / "out" / "images").iterdir())
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(10)]
    for i, p in enumerate(pngs):
        assert np.array_equal(np.asarray(Image.open(p)), arr[i, ..., 0])


def test_ode_samples_do_not_depend_on_batching_and_missing_ones_are_filled_in(checkpoint, tmp_path):
    a = _sample(checkpoint, tmp_path / "a", "--num-samples", "7", "--mode", "ode", "--steps", "3", "--per-proc-batch", "7")
    b = _sample(checkpoint, tmp_path / "b", "--num-samples", "7", "--mode", "ode", "--steps", "3", "--per-proc-batch", "2")
    assert np.array_equal(a, b)
    # an interrupted job: delete two images, run again, get the same set back
    for i in (1, 5):
        (tmp_path / "b" / "images" / f"{i:06d}.png").unlink()
    c = _sample(checkpoint, tmp_path / "b", "--num-samples", "7", "--mode", "ode", "--steps", "3")
    assert np.array_equal(a, c)
    # another seed gives other images
    d = _sample(checkpoint, tmp_path / "d", "--num-samples", "7", "--mode", "ode", "--steps", "3", "--seed", "1")
    assert not np.array_equal(a, d)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_write_the_same_npz_as_one(checkpoint, tmp_path):
    one = _sample(checkpoint, tmp_path / "one", "--num-samples", "6", "--mode", "ode", "--steps", "3")
    run_module(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "repa.sit.sample",
                "--ckpt", str(checkpoint), "--output", str(tmp_path / "two"), "--num-samples", "6", "--mode", "ode",
                "--steps", "3", "--no-progress"], cwd=tmp_path)
    with np.load(tmp_path / "two" / "samples.npz") as f:
        two = f["arr_0"]
    assert np.array_equal(one, two)


def test_labels_balanced_or_random():
    balanced = sample_labels(50, 10, "balanced", seed=0)
    assert torch.equal(torch.bincount(balanced), torch.full((10,), 5))
    assert torch.equal(balanced[:12], torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]))
    r1, r2 = sample_labels(1000, 10, "random", seed=3), sample_labels(1000, 10, "random", seed=3)
    assert torch.equal(r1, r2) and r1.min() >= 0 and r1.max() <= 9 and len(set(r1.tolist())) == 10


def test_every_sample_choice_resolves(checkpoint, tmp_path):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with_choices = {a.dest: a.choices for a in parser._actions if a.choices}
    # path_type applies to official checkpoints only: tests/test_official_checkpoints.py runs it
    assert set(with_choices) == {"mode", "solver", "classes", "weights", "mixed_precision", "pixels", "path_type"}
    assert set(with_choices["mode"]) == set(METHODS) and set(with_choices["classes"]) == set(CLASS_MODES)
    assert set(with_choices["pixels"]) == set(PIXEL_ROUNDINGS)
    ckpt = load_checkpoint(checkpoint)
    for w in with_choices["weights"]:  # ema -> the EMA shadow, model -> the raw weights
        model = load_sampling_model(ckpt, w)
        source = {k[len("shadows.model."):]: v for k, v in ckpt["ema"].items() if k.startswith("shadows.model.")}
        source = source if w == "ema" else ckpt["model"]
        assert all(torch.equal(v, source[k]) for k, v in model.state_dict().items())
    assert set(with_choices["weights"]) == set(WEIGHT_CHOICES)
    for c in with_choices["classes"]:
        assert sample_labels(8, 4, c, seed=0).shape == (8,)
    runs = [("ode", "euler", "no"), ("ode", "heun", "bf16"), ("sde", "euler", "fp16")]
    assert {r[0] for r in runs} == set(with_choices["mode"]) and {r[1] for r in runs} == set(with_choices["solver"])
    assert {r[2] for r in runs} == set(PRECISIONS) == set(with_choices["mixed_precision"])
    for mode, solver, precision in runs:
        arr = _sample(checkpoint, tmp_path / f"{mode}-{solver}-{precision}", "--num-samples", "2", "--mode", mode,
                      "--solver", solver, "--steps", "2", "--mixed-precision", precision, "--classes", "random")
        assert arr.shape == (2, SIZE, SIZE, 3)
    # the two pixel conversions of the same draw: rounding is truncation or one level above it
    trunc = _sample(checkpoint, tmp_path / "trunc", "--num-samples", "2", "--mode", "ode", "--steps", "2")
    rounded = _sample(checkpoint, tmp_path / "round", "--num-samples", "2", "--mode", "ode", "--steps", "2",
                      "--pixels", "round")
    diff = rounded.astype(int) - trunc.astype(int)
    assert set(np.unique(diff).tolist()) <= {0, 1} and diff.any()


def test_sample_errors_name_the_fix(checkpoint, tmp_path):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    from repa.sit.sample import main

    with pytest.raises(CheckpointError, match="does not exist; pass a file written by `repa train`"):
        main(parser.parse_args(["--ckpt", str(tmp_path / "nope.pt")]))
    with pytest.raises(ConfigError, match="--solver heun applies to --mode ode"):
        main(parser.parse_args(["--ckpt", str(checkpoint), "--mode", "sde", "--solver", "heun"]))


def test_image_conversion_helpers():
    x = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0, 2.0, -3.0]).view(1, 1, 1, 7)
    # round((x + 1) * 127.5), clamped: 0, 63.75 -> 64, 127.5 -> 128 (half to even), 191.25 -> 191, 255
    assert to_uint8(x).flatten().tolist() == [0, 64, 128, 191, 255, 255, 0]
    gray = torch.arange(4, dtype=torch.uint8).view(1, 1, 2, 2)
    assert to_hwc3(gray).shape == (1, 2, 2, 3) and to_hwc3(gray)[0, 1, 1].tolist() == [3, 3, 3]
    grid = make_grid(torch.zeros(3, 1, 2, 2, dtype=torch.uint8), nrow=2, pad=1)
    assert grid.shape == (2 * 3 + 1, 2 * 3 + 1, 1)
    assert grid[1:3, 1:3].max() == 0 and grid[4:6, 4:6].min() == 255  # the 4th cell is empty padding
