"""REPARegularizer under DistributedDataParallel (2 CPU processes, gloo).

Two ways are supported and checked against one process on the same global batch:
(a) DDP(model) beside DDP(reg), (b) reg.attach_to(model) then DDP(model) alone.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from repa import REPARegularizer
from tiny_models import ConvEncoder, TinyDiT, exit_spawned_worker

pytestmark = pytest.mark.distributed

GLOBAL_BATCH = 4


def _data():
    g = torch.Generator().manual_seed(123)
    x = torch.rand(GLOBAL_BATCH, 3, 16, 16, generator=g)
    noise = torch.randn(GLOBAL_BATCH, 3, 16, 16, generator=g)
    t = torch.rand(GLOBAL_BATCH, generator=g)
    return x, noise, t


def _build():
    torch.manual_seed(0)
    model = TinyDiT(depth=3)
    enc = ConvEncoder(dim=8)
    reg = REPARegularizer(model, layers=1, encoders=enc, projector_dim=16)
    return model, reg


def _step(model_fwd, reg_call, x, noise, t, params):
    opt = torch.optim.SGD(params, lr=0.1)
    x_t = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * noise
    pred = model_fwd(x_t, t)
    loss = F.mse_loss(pred, noise - x) + reg_call(x)
    loss.backward()
    opt.step()


def _reference(mode):
    model, reg = _build()
    if mode == "attach":
        reg.attach_to(model)
        params = list(model.parameters())
    else:
        params = [*model.parameters(), *reg.parameters()]
    _step(model, reg, *_data(), params)
    return {k: v.clone() for k, v in model.state_dict().items()}, {k: v.clone() for k, v in reg.state_dict().items()}


def _worker(rank, world, init_file, mode, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, reg = _build()
        x, noise, t = (a.chunk(world)[rank] for a in _data())
        if mode == "attach":
            reg.attach_to(model)
            ddp_model = torch.nn.parallel.DistributedDataParallel(model)
            _step(ddp_model, reg, x, noise, t, list(ddp_model.parameters()))
        else:
            ddp_model = torch.nn.parallel.DistributedDataParallel(model)
            ddp_reg = torch.nn.parallel.DistributedDataParallel(reg)
            _step(ddp_model, ddp_reg, x, noise, t, [*ddp_model.parameters(), *ddp_reg.parameters()])
        if rank == 0:
            torch.save((model.state_dict(), reg.state_dict()), os.path.join(out_dir, "result.pt"))
        dist.barrier()  # no rank tears the group down while the other still talks to it
    finally:
        dist.destroy_process_group()
    exit_spawned_worker()  # only after success: see tiny_models.exit_spawned_worker


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["wrap-both", "attach"])
def test_ddp_two_processes_equal_one_process(tmp_path, mode):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), mode, str(tmp_path)), nprocs=2, join=True)
    ddp_model, ddp_reg = torch.load(tmp_path / "result.pt")
    ref_model, ref_reg = _reference(mode)
    for key, value in ref_model.items():
        assert torch.allclose(ddp_model[key], value, atol=1e-6), key
    for key, value in ref_reg.items():
        assert torch.allclose(ddp_reg[key], value, atol=1e-6), key
    # the step actually changed the projector (the comparison is not between untouched weights)
    _, fresh = _build()
    assert not torch.allclose(fresh.state_dict()["projectors.0.0.weight"], ref_reg["projectors.0.0.weight"])
