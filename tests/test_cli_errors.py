"""The `repa` command line ends every user error with one line `error: <Class>: <message>` and
exit status 2; a traceback only with `repa --debug` or `REPA_DEBUG=1` (issue 12, section 4)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from repa.cli import error_line
from repa.cli import main as repa_main
from repa.encoders import register_encoder
from repa.errors import CorruptImageError
from repa.sit.checkpoint import atomic_save, latest_checkpoint, load_checkpoint
from sit_fixtures import write_synthetic_idx


class _Patch(nn.Module):
    """normalized (B, 3, H, W) -> (B, 8, H/4, W/4)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, 8, 4, stride=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


register_encoder("test-cli-conv", embed_dim=8, patch_size=4, license="test", overwrite=True)(lambda spec, **kw: _Patch())


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.delenv("REPA_DEBUG", raising=False)
    yield
    torch.set_num_threads(before)


def _one_error_line(capsys, cls: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: {cls}: "), err
    assert "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def tiny_json(tmp_path) -> Path:
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"model": "SiT-T/4", "model_kwargs": {"depth": 2, "hidden_size": 32, "num_heads": 2},
                                  "batch_size": 8, "max_train_steps": 2, "log_every": 1, "sample_every": 1000}))
    return config


@pytest.fixture
def idx_data(tmp_path):
    return write_synthetic_idx(tmp_path / "data", n=32)


