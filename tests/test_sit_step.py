"""Specification of the shared training step (repa.sit.step) and of the recipe's flag aliases."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
from torch import nn

from repa.sit.ema import EMA
from repa.sit.step import StepBatch, step_losses, training_step
from repa.sit.transport import get_path


class Scale(nn.Module):
    """pred = w * x_t: a one-parameter "model" whose gradient is written out by hand below."""

    def __init__(self, w: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(float(w)))

    def forward(self, x_t, t, y, force_drop_ids=None):
        return self.w * x_t


def _batch() -> StepBatch:
    x = torch.tensor([[1.0, -2.0], [0.5, 3.0]]).view(2, 1, 1, 2)  # (2, 1, 1, 2)
    noise = torch.tensor([[0.0, 1.0], [-1.0, 2.0]]).view(2, 1, 1, 2)
    t = torch.tensor([0.25, 0.5])
    return StepBatch(x=x, y=torch.zeros(2, dtype=torch.long), t=t, noise=noise)


def _by_hand(w: float):
    """Linear path: x_t = (1 - t) x + t eps, v = eps - x; loss = mean((w x_t - v)^2); dL/dw = mean(2 (w x_t - v) x_t)."""
    xs = [[1.0, -2.0], [0.5, 3.0]]
    es = [[0.0, 1.0], [-1.0, 2.0]]
    ts = [0.25, 0.5]
    sq, grad = [], []
    for x, e, t in zip(xs, es, ts):
        for xi, ei in zip(x, e):
            xt = (1 - t) * xi + t * ei
            v = ei - xi
            sq.append((w * xt - v) ** 2)
            grad.append(2 * (w * xt - v) * xt)
    return sum(sq) / len(sq), sum(grad) / len(grad)


def test_step_loss_is_the_velocity_mse_by_hand():
    losses = step_losses(Scale(0.7), _batch(), path=get_path("linear"))
    loss, _ = _by_hand(0.7)
    assert losses.loss.item() == pytest.approx(loss, rel=1e-6)
    assert losses.denoise.item() == pytest.approx(loss, rel=1e-6)
    assert losses.repa is None and losses.terms == {}


@pytest.mark.parametrize("max_norm", [0.1, 0.0])  # 0.1 clips; <= 0: no clipping
def test_training_step_clips_updates_and_averages_by_hand(max_norm):
    w0, lr, decay = 0.7, 0.5, 0.9
    model = Scale(w0)
    ema = EMA({"model": model}, decay)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    record = training_step(model, _batch(), path=get_path("linear"), optimizer=opt, max_grad_norm=max_norm, ema=ema)
    loss, grad = _by_hand(w0)
    clipped = grad * min(1.0, max_norm / abs(grad)) if max_norm > 0 else grad
    w1 = w0 - lr * clipped
    assert record.loss.item() == pytest.approx(loss, rel=1e-6)
    assert record.grad_norm.item() == pytest.approx(abs(grad), rel=1e-5)  # the norm before clipping
    assert model.w.item() == pytest.approx(w1, rel=1e-5)
    assert ema["model"].w.item() == pytest.approx(decay * w0 + (1 - decay) * w1, rel=1e-5)
    assert model.w.grad is None  # zeroed after the step
    assert record.align.item() == 0.0 and record.cos.item() == 0.0


def test_ema_decay_override_is_used_for_this_step():
    w0, lr = 0.7, 0.5
    model = Scale(w0)
    ema = EMA({"model": model}, 0.9999)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    training_step(model, _batch(), path=get_path("linear"), optimizer=opt, max_grad_norm=0.0, ema=ema, ema_decay=0.5)
    w1 = w0 - lr * _by_hand(w0)[1]
    assert ema["model"].w.item() == pytest.approx(0.5 * w0 + 0.5 * w1, rel=1e-5)


def test_before_update_can_stop_the_step_before_anything_changes():
    model = Scale(0.7)
    ema = EMA({"model": model}, 0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)

    def refuse(loss, grad_norm):
        assert math.isfinite(loss.item()) and grad_norm.item() > 0
        raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        training_step(model, _batch(), path=get_path("linear"), optimizer=opt, ema=ema, before_update=refuse)
    assert model.w.item() == pytest.approx(0.7) and ema["model"].w.item() == pytest.approx(0.7)


def test_repa_term_enters_the_loss_with_its_weight():
    """With a regularizer the loss is mse + weight * alignment, and the record carries both parts."""
    from repa import REPARegularizer
    from repa.sit import create_sit

    torch.manual_seed(0)
    model = create_sit("SiT-S/2", input_size=8, in_channels=4, depth=2, hidden_size=32, num_heads=2)
    reg = REPARegularizer(model, layers=0, encoders={"t": 8}, weight=0.25, projector_dim=16)
    x = torch.randn(2, 4, 8, 8)
    batch = StepBatch(x=x, y=torch.zeros(2, dtype=torch.long), t=torch.tensor([0.3, 0.6]), noise=torch.randn_like(x),
                      drop=torch.zeros(2, dtype=torch.long), features={"t": torch.randn(2, 16, 8)})
    opt = torch.optim.AdamW([*model.parameters(), *reg.parameters()], lr=1e-3)
    record = training_step(model, batch, path=get_path("linear"), optimizer=opt, regularizer=reg)
    assert record.repa_total is not None
    assert record.repa_total.item() == pytest.approx(0.25 * record.align.item(), rel=1e-5)
    assert record.loss.item() == pytest.approx(record.denoise.item() + record.repa_total.item(), rel=1e-5)
    assert record.alignment_total.item() == pytest.approx(record.repa_total.item())
    assert -1.0 <= record.cos.item() <= 1.0



def test_a_stopped_step_leaves_the_projectors_alone_and_updates_the_model_as_before():
    """At weight 0 (after a stop) the projectors, their AdamW state and their EMA shadow do not move;
    the model's update is the one a vanilla step would make (same loss, same clipped gradient)."""
    from repa import REPARegularizer
    from repa.schedules import StopAt
    from repa.sit import create_sit

    def build():
        torch.manual_seed(0)
        model = create_sit("SiT-S/2", input_size=8, in_channels=4, depth=2, hidden_size=32, num_heads=2)
        reg = REPARegularizer(model, layers=0, encoders={"t": 8}, weight=StopAt(0.5, stop=1), projector_dim=16)
        opt = torch.optim.AdamW([*model.parameters(), *reg.parameters()], lr=1e-2)
        ema = EMA({"model": model, "projectors": reg.projectors}, 0.5)
        return model, reg, opt, ema

    torch.manual_seed(1)
    x = torch.randn(2, 4, 8, 8)
    batch = StepBatch(x=x, y=torch.zeros(2, dtype=torch.long), t=torch.tensor([0.3, 0.6]), noise=torch.randn_like(x),
                      drop=torch.zeros(2, dtype=torch.long), features={"t": torch.randn(2, 16, 8)})
    model, reg, opt, ema = build()
    sources = {"model": model, "projectors": reg.projectors}
    training_step(model, batch, path=get_path("linear"), optimizer=opt, regularizer=reg, ema=ema, ema_sources=sources,
                  reg_step=0)  # weight 0.5: everything moves
    proj = [p.clone() for p in reg.projectors.parameters()]
    shadow = [p.clone() for p in ema["projectors"].parameters()]
    moments = [opt.state[p]["exp_avg"].clone() for p in reg.projectors.parameters()]
    model_before = [p.clone() for p in model.parameters()]
    record = training_step(model, batch, path=get_path("linear"), optimizer=opt, regularizer=reg, ema=ema,
                           ema_sources=sources, reg_step=1)  # weight 0
    assert record.repa_total is not None and record.repa_total.item() == 0.0
    assert all(torch.equal(a, b) for a, b in zip(proj, reg.projectors.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(shadow, ema["projectors"].parameters()))
    assert all(torch.equal(a, opt.state[p]["exp_avg"]) for a, p in zip(moments, reg.projectors.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(model_before, model.parameters()))
    # the model's step equals a vanilla step from the same state (its AdamW state included)
    model2, reg2, opt2, ema2 = build()
    training_step(model2, batch, path=get_path("linear"), optimizer=opt2, regularizer=reg2, ema=ema2,
                  ema_sources={"model": model2, "projectors": reg2.projectors}, reg_step=0)
    reg2.remove()
    training_step(model2, batch, path=get_path("linear"), optimizer=opt2, ema=ema2,
                  ema_sources={"model": model2, "projectors": reg2.projectors})
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))


