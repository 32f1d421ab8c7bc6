"""Small data, encoders and configs shared by the tests of `repa train` / `repa sample`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch import nn

from repa.sit.configs import TrainConfig
from repa.sit.data import write_idx

SIZE = 16  # synthetic images are 16x16: SiT patch 4 -> 4x4 tokens
CLASSES = 4


def synthetic_images(n: int, seed: int = 0):
    """(n, 16, 16) uint8 images: class c is a bright horizontal band at rows 4c..4c+3 on a dark noisy field."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, n).astype(np.uint8)
    images = rng.integers(0, 40, (n, SIZE, SIZE)).astype(np.uint8)
    for i, c in enumerate(labels):
        images[i, 4 * c : 4 * c + 4, :] = 200 + rng.integers(0, 55)
    return images, labels


def write_synthetic_idx(root: Path, n: int = 128, seed: int = 0) -> Path:
    """An MNIST-format folder (gzipped IDX pair) of :func:`synthetic_images`."""
    images, labels = synthetic_images(n, seed)
    write_idx(root / "train-images-idx3-ubyte.gz", images)
    write_idx(root / "train-labels-idx1-ubyte.gz", labels)
    return root


class TinyEncoder(nn.Module):
    """A frozen-encoder stand-in following the encoder contract: (B, C, H, W) in [0, 1] -> (B, (H/4)(W/4), D)."""

    def __init__(self, in_chans: int = 1, dim: int = 16) -> None:
        super().__init__()
        torch.manual_seed(1234)
        self.name = "tiny-conv"
        self.embed_dim = dim
        self.patch_size = 4
        self.model = nn.Conv2d(in_chans, dim, 4, stride=4)
        self.eval().requires_grad_(False)

    def grid(self, image_size):
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        return (h // 4, w // 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).flatten(2).transpose(1, 2)  # (B, N, D)


TINY_SETTINGS: Dict[str, Any] = dict(
    model="SiT-T/4",
    model_kwargs={"depth": 2, "hidden_size": 32, "num_heads": 2},
    batch_size=16,
    learning_rate=1e-3,
    encoder_depth=1,
    projector_dim=32,
    log_every=1,
    checkpointing_steps=1000,
    sample_every=1000,
    sample_count=8,
    sample_steps=2,
    max_train_steps=10,
    ema_decay=0.9,
)


def tiny_config(data: Path, output_dir: Path, **overrides: Any) -> TrainConfig:
    """A TrainConfig for a ~0.1M-parameter SiT on :func:`write_synthetic_idx` data."""
    settings = {**TINY_SETTINGS, "data": str(data), "output_dir": str(output_dir), "exp_name": "run", **overrides}
    return TrainConfig(**settings).validate()


def read_log(run_dir: Path) -> List[Dict[str, Any]]:
    import json

    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def save_random_teacher(path: Path) -> Path:
    """Random-init weights of the registry's "fmnist-vit", saved where a test points the program at them."""
    from repa.encoders import create_encoder, save_encoder_weights

    torch.manual_seed(0)
    return save_encoder_weights(create_encoder("fmnist-vit", pretrained=False), path)


def subprocess_env(**extra: str) -> Dict[str, str]:
    """Environment for child processes: offline, one thread each (the test machine has 2 cores)."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def run_module(args: List[str], cwd: Path, timeout: float = 180, env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    """``python <args>`` in a child process; raises with its output if it fails."""
    proc = subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env or subprocess_env(), capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited with {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc
