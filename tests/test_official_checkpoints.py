"""Specification of reading the official REPA code's checkpoints: the released bare EMA state dict,
train.py checkpoints (model, ema, opt, args, steps) and legacy ones (decoder_blocks), for
`repa sample`, `repa probe`, `repa train --init-from` and the regularizer's projectors.

Every checkpoint here is written by the test itself in the reference's layout, built by hand from a
tiny SiT (whose parameter names are the reference's) plus projectors stored as the reference's
``projectors.{i}.{0,2,4}`` Sequential keys.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from repa import REPARegularizer
from repa.cli import main as repa_main
from repa.errors import CheckpointError, ConfigError
from repa.sit.configs import build_model
from repa.sit.data import write_idx
from repa.sit.official import (
    init_from_official,
    load_official_projectors,
    official_train_settings,
    read_official_checkpoint,
)
from repa.sit.sample import sample_labels, sample_noise
from repa.sit.sampling import sample
from sit_fixtures import TinyEncoder

NUM_CLASSES = 4
PROJ_HIDDEN, Z_DIM = 24, 16  # TinyEncoder's width is 16
DEPTH_ALIGNED = 2  # "encoder depth 2": the output of blocks.1


def _tiny_sit(seed: int) -> torch.nn.Module:
    """SiT-T/4 on 28x28x1 with every parameter random (so a wrong key or a zero layer shows)."""
    model = build_model("SiT-T/4", in_channels=1, num_classes=NUM_CLASSES)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def _projector_keys(seed: int, hidden: int = 128) -> dict:
    """One reference projector (Linear-SiLU-Linear-SiLU-Linear) as ``projectors.0.{0,2,4}`` keys."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"0": (PROJ_HIDDEN, hidden), "2": (PROJ_HIDDEN, PROJ_HIDDEN), "4": (Z_DIM, PROJ_HIDDEN)}
    out = {}
    for idx, (o, i) in shapes.items():
        out[f"projectors.0.{idx}.weight"] = torch.randn(o, i, generator=g) * 0.1
        out[f"projectors.0.{idx}.bias"] = torch.randn(o, generator=g) * 0.1
    return out


def _reference_state(model: torch.nn.Module, proj_seed: int) -> dict:
    return {**{k: v.clone() for k, v in model.state_dict().items()}, **_projector_keys(proj_seed)}


def _legacy(state: dict, encoder_depth: int) -> dict:
    """The older naming: blocks after the aligned depth are decoder_blocks.{j - encoder_depth}."""
    out = {}
    for k, v in state.items():
        parts = k.split(".")
        if parts[0] == "blocks" and int(parts[1]) >= encoder_depth:
            k = ".".join(["decoder_blocks", str(int(parts[1]) - encoder_depth), *parts[2:]])
        out[k] = v
    return out


def _args(**over) -> argparse.Namespace:
    base = dict(model="SiT-T/4", enc_type="tiny-conv", encoder_depth=DEPTH_ALIGNED, path_type="cosine",
                weighting="lognormal", cfg_prob=0.1, proj_coeff=0.25, num_classes=NUM_CLASSES, batch_size=16,
                learning_rate=1e-12, adam_beta1=0.9, adam_beta2=0.999, adam_weight_decay=0.0, adam_epsilon=1e-8,
                max_grad_norm=1.0, mixed_precision="no", seed=3, qk_norm=False, fused_attn=True,
                data_dir="/somewhere/else", output_dir="exps", exp_name="ref", legacy=False)
    base.update(over)
    return argparse.Namespace(**base)


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """The three layouts of one tiny model: bare EMA state dict, train.py dict, and both legacy."""
    root = tmp_path_factory.mktemp("official")
    ema_model, raw_model = _tiny_sit(1), _tiny_sit(2)
    ema_state, raw_state = _reference_state(ema_model, 11), _reference_state(raw_model, 12)
    files = {
        "bare": root / "last.pt",
        "train": root / "0001000.pt",
        "legacy_bare": root / "legacy_last.pt",
        "legacy_train": root / "legacy_0001000.pt",
    }
    opt = {"state": {}, "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": [0, 1]}]}
    torch.save(ema_state, files["bare"])
    torch.save({"model": raw_state, "ema": ema_state, "opt": opt, "args": _args(), "steps": 1000}, files["train"])
    torch.save(_legacy(ema_state, 3), files["legacy_bare"])
    torch.save({"model": _legacy(raw_state, DEPTH_ALIGNED), "ema": _legacy(ema_state, DEPTH_ALIGNED), "opt": opt,
                "args": _args(legacy=True), "steps": 7}, files["legacy_train"])
    data = root / "data"
    rng = np.random.default_rng(0)
    write_idx(data / "train-images-idx3-ubyte.gz", rng.integers(0, 255, (48, 28, 28)).astype(np.uint8))
    write_idx(data / "train-labels-idx1-ubyte.gz", rng.integers(0, NUM_CLASSES, 48).astype(np.uint8))
    return dict(files=files, ema_model=ema_model, raw_model=raw_model, ema_state=ema_state, raw_state=raw_state,
                data=data, root=root)


