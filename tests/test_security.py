"""Specification of checkpoint safety: nothing in a checkpoint runs, failed writes lose nothing.

A crafted ``.pt`` whose pickle would write a marker file when unpickled is refused by
``load_checkpoint`` and by ``repa sample --ckpt``, ``repa probe --ckpt`` and ``repa train
--resume``, and the marker never appears. Checkpoints of ``repa train`` are read by plain
``torch.load(weights_only=True)``. A write that fails half-way (a file size limit, a full disk)
keeps earlier checkpoints, removes its temporary file and raises ``CheckpointWriteError``.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from repa.cli import main as repa_main
from repa.errors import CheckpointError, CheckpointWriteError, REPAError, UnsafeCheckpointError
from repa.sit.checkpoint import (
    CHECKPOINT_FORMAT,
    SETTINGS_KEYS,
    atomic_save,
    capture_rng_state,
    checkpoint_path,
    clean_stale_temp_files,
    convert_legacy_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from repa.sit.train import train
from sit_fixtures import TinyEncoder, read_log, subprocess_env, tiny_config, write_synthetic_idx


class WritesMarker:
    """Unpickling this object runs ``os.system("touch <marker>")``: what an attacker's file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def malicious_checkpoint(path: Path, marker: Path, raw_pickle: bool = False) -> Path:
    """A file that looks like a checkpoint of this version but runs code when fully unpickled."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": CHECKPOINT_FORMAT, "step": 5, "model_name": "SiT-T/4", "model": WritesMarker(marker)}
    if raw_pickle:  # the legacy (non-zip) torch format: a bare pickle stream
        path.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        torch.save(payload, str(path))
    return path


@pytest.fixture
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def idx_data(tmp_path):
    return write_synthetic_idx(tmp_path / "data", n=64)


# --------------------------------------------------------------------------------------------
# Loading never runs code
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw_pickle", [False, True], ids=["zip", "raw-pickle"])
def test_the_crafted_file_really_runs_code_when_fully_unpickled(tmp_path, raw_pickle):
    # the control: without weights_only the payload executes, so the refusals below are meaningful
    marker = tmp_path / "pwned"
    evil = malicious_checkpoint(tmp_path / "evil.pt", marker, raw_pickle)
    code = f"import torch; torch.load({str(evil)!r}, weights_only=False)"
    subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, timeout=120)
    assert marker.exists()  # (the raw pickle runs its payload, then fails torch's magic-number check)


@pytest.mark.parametrize("raw_pickle", [False, True], ids=["zip", "raw-pickle"])
def test_load_checkpoint_refuses_a_crafted_file_without_running_it(tmp_path, raw_pickle):
    marker = tmp_path / "pwned"
    evil = malicious_checkpoint(tmp_path / "run" / "checkpoints" / "0000005.pt", marker, raw_pickle)
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to load .*0000005\.pt.*posix\.system.*nothing in it was run"):
        load_checkpoint(evil)
    assert not marker.exists()


@pytest.mark.parametrize("raw_pickle", [False, True], ids=["zip", "raw-pickle"])
def test_repa_sample_and_probe_refuse_a_crafted_checkpoint(tmp_path, capsys, raw_pickle):
    marker = tmp_path / "pwned"
    evil = malicious_checkpoint(tmp_path / "run" / "checkpoints" / "0000005.pt", marker, raw_pickle)
    for argv in (
        ["sample", "--ckpt", str(evil), "--output", str(tmp_path / "out"), "--no-progress"],
        ["sample", "--ckpt", str(tmp_path / "run"), "--output", str(tmp_path / "out"), "--no-progress"],  # run folder
        ["probe", "--ckpt", str(evil), "--encoder", "fmnist-vit", "--no-pretrained", "--data", str(tmp_path),
         "--no-progress"],
    ):
        assert repa_main(argv) != 0, argv
        err = capsys.readouterr().err
        assert "refusing to load" in err and "0000005.pt" in err and "Traceback" not in err, err
        assert not marker.exists(), argv
    assert not (tmp_path / "out").exists()


def test_repa_train_resume_refuses_a_crafted_checkpoint(tmp_path, idx_data, capsys, one_thread):
    marker = tmp_path / "pwned"
    evil = malicious_checkpoint(tmp_path / "elsewhere" / "0000005.pt", marker)
    argv = ["train", "--data", str(idx_data), "--no-repa", "--model", "SiT-T/4",
            "--model-kwargs", '{"depth": 2, "hidden_size": 32, "num_heads": 2}', "--batch-size", "16",
            "--output-dir", str(tmp_path / "runs"), "--exp-name", "victim", "--max-train-steps", "2",
            "--resume", str(evil), "--no-progress"]  # fmt: skip
    assert repa_main(argv) != 0
    err = capsys.readouterr().err
    assert "refusing to load" in err and "convert_legacy_checkpoint" in err, err
    assert not marker.exists()
    assert list_checkpoints(tmp_path / "runs" / "victim") == []


def test_checkpoints_of_repa_train_are_plain_tensors_and_json(tmp_path, idx_data, one_thread):
    train(tiny_config(idx_data, tmp_path / "runs", max_train_steps=2), encoders=[TinyEncoder()], progress=False)
    path = latest_checkpoint(tmp_path / "runs" / "run")
    raw = torch.load(str(path), weights_only=True)  # the restricted unpickler: no class, no function
    assert raw["format"] == CHECKPOINT_FORMAT == "repa-sit-train/2"
    for key in SETTINGS_KEYS:
        assert isinstance(raw[key], str), key
    assert json.loads(raw["config"])["batch_size"] == 16
    assert json.loads(raw["regularizer_config"])["layers"] == ["blocks.0"]
    rng = raw["rng"][0]
    assert rng["python"]["state"].dtype == torch.int64 and rng["python"]["state"].shape == (625,)
    assert rng["numpy"]["keys"].shape == (624,) and rng["numpy"]["algorithm"] == "MT19937"

    ckpt = load_checkpoint(path)  # settings come back as the dicts the program wrote
    assert ckpt["config"]["batch_size"] == 16 and ckpt["model_kwargs"]["depth"] == 2
    assert ckpt["data"] == json.loads((tmp_path / "runs" / "run" / "config.json").read_text())["data"]


def test_rng_state_survives_the_safe_format_exactly(tmp_path):
    random.seed(3)
    random.gauss(0, 1)  # leaves a cached second normal (gauss_next) in the python state
    np.random.seed(4)
    np.random.randn()  # leaves a cached gaussian in the numpy state
    torch.manual_seed(5)
    state = capture_rng_state()
    expected = (random.random(), random.gauss(0, 1), np.random.randn(), np.random.rand(), torch.rand(3))
    path = tmp_path / "ckpt.pt"
    atomic_save({"rng": [state]}, path)
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    restore_rng_state(torch.load(str(path), weights_only=True)["rng"][0])
    got = (random.random(), random.gauss(0, 1), np.random.randn(), np.random.rand(), torch.rand(3))
    assert got[:4] == expected[:4] and torch.equal(got[4], expected[4])


def test_save_checkpoint_refuses_objects_the_safe_loader_could_not_read(tmp_path):
    target = tmp_path / "checkpoints" / "0000001.pt"
    with pytest.raises(CheckpointError, match=r"checkpoint entry optimizer\.state\.0\.step is a numpy\.float64"):
        save_checkpoint({"step": 1, "optimizer": {"state": {0: {"step": np.float64(3.0)}}}}, target)
    with pytest.raises(CheckpointError, match="'config' is not JSON-serializable"):
        save_checkpoint({"step": 1, "config": {"data": Path("x")}}, target)
    assert not target.parent.exists() or list(target.parent.iterdir()) == []  # nothing written


# --------------------------------------------------------------------------------------------
# Checkpoints of the previous release
# --------------------------------------------------------------------------------------------


def legacy_checkpoint(path: Path, model: torch.nn.Module) -> Path:
    """A checkpoint as repa 0.1 wrote it: settings as dicts, RNG states as tuples with a numpy array."""
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    obj = {
        "format": "repa-sit-train/1", "step": 3, "config": {"batch_size": 16}, "data": {"kind": "pixels"},
        "model_name": "toy", "model_kwargs": {}, "model": model.state_dict(), "ema": {},
        "rng": [{"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}],
    }  # fmt: skip
    torch.save(obj, str(path))
    return path


def test_a_legacy_checkpoint_is_refused_and_converts_without_full_unpickling(tmp_path):
    model = torch.nn.Linear(3, 2)
    old = legacy_checkpoint(tmp_path / "0000003.pt", model)
    with pytest.raises(UnsafeCheckpointError, match=r"numpy.*repa 0\.1.*convert_legacy_checkpoint\(src, dst\)"):
        load_checkpoint(old)
    with pytest.raises(CheckpointError, match="dst must differ from src"):
        convert_legacy_checkpoint(old, old)

    new = convert_legacy_checkpoint(old, tmp_path / "new.pt")
    ckpt = load_checkpoint(new)
    assert ckpt["format"] == CHECKPOINT_FORMAT and ckpt["step"] == 3 and ckpt["config"] == {"batch_size": 16}
    assert torch.equal(ckpt["model"]["weight"], model.weight)
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    expected = (random.random(), np.random.rand(), torch.rand(2))
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    restore_rng_state(ckpt["rng"][0])
    got = (random.random(), np.random.rand(), torch.rand(2))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


# --------------------------------------------------------------------------------------------
# Failed writes, leftovers of killed writes, incomplete checkpoints
# --------------------------------------------------------------------------------------------


def test_a_write_beyond_the_file_size_limit_keeps_the_earlier_checkpoint(tmp_path):
    # `ulimit -f`: the kernel refuses to grow the file (EFBIG) in the middle of torch.save
    script = textwrap.dedent(
        f"""
        import json, resource, torch
        from repa.errors import CheckpointWriteError, REPAError
        from repa.sit.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint

        run = {str(tmp_path / "run")!r}
        base = {{"model_name": "toy", "model_kwargs": {{}}, "data": {{}}, "config": {{}}, "ema": {{}}}}
        save_checkpoint({{**base, "step": 1, "model": {{"w": torch.zeros(1000)}}}}, checkpoint_path(run, 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
        try:
            save_checkpoint({{**base, "step": 2, "model": {{"w": torch.zeros(1_000_000)}}}}, checkpoint_path(run, 2))
            print(json.dumps({{"raised": None}}))
        except REPAError as exc:
            print(json.dumps({{"raised": type(exc).__name__, "oserror": isinstance(exc, OSError), "message": str(exc),
                              "step": load_checkpoint(checkpoint_path(run, 1))["step"]}}))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["raised"] == "CheckpointWriteError" and result["oserror"] and result["step"] == 1
    assert "0000002.pt" in result["message"] and "earlier checkpoints are kept" in result["message"]
    assert "--resume latest" in result["message"] and "file size limit (ulimit -f) 64 KiB" in result["message"]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["0000001.pt"]  # no temp file


def test_a_full_disk_during_training_raises_one_clear_error_and_keeps_the_run(tmp_path, idx_data, monkeypatch, capsys,
                                                                             one_thread):
    import errno

    import repa.sit.checkpoint as ckpt_module

    real_save = torch.save
    calls = {"n": 0}

    def disk_fills_up(obj, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint: half the bytes, then ENOSPC
            with open(path, "wb") as fh:
                fh.write(b"PK\x03\x04 half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(ckpt_module.torch, "save", disk_fills_up)
    cfg = tiny_config(idx_data, tmp_path / "runs", max_train_steps=8, checkpointing_steps=4)
    with pytest.raises(CheckpointWriteError, match=r"could not write .*0000008\.pt.*No space left on device.*earlier checkpoints are kept"):
        train(cfg, encoders=[TinyEncoder()], progress=False)
    run = tmp_path / "runs" / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["0000004.pt"]
    assert load_checkpoint(run / "checkpoints" / "0000004.pt")["step"] == 4

    calls["n"] = 1  # the command line: the same failure is one error line, no traceback
    argv = ["train", "--data", str(idx_data), "--no-repa", "--model", "SiT-T/4",
            "--model-kwargs", '{"depth": 2, "hidden_size": 32, "num_heads": 2}', "--batch-size", "16",
            "--output-dir", str(tmp_path / "cli"), "--exp-name", "run", "--max-train-steps", "2",
            "--checkpointing-steps", "2", "--no-progress"]  # fmt: skip
    assert repa_main(argv) != 0
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err, err
    assert list((tmp_path / "cli" / "run" / "checkpoints").iterdir()) == []


def test_leftovers_of_a_killed_write_are_cleaned_at_the_next_start(tmp_path, idx_data, caplog, one_thread):
    train(tiny_config(idx_data, tmp_path / "runs", max_train_steps=4, checkpointing_steps=4),
          encoders=[TinyEncoder()], progress=False)
    folder = tmp_path / "runs" / "run" / "checkpoints"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs: the writer was killed
    stale = folder / f".0000006.pt.tmp{dead.pid}"
    stale.write_bytes(b"PK\x03\x04 partial")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        in_progress = folder / f".0000006.pt.tmp{live.pid}"  # a write still running: kept
        in_progress.write_bytes(b"PK\x03\x04 partial")
        assert clean_stale_temp_files(tmp_path / "runs" / "run") == [stale]
        assert in_progress.exists() and not stale.exists()
    finally:
        live.kill()
        live.wait()
    stale.write_bytes(b"PK\x03\x04 partial")
    with caplog.at_level("WARNING", logger="repa"):
        train(tiny_config(idx_data, tmp_path / "runs", max_train_steps=8, checkpointing_steps=4, resume="latest"),
              encoders=[TinyEncoder()], progress=False)
    assert sorted(p.name for p in folder.iterdir()) == ["0000004.pt", "0000008.pt"]
    assert "removed 2 unfinished checkpoint write(s)" in caplog.text
    assert [r["step"] for r in read_log(tmp_path / "runs" / "run")] == list(range(1, 9))


def test_a_checkpoint_missing_entries_names_them(tmp_path, idx_data, capsys, one_thread):
    train(tiny_config(idx_data, tmp_path / "runs", max_train_steps=2, checkpointing_steps=2),
          encoders=[TinyEncoder()], progress=False)
    path = latest_checkpoint(tmp_path / "runs" / "run")
    ckpt = dict(load_checkpoint(path))
    del ckpt["optimizer"], ckpt["scaler"]
    save_checkpoint(ckpt, path)
    with pytest.raises(CheckpointError, match=r"0000002\.pt' has no entries 'optimizer', 'scaler'; .* use another checkpoint"):
        train(tiny_config(idx_data, tmp_path / "runs", max_train_steps=4, resume="latest"), encoders=[TinyEncoder()],
              progress=False)

    ckpt = dict(load_checkpoint(path))
    ckpt["rng"] = [{"python": {"version": 3}, "numpy": {}, "torch": ckpt["rng"][0]["torch"]}]
    ckpt["optimizer"], ckpt["scaler"] = {}, {}
    save_checkpoint({k: v for k, v in ckpt.items() if k != "ema"}, path)
    with pytest.raises(CheckpointError, match=r"has no entry 'ema'"):
        load_checkpoint(path)["ema"]
    assert repa_main(["sample", "--ckpt", str(path), "--output", str(tmp_path / "out"), "--no-progress"]) != 0
    assert "has no entry 'ema'" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="random-number state is incomplete or malformed"):
        restore_rng_state(load_checkpoint(path)["rng"][0])
    assert issubclass(CheckpointError, REPAError)


def test_every_load_path_of_the_package_is_safe():
    # the audit of issue 12, over the syntax tree of every module: torch.load only with
    # weights_only=True (the legacy converter included), np.load only with
    # allow_pickle=False, no pickle.load at all
    import ast

    root = Path(__file__).resolve().parents[1] / "src" / "repa"
    calls, offenders = [], []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            target = ast.unparse(node.func)
            if target not in ("torch.load", "np.load", "numpy.load", "pickle.load", "pickle.loads"):
                continue
            keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
            where = f"{path.relative_to(root)}:{node.lineno} {target}"
            calls.append(where)
            if target == "torch.load" and (keywords.get("weights_only") == "True"):
                continue
            if target.endswith("np.load") and keywords.get("allow_pickle") == "False":
                continue
            offenders.append(where)
    assert offenders == [] and len(calls) >= 8, (offenders, calls)


def test_a_loaded_checkpoint_saved_again_stays_safe_to_load(tmp_path):
    path = checkpoint_path(tmp_path, 1)
    save_checkpoint({"step": 1, "config": {"lr": 0.1}, "model": {"w": torch.ones(2)}}, path)
    again = tmp_path / "again.pt"
    torch.save(load_checkpoint(path), str(again))  # what a user editing a checkpoint by hand does
    raw = torch.load(str(again), weights_only=True)
    assert raw["config"] == {"lr": 0.1} and torch.equal(raw["model"]["w"], torch.ones(2))


def test_the_legacy_converter_refuses_a_crafted_file_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = malicious_checkpoint(tmp_path / "0000005.pt", marker)
    with pytest.raises(CheckpointError, match="nothing in it was run"):
        convert_legacy_checkpoint(path, tmp_path / "new.pt")
    assert not marker.exists() and not (tmp_path / "new.pt").exists()
