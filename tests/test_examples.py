"""The examples/ scripts run as users run them: offline, on CPU, as subprocesses.

With ``--tiny`` each one trains a few steps with random weights and prints the layers it hooked
and finite losses. Without ``--tiny`` they ask for DINOv2-B's weights, which are not on this
machine: they must stop with the WeightsNotFoundError and its fix, not a traceback. The
distributed ones are also run on 2 CPU processes (gloo) and must compute what one process
computes on the whole batch.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")  # the diffusers examples need the [diffusers] extra
pytest.importorskip("accelerate")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

# script -> the layers it says it aligns with --tiny (see each script's docstring)
HOOKED = {
    "custom_loop.py": ["blocks.3"],
    "timm_vit.py": ["blocks.3"],
    "diffusers_dit.py": ["transformer_blocks.1"],
    "diffusers_sd3.py": ["transformer_blocks.1"],
    "diffusers_flux.py": ["transformer_blocks.1"],
    "diffusers_unet.py": ["mid_block"],
    "diffusers_wan.py": ["blocks.1"],
    "accelerate_ddp.py": ["blocks.3"],
    "fsdp.py": ["blocks.3"],
}
STEP_LINE = re.compile(r"^step (\d+)/(\d+)\s+diffusion (\S+)\s+repa (\S+)", re.MULTILINE)
CHECKSUM = re.compile(r"projector checksum: (\S+)")


def _env(home: Path) -> Dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",  # several processes share 2 cores
        HF_HOME=str(home / "hf"),  # empty caches: no weights can be found
        HF_HUB_CACHE=str(home / "hf" / "hub"),
        TORCH_HOME=str(home / "torch"),
        REPA_HOME=str(home / "repa"),
    )
    return env


def run_example(script: str, *args: str, home: Path, nproc: Optional[int] = None) -> subprocess.CompletedProcess:
    path = str(EXAMPLES / script)
    if nproc is None:
        cmd = [sys.executable, path, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", path, *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(home), cwd=str(ROOT), timeout=300)


def step_losses(stdout: str) -> List[tuple]:
    return [(int(s), float(d), float(r)) for s, _, d, r in STEP_LINE.findall(stdout)]


def checksum(stdout: str) -> float:
    found = CHECKSUM.findall(stdout)
    assert found, f"no checksum line in:\n{stdout}"
    return float(found[-1])


def test_every_example_is_listed():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(HOOKED)


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(HOOKED))
def test_example_tiny_runs_offline_on_cpu(script, tmp_path):
    result = run_example(script, "--tiny", "--steps", "2", home=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"hooked layers: {HOOKED[script]}" in result.stdout
    losses = step_losses(result.stdout)
    assert [s for s, _, _ in losses] == [1, 2]
    assert all(math.isfinite(d) and math.isfinite(r) for _, d, r in losses)
    assert "Traceback" not in result.stderr


_RUN_ALL_WITHOUT_TINY = """
import runpy, sys
for script in sys.argv[1:]:
    sys.argv = [script, "--steps", "1"]
    print(f"=== {script}", file=sys.stderr, flush=True)
    try:
        runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as exc:
        code = exc.code
    print(f"=== exit {code}", file=sys.stderr, flush=True)
"""


@pytest.mark.slow
def test_examples_without_tiny_ask_for_the_encoder_weights(tmp_path):
    """Each script's own ``__main__`` runs (one interpreter for all of them, to share the imports)."""
    scripts = [str(EXAMPLES / name) for name in sorted(HOOKED)]
    result = subprocess.run(
        [sys.executable, "-c", _RUN_ALL_WITHOUT_TINY, *scripts],
        capture_output=True, text=True, env=_env(tmp_path), cwd=str(ROOT), timeout=600,
    )
    assert result.returncode == 0, result.stderr
    sections = re.findall(r"=== (\S+)\n(.*?)=== exit (\S+)\n", result.stderr, re.DOTALL)
    assert [Path(s).name for s, _, _ in sections] == sorted(HOOKED)
    for script, stderr, code in sections:
        name = Path(script).name
        assert code == "2", f"{name} exited {code}:\n{stderr}"
        assert "error: WeightsNotFoundError: no weights for encoder 'dinov2-vit-b'" in stderr, name
        assert "To fix:" in stderr, name
        assert "Traceback" not in stderr, name