def _forward(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 1, 28, 28, generator=g)
    t = torch.rand(3, generator=g)
    y = torch.tensor([0, 3, NUM_CLASSES])
    with torch.no_grad():
        return model(x, t, y)


@pytest.mark.parametrize("layout", ["bare", "train", "legacy_bare", "legacy_train"])
def test_every_layout_reads_into_the_same_sit(official, layout):
    ckpt = read_official_checkpoint(official["files"][layout])
    assert ckpt.layout == ("train" if "train" in layout else "state_dict")
    assert ckpt.legacy == layout.startswith("legacy")
    model = build_model("SiT-T/4", in_channels=1, num_classes=NUM_CLASSES).eval()
    model.load_state_dict(ckpt.ema)
    # the EMA SiT computes exactly what the model the file was written from computes
    assert torch.equal(_forward(model), _forward(official["ema_model"]))
    # legacy decoder_blocks.j came back as blocks.(j + encoder depth)
    for k, v in official["ema_model"].state_dict().items():
        assert torch.equal(ckpt.ema[k], v), k
    assert ckpt.projector_dims == [(128, PROJ_HIDDEN, Z_DIM)]
    assert torch.equal(ckpt.ema_projectors[0]["2.weight"], official["ema_state"]["projectors.0.2.weight"])
    if "train" in layout:
        assert torch.equal(ckpt.projectors[0]["4.bias"], official["raw_state"]["projectors.0.4.bias"])
        assert ckpt.steps in (1000, 7) and ckpt.args["path_type"] == "cosine"


def test_only_namespace_is_unpickled(official, tmp_path):
    bad = tmp_path / "bad.pt"
    # a pathlib.Path inside args: not a tensor, container or Namespace, so it is refused
    torch.save({"model": official["raw_state"], "ema": official["ema_state"], "opt": {}, "steps": 1,
                "args": _args(output_dir=pathlib.PurePosixPath("/x"))}, bad)
    with pytest.raises(CheckpointError, match="weights_only=True.*argparse.Namespace"):
        read_official_checkpoint(bad)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match="not a checkpoint of the official REPA code"):
        read_official_checkpoint(other)


def test_legacy_depth_flag_must_agree(official):
    with pytest.raises(CheckpointError, match="holds 3 encoder blocks.*pass --encoder-depth 3"):
        read_official_checkpoint(official["files"]["legacy_bare"], encoder_depth=8)


def test_training_args_map_to_repa_settings(official):
    s = official_train_settings(official["files"]["train"])
    assert s["model"] == "SiT-T/4" and s["enc_type"] == "tiny-conv" and s["encoder_depth"] == DEPTH_ALIGNED
    assert s["path_type"] == "cosine" and s["weighting"] == "lognormal" and s["proj_coeff"] == 0.25
    assert s["projector_dim"] == PROJ_HIDDEN and s["ema_decay"] == 0.9999 and s["seed"] == 3
    assert "data_dir" not in s and "output_dir" not in s and "exp_name" not in s  # another machine's paths
    bare = official_train_settings(official["files"]["bare"])
    assert bare == {"projector_dim": PROJ_HIDDEN, "ema_decay": 0.9999}  # the rest comes from flags


