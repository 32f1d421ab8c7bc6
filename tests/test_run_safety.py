"""Never lose a run (issue 12): folder locks, resuming, signals to the process group, NaN losses,
`repa sample` output folders, and the log window across a resume.

Tiny SiTs on 16x16 synthetic images; the signal and lock checks run real processes in their own
process group (``start_new_session=True``) and send the signal to the whole group, as SLURM
preemption and ``kill -TERM -PGID`` do.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from repa._runlock import LOCK_NAME, FolderLock
from repa.cli import main as repa_main
from repa.errors import CheckpointError, FolderInUseError, NonFiniteLossError
from repa.sit.checkpoint import atomic_save, latest_checkpoint, list_checkpoints, load_checkpoint
from repa.sit.train import train
from sit_fixtures import TinyEncoder, read_log, subprocess_env, tiny_config, write_synthetic_idx


@pytest.fixture
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def idx_data(tmp_path):
    return write_synthetic_idx(tmp_path / "data", n=64)


def _strict_records(run_dir: Path):
    """log.jsonl parsed as strict JSON: a bare NaN / Infinity fails the test."""

    def refuse(token):
        raise AssertionError(f"log.jsonl holds the non-JSON constant {token}")

    return [json.loads(line, parse_constant=refuse) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def _tiny_json(tmp_path: Path, **extra) -> Path:
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"model": "SiT-T/4", "model_kwargs": {"depth": 2, "hidden_size": 32, "num_heads": 2},
                                  "batch_size": 16, "projector_dim": 32, "encoder_depth": 1, **extra}))
    return config


def _wait_for_log(proc: subprocess.Popen, log_file: Path, lines: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if log_file.exists() and len(log_file.read_text().splitlines()) >= lines:
            return
        time.sleep(0.2)
    out, err = proc.communicate(timeout=30) if proc.poll() is not None else ("", "")
    raise AssertionError(f"no {lines} log lines in time (exit {proc.poll()}):\n{err[-3000:]}")


# --------------------------------------------------------------------------------------------
# The folder lock
# --------------------------------------------------------------------------------------------


def test_a_locked_folder_is_refused_and_released(tmp_path):
    folder = tmp_path / "run"
    with FolderLock(folder, "first") as lock:
        record = json.loads((folder / LOCK_NAME).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        with pytest.raises(FolderInUseError, match=f"in use by process {os.getpid()} on host"):
            FolderLock(folder, "second").acquire()
        assert lock.held
    assert not (folder / LOCK_NAME).exists()
    assert not folder.exists()  # the lock made the folder and nothing was written: no trace left
    with FolderLock(folder, "again"):
        (folder / "kept.txt").write_text("x")
    assert (folder / "kept.txt").exists() and not (folder / LOCK_NAME).exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "then",
                                                "purpose": "repa train"}))
    with caplog.at_level(logging.WARNING, logger="repa"):
        with FolderLock(folder, "repa train"):
            assert json.loads((folder / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert "stale lock" in caplog.text and str(dead.pid) in caplog.text
    # a lock of another host cannot be checked from here: never taken over, the message says what to delete
    (folder / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": "elsewhere", "started": "then"}))
    with pytest.raises(FolderInUseError, match=f"on host 'elsewhere'.*delete '{folder / LOCK_NAME}'"):
        FolderLock(folder).acquire()


def test_train_refuses_a_folder_another_process_trains_in(tmp_path, idx_data, one_thread):
    cfg = tiny_config(idx_data, tmp_path / "runs", max_train_steps=2)
    with FolderLock(cfg.run_dir, "repa train"):  # as if another `repa train` ran there
        t0 = time.time()
        with pytest.raises(FolderInUseError, match="two processes must not write one folder"):
            train(cfg, encoders=[TinyEncoder()], progress=False)
        assert time.time() - t0 < 5  # refused at once, before any data or model is built
        assert not (cfg.run_dir / "log.jsonl").exists()
    assert train(cfg, encoders=[TinyEncoder()], progress=False).step == 2
    assert not (cfg.run_dir / LOCK_NAME).exists()  # released at the end


# --------------------------------------------------------------------------------------------
# Signals to the whole process group, with DataLoader workers; a second run is refused meanwhile
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_group_signal_with_workers_saves_exits_0_and_resumes(tmp_path, sig):
    data = write_synthetic_idx(tmp_path / "data", n=64)
    common = ["-m", "repa.cli", "train", "--config", str(_tiny_json(tmp_path)), "--data", str(data), "--no-repa",
              "--output-dir", str(tmp_path / "runs"), "--exp-name", "run", "--log-every", "1",
              "--checkpointing-steps", "100000", "--sample-every", "100000", "--no-progress", "--num-workers", "2"]
    proc = subprocess.Popen([sys.executable, *common, "--max-train-steps", "100000"], cwd=tmp_path,
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    run = tmp_path / "runs" / "run"
    try:
        _wait_for_log(proc, run / "log.jsonl", 3)
        if sig == signal.SIGTERM:  # meanwhile a second `repa train` on the folder refuses at once
            t0 = time.time()
            second = subprocess.run([sys.executable, *common, "--max-train-steps", "100000"], cwd=tmp_path,
                                    env=subprocess_env(), capture_output=True, text=True, timeout=120)
            assert second.returncode == 2, second.stderr
            assert f"error: FolderInUseError: '{run}' is in use by process {proc.pid}" in second.stderr
            assert "Traceback" not in second.stderr and time.time() - t0 < 60
        os.killpg(proc.pid, sig)  # the whole group: the main process and its DataLoader workers
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    assert f"stopped by {signal.Signals(sig).name}" in err and "--resume latest" in err
    assert "DataLoader worker" not in err
    stopped = load_checkpoint(latest_checkpoint(run))["step"]
    assert stopped == read_log(run)[-1]["step"] >= 3
    assert not (run / LOCK_NAME).exists()

    resumed = subprocess.run([sys.executable, *common, "--max-train-steps", str(stopped + 2), "--resume", "latest"],
                             cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["step"] for r in read_log(run)] == list(range(1, stopped + 3))
    assert load_checkpoint(latest_checkpoint(run))["step"] == stopped + 2


@pytest.mark.slow
@pytest.mark.distributed
def test_group_signal_under_torchrun_two_ranks_agree_save_and_resume(tmp_path):
    data = write_synthetic_idx(tmp_path / "data", n=64)
    common = ["--config", str(_tiny_json(tmp_path)), "--data", str(data), "--no-repa",
              "--output-dir", str(tmp_path / "runs"), "--exp-name", "ddp", "--log-every", "1",
              "--checkpointing-steps", "100000", "--sample-every", "100000", "--no-progress", "--num-workers", "1"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "repa.sit.train"]
    proc = subprocess.Popen([*torchrun, *common, "--max-train-steps", "100000"], cwd=tmp_path, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    run = tmp_path / "runs" / "ddp"
    try:
        _wait_for_log(proc, run / "log.jsonl", 3, timeout=180)
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    # both ranks stopped at the same step, saved together, and exited 0 (torchrun's own status
    # reflects that it was itself signalled, so the ranks' messages are checked instead)
    assert err.count("stopped by SIGTERM") == 1, err[-3000:]  # rank 0 reports for the job
    ckpt = load_checkpoint(latest_checkpoint(run))
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    assert ckpt["step"] == read_log(run)[-1]["step"] >= 3
    assert not (run / LOCK_NAME).exists()
    resumed = subprocess.run([*torchrun, *common, "--max-train-steps", str(ckpt["step"] + 2), "--resume", "latest"],
                             cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["step"] for r in read_log(run)] == list(range(1, ckpt["step"] + 3))


# --------------------------------------------------------------------------------------------
# Resuming from another run's checkpoint; changed settings on resume
# --------------------------------------------------------------------------------------------


def _files(folder: Path):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_resume_from_another_runs_checkpoint_never_touches_either_run(tmp_path, idx_data, one_thread):
    runs = tmp_path / "runs"
    train(tiny_config(idx_data, runs, exp_name="other", max_train_steps=4, checkpointing_steps=2),
          encoders=[TinyEncoder()], progress=False)
    train(tiny_config(idx_data, runs, exp_name="victim", max_train_steps=4, checkpointing_steps=2),
          encoders=[TinyEncoder()], progress=False)
    victim, other = _files(runs / "victim"), _files(runs / "other")
    foreign = runs / "other" / "checkpoints" / "0000002.pt"

    with pytest.raises(CheckpointError, match=r"another run .*already holds .*--resume latest.*--exp-name victim-from-other"):
        train(tiny_config(idx_data, runs, exp_name="victim", max_train_steps=6, resume=str(foreign)),
              encoders=[TinyEncoder()], progress=False)
    assert _files(runs / "victim") == victim  # nothing truncated, nothing overwritten

    # into a new folder: a new run that starts from that checkpoint and repeats the other run exactly
    result = train(tiny_config(idx_data, runs, exp_name="fork", max_train_steps=4, checkpointing_steps=2,
                               resume=str(foreign)), encoders=[TinyEncoder()], progress=False)
    assert result.step == 4 and _files(runs / "other") == other
    fork_log, other_log = read_log(runs / "fork"), read_log(runs / "other")
    assert [r["step"] for r in fork_log] == [3, 4]
    for a, b in zip(fork_log, other_log[2:]):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"]
    meta = json.loads((runs / "fork" / "config.json").read_text())
    assert meta["resumed_from"] == {"checkpoint": str(foreign), "step": 2}


def test_resume_applies_a_new_learning_rate_and_refuses_other_changes_in_one_message(tmp_path, idx_data, one_thread, caplog):
    runs = tmp_path / "runs"
    train(tiny_config(idx_data, runs, max_train_steps=2, checkpointing_steps=2), encoders=[TinyEncoder()], progress=False)
    with pytest.raises(CheckpointError) as info:
        train(tiny_config(idx_data, runs, max_train_steps=4, resume="latest", batch_size=32, adam_beta1=0.8,
                          model_kwargs={"depth": 3, "hidden_size": 32, "num_heads": 2}),
              encoders=[TinyEncoder()], progress=False)
    message = str(info.value)
    for diff in ("--batch-size: saved 16, given 32", "--adam-beta1: saved 0.9, given 0.8",
                 "--model-kwargs: saved {'depth': 2,", "3 setting(s) differ"):
        assert diff in message, message

    with caplog.at_level(logging.WARNING, logger="repa"):
        train(tiny_config(idx_data, runs, max_train_steps=4, checkpointing_steps=2, resume="latest", learning_rate=2.5e-4),
              encoders=[TinyEncoder()], progress=False)
    assert "--learning-rate changed from 0.001 (saved) to 0.00025" in caplog.text
    ckpt = load_checkpoint(runs / "run" / "checkpoints" / "0000004.pt")
    assert [g["lr"] for g in ckpt["optimizer"]["param_groups"]] == [2.5e-4]  # the optimizer uses it
    assert ckpt["config"]["learning_rate"] == 2.5e-4
    assert json.loads((runs / "run" / "config.json").read_text())["config"]["learning_rate"] == 2.5e-4
    assert [r["lr"] for r in read_log(runs / "run")] == [1e-3, 1e-3, 2.5e-4, 2.5e-4]


def test_a_learning_rate_applied_on_resume_drives_the_update(tmp_path, idx_data, one_thread):
    """Step 3 with lr 0 on resume leaves the weights as they were: the new rate reaches the optimizer."""
    runs = tmp_path / "runs"
    train(tiny_config(idx_data, runs, max_train_steps=2, checkpointing_steps=2, adam_weight_decay=0.0),
          encoders=[TinyEncoder()], progress=False)
    before = load_checkpoint(runs / "run" / "checkpoints" / "0000002.pt")["model"]
    train(tiny_config(idx_data, runs, max_train_steps=3, resume="latest", learning_rate=1e-12),
          encoders=[TinyEncoder()], progress=False)
    after = load_checkpoint(runs / "run" / "checkpoints" / "0000003.pt")["model"]
    # AdamW moves each weight by at most ~lr per step (|m_hat / sqrt(v_hat)| <= ~1 after bias correction)
    assert max((after[k] - before[k]).abs().max().item() for k in before) < 1e-10


# --------------------------------------------------------------------------------------------
# A loss that turns NaN / Inf
# --------------------------------------------------------------------------------------------


def test_a_nan_loss_stops_the_run_keeps_the_last_good_checkpoint_and_the_log_strict(tmp_path, idx_data, one_thread, monkeypatch):
    import repa.sit.train as train_module

    real_loss = train_module.velocity_loss
    calls = {"n": 0}

    def turns_nan_at_step_5(pred, target):
        calls["n"] += 1
        out = real_loss(pred, target)
        return out * float("nan") if calls["n"] == 5 else out

    monkeypatch.setattr(train_module, "velocity_loss", turns_nan_at_step_5)
    runs = tmp_path / "runs"
    cfg = tiny_config(idx_data, runs, max_train_steps=8, checkpointing_steps=2)
    with pytest.raises(NonFiniteLossError, match=r"training loss is nan at step 5.*0000004\.pt.*--resume latest"):
        train(cfg, encoders=[TinyEncoder()], progress=False)
    run = runs / "run"
    assert [p.name for p in list_checkpoints(run)] == ["0000002.pt", "0000004.pt"]  # the bad step is never saved
    records = _strict_records(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert records[-1]["loss"] is None and "non-finite loss" in records[-1]["error"]
    assert not (run / LOCK_NAME).exists()

    monkeypatch.setattr(train_module, "velocity_loss", real_loss)
    good = load_checkpoint(run / "checkpoints" / "0000004.pt")
    assert all(torch.isfinite(v).all() for v in good["model"].values())
    result = train(tiny_config(idx_data, runs, max_train_steps=8, checkpointing_steps=2, resume="latest"),
                   encoders=[TinyEncoder()], progress=False)
    assert result.step == 8 and [r["step"] for r in _strict_records(run)] == list(range(1, 9))


def test_the_cli_reports_a_nan_loss_in_one_line_with_a_nonzero_exit(tmp_path, idx_data, monkeypatch, capsys):
    import repa.sit.train as train_module

    monkeypatch.setattr(train_module, "velocity_loss", lambda pred, target: (pred - target).pow(2) * float("inf"))
    status = repa_main(["train", "--config", str(_tiny_json(tmp_path)), "--data", str(idx_data), "--no-repa",
                        "--output-dir", str(tmp_path / "runs"), "--exp-name", "run", "--max-train-steps", "3",
                        "--no-progress"])
    err = capsys.readouterr().err
    assert status == 2
    assert "error: NonFiniteLossError: the training loss is inf at step 1" in err and "Traceback" not in err
    assert latest_checkpoint(tmp_path / "runs" / "run") is None
    _strict_records(tmp_path / "runs" / "run")


# --------------------------------------------------------------------------------------------
# The log window across a resume
# --------------------------------------------------------------------------------------------


def test_the_first_log_record_after_a_resume_averages_the_whole_window(tmp_path, idx_data, one_thread):
    full = tiny_config(idx_data, tmp_path / "a", max_train_steps=8, log_every=4, checkpointing_steps=100)
    train(full, encoders=[TinyEncoder()], progress=False)
    # checkpoints every 2 steps, logs every 4: the checkpoint at step 2 lies between two log points
    part = tiny_config(idx_data, tmp_path / "b", max_train_steps=8, log_every=4, checkpointing_steps=2)
    train(part, encoders=[TinyEncoder()], progress=False)
    for later in list_checkpoints(tmp_path / "b" / "run")[1:]:  # as if the run had died after step 2
        later.unlink()
    train(tiny_config(idx_data, tmp_path / "b", max_train_steps=8, log_every=4, checkpointing_steps=100,
                      resume="latest"), encoders=[TinyEncoder()], progress=False)
    a, b = read_log(tmp_path / "a" / "run"), read_log(tmp_path / "b" / "run")
    assert [r["step"] for r in a] == [4, 8] and [r["step"] for r in b] == [4, 8]
    # per-step losses of the uninterrupted run, averaged by hand over steps 1..4
    for key in ("loss", "loss_denoise", "loss_align", "cos_sim", "grad_norm"):
        assert b[0][key] == pytest.approx(a[0][key], rel=1e-12, abs=1e-15), key
        assert b[1][key] == pytest.approx(a[1][key], rel=1e-12, abs=1e-15), key
    per_step = read_log_every_step(tmp_path, idx_data)
    assert a[0]["loss"] == pytest.approx(sum(r["loss"] for r in per_step[:4]) / 4, rel=1e-12)


def read_log_every_step(tmp_path: Path, idx_data: Path):
    train(tiny_config(idx_data, tmp_path / "c", max_train_steps=4, log_every=1), encoders=[TinyEncoder()], progress=False)
    return read_log(tmp_path / "c" / "run")


# --------------------------------------------------------------------------------------------
# `repa sample`: no stale results, a killed run resumes
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("sample")
    data = write_synthetic_idx(root / "data", n=64)
    train(tiny_config(data, root / "runs", max_train_steps=4), encoders=[TinyEncoder()], progress=False)
    torch.set_num_threads(previous)
    return latest_checkpoint(root / "runs" / "run")


def _sample(ckpt: Path, *extra: str) -> int:
    return repa_main(["sample", "--ckpt", str(ckpt), "--no-progress", "--num-samples", "4", "--steps", "2", *extra])


def test_the_default_sample_folder_names_every_setting_and_is_never_stale(checkpoint, capsys):
    eval_dir = checkpoint.parent.parent / "eval"
    base = ["--mode", "ode"]
    variants = [[], ["--seed", "1"], ["--weights", "model"], ["--solver", "heun"], ["--cfg-scale", "2"],
                ["--cfg-scale", "2", "--guidance-high", "1"], ["--classes", "balanced"], ["--steps", "3"],
                ["--mixed-precision", "bf16"], ["--num-samples", "5"]]
    folders = []
    for extra in variants:
        before = set(eval_dir.iterdir()) if eval_dir.exists() else set()
        assert _sample(checkpoint, *base, *extra) == 0
        new = set(eval_dir.iterdir()) - before
        assert len(new) == 1, (extra, new)  # every setting that changes the images gets its own folder
        folders.append(new.pop())
    arrays = [np.load(f / "samples.npz")["arr_0"] for f in folders]
    assert not np.array_equal(arrays[0], arrays[1])  # another seed, other images
    # the same settings again: the same folder, nothing added
    before = set(eval_dir.iterdir())
    assert _sample(checkpoint, *base) == 0 and set(eval_dir.iterdir()) == before
    name = folders[0].name
    assert name.startswith("0000004-") and "-ema-ode2-euler-cfg1-random-seed0-n4" in name
    settings = json.loads((folders[0] / "samples.json").read_text())
    import hashlib

    assert settings["checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert name.split("-")[1] == settings["checkpoint_sha256"][:8]


def test_an_output_folder_made_with_other_settings_is_refused(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    assert _sample(checkpoint, "--mode", "ode", "--output", str(out)) == 0
    capsys.readouterr()
    assert _sample(checkpoint, "--mode", "ode", "--output", str(out), "--seed", "3", "--cfg-scale", "1.5") == 2
    err = capsys.readouterr().err
    assert "error: ConfigError:" in err and "seed: 0 there, 3 now" in err and "cfg_scale: 1.0 there, 1.5 now" in err
    # another checkpoint (same run, other step) is another identity
    other = checkpoint.parent / "0000009.pt"
    ckpt = load_checkpoint(checkpoint)
    ckpt["step"] = 9
    atomic_save(ckpt, other)
    try:
        assert _sample(other, "--mode", "ode", "--output", str(out)) == 2
        assert "checkpoint_sha256: '" in capsys.readouterr().err
    finally:
        other.unlink()
    # images of unknown origin
    (tmp_path / "old" / "images").mkdir(parents=True)
    (tmp_path / "old" / "images" / "000000.png").write_bytes(b"x")
    assert _sample(checkpoint, "--mode", "ode", "--output", str(tmp_path / "old")) == 2
    assert "no samples.json" in capsys.readouterr().err
    # a folder another process writes
    with FolderLock(tmp_path / "busy"):
        assert _sample(checkpoint, "--mode", "ode", "--output", str(tmp_path / "busy")) == 2
    assert "FolderInUseError" in capsys.readouterr().err


@pytest.mark.slow
def test_a_killed_sampling_run_resumes_to_the_same_images(checkpoint, tmp_path):
    args = [sys.executable, "-m", "repa.cli", "sample", "--ckpt", str(checkpoint), "--no-progress", "--mode", "ode",
            "--steps", "400", "--num-samples", "12", "--per-proc-batch", "1"]
    out = tmp_path / "killed"
    proc = subprocess.Popen([*args, "--output", str(out)], env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (out / "images" / "000001.png").exists():
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    done = sorted(p.name for p in (out / "images").glob("*.png"))
    assert 2 <= len(done) < 12 and not (out / "samples.npz").exists(), done
    assert (out / LOCK_NAME).exists()  # the killed process could not release it
    finished = subprocess.run([*args, "--output", str(out)], env=subprocess_env(), capture_output=True, text=True,
                              timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "stale lock" in finished.stderr
    whole = subprocess.run([*args, "--output", str(tmp_path / "whole")], env=subprocess_env(), capture_output=True,
                           text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert np.array_equal(np.load(out / "samples.npz")["arr_0"], np.load(tmp_path / "whole" / "samples.npz")["arr_0"])


# --------------------------------------------------------------------------------------------
# OpenMP's wait policy: passive for the `repa` programs, untouched for a user's script
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "orig_argv, preset, expected",
    [
        (["python", "-m", "repa.cli", "train"], None, "PASSIVE"),  # `python -m repa.cli`, a torchrun rank
        (["python", "my_train.py"], None, "None"),  # a user's script importing repa: left alone
        (["python", "-m", "repa.sit.train"], "ACTIVE", "ACTIVE"),  # the user's choice wins
    ],
)
def test_the_repa_programs_wait_passively_unless_told_otherwise(orig_argv, preset, expected):
    code = (f"import sys; sys.argv = ['x']; sys.orig_argv = {orig_argv!r}; import repa, os; "
            "print(os.environ.get('OMP_WAIT_POLICY'))")
    env = {k: v for k, v in subprocess_env().items() if k != "OMP_WAIT_POLICY"}
    if preset is not None:
        env["OMP_WAIT_POLICY"] = preset
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected
