"""REPAConfig, the registries of losses and projectors, and the deprecated names of 0.1.0."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

import repa
from repa import REPAConfig, REPARegularizer, schedules
from repa import losses as losses_mod
from repa import projectors as projectors_mod
from repa.errors import ConfigError, HiddenDimError
from repa.projectors import MLPProjector
from tiny_models import ConvEncoder, TinyDiT

# repa_config.json exactly as repa 0.1.0 wrote it (TinyDiT(depth=2), ConvEncoder(dim=24) named "conv")
OLD_CONFIG = """{
  "encoder_dims": [24],
  "encoders": ["conv"],
  "grid": null,
  "hidden_dims": {"blocks.0": 32, "blocks.1": 32},
  "input_range": [-1.0, 1.0],
  "layers": ["blocks.0", "blocks.1"],
  "loss": "nt-xent",
  "mismatch": "interpolate",
  "options": {"alpha": 0.6, "temperature": 0.2},
  "projector": "mlp",
  "projector_dim": 8,
  "repa_version": "0.1.0",
  "resample": "target",
  "weight": {"kind": "stop_at", "stop": 9, "weight": 0.5}
}
"""


@pytest.fixture
def registries(monkeypatch):
    """Private copies of the loss and projector registries: registrations end with the test."""
    monkeypatch.setattr(losses_mod, "_LOSSES", dict(losses_mod._LOSSES))
    monkeypatch.setattr(losses_mod, "_LOSS_OPTIONS", dict(losses_mod._LOSS_OPTIONS))
    monkeypatch.setattr(projectors_mod, "_PROJECTORS", dict(projectors_mod._PROJECTORS))


def _settings(**changes):
    base = dict(layers=["blocks.0"], encoders=["conv"], encoder_dims=[24], model_dims={"blocks.0": 32})
    base.update(changes)
    return base


# --------------------------------------------------------------------------- REPAConfig
def test_a_0_1_0_config_file_still_loads(tmp_path):
    model, enc = TinyDiT(depth=2), ConvEncoder(dim=24)
    reg = REPARegularizer(model, layers=[0, 1], encoders={"conv": enc}, projector_dim=8)
    reg.save_pretrained(tmp_path)
    state = reg.state_dict()
    reg.remove()
    (tmp_path / "repa_config.json").write_text(OLD_CONFIG)
    loaded = REPARegularizer.from_pretrained(tmp_path, model, encoders={"conv": enc})
    assert loaded.model_dims == {"blocks.0": 32, "blocks.1": 32}
    assert loaded.weight_fn == schedules.StopAt(0.5, 9)
    assert loaded.input_range == (-1.0, 1.0) and loaded.resample == "target"
    assert loaded.config["loss"] == "nt-xent" and loaded.config["options"] == {"alpha": 0.6, "temperature": 0.2}
    assert "hidden_dims" not in loaded.config and loaded.config["model_dims"] == {"blocks.0": 32, "blocks.1": 32}
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())
    assert loaded.loss_fn.keywords == {"temperature": 0.2}  # nt-xent with the saved temperature bound


def test_the_saved_config_is_the_dataclass_and_round_trips(tmp_path):
    model, enc = TinyDiT(depth=2), ConvEncoder(dim=24)
    reg = REPARegularizer(model, layers=1, encoders=enc, projector="conv", kernel_size=3, projector_dim=8,
                          weight=schedules.Warmup(1.0, 4), grid=(4, 4), mismatch="error")
    cfg = reg.repa_config
    assert isinstance(cfg, REPAConfig) and cfg.model_dims == {"blocks.1": 32} and cfg.grid == {"blocks.1": [4, 4]}
    assert cfg.options == {"alpha": 0.6, "kernel_size": 3}
    reg.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "repa_config.json").read_text())
    assert saved.pop("repa_version") == repa.__version__
    assert saved == reg.config == cfg.to_dict()
    assert REPAConfig.from_dict(saved) == cfg
    reg.remove()
    again = REPARegularizer.from_pretrained(tmp_path, model, encoders={cfg.encoders[0]: enc})
    assert again.repa_config == cfg


def test_repa_config_validates_its_values():
    assert REPAConfig(**_settings()).projector_dim == 2048  # REPA's defaults for the rest
    cases = [
        (dict(mismatch="nearest"), r"mismatch must be 'interpolate' or 'error', got 'nearest'"),
        (dict(resample="both"), r"resample must be 'target' or 'model', got 'both'"),
        (dict(input_range=[1, 0]), r"input_range must be \(low, high\) with low < high, got \[1, 0\]"),
        (dict(options={"target_norm": "l2"}), r"target_norm must be None or 'zscore', got 'l2'"),
        (dict(model_dims={"blocks.9": 32}), r"model_dims must give one width per layer \['blocks.0'\]"),
        (dict(encoder_dims=[24, 8]), r"encoder_dims \[24, 8\] must give one width per encoder \['conv'\]"),
        (dict(grid={"blocks.3": [4, 4]}), r"grid has entries for unknown layers \['blocks.3'\]"),
        (dict(projector_dim=0, layers="blocks.0"),
         r"wrong type: layers='blocks.0' \(expected a list of module names\); projector_dim=0 \(expected a positive"),
    ]
    for changes, message in cases:
        with pytest.raises(ConfigError, match=message):
            REPAConfig(**_settings(**changes))


def test_unknown_settings_in_a_file_are_named(tmp_path):
    data = {**_settings(), "projector": "mlp", "projector_dim": 8, "loss": "cosine", "weight": 0.5,
            "mismatch": "interpolate", "input_range": [0, 1], "future_option": 1, "repa_version": "9.0"}
    assert REPAConfig.from_dict({k: v for k, v in data.items() if k != "future_option"}).projector_dim == 8
    with pytest.raises(ConfigError, match=r"unknown setting\(s\) \['future_option'\] \(written by repa 9.0\); upgrade"):
        REPAConfig.from_dict(data, "x.json")


# --------------------------------------------------------------------------- model_dim
def test_model_dim_and_its_deprecated_name_hidden_dim():
    seq = nn.Sequential(nn.Identity())
    with pytest.raises(HiddenDimError, match=r"pass model_dim=<int>"):
        REPARegularizer(seq, layers="0", encoders=ConvEncoder(), projector="linear")
    reg = REPARegularizer(seq, layers="0", encoders=ConvEncoder(), model_dim=4, projector="linear")
    assert reg.model_dims == {"0": 4} and reg.projectors[0].in_features == 4
    reg.remove()
    with pytest.warns(DeprecationWarning, match=r"hidden_dim=\.\.\.\) is deprecated; pass model_dim="):
        old = REPARegularizer(seq, layers="0", encoders=ConvEncoder(), hidden_dim=6, projector="linear")
    assert old.model_dims == {"0": 6} and old.projectors[0].in_features == 6
    with pytest.warns(DeprecationWarning, match=r"reg.hidden_dims is deprecated; use reg.model_dims"):
        assert old.hidden_dims == {"0": 6}
    old.remove()
    with pytest.raises(ConfigError, match=r"pass model_dim= only"):
        REPARegularizer(seq, layers="0", encoders=ConvEncoder(), hidden_dim=6, model_dim=6, projector="linear")


def test_mlp_projector_width_is_projector_dim():
    proj = MLPProjector(5, 3, projector_dim=7)
    assert [tuple(proj[i].weight.shape) for i in (0, 2, 4)] == [(7, 5), (7, 7), (3, 7)]
    with pytest.warns(DeprecationWarning, match=r"MLPProjector\(hidden_dim=\.\.\.\) is deprecated"):
        old = MLPProjector(5, 3, hidden_dim=9)
    assert tuple(old[2].weight.shape) == (9, 9)


# --------------------------------------------------------------------------- one name per schedule
@pytest.mark.parametrize("old, cls", [("constant", "Constant"), ("stop_at", "StopAt"), ("linear_decay", "LinearDecay"),
                                      ("cosine_decay", "CosineDecay"), ("warmup", "Warmup")])
def test_lower_case_schedule_names_are_deprecated_aliases(old, cls):
    with pytest.warns(DeprecationWarning, match=rf"repa.schedules.{old} is deprecated; use repa.schedules.{cls}"):
        alias = getattr(schedules, old)
    assert alias is getattr(schedules, cls)
    assert old not in schedules.__all__ and cls in schedules.__all__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert schedules.StopAt(0.5, 2)(1) == 0.5  # the class name is silent


# --------------------------------------------------------------------------- registries
def test_register_loss_is_used_by_name_with_its_options(registries):
    def scaled_l1(pred, target, scale=1.0):
        return scale * (pred - target).abs().mean()

    repa.register_loss("scaled-l1", scaled_l1, options={"l1_scale": "scale"})
    assert "scaled-l1" in repa.list_losses() and "cosine" in repa.list_losses()
    with pytest.raises(ConfigError, match=r"loss 'scaled-l1' is already registered; pass overwrite=True"):
        repa.register_loss("scaled-l1", scaled_l1)
    model, enc = TinyDiT(depth=2), ConvEncoder(dim=24)
    x = torch.rand(2, 3, 16, 16)
    reg = REPARegularizer(model, layers=1, encoders=enc, projector_dim=8, loss="scaled-l1", l1_scale=3.0, weight=1.0)
    captured = {}
    model.blocks[1].register_forward_hook(lambda m, a, o: captured.setdefault("h", o.detach()))
    model(torch.randn_like(x), torch.rand(2))
    out = reg(x, return_breakdown=True)
    pred, target = reg.projectors[0](captured["h"]).detach(), enc(x)  # (B, 16, 24) each: 4x4 grids on both sides
    expected = 3.0 * sum(abs(float(p) - float(t)) for p, t in zip(pred.flatten(), target.flatten())) / pred.numel()
    assert float(out.loss) == pytest.approx(expected, rel=1e-5)
    assert reg.config["loss"] == "scaled-l1" and reg.config["options"]["l1_scale"] == 3.0


def test_register_projector_is_used_by_name(registries):
    @repa.register_projector("bias-free")
    def bias_free(in_dim, out_dim):
        return nn.Linear(in_dim, out_dim, bias=False)

    assert "bias-free" in repa.list_projectors()
    reg = REPARegularizer(TinyDiT(depth=2), layers=0, encoders=ConvEncoder(dim=24), projector="bias-free")
    assert isinstance(reg.projectors[0], nn.Linear) and reg.projectors[0].bias is None
    assert tuple(reg.projectors[0].weight.shape) == (24, 32)
    with pytest.raises(ConfigError, match=r"projector 'bias-free' is already registered"):
        repa.register_projector("bias-free", bias_free)


def test_the_bare_registry_dicts_are_deprecated():
    with pytest.warns(DeprecationWarning, match=r"repa.losses.LOSSES is deprecated; use repa.register_loss"):
        assert "cosine" in losses_mod.LOSSES
    with pytest.warns(DeprecationWarning, match=r"repa.projectors.PROJECTORS is deprecated"):
        assert "mlp" in projectors_mod.PROJECTORS


def test_preset_registry_is_exported():
    assert any(p.name == "repa-sit" for p in repa.list_presets())
    assert {"list_presets", "register_preset", "register_loss", "list_losses", "register_projector",
            "list_projectors", "REPAConfig"} <= set(repa.__all__)


# --------------------------------------------------------------------------- the encoder-free objectives
def test_dispersive_settings_are_a_dataclass_saved_generically(tmp_path):
    from repa.dispersive import DispersiveConfig

    model = TinyDiT(depth=2)
    disp = repa.DispersiveRegularizer(model, layers=[0, 1], weight=schedules.StopAt(0.25, 5), variant="hinge", margin=2)
    assert disp.config == {"objective": "dispersive", "layers": ["blocks.0", "blocks.1"], "variant": "hinge",
                           "weight": {"kind": "stop_at", "weight": 0.25, "stop": 5}, "temperature": 0.5,
                           "margin": 2.0, "normalize_by_dim": True}
    disp.save_pretrained(tmp_path)
    disp.remove()
    back = repa.DispersiveRegularizer.from_pretrained(tmp_path, model)
    assert back.weight_fn == schedules.StopAt(0.25, 5) and back.margin == 2.0 and back.variant == "hinge"
    back.remove()
    with pytest.raises(ConfigError, match=r"variant='ring' is not a dispersive loss"):
        DispersiveConfig(["blocks.0"], variant="ring")
    path = tmp_path / "dispersive_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "spread": 3}))
    with pytest.raises(ConfigError, match=r"unknown setting\(s\) \['spread'\]"):
        repa.DispersiveRegularizer.from_pretrained(tmp_path, model)
    path.write_text(json.dumps({**disp.config, "temperature": -1}))
    with pytest.raises(ConfigError, match=r"invalid setting \(temperature must be > 0, got -1"):
        repa.DispersiveRegularizer.from_pretrained(tmp_path, model)


def test_self_alignment_settings_reject_a_bad_max_gap():
    from repa.self_alignment import SelfAlignmentConfig

    cfg = SelfAlignmentConfig("blocks.0", "blocks.1", hidden_dim=32, teacher_dim=32)
    assert (cfg.weight, cfg.loss, cfg.beta, cfg.projector, cfg.max_gap) == (0.2, "smooth-l1", 0.05, "sra", 0.2)
    with pytest.raises(ConfigError, match=r"max_gap must lie in \[0, 1\], got 1.5"):
        SelfAlignmentConfig("blocks.0", "blocks.1", hidden_dim=32, teacher_dim=32, max_gap=1.5)
    with pytest.raises(ConfigError, match=r"teacher_dim must be a positive int, got 0"):
        SelfAlignmentConfig("blocks.0", "blocks.1", hidden_dim=32, teacher_dim=0)