def _hand_truncate(x: torch.Tensor) -> np.ndarray:
    """The reference's pixels: clamp(255 * (x + 1) / 2, 0, 255) cast to uint8, as (B, H, W, 3)."""
    px = torch.clamp(255.0 * (x.float() + 1) / 2, 0, 255).to(torch.uint8)  # (B, 1, H, W)
    return px.permute(0, 2, 3, 1).repeat(1, 1, 1, 3).numpy()


@pytest.mark.parametrize("layout", ["bare", "legacy_train"])
def test_repa_sample_reads_official_checkpoints(official, layout, tmp_path):
    out = tmp_path / "out"
    status = repa_main(["sample", "--ckpt", str(official["files"][layout]), "--output", str(out), "--no-progress",
                        "--num-samples", "3", "--mode", "ode", "--steps", "2", "--model", "SiT-T/4"])
    assert status == 0
    with np.load(out / "samples.npz") as f:
        arr = f["arr_0"]
    # the same draw by hand from the model the file was written from (EMA weights, seed 0)
    noise = sample_noise([0, 1, 2], (1, 28, 28), seed=0)
    labels = sample_labels(3, NUM_CLASSES, "random", seed=0)
    path = "linear" if layout == "bare" else "cosine"  # bare: the reference default; train: its args
    x = sample(official["ema_model"], noise, labels, method="ode", steps=2, path=path)
    assert np.array_equal(arr, _hand_truncate(x))
    record = json.loads((out / "samples.json").read_text())
    assert record["classes"] == "random" and record["pixels"] == "truncate"


def test_outputs_of_an_official_file_go_beside_it_named_after_it(official, tmp_path):
    import shutil

    ckpt = tmp_path / "downloads" / "last.pt"
    ckpt.parent.mkdir()
    shutil.copy(official["files"]["bare"], ckpt)
    assert repa_main(["sample", "--ckpt", str(ckpt), "--no-progress", "--num-samples", "2", "--mode", "ode",
                      "--steps", "1"]) == 0
    (out,) = (tmp_path / "downloads" / "eval").glob("last-*-n2")  # named after the file and the settings
    assert (out / "samples.npz").is_file() and out.name.endswith("-ema-ode1-euler-cfg1-random-seed0-n2")


def test_sample_with_the_wrong_model_names_the_fix(official, tmp_path):
    with pytest.raises(CheckpointError, match="which is not SiT-S/4.*pass --model SiT-T/4"):
        from repa.sit.sample import add_arguments, main

        parser = argparse.ArgumentParser()
        add_arguments(parser)
        main(parser.parse_args(["--ckpt", str(official["files"]["bare"]), "--model", "SiT-S/4",
                                "--output", str(tmp_path / "o")]))


def test_repa_probe_reads_an_official_training_checkpoint(official, tmp_path):
    out = tmp_path / "probe"
    status = repa_main(["probe", "--ckpt", str(official["files"]["train"]), "--encoder", "fmnist-vit",
                        "--no-pretrained", "--data", str(official["data"]), "--num-samples", "24", "--topk", "3",
                        "--layers", "1", "--t", "0.5", "--out", str(out), "--no-progress", "--device", "cpu"])
    assert status == 0
    result = json.loads((out / "alignment.json").read_text())
    assert result["path"] == "cosine" and result["model"] == "SiT-T/4"  # from the checkpoint's args
    assert result["step"] == 1000 and len(result["cknna"][0]) == 1