# ---------------------------------------------------------------------------------------- flags


def _train_cfg(argv):
    from repa.sit.train import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args(argv))


@pytest.mark.parametrize("flag", ["--encoder", "--encoders", "--enc-type"])
def test_train_encoder_flag_and_its_aliases(flag):
    assert _train_cfg([flag, "dinov2-vit-s"]).enc_type == "dinov2-vit-s"


@pytest.mark.parametrize("flag", ["--encoder-weights", "--enc-weights"])
def test_train_encoder_weights_flag_and_its_alias(flag, tmp_path):
    assert _train_cfg([flag, str(tmp_path / "w.safetensors")]).enc_weights == str(tmp_path / "w.safetensors")


@pytest.mark.parametrize("flag", ["--out", "--output-dir"])
def test_train_out_flag_and_its_alias(flag, tmp_path):
    assert _train_cfg([flag, str(tmp_path / "runs")]).output_dir == str(tmp_path / "runs")


def test_train_keeps_the_reference_scripts_names():
    cfg = _train_cfg(["--proj-coeff", "0.7", "--encoder-depth", "3", "--enc-type", "dinov2-vit-b"])
    assert (cfg.proj_coeff, cfg.encoder_depth, cfg.enc_type) == (0.7, 3, "dinov2-vit-b")


def test_train_help_lists_the_aliases(capsys):
    from repa.sit.train import add_arguments

    parser = argparse.ArgumentParser(prog="repa train")
    add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in ("--encoder", "--encoders", "--enc-type", "--encoder-weights", "--enc-weights", "--out", "--output-dir"):
        assert flag in text


@pytest.mark.parametrize("flags", [["--model-weights", "model"], ["--weights", "model"]])
def test_sample_model_weights_flag_and_its_alias(flags, tmp_path):
    from repa.sit.sample import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--ckpt", "x.pt", *flags, "--out", str(tmp_path)])
    assert args.weights == "model" and args.output == str(tmp_path)
    assert parser.parse_args(["--ckpt", "x.pt", "--output", str(tmp_path)]).output == str(tmp_path)
    assert parser.parse_args(["--ckpt", "x.pt"]).weights == "ema"


# ---------------------------------------------------------------------------------------- benchmarks use the step


def test_overhead_benchmark_runs_the_librarys_step(monkeypatch):
    """Every arm of benchmarks/overhead.py (via _common) goes through training_step, clipping at 1.0 with EMA."""
    import sys
    from pathlib import Path

    import repa.sit.step as step_module

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import _common
    finally:
        sys.path.pop(0)
    calls = []
    real = step_module.training_step

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(step_module, "training_step", spy)
    torch.set_num_threads(1)
    cfg = _common.BenchConfig(model=_common.TINY_SIT, encoder=_common.TINY_ENCODER, batch_size=2, resolution=64,
                              projector_dim=16, device="cpu", dtype="fp32", warmup=0, repeats=1)
    bench = _common._Bench(cfg)
    shadow = [p.clone() for p in bench.ema["projectors"].parameters()]
    for arm in _common.ARMS:
        bench.step(arm)
    assert any(not torch.equal(a, b) for a, b in zip(shadow, bench.ema["projectors"].parameters()))
    assert len(calls) == len(_common.ARMS)
    assert all(c["max_grad_norm"] == 1.0 and c["ema"] is not None for c in calls)
    assert [c["regularizer"] is None for c in calls] == [arm == "vanilla" for arm in _common.ARMS]
