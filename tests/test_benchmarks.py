"""The benchmark scripts run end to end in their tiny modes and report consistent numbers.

``benchmarks/overhead.py`` and ``benchmarks/gpu_benchmark.py`` run as subprocesses on CPU
with a tiny SiT and a tiny encoder. Timings are never asserted; what is checked: every arm is
there with finite positive times, the ratios are computed from the reported medians, and the
counted FLOPs equal hand-written formulas of the tiny networks.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
ARMS = ("vanilla", "online", "cached", "stopped")
ARMS_CONV = ("vanilla", "repa", "repa-stop", "random-teacher")

# the tiny pair (benchmarks/_common.py): SiT width 64, depth 2, patch 2 on 64/8 = 8x8x4 latents
# -> 16 tokens; ViT width 32, depth 2, MLP 64, patch 14 on 56 px (224/256 of 64) -> 16 patches + CLS
TINY_ARGS = ["--tiny", "--batch-size", "4", "--repeats", "3", "--projector-dim", "64", "--no-progress"]
SIT = dict(width=64, depth=2, tokens=16, patch=2, channels=4)
VIT = dict(width=32, depth=2, mlp=64, patches=16, patch=14, prefix=1)
PROJECTOR_HIDDEN = 64


def _run(script: str, args: List[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def overhead(tmp_path_factory) -> Dict[str, Any]:
    out = tmp_path_factory.mktemp("overhead")
    proc = _run("overhead.py", [*TINY_ARGS, "--peak-tflops", "2", "--json", str(out / "r.json")], out)
    return {"json": json.loads((out / "r.json").read_text()), "stdout": proc.stdout}


@pytest.fixture(scope="module")
def gpu_tiny(tmp_path_factory) -> Dict[str, Any]:
    out = tmp_path_factory.mktemp("gpu")
    # the eager backend path of torch.compile keeps the compiled mode to seconds on CPU
    proc = _run("gpu_benchmark.py", ["--tiny", "--compile-backend", "aot_eager", "--no-progress", "--json", str(out / "g.json")], out)
    return {"json": json.loads((out / "g.json").read_text()), "stdout": proc.stdout}


def _check_arms(result: Dict[str, Any], repeats: int) -> None:
    arms = result["arms"]
    assert set(arms) == set(ARMS)
    batch = result["config"]["batch_size"]
    for arm in ARMS:
        a = arms[arm]
        times = a["times_s"]
        assert len(times) == repeats
        assert all(math.isfinite(t) and t > 0 for t in times)
        assert a["median_s"] == pytest.approx(statistics.median(times))
        assert a["images_per_s"] == pytest.approx(batch / a["median_s"])
        # the ratio is recomputed from the JSON's own medians
        assert a["ratio_to_vanilla"] == pytest.approx(a["median_s"] / arms["vanilla"]["median_s"])
        assert a["measured_over_expected"] == pytest.approx(a["ratio_to_vanilla"] / a["expected_ratio"])
    assert arms["vanilla"]["ratio_to_vanilla"] == 1.0


# ------------------------------------------------------------------------ overhead.py


def test_overhead_reports_every_arm_with_ratios_from_its_medians(overhead):
    _check_arms(overhead["json"], repeats=3)
    cached = overhead["json"]["arms"]["cached"]
    vanilla = overhead["json"]["arms"]["vanilla"]
    assert cached["ratio_to_vanilla"] == pytest.approx(cached["median_s"] / vanilla["median_s"])


def test_overhead_prints_command_and_markdown_table(overhead):
    out = overhead["stdout"]
    first = out.splitlines()[0]
    assert first.startswith("Command: python ") and "overhead.py --tiny" in first
    assert "Resolved: python " in out and "--model tiny-sit" in out and "--encoder tiny-vit" in out
    assert "| arm | median step (s) | IQR (s) | images/s | peak mem (MiB) | ratio to vanilla |" in out
    for label in ("| vanilla |", "| REPA, online encoder |", "| REPA, cached features |", "| REPA, stopped (weight 0) |"):
        assert label in out
    assert overhead["json"]["command"].startswith("python ")


def _sit_step_flops(width: int, depth: int, tokens: int, patch: int, channels: int, freq: int = 256) -> float:
    """FLOPs of one SiT forward + backward per image, from the architecture (2 FLOPs per MAC).

    Forward MACs: patch conv N*C*p*p*D; time MLP 256*D + D*D; per block adaLN 6*D*D (per image),
    qkv 3*N*D*D, out proj N*D*D, MLP 2*N*D*4D, attention 2*N*N*D (QK^T and AV); final adaLN
    2*D*D and linear N*D*p*p*C. Backward: each layer computes input and weight gradients (2x),
    except the patch conv (x_t needs no gradient) and the first time-MLP layer (sinusoid
    features): weight gradient only; attention backward is 2.5x its forward (scores recomputed).
    """
    d, n = width, tokens
    patch_embed = n * channels * patch * patch * d
    t1, t2 = freq * d, d * d
    block = 6 * d * d + n * (3 * d * d + d * d + 2 * d * 4 * d)
    attention = 2 * n * n * d
    final = 2 * d * d + n * d * patch * patch * channels
    forward = patch_embed + t1 + t2 + depth * (block + attention) + final
    backward = patch_embed + t1 + 2 * t2 + depth * (2 * block + 2.5 * attention) + 2 * final
    return 2.0 * (forward + backward)


def _vit_forward_flops(width: int, depth: int, mlp: int, patches: int, patch: int, prefix: int) -> float:
    """FLOPs of one ViT forward per image: patch embedding, then per block qkv + proj + MLP + attention."""
    t = patches + prefix
    embed = patches * 3 * patch * patch * width
    block = t * (4 * width * width + 2 * width * mlp) + 2 * t * t * width
    return 2.0 * (embed + depth * block)


def test_counted_flops_match_the_architectures(overhead):
    flops = overhead["json"]["flops_per_image"]
    assert flops["step"] == pytest.approx(_sit_step_flops(**SIT))
    assert flops["encoder"] == pytest.approx(_vit_forward_flops(**VIT))
    # MLP projector D -> h -> h -> D_e on every token, forward + backward (input and weight grads)
    d, h, de, n = SIT["width"], PROJECTOR_HIDDEN, VIT["width"], SIT["tokens"]
    assert flops["projector"] == pytest.approx(2 * 3 * n * (d * h + h * h + h * de))


def test_expected_ratios_and_mfu_follow_the_counts(overhead):
    r = overhead["json"]
    f, arms, batch = r["flops_per_image"], r["arms"], r["config"]["batch_size"]
    step, enc, proj = f["step"], f["encoder"], f["projector"]
    assert arms["online"]["expected_ratio"] == pytest.approx((step + enc + proj) / step)
    assert arms["cached"]["expected_ratio"] == pytest.approx((step + proj) / step)
    assert arms["stopped"]["expected_ratio"] == 1.0
    assert arms["online"]["flops_per_step"] == pytest.approx((step + enc + proj) * batch)
    for arm in ARMS:  # --peak-tflops 2
        a = arms[arm]
        assert a["mfu"] == pytest.approx(a["flops_per_step"] / a["median_s"] / 2e12)


def test_overhead_records_memory_and_environment(overhead):
    r = overhead["json"]
    assert r["memory_measure"].startswith("CPU:")
    for arm in ARMS:
        peak = r["arms"][arm]["peak_mem_mib"]
        assert peak is None or (math.isfinite(peak) and peak >= 0)
    assert r["environment"]["torch"] == torch.__version__
    assert r["layer"] == "blocks.1"  # depth-2 tiny SiT: encoder depth 4 clipped to the last block


def test_overhead_rejects_bad_options(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(BENCH / "overhead.py"), "--tiny", "--resolution", "60"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert "--resolution 60 must be a multiple of 8" in proc.stderr


# ------------------------------------------------------------------------ gpu_benchmark.py


@pytest.mark.slow
def test_gpu_benchmark_tiny_runs_compile_off_and_on(gpu_tiny):
    data = gpu_tiny["json"]
    runs = data["runs"]
    assert [(r["config"]["model"], r["config"]["compile"]) for r in runs] == [("tiny-sit", False), ("tiny-sit", True)]
    assert data["skipped"] == [] and data["oom"] == []
    for run in runs:
        assert run["config"]["dtype"] == "bf16"
        _check_arms(run, repeats=run["config"]["repeats"])
        online, vanilla = run["arms"]["online"], run["arms"]["vanilla"]
        assert online["ratio_to_vanilla"] == pytest.approx(online["median_s"] / vanilla["median_s"])
    assert data["peak_flops"] is None  # CPU: no peak, so no MFU
    assert all(run["arms"][arm]["mfu"] is None for run in runs for arm in ARMS)


def test_gpu_benchmark_prints_summary_table(gpu_tiny):
    out = gpu_tiny["stdout"]
    assert out.splitlines()[0].startswith("Command: python ")
    assert "## Summary" in out
    assert "| model | batch | compile | vanilla img/s | vanilla MFU |" in out
    assert "| tiny-sit | 4 | off |" in out and "| tiny-sit | 4 | on |" in out


@pytest.fixture()
def gpu_module(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import gpu_benchmark

    return gpu_benchmark


def test_batch_falls_back_when_memory_runs_out(gpu_module):
    import _common

    cfg = _common.BenchConfig(model="SiT-XL/2", batch_size=256)
    tried = []

    def measure(c):
        tried.append(c.batch_size)
        if c.batch_size > 128:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return {"batch": c.batch_size}

    result, failures = gpu_module.run_with_fallback(cfg, (256, 128), measure, log=lambda s: None)
    assert tried == [256, 128]
    assert result == {"batch": 128}
    assert failures == [{"batch_size": 256, "error": "CUDA out of memory. Tried to allocate 2.00 GiB"}]

    def never_fits(c):
        raise torch.OutOfMemoryError("CUDA out of memory")

    assert gpu_module.run_with_fallback(cfg, (256, 128), never_fits, log=lambda s: None)[0] is None


def test_other_errors_are_not_taken_for_out_of_memory(gpu_module):
    import _common

    def broken(c):
        raise ValueError("shape mismatch")

    with pytest.raises(ValueError, match="shape mismatch"):
        gpu_module.run_with_fallback(_common.BenchConfig(), (4, 2), broken, log=lambda s: None)
    wrapped = RuntimeError("backend compiler failed")
    wrapped.__cause__ = torch.OutOfMemoryError("CUDA out of memory")
    assert gpu_module.is_out_of_memory(wrapped)


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA GeForce RTX 3090", None),
    ],
)
def test_peak_flops_by_device_name(gpu_module, name, peak):
    import _common

    assert _common.peak_flops_for_name(name) == peak


def test_gpu_plan_is_the_papers_setup(gpu_module):
    args = gpu_module.build_parser().parse_args([])
    plan = gpu_module.plan_runs(args)
    assert [(c.model, c.batch_size, c.compile) for c in plan] == [
        ("SiT-B/2", 256, False), ("SiT-XL/2", 256, False), ("SiT-B/2", 256, True), ("SiT-XL/2", 256, True),
    ]
    assert {(c.resolution, c.encoder, c.dtype, c.device, c.projector_dim) for c in plan} == {
        (256, "dinov2-vit-b", "bf16", "cuda", 2048)
    }
    assert gpu_module.fallback_batches("SiT-XL/2", tiny=False) == (256, 128)


# --------------------------------------------------------------------------------------------
# benchmarks/convergence.py
# --------------------------------------------------------------------------------------------


@pytest.fixture()
def conv_module(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import convergence

    return convergence


def test_steps_to_reach_interpolates_between_evaluations(conv_module):
    curve = [(100, 50.0), (200, 30.0), (300, 20.0)]
    assert conv_module.steps_to_reach(curve, 25.0) == pytest.approx(250.0)  # 200 + 100 * (30 - 25) / (30 - 20)
    assert conv_module.steps_to_reach(curve, 30.0) == pytest.approx(200.0)
    assert conv_module.steps_to_reach(curve, 45.0) == pytest.approx(125.0)  # 100 + 100 * 5 / 20
    assert conv_module.steps_to_reach(curve, 60.0) == 100.0  # already there at the first point: a bound
    assert conv_module.steps_to_reach(curve, 19.9) is None  # never reached


def test_summary_speedups_by_hand(conv_module):
    cfg = conv_module.ConvConfig(steps=300, eval_every=100)

    def run(arm, seed, fds, step_s):
        return {"arm": arm, "seed": seed, "median_step_s": step_s,
                "curve": [{"step": s, "fd": f} for s, f in zip((100, 200, 300), fds)]}

    runs = [
        run("vanilla", 0, [60, 40, 30], 0.2), run("vanilla", 1, [50, 30, 20], 0.2),
        run("repa", 0, [40, 20, 15], 0.3), run("repa", 1, [30, 20, 10], 0.3),
    ]
    s = conv_module.summarize(runs, cfg, {"repa": 6.0})
    assert s["arms"]["vanilla"]["fd_mean"] == [55, 35, 25]
    assert s["arms"]["repa"]["fd_mean"] == [35, 20, 12.5]
    assert s["arms"]["repa"]["fd_std"][0] == pytest.approx(math.sqrt(50))  # sample std of (40, 30)
    assert s["target_fd"] == 25
    repa = s["arms"]["repa"]
    # mean curve 35 -> 20 between steps 100 and 200 crosses 25 at 100 + 100 * 10 / 15
    reach = 100 + 100 * 10 / 15
    assert repa["steps_to_vanilla_final"] == pytest.approx(reach)
    assert repa["speedup_steps"] == pytest.approx(300 / reach)
    assert repa["speedup_wallclock"] == pytest.approx(300 * 0.2 / (reach * 0.3))
    assert repa["speedup_wallclock_incl_targets"] == pytest.approx(300 * 0.2 / (reach * 0.3 + 6.0))
    # per seed, against that seed's vanilla: seed 0 target 30 -> 100 + 100 * 10 / 20 = 150; seed 1 target 20 -> 200
    assert repa["speedup_steps_per_seed"] == pytest.approx([2.0, 1.5])


@pytest.mark.slow
def test_convergence_tiny_runs_every_arm_and_resumes(tmp_path):
    out = tmp_path / "conv"
    args = ["--tiny", "--out", str(out), "--evaluator-dir", str(tmp_path / "ev"), "--no-progress"]
    first = _run("convergence.py", args, tmp_path)
    result = json.loads((out / "result.json").read_text())
    cfg = result["config"]
    assert result["mode"] == "tiny" and cfg["seeds"] == 2 and set(result["summary"]["arms"]) == set(ARMS_CONV)
    assert len(result["runs"]) == 2 * len(ARMS_CONV)
    for r in result["runs"]:
        assert [p["step"] for p in r["curve"]] == [3, 6]
        assert all(math.isfinite(p["fd"]) and p["fd"] >= 0 for p in r["curve"])
        assert r["mean_step_s"] > 0
    # REPA arms align to the registry's fmnist-vit; the control to a random one; both report kNN accuracy
    assert 0 <= result["teachers"]["trained"]["knn_accuracy"] <= 1 and "random init" in result["teachers"]["random"]["weights"]
    assert math.isfinite(result["evaluation"]["floor_fd"])
    # the summary is the mean over seeds of the stored curves
    for arm, a in result["summary"]["arms"].items():
        curves = [[p["fd"] for p in r["curve"]] for r in result["runs"] if r["arm"] == arm]
        assert a["fd_mean"] == pytest.approx([statistics.fmean(c) for c in zip(*curves)])
    assert "| arm | FD @ 3 | FD @ 6 | s/step |" in first.stdout and "speedup (wall clock)" in first.stdout
    with open(out / "fd_vs_steps.png", "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    # a second run reuses every finished (arm, seed) run and gives the same curves
    second = _run("convergence.py", args, tmp_path)
    assert second.stdout.count("reusing") == 2 * len(ARMS_CONV) + 1  # runs + the evaluator
    again = json.loads((out / "result.json").read_text())
    assert [r["curve"] for r in again["runs"]] == [r["curve"] for r in result["runs"]]


def test_convergence_fingerprints_count_what_each_arm_reads(conv_module, tmp_path):
    C = conv_module.ConvConfig
    base = C()
    # vanilla reads none of the REPA-only fields; REPA arms read all of them
    assert C(proj_coeff=0.5, projector_dim=512).fingerprint("vanilla") == base.fingerprint("vanilla")
    assert C(proj_coeff=0.5).fingerprint("repa") != base.fingerprint("repa")
    assert C(learning_rate=5e-4).fingerprint("vanilla") != base.fingerprint("vanilla")
    assert C(unconditional=True).fingerprint("vanilla") != base.fingerprint("vanilla")
    # a teacher file counts by its content, not its path; the random teacher ignores it
    a, b, c = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "c.safetensors"
    a.write_bytes(b"same"), b.write_bytes(b"same"), c.write_bytes(b"other")
    assert C(teacher_weights=str(a)).fingerprint("repa") == C(teacher_weights=str(b)).fingerprint("repa")
    assert C(teacher_weights=str(a)).fingerprint("repa") != C(teacher_weights=str(c)).fingerprint("repa")
    assert C(teacher_weights=str(c)).fingerprint("random-teacher") == base.fingerprint("random-teacher")
    # the fields added later leave the fingerprint of a config at their defaults as it was
    d = {k: v for k, v in __import__("dataclasses").asdict(base).items() if k not in ("threads", "seeds", "arms")}
    for k in conv_module.NEW_FIELD_DEFAULTS:
        d.pop(k)
    import hashlib
    import json as _json

    assert base.fingerprint() == hashlib.sha256(_json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
    with pytest.raises(SystemExit, match="weight_schedule"):
        C(weight_schedule="exp")


def test_convergence_rejects_bad_options(tmp_path):
    for bad, message in ((["--arms", "vanilla,nope"], "unknown arm"), (["--samples", "15"], "multiple of 10")):
        proc = subprocess.run([sys.executable, str(BENCH / "convergence.py"), "--tiny", *bad, "--out", str(tmp_path)],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and message in proc.stderr


# --------------------------------------------------------------------------------------------
# benchmarks/convergence_sweep.py
# --------------------------------------------------------------------------------------------


@pytest.fixture()
def sweep_module(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import convergence_sweep

    return convergence_sweep


def test_sweep_variants_parse_and_share_the_right_vanilla(sweep_module, conv_module):
    base = conv_module.ConvConfig(steps=600, learning_rate=1e-3)
    name, arm, cfg = sweep_module.parse_variant("w2:proj_coeff=2,encoder_depth=3", base)
    assert (name, arm, cfg.proj_coeff, cfg.encoder_depth, cfg.learning_rate) == ("w2", "repa", 2.0, 3, 1e-3)
    # REPA-only changes share the base's vanilla; a learning-rate change gets its own
    assert sweep_module.vanilla_config(cfg, base).fingerprint() == base.fingerprint()
    _, arm, lr = sweep_module.parse_variant("lr:learning_rate=5e-4,arm=random-teacher", base)
    assert arm == "random-teacher"
    assert sweep_module.vanilla_config(lr, base).fingerprint() != base.fingerprint()
    assert sweep_module.vanilla_config(lr, base).learning_rate == 5e-4
    for bad in ("nocolon", "x:nope=1", "x:steps", "x:arm=vanilla", "x:steps=abc"):
        with pytest.raises(SystemExit):
            sweep_module.parse_variant(bad, base)


def test_sweep_speedups_by_hand(sweep_module):
    def run(fds, step_s):
        return {"median_step_s": step_s, "curve": [{"step": s, "fd": f} for s, f in zip((100, 200, 300), fds)]}

    s = sweep_module.speedups(run([40, 20, 15], 0.3), run([60, 40, 30], 0.2), 300)
    # REPA's 40 -> 20 between steps 100 and 200 crosses vanilla's final 30 at step 150
    assert s["steps_to_vanilla_final"] == pytest.approx(150)
    assert s["speedup_steps"] == pytest.approx(2.0)
    assert s["speedup_wallclock"] == pytest.approx(300 * 0.2 / (150 * 0.3))
    never = sweep_module.speedups(run([70, 50, 35], 0.3), run([60, 40, 30], 0.2), 300)
    assert never["steps_to_vanilla_final"] is None and never["speedup_steps"] is None


@pytest.mark.slow
def test_sweep_tiny_runs_and_reuses_the_shared_vanilla(tmp_path):
    out = tmp_path / "sweep"
    args = ["--tiny", "--out", str(out), "--evaluator-dir", str(tmp_path / "ev"), "--no-progress",
            "base:", "w2:proj_coeff=2", "rnd:arm=random-teacher"]
    first = _run("convergence_sweep.py", args, tmp_path)
    result = json.loads((out / "result.json").read_text())
    assert [v["name"] for v in result["variants"]] == ["base", "w2", "rnd"]
    assert [v["arm"] for v in result["variants"]] == ["repa", "repa", "random-teacher"]
    assert result["variants"][1]["changes"] == "proj_coeff=2.0"
    # one vanilla run serves all three variants: it is trained once and reused twice
    assert first.stdout.count("vanilla (") == 3 and first.stdout.count("reusing") == 2
    for v in result["variants"]:
        assert all(math.isfinite(p["fd"]) for c in v["curves"] for p in c)
        assert v["vanilla_fd_final"] == result["variants"][0]["vanilla_fd_final"]
    assert "| variant | arm | changes |" in first.stdout
    second = _run("convergence_sweep.py", args, tmp_path)
    assert second.stdout.count("reusing") == 6 + 1  # + the evaluator
    assert json.loads((out / "result.json").read_text())["variants"][0]["curves"] == result["variants"][0]["curves"]


# --------------------------------------------------------------------------------------------
# the study of what makes the gain last: new convergence options, the teacher ladder, demo_eval
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_convergence_unconditional_and_decay_run_and_record_the_readouts(tmp_path):
    out = tmp_path / "conv"
    args = ["--tiny", "--seeds", "1", "--arms", "vanilla,repa", "--unconditional", "--weight-schedule", "cosine-decay",
            "--out", str(out), "--evaluator-dir", str(tmp_path / "ev"), "--no-progress"]
    _run("convergence.py", args, tmp_path)
    result = json.loads((out / "result.json").read_text())
    assert result["config"]["unconditional"] is True and result["config"]["weight_schedule"] == "cosine-decay"
    for r in result["runs"]:
        for point in r["curve"]:
            assert point["class_consistency"] is None  # unconditional samples have no label to check
            assert 0 <= point["precision"] <= 1 and 0 <= point["recall"] <= 1
    floor = result["evaluation"]["floor_scores"]
    assert 0 <= floor["class_consistency"] <= 1 and floor["fd"] == result["evaluation"]["floor_fd"]
    assert 0 <= result["teachers"]["trained"]["linear_probe_accuracy"] <= 1


@pytest.mark.slow  # trains two tiny teachers and five tiny runs
def test_teacher_ladder_tiny_trains_its_teachers_and_reports_each_rung(tmp_path):
    out, teachers = tmp_path / "ladder", tmp_path / "teachers"
    common = ["--tiny", "--out", str(out), "--teachers-dir", str(teachers), "--evaluator-dir", str(tmp_path / "ev"),
              "--no-progress"]
    first = _run("teacher_ladder.py", [*common, "--rungs", "random", "shipped", "supervised-ft"], tmp_path)
    ladder = json.loads((out / "ladder.json").read_text())
    assert [r["teacher"] for r in ladder["rows"]] == ["random", "shipped", "supervised-ft"]
    for r in ladder["rows"]:
        assert 0 <= r["knn_accuracy"] <= 1 and 0 <= r["linear_probe_accuracy"] <= 1
    record = ladder["teacher_records"]["supervised-ft"]
    assert record["objective"] == "supervised" and record["init"]["file"] == "fmnist-vit.safetensors"
    assert record["init"]["objective"] == "simclr-nn"  # fine-tuned from the shipped self-supervised teacher
    assert sorted(p.name for p in teachers.glob("*.safetensors")) == ["fmnist-vit-supervised-ft.safetensors"]
    assert "| teacher | kNN | linear probe |" in first.stdout
    with open(out / "gain_vs_teacher.png", "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    # one more rung: the three earlier rows are kept (same vanilla curve), in the ladder's order
    second = _run("teacher_ladder.py", [*common, "--rungs", "ssl-1ep"], tmp_path)
    assert "training teacher ssl-1ep" in second.stdout and "reusing" in second.stdout  # the vanilla run
    ladder = json.loads((out / "ladder.json").read_text())
    assert [r["teacher"] for r in ladder["rows"]] == ["random", "ssl-1ep", "shipped", "supervised-ft"]
    assert ladder["kept_from_earlier"] == ["random", "shipped", "supervised-ft"]
    assert set(ladder["teacher_records"]) == {"ssl-1ep", "supervised-ft"}
    third = _run("teacher_ladder.py", [*common, "--rungs", "ssl-1ep"], tmp_path)  # every run and teacher reused
    assert "training teacher" not in third.stdout and third.stdout.count("reusing") >= 2


def test_teacher_ladder_keeps_earlier_rows_only_over_the_same_vanilla_curve(capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import teacher_ladder as tl

    vanilla = [[{"step": 300, "fd": 188.25}, {"step": 600, "fd": 91.5}]]
    moved = [[{"step": 300, "fd": 188.25}, {"step": 600, "fd": 91.5 * (1 + 1e-6)}]]
    previous = {"rows": [{"teacher": "random", "vanilla_curves": vanilla},
                         {"teacher": "shipped", "vanilla_curves": moved},
                         {"teacher": "ssl-1ep", "vanilla_curves": vanilla},
                         {"teacher": "someone-else", "vanilla_curves": vanilla}]}
    kept = tl.kept_rows(previous, ["ssl-1ep"], vanilla)  # ssl-1ep was run again; an unknown rung is not kept
    assert [r["teacher"] for r in kept] == ["random"]
    assert "dropping the earlier row of 'shipped'" in capsys.readouterr().out
    assert tl.kept_rows(None, [], vanilla) == []
    assert not tl.same_curves(vanilla, vanilla + vanilla)  # a different number of seeds
    assert not tl.same_curves(vanilla, [[{"step": 300, "fd": 188.25}, {"step": 900, "fd": 91.5}]])


def test_teacher_ladder_records_paths_relative_to_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import teacher_ladder as tl

    (tmp_path / "here" / "teachers").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "here")
    folder = tmp_path / "here" / "teachers"
    assert tl.shown(tl.teacher_file("ssl-12ep", folder)) == os.path.join("teachers", "fmnist-vit-ssl-12ep.safetensors")
    assert tl.shown(tmp_path / "elsewhere.safetensors") == str(tmp_path / "elsewhere.safetensors")
    assert tl.variants(folder, ["shipped", "ssl-12ep"]) == [
        "shipped:proj_coeff=4.0,projector_dim=128",
        f"ssl-12ep:teacher_weights={os.path.join('teachers', 'fmnist-vit-ssl-12ep.safetensors')},proj_coeff=4.0,projector_dim=128"]
    # teacher records: only the rungs in the table; the folder's record replaces the earlier ladder's
    tl.teacher_file("ssl-12ep", folder).with_suffix(".json").write_text(json.dumps({"knn_accuracy": 0.86}))
    tl.teacher_file("ssl-1ep", folder).with_suffix(".json").write_text(json.dumps({"knn_accuracy": 0.8}))
    previous = {"teacher_records": {"ssl-12ep": {"knn_accuracy": 0.5}, "supervised-ft": {"knn_accuracy": 0.89},
                                    "supervised-2ep": {"knn_accuracy": 0.82}}}
    assert tl.teacher_records(previous, folder, ["shipped", "ssl-12ep", "supervised-ft"]) == {
        "ssl-12ep": {"knn_accuracy": 0.86}, "supervised-ft": {"knn_accuracy": 0.89}}


@pytest.mark.slow
def test_demo_eval_scores_a_repa_train_run(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "repa.cli", "train", "--max-train-steps", "1", "--checkpointing-steps", "1",
                    "--sample-every", "100", "--model-kwargs", '{"depth": 2, "hidden_size": 32, "num_heads": 2}',
                    "--out", str(tmp_path / "runs"), "--no-progress"], check=True, capture_output=True, env=env, timeout=300)
    run = next((tmp_path / "runs").iterdir())
    proc = _run("demo_eval.py", [str(run), "--tiny", "--samples", "20", "--evaluator-dir", str(tmp_path / "ev"), "--json",
                                 str(tmp_path / "scores.json")], tmp_path)
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["step"] == 1 and scores["sampler"]["sample_mode"] == "ode"
    assert math.isfinite(scores["scores"]["fd"]) and 0 <= scores["scores"]["class_consistency"] <= 1
    assert "class consistency" in proc.stdout