def test_official_projectors_load_into_the_regularizer(official):
    model = build_model("SiT-T/4", in_channels=1, num_classes=NUM_CLASSES)
    reg = REPARegularizer(model, layers=DEPTH_ALIGNED - 1, encoders={"tiny-conv": Z_DIM}, projector_dim=PROJ_HIDDEN)
    load_official_projectors(reg, official["files"]["train"])
    s = official["ema_state"]
    h = torch.randn(2, 49, 128)
    # the reference's projector written out: Linear, SiLU, Linear, SiLU, Linear
    z = F.linear(h, s["projectors.0.0.weight"], s["projectors.0.0.bias"])
    z = F.linear(F.silu(z), s["projectors.0.2.weight"], s["projectors.0.2.bias"])
    z = F.linear(F.silu(z), s["projectors.0.4.weight"], s["projectors.0.4.bias"])
    with torch.no_grad():
        assert torch.allclose(reg.projectors[0](h), z, atol=1e-6)
    wide = REPARegularizer(model, layers=1, encoders={"tiny-conv": Z_DIM}, projector_dim=64)
    with pytest.raises(CheckpointError, match="projector 0 of .* does not fit"):
        load_official_projectors(wide, official["files"]["train"])
    two = REPARegularizer(model, layers=[0, 1], encoders={"tiny-conv": Z_DIM}, projector_dim=PROJ_HIDDEN)
    with pytest.raises(CheckpointError, match="has 1 projector.*regularizer has 2"):
        load_official_projectors(two, official["files"]["train"])


def test_init_from_loads_model_ema_and_projectors(official):
    from repa.sit.ema import EMA

    model = build_model("SiT-T/4", in_channels=1, num_classes=NUM_CLASSES)
    reg = REPARegularizer(model, layers=1, encoders={"tiny-conv": Z_DIM}, projector_dim=PROJ_HIDDEN)
    ema = EMA({"model": model, "projectors": reg.projectors}, 0.9999)
    init_from_official(official["files"]["legacy_train"], model, reg, ema)
    for k, v in official["raw_model"].state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
        assert torch.equal(ema["model"].state_dict()[k], official["ema_model"].state_dict()[k]), k
    assert torch.equal(reg.projectors[0][0].weight, official["raw_state"]["projectors.0.0.weight"])
    assert torch.equal(ema["projectors"][0][4].bias, official["ema_state"]["projectors.0.4.bias"])
    # a bare state dict whose shapes do not fit the model built from the flags
    small = build_model("SiT-T/4", in_channels=1, num_classes=10)
    reg2 = REPARegularizer(small, layers=1, encoders={"tiny-conv": Z_DIM}, projector_dim=PROJ_HIDDEN)
    ema2 = EMA({"model": small, "projectors": reg2.projectors})
    with pytest.raises(CheckpointError, match=r"y_embedder.embedding_table.weight \(5, 128\) vs \(11, 128\)"):
        init_from_official(official["files"]["bare"], small, reg2, ema2)


@pytest.mark.slow
def test_repa_train_init_from_a_training_checkpoint(official, tmp_path):
    from repa.sit.train import add_arguments, config_from_args, train

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--init-from", str(official["files"]["train"]), "--data", str(official["data"]),
                              "--output-dir", str(tmp_path), "--exp-name", "ft", "--max-train-steps", "1",
                              "--sample-every", "1000", "--checkpointing-steps", "1000", "--no-progress"])
    cfg = config_from_args(args)
    # the checkpoint's args became the run's settings; the flags kept theirs
    assert (cfg.model, cfg.path_type, cfg.weighting, cfg.encoder_depth, cfg.projector_dim) == (
        "SiT-T/4", "cosine", "lognormal", DEPTH_ALIGNED, PROJ_HIDDEN)
    assert cfg.max_train_steps == 1 and cfg.exp_name == "ft"
    result = train(cfg, encoders=[TinyEncoder()], progress=False)
    ckpt = torch.load(result.checkpoint, weights_only=False)
    # one AdamW step at lr 1e-12 leaves the weights where the official checkpoint put them
    for k, v in official["raw_model"].state_dict().items():
        assert torch.allclose(ckpt["model"][k], v, atol=1e-9), k
    proj = ckpt["regularizer"]["projectors.0.0.weight"]
    assert torch.allclose(proj, official["raw_state"]["projectors.0.0.weight"], atol=1e-9)


def test_flags_for_official_checkpoints_are_refused_for_repa_ones(tmp_path):
    from repa.sit.official import load_any_checkpoint

    fake = tmp_path / "x.pt"
    torch.save({"format": "repa-sit-train/1"}, fake)
    with pytest.raises(ConfigError, match="apply to official REPA checkpoints only"):
        load_any_checkpoint(fake, argparse.Namespace(model="SiT-XL/2", path_type=None, encoder_depth=None))
