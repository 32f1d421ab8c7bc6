"""Dispersive Loss (arXiv 2506.09027): formulas, gradients, schedules, save/load, DDP per-rank batch."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import repa.dispersive as dispersive_mod
from repa import DispersiveRegularizer, REPARegularizer, combine
from repa.dispersive import dispersive_loss
from repa.errors import CaptureError, ConfigError, StateDictError
from repa.schedules import StopAt
from tiny_models import ConvEncoder, TinyDiT, exit_spawned_worker


def _rows(z):
    return [[float(v) for v in row] for row in z.reshape(z.shape[0], -1)]


def _hand_infonce_l2(z, tau, by_dim=True):
    rows = _rows(z)
    b, d = len(rows), len(rows[0])
    acc = 0.0
    for i in range(b):
        for j in range(b):
            dist2 = sum((a - c) ** 2 for a, c in zip(rows[i], rows[j]))
            acc += math.exp(-(dist2 / d if by_dim else dist2) / tau)
    return math.log(acc / (b * b))


def _hand_infonce_cos(z, tau):
    rows = _rows(z)
    b = len(rows)
    acc = 0.0
    for i in range(b):
        for j in range(b):
            dot = sum(a * c for a, c in zip(rows[i], rows[j]))
            ni = math.sqrt(sum(a * a for a in rows[i]))
            nj = math.sqrt(sum(c * c for c in rows[j]))
            acc += math.exp(dot / (ni * nj) / tau)
    return math.log(acc / (b * b))


def _hand_hinge(z, margin):
    rows = _rows(z)
    b, d = len(rows), len(rows[0])
    terms = []
    for i in range(b):
        for j in range(b):
            if i != j:
                dist2 = sum((a - c) ** 2 for a, c in zip(rows[i], rows[j])) / d
                terms.append(max(0.0, margin - dist2) ** 2)
    return sum(terms) / len(terms)


def _hand_covariance(z):
    rows = _rows(z)
    b, d = len(rows), len(rows[0])
    rows = [[v / math.sqrt(sum(a * a for a in r)) for v in r] for r in rows]
    mean = [sum(r[m] for r in rows) / b for m in range(d)]
    total = 0.0
    for m in range(d):
        for n in range(d):
            if m != n:
                cov = sum((r[m] - mean[m]) * (r[n] - mean[n]) for r in rows) / (b - 1)
                total += cov * cov
    return total


def test_infonce_l2_matches_the_hand_formula():
    torch.manual_seed(0)
    z = torch.randn(5, 3, 4)  # (B, N, D) -> flattened to (5, 12)
    assert float(dispersive_loss(z, "infonce-l2", temperature=0.5)) == pytest.approx(_hand_infonce_l2(z, 0.5), rel=1e-5)
    assert float(dispersive_loss(z, "infonce-l2", temperature=1.0, normalize_by_dim=False)) == pytest.approx(
        _hand_infonce_l2(z, 1.0, by_dim=False), rel=1e-5
    )


def test_infonce_l2_hand_case_two_points():
    # two samples at squared distance 4 in D = 2: log((2 + 2 exp(-(4/2)/0.5)) / 4)
    z = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    expected = math.log((2 + 2 * math.exp(-4.0)) / 4)
    assert float(dispersive_loss(z, "infonce-l2", temperature=0.5)) == pytest.approx(expected, rel=1e-6)


def test_other_variants_match_their_hand_formulas():
    torch.manual_seed(1)
    z = torch.randn(4, 6)
    assert float(dispersive_loss(z, "infonce-cosine", temperature=0.5)) == pytest.approx(_hand_infonce_cos(z, 0.5), rel=1e-5)
    assert float(dispersive_loss(z, "hinge", margin=3.0)) == pytest.approx(_hand_hinge(z, 3.0), rel=1e-5)
    assert float(dispersive_loss(z, "covariance")) == pytest.approx(_hand_covariance(z), rel=1e-4)


def test_bad_arguments_are_named():
    model = TinyDiT(depth=2)
    with pytest.raises(ConfigError, match="variant='l3' is not a dispersive loss"):
        DispersiveRegularizer(model, 0, variant="l3")
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        DispersiveRegularizer(model, 0, temperature=0)
    disp = DispersiveRegularizer(model, 0)
    with pytest.raises(CaptureError, match="has not run since the last disp\\(\\) call"):
        disp()


def _captured(model, layer_index, x, t):
    box = {}
    handle = model.blocks[layer_index].register_forward_hook(lambda m, a, out: box.__setitem__("h", out))
    pred = model(x, t)
    handle.remove()
    return pred, box["h"]


def test_regularizer_returns_weight_times_the_loss_and_grads_stop_at_the_hooked_block():
    torch.manual_seed(0)
    model = TinyDiT(depth=3)
    disp = DispersiveRegularizer(model, layers=1, weight=0.5)
    assert list(disp.parameters()) == []  # no extra parameters
    x, t = torch.rand(4, 3, 16, 16), torch.rand(4)
    _, h = _captured(model, 1, x, t)
    out = disp(return_breakdown=True)
    assert out.weight == 0.5
    assert float(out.total.detach()) == pytest.approx(0.5 * _hand_infonce_l2(h.detach(), 0.5), rel=1e-5)
    out.total.backward()
    assert model.blocks[0].mlp[0].weight.grad is not None and model.blocks[1].mlp[0].weight.grad is not None
    assert model.blocks[2].mlp[0].weight.grad is None and model.out.weight.grad is None


def test_zero_weight_computes_nothing(monkeypatch):
    calls = []
    real = dispersive_mod.dispersive_loss
    monkeypatch.setattr(dispersive_mod, "dispersive_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = TinyDiT(depth=2)
    disp = DispersiveRegularizer(model, layers=0, weight=StopAt(0.5, 1))
    x, t = torch.rand(3, 3, 16, 16), torch.rand(3)
    model(x, t)
    assert float(disp().detach()) != 0.0 and len(calls) == 1
    model(x, t)
    zero = disp()
    assert float(zero) == 0.0 and len(calls) == 1  # the loss was not computed at weight 0
    assert disp.weight_at() == 0.0


def test_no_capture_under_no_grad_or_disabled():
    model = TinyDiT(depth=2)
    disp = DispersiveRegularizer(model, layers=0)
    with disp.disabled():
        model(torch.rand(2, 3, 16, 16), torch.rand(2))
    assert disp._captures == {}
    disp.remove()
    model(torch.rand(2, 3, 16, 16), torch.rand(2))
    assert disp._captures == {}


def test_save_load_round_trip(tmp_path):
    model = TinyDiT(depth=3)
    disp = DispersiveRegularizer(model, layers=[0, 2], weight=StopAt(0.25, 100), variant="hinge", margin=2.0)
    for _ in range(3):
        model(torch.rand(2, 3, 16, 16), torch.rand(2))
        disp()
    disp.save_pretrained(tmp_path / "disp")
    assert (tmp_path / "disp" / "dispersive_config.json").exists()
    disp.remove()
    back = DispersiveRegularizer.from_pretrained(tmp_path / "disp", model)
    assert back.layer_names == ["blocks.0", "blocks.2"] and back.variant == "hinge" and back.margin == 2.0
    assert back._step == 3 and back.weight_at(99) == 0.25 and back.weight_at(100) == 0.0
    with pytest.raises(StateDictError, match="missing keys \\['step'\\]"):
        back.load_state_dict({})
    with pytest.raises(StateDictError, match="no dispersive.safetensors"):
        DispersiveRegularizer.from_pretrained(tmp_path / "nothing", model)


def test_combines_with_repa_in_one_breakdown():
    torch.manual_seed(0)
    model = TinyDiT(depth=3)
    reg = REPARegularizer(model, layers=1, encoders=ConvEncoder(dim=8), projector_dim=16)
    disp = DispersiveRegularizer(model, layers=2, weight=0.25)
    x, t = torch.rand(4, 3, 16, 16), torch.rand(4)
    model(x, t)
    a, b = reg(x, return_breakdown=True), disp(return_breakdown=True)
    out = combine(repa=a, dispersive=b)
    assert float(out.total.detach()) == pytest.approx(float(a.total.detach()) + float(b.total.detach()))
    logs = out.logs()
    assert logs["repa/weight"] == 0.5 and logs["dispersive/weight"] == 0.25
    assert logs["dispersive/loss"] == pytest.approx(float(b.loss)) and "repa/cosine/blocks.1/convencoder" in logs
    with pytest.raises(ConfigError, match="needs at least one named term"):
        combine()


# ------------------------------------------------------------------------- DDP: each rank's batch

GLOBAL_BATCH = 8


def _data():
    g = torch.Generator().manual_seed(7)
    return torch.rand(GLOBAL_BATCH, 3, 16, 16, generator=g), torch.randn(GLOBAL_BATCH, 3, 16, 16, generator=g), torch.rand(
        GLOBAL_BATCH, generator=g
    )


def _build():
    torch.manual_seed(0)
    model = TinyDiT(depth=3)
    return model, DispersiveRegularizer(model, layers=1, weight=0.5)


def _loss(model_fwd, disp, x, noise, t):
    x_t = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * noise
    return F.mse_loss(model_fwd(x_t, t), noise - x) + disp()


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, disp = _build()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
        x, noise, t = (a.chunk(world)[rank] for a in _data())
        _loss(ddp, disp, x, noise, t).backward()
        opt.step()
        if rank == 0:
            torch.save(model.state_dict(), os.path.join(out_dir, "result.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    exit_spawned_worker()  # only after success: see tiny_models.exit_spawned_worker


def _reference(gathered: bool):
    """One process: the mean of the two halves' losses (per-rank batches), or one loss on the whole batch."""
    model, disp = _build()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x, noise, t = _data()
    if gathered:
        loss = _loss(model, disp, x, noise, t)
    else:
        loss = sum(_loss(model, disp, *(a.chunk(2)[r] for a in (x, noise, t))) for r in range(2)) / 2
    loss.backward()
    opt.step()
    return model.state_dict()


@pytest.mark.distributed
def test_ddp_uses_each_ranks_batch_like_the_paper(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    got = torch.load(tmp_path / "result.pt")
    per_rank, gathered = _reference(False), _reference(True)
    for key, value in per_rank.items():
        assert torch.allclose(got[key], value, atol=1e-6), key
    # and it is not the loss over the gathered global batch (the two differ measurably)
    assert any(not torch.allclose(got[k], gathered[k], atol=1e-5) for k in per_rank if "blocks.0" in k)