@pytest.fixture
def images_with_a_corrupt_png(tmp_path) -> Path:
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    good = (root / "b" / "3.png").read_bytes()
    (root / "b" / "3.png").write_bytes(good[: len(good) // 2])  # truncated half-way
    return root


def _train(tiny_json, data, out, *extra):
    return repa_main(["train", "--config", str(tiny_json), "--data", str(data), "--no-repa", "--output-dir", str(out),
                      "--exp-name", "run", "--no-progress", *extra])


# --------------------------------------------------------------------------------------------
# bad flags
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, cls, message",
    [
        (["--learning-rate", "nan"], "ConfigError", "--learning-rate must be a finite number, got nan"),
        (["--adam-beta1", "inf"], "ConfigError", "--adam-beta1 must be a finite number, got inf"),
        (["--model-kwargs", '{"bogus": 1}'], "ConfigError", "unknown SiT argument 'bogus'; valid keys are"),
        (["--model-kwargs", '{"depth": -1}'], "ConfigError", "depth must be a positive integer (number of blocks), got -1"),
        (["--model-kwargs", '{"hidden_size": 30, "num_heads": 4}'], "ConfigError", "not divisible by num_heads 4"),
    ],
)
def test_bad_flag_values_end_in_one_line_and_status_2(tiny_json, idx_data, tmp_path, capsys, flags, cls, message):
    assert _train(tiny_json, idx_data, tmp_path / "runs", *flags) == 2
    line = _one_error_line(capsys, cls)
    assert message in line and "1..0" not in line


def test_an_output_dir_that_is_a_file(tiny_json, idx_data, tmp_path, capsys):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    assert _train(tiny_json, idx_data, blocker) == 2
    assert f"'{blocker}' is a file, not a folder; pass another --output-dir" in _one_error_line(capsys, "ConfigError")


# --------------------------------------------------------------------------------------------
# corrupt images: train, cache, fd name the file; --skip-bad-images skips with a warning
# --------------------------------------------------------------------------------------------


def test_a_corrupt_png_is_named_by_train_and_skipped_on_request(tiny_json, images_with_a_corrupt_png, tmp_path, capsys):
    bad = images_with_a_corrupt_png / "b" / "3.png"
    for workers in ("0", "1"):  # in the main process, and re-raised from a DataLoader worker
        assert _train(tiny_json, images_with_a_corrupt_png, tmp_path / f"runs{workers}", "--resolution", "16",
                      "--num-workers", workers, "--batch-size", "15", "--max-train-steps", "3") == 2
        line = _one_error_line(capsys, "CorruptImageError")
        assert f"cannot decode the image '{bad}'" in line and "--skip-bad-images" in line
    assert _train(tiny_json, images_with_a_corrupt_png, tmp_path / "skip", "--resolution", "16", "--batch-size", "15",
                  "--max-train-steps", "3", "--skip-bad-images") == 0
    err = capsys.readouterr().err
    assert f"skipping the unreadable image {bad}" in err and "skipped 1 of 16 images" in err
    assert "(15 items)" in err


def test_a_corrupt_png_is_named_by_cache_and_fd(images_with_a_corrupt_png, tmp_path, capsys):
    bad = images_with_a_corrupt_png / "b" / "3.png"
    cache = ["cache", "--data", str(images_with_a_corrupt_png), "--encoders", "test-cli-conv", "--no-pretrained",
             "--resolution", "16", "--out", str(tmp_path / "cache"), "--num-workers", "0", "--no-progress"]
    assert repa_main(cache) == 2
    assert f"'{bad}'" in _one_error_line(capsys, "CorruptImageError")
    assert repa_main(cache[:-5] + ["--out", str(tmp_path / "cache2"), "--num-workers", "0", "--no-progress",
                                   "--skip-bad-images"]) == 0
    assert json.loads((tmp_path / "cache2" / "index.json").read_text())["count"] == 15

    fd = ["fd", "--encoder", "test-cli-conv", "--no-pretrained", "--no-progress", "--resolution", "16",
          "--samples", str(images_with_a_corrupt_png / "a"), "--ref", str(images_with_a_corrupt_png / "b")]
    capsys.readouterr()
    assert repa_main(fd) == 2
    assert f"'{bad}'" in _one_error_line(capsys, "CorruptImageError")
    assert repa_main(fd + ["--skip-bad-images"]) == 0
    assert "skipping the unreadable image" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# checkpoints: missing keys, a failed write
# --------------------------------------------------------------------------------------------


def test_a_checkpoint_missing_keys_is_named(tiny_json, idx_data, tmp_path, capsys):
    assert _train(tiny_json, idx_data, tmp_path / "runs") == 0
    path = latest_checkpoint(tmp_path / "runs" / "run")
    ckpt = load_checkpoint(path)
    del ckpt["optimizer"], ckpt["ema"]
    atomic_save(ckpt, path)
    capsys.readouterr()
    assert _train(tiny_json, idx_data, tmp_path / "runs", "--resume", "latest", "--max-train-steps", "4") == 2
    line = _one_error_line(capsys, "CheckpointError")
    assert "has no entries 'ema', 'optimizer'" in line and str(path) in line
    assert repa_main(["sample", "--ckpt", str(path), "--num-samples", "2", "--steps", "1", "--no-progress"]) == 2
    line = _one_error_line(capsys, "CheckpointError")
    assert "has no entr" in line and "'ema'" in line


def test_a_failed_checkpoint_write_ends_in_one_line_and_keeps_the_earlier_one(tiny_json, idx_data, tmp_path, capsys,
                                                                                  monkeypatch):
    import repa.sit.checkpoint as ckpt_module

    real_save = torch.save
    calls = {"n": 0}

    def disk_full_on_second(obj, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            with open(path, "wb") as fh:
                fh.write(b"PK\x03\x04 half")
            raise OSError(28, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(ckpt_module.torch, "save", disk_full_on_second)
    assert _train(tiny_json, idx_data, tmp_path / "runs", "--max-train-steps", "4", "--checkpointing-steps", "2") == 2
    line = _one_error_line(capsys, "CheckpointWriteError")
    assert "could not write" in line and "No space left on device" in line and "--resume latest" in line
    run = tmp_path / "runs" / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["0000002.pt"]
    assert load_checkpoint(run / "checkpoints" / "0000002.pt")["step"] == 2


# --------------------------------------------------------------------------------------------
# --debug / REPA_DEBUG show the traceback; the one-line form of worker errors
# --------------------------------------------------------------------------------------------


def test_debug_shows_the_traceback(tiny_json, idx_data, tmp_path, capsys, monkeypatch):
    argv = ["train", "--config", str(tiny_json), "--data", str(idx_data), "--learning-rate", "nan"]
    assert repa_main(["--debug", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.rstrip().endswith("got nan")
    monkeypatch.setenv("REPA_DEBUG", "1")
    assert repa_main(argv) == 2
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_a_worker_error_is_reduced_to_its_original_message():
    wrapped = CorruptImageError(
        "Caught CorruptImageError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\n    raise\nrepa.errors.CorruptImageError: cannot decode the image \'a.png\' (x)\n'
    )
    assert error_line(wrapped) == "error: CorruptImageError: cannot decode the image 'a.png' (x)"


def test_status_messages_reach_the_command_line_but_not_a_library_user():
    """`repa.cli.main` shows the `repa` logger's INFO on stderr; a plain `import repa` prints nothing."""
    import subprocess
    import sys

    code = (
        "import logging, repa, repa.cli as cli;"
        "logging.getLogger('repa').info('quiet for a library user');"
        "cli.run_command(lambda: logging.getLogger('repa').info('status %d', 7) or 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == ["repa: status 7"]
    assert done.stdout == ""


def test_an_unmatched_encoder_pattern_is_a_status_line(capsys):
    assert repa_main(["encoders", "no-such-encoder-xyz"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "repa: no encoder matches 'no-such-encoder-xyz'" in captured.err
