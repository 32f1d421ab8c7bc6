"""SRA (arXiv 2505.02831): the loss, which parameters learn, the skipped teacher, save/load, DDP."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from repa import DispersiveRegularizer, SelfAlignmentRegularizer, combine
from repa.errors import CaptureError, ConfigError
from repa.schedules import StopAt
from tiny_models import TinyDiT, exit_spawned_worker


def _pair(seed=0, depth=4):
    torch.manual_seed(seed)
    model = TinyDiT(depth=depth)
    ema = copy.deepcopy(model)
    with torch.no_grad():  # a teacher that differs from the student, as after some EMA steps
        for p in ema.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, ema


def _hand_smooth_l1(a, b, beta):
    d = (a - b).abs()
    return torch.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta).mean()


def _inputs(b=4):
    g = torch.Generator().manual_seed(3)
    x, noise, t = torch.rand(b, 3, 16, 16, generator=g), torch.randn(b, 3, 16, 16, generator=g), torch.rand(b, generator=g)
    return x, noise, t


def _lerp(x, noise, t):
    return (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * noise


def test_loss_matches_the_hand_formula_and_only_student_and_projector_learn():
    model, ema = _pair()
    sra = SelfAlignmentRegularizer(model, ema, student_layer=1, teacher_layer=3)
    assert sra.weight_at() == 0.2 and sra.max_gap == 0.2
    x, noise, t = _inputs()
    t_lo = sra.teacher_time(t, generator=torch.Generator().manual_seed(0))
    box = {}
    h = model.blocks[1].register_forward_hook(lambda m, a, out: box.__setitem__("s", out))
    model(_lerp(x, noise, t), t)
    h.remove()
    out = sra(_lerp(x, noise, t_lo), t_lo, return_breakdown=True)
    # independent: run the teacher by hand
    with torch.no_grad():
        h = ema.blocks[3].register_forward_hook(lambda m, a, o: box.__setitem__("t", o))
        ema(_lerp(x, noise, t_lo), t_lo)
        h.remove()
        p = sra.projector
        proj = p[2](F.silu(p[0](box["s"])))  # Linear(D, D + D_t) -> SiLU -> Linear
        expected = 0.2 * _hand_smooth_l1(proj, box["t"], 0.05)
    assert float(out.total.detach()) == pytest.approx(float(expected), rel=1e-5)
    assert p[0].weight.shape == (64, 32)  # D + D_t = 64 hidden

    ema_before = {k: v.clone() for k, v in ema.state_dict().items()}
    opt = torch.optim.SGD([*model.parameters(), *sra.parameters()], lr=0.1)
    out.total.backward()
    assert all(not q.requires_grad and q.grad is None for q in ema.parameters())  # teacher frozen
    assert sra.projector[0].weight.grad is not None and model.blocks[1].mlp[0].weight.grad is not None
    assert model.blocks[2].mlp[0].weight.grad is None and model.blocks[3].mlp[0].weight.grad is None
    opt.step()
    assert all(torch.equal(v, ema.state_dict()[k]) for k, v in ema_before.items())  # untouched by the optimizer
    assert not any(q is e for q in sra.parameters() for e in ema.parameters())
    assert set(sra.state_dict()) == {"step", *(f"projector.{k}" for k in sra.projector.state_dict())}


def test_teacher_time_is_a_lower_noise_level_within_the_gap():
    model, ema = _pair()
    sra = SelfAlignmentRegularizer(model, ema, 0, 1, max_gap=0.2)
    t = torch.tensor([0.0, 0.05, 0.5, 1.0] * 50)
    lo = sra.teacher_time(t, generator=torch.Generator().manual_seed(1))
    assert (lo <= t).all() and (lo >= (t - 0.2).clamp(min=0) - 1e-7).all() and (lo >= 0).all()
    assert (t - lo).max() > 0.15  # the draw is uniform over the whole gap


def test_zero_weight_skips_the_teacher_forward():
    model, ema = _pair()
    calls = []
    ema.register_forward_pre_hook(lambda m, a: calls.append(1))
    sra = SelfAlignmentRegularizer(model, ema, 1, 2, weight=StopAt(0.2, 2))
    x, noise, t = _inputs()
    for step in range(4):
        model(_lerp(x, noise, t), t)
        out = sra(_lerp(x, noise, t), t)
        if step >= 2:
            assert float(out.detach()) == 0.0
    assert len(calls) == 2 and sra.teacher_calls == 2  # only the two steps with weight > 0
    out.backward()  # the zero touches the projector: DDP sees no unused parameter
    assert all(p.grad is not None for p in sra.parameters())


def test_student_captures_and_errors():
    model, ema = _pair()
    with pytest.raises(ConfigError, match="ema_model is the student model itself"):
        SelfAlignmentRegularizer(model, model, 0, 1)
    sra = SelfAlignmentRegularizer(model, ema, 0, 1)
    x, noise, t = _inputs()
    with pytest.raises(CaptureError, match="has not run since the last sra\\(\\) call"):
        sra(x, t)
    model(x, t)
    with pytest.raises(ConfigError, match="needs the teacher's inputs"):
        sra()
    # a deep copy of the hooked student (a new EMA) carries inert hooks
    copy.deepcopy(model)(x, t)
    assert sra._captures == {}


def test_save_load_round_trip(tmp_path):
    model, ema = _pair()
    sra = SelfAlignmentRegularizer(model, ema, 1, 3, loss="cosine", weight=0.5, max_gap=0.1)
    x, noise, t = _inputs()
    model(x, t)
    sra(x, t)
    sra.save_pretrained(tmp_path / "sra")
    sra.remove()
    back = SelfAlignmentRegularizer.from_pretrained(tmp_path / "sra", model, ema)
    assert back._step == 1 and back.max_gap == 0.1 and back.student_layer == "blocks.1" and back.teacher_layer == "blocks.3"
    for k, v in sra.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)


def test_combines_with_dispersive():
    model, ema = _pair()
    sra = SelfAlignmentRegularizer(model, ema, 1, 3)
    disp = DispersiveRegularizer(model, 1)
    x, noise, t = _inputs()
    model(x, t)
    out = combine(sra=sra(x, t, return_breakdown=True), dispersive=disp(return_breakdown=True))
    assert set(out.losses) == {"sra", "dispersive"} and "sra/cosine" in out.metrics


# ----------------------------------------------------------------------------- DDP

def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, ema = _pair(depth=3)
        sra = SelfAlignmentRegularizer(model, ema, 0, 2)
        ddp_model, ddp_sra = torch.nn.parallel.DistributedDataParallel(model), torch.nn.parallel.DistributedDataParallel(sra)
        x, noise, t = (a.chunk(world)[rank] for a in _inputs(8))
        opt = torch.optim.SGD([*ddp_model.parameters(), *ddp_sra.parameters()], lr=0.5)
        loss = F.mse_loss(ddp_model(_lerp(x, noise, t), t), noise - x) + ddp_sra(_lerp(x, noise, t * 0.9), t * 0.9)
        loss.backward()
        opt.step()
        if rank == 0:
            torch.save((model.state_dict(), sra.state_dict()), os.path.join(out_dir, "result.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    exit_spawned_worker()  # only after success: see tiny_models.exit_spawned_worker


@pytest.mark.distributed
def test_ddp_two_processes_equal_one_process(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    got_model, got_sra = torch.load(tmp_path / "result.pt")
    model, ema = _pair(depth=3)
    sra = SelfAlignmentRegularizer(model, ema, 0, 2)
    fresh = copy.deepcopy(sra.state_dict())
    x, noise, t = _inputs(8)
    opt = torch.optim.SGD([*model.parameters(), *sra.parameters()], lr=0.5)
    loss = F.mse_loss(model(_lerp(x, noise, t), t), noise - x) + sra(_lerp(x, noise, t * 0.9), t * 0.9)
    loss.backward()
    opt.step()
    for k, v in model.state_dict().items():
        assert torch.allclose(got_model[k], v, atol=1e-6), k
    for k, v in sra.state_dict().items():
        assert torch.allclose(got_sra[k], v, atol=1e-6), k
    assert not torch.allclose(fresh["projector.0.weight"], sra.state_dict()["projector.0.weight"])