@pytest.mark.slow
def test_custom_loop_checkpoint_holds_the_projectors(tmp_path):
    out = tmp_path / "run"
    result = run_example("custom_loop.py", "--tiny", "--steps", "1", "--out", str(out), home=tmp_path)
    assert result.returncode == 0, result.stderr
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert set(state) == {"model", "ema", "repa", "optimizer"}
    assert int(state["repa"]["step"]) == 1
    assert any(k.startswith("projectors.0.") for k in state["repa"])
    assert any(k.startswith("projectors.0.") for k in state["ema"])  # the EMA averages the projectors too


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name[:-3]}", EXAMPLES / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def plain_training(example, steps: int, weight) -> float:
    """The tiny distributed examples' run, in this process, without DDP or FSDP: the projector checksum.

    Uses the example's model class and global batches; the loop is written out here.
    """
    from repa import REPARegularizer, create_encoder

    torch.manual_seed(1234)
    encoder = create_encoder("dinov2-vit-s", pretrained=False, depth=1, resolution=64)
    torch.manual_seed(0)
    model = example.Denoiser(64, patch=16, dim=32, depth=12, heads=2)
    reg = REPARegularizer(model, layers="blocks.3", encoders=encoder, weight=weight)
    params = list(model.parameters()) + list(reg.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    for step in range(steps):
        images, noise, t = example.global_batch(step, 0, 4, 64)  # the whole global batch
        x = images * 2 - 1
        x_t = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * noise
        loss = F.mse_loss(model(x_t, t), noise - x) + reg(images)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    return float(sum(p.detach().double().sum() for p in reg.parameters()))


@pytest.mark.slow
@pytest.mark.distributed
def test_accelerate_two_processes_match_plain_training_and_survive_the_repa_stop(tmp_path):
    """REPA stops after step 1: the zero it returns must keep DDP from seeing unused parameters."""
    from repa import schedules

    two = run_example("accelerate_ddp.py", "--tiny", "--steps", "3", "--stop-repa-at", "1", home=tmp_path, nproc=2)
    assert two.returncode == 0, two.stdout + two.stderr
    assert "processes: 2" in two.stdout and "projectors in sync across 2 process(es)" in two.stdout
    assert [r for _, _, r in step_losses(two.stdout)][1:] == [0.0, 0.0]  # off from the 2nd step on
    expected = plain_training(_load_example("accelerate_ddp.py"), steps=3, weight=schedules.StopAt(0.5, 1))
    assert checksum(two.stdout) == pytest.approx(expected, rel=1e-6)


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp_two_processes_match_plain_unsharded_training(tmp_path):
    """FSDP2 on 2 gloo processes == the same 3 steps without any sharding, in this process."""
    two = run_example("fsdp.py", "--tiny", "--steps", "3", "--out", str(tmp_path / "out"), home=tmp_path, nproc=2)
    assert two.returncode == 0, two.stdout + two.stderr
    assert "processes: 2; FSDP2 on cpu" in two.stdout
    expected = plain_training(_load_example("fsdp.py"), steps=3, weight=0.5)
    assert checksum(two.stdout) == pytest.approx(expected, rel=1e-6)
    # reg.save_pretrained gathered the sharded projectors: the saved weights sum to the same checksum
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "out" / "repa" / "repa_projectors.safetensors"))
    assert int(saved.pop("step")) == 3  # the regularizer's step counter is saved with the projectors
    assert sum(float(v.double().sum()) for v in saved.values()) == pytest.approx(expected, rel=1e-6)
