"""What makes REPA's toy-scale gain large? One-factor-at-a-time variants against their own vanilla.

    python benchmarks/convergence_sweep.py                   # the default grid below (1 seed each, ~55 min)
    python benchmarks/convergence_sweep.py "w2:proj_coeff=2" "lr5e-4:learning_rate=5e-4" --seeds 2
    python benchmarks/convergence_sweep.py --tiny            # seconds: the test suite's smoke run

Each variant is ``name:field=value,field=value`` over the fields of ``convergence.ConvConfig``
(``encoder_depth``, ``proj_coeff``, ``projector_dim``, ``learning_rate``, ``steps``, ``stop_at``,
...) plus ``arm`` (``repa``, the default; ``repa-stop``; ``random-teacher``). Every variant is
compared with a vanilla run that shares everything vanilla depends on (learning rate, steps,
batch, EMA, seed, ...), so a learning-rate variant gets its own vanilla baseline and REPA-only
variants share one. The training, sampler, evaluator and FD protocol are those of
``convergence.py`` and are the same for every variant and its baseline.

Reported per variant: the final FD beside its vanilla's, the steps REPA needs to reach
vanilla's final FD and the speedup in steps and in wall-clock time (mean over seeds of the
per-seed speedups), and seconds per step. Finished runs are stored under ``--out``/runs and
reused, so variants can be added to a sweep without re-running the others.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import convergence as conv  # noqa: E402
from _common import environment, write_json  # noqa: E402

FORMAT = "repa-convergence-sweep/1"
#: The protocol of a sweep: one seed, 600 steps, cheap evaluations every 100 steps; the base REPA
#: arm has the paper's weight 0.5 (and a 512-wide projector), from which each factor moves.
SWEEP = dict(seeds=1, steps=600, eval_every=100, samples=1000, sample_steps=6, proj_coeff=0.5, projector_dim=512)
#: Fields only REPA arms read; a variant's vanilla baseline resets them to the base config.
REPA_ONLY = conv.REPA_ONLY
#: The default grid: the base REPA arm, then one factor at a time.
DEFAULT_VARIANTS = (
    "base:",
    "block1:encoder_depth=1",
    "block3:encoder_depth=3",
    "w1:proj_coeff=1.0",
    "w2:proj_coeff=2.0",
    "w4:proj_coeff=4.0",
    "proj128:projector_dim=128",
    "w2-proj128:proj_coeff=2.0,projector_dim=128",
    "w4-proj128:proj_coeff=4.0,projector_dim=128",
    "lr5e-4:learning_rate=5e-4",
    "random:arm=random-teacher",
)


def parse_variant(text: str, base: conv.ConvConfig) -> Tuple[str, str, conv.ConvConfig]:
    """``name:field=value,...`` -> (name, arm, config). Values take the type of the field's default."""
    name, sep, body = text.partition(":")
    if not sep or not name:
        raise SystemExit(f"convergence_sweep.py: variant {text!r} must look like name:field=value,field=value")
    fields = {f.name: f for f in dataclasses.fields(conv.ConvConfig)}
    arm, changes = "repa", {}
    for item in filter(None, (x.strip() for x in body.split(","))):
        key, eq, value = item.partition("=")
        if key == "arm":
            if value not in conv.ARMS[1:]:
                raise SystemExit(f"convergence_sweep.py: variant {name!r}: arm {value!r}; choose from {list(conv.ARMS[1:])}")
            arm = value
            continue
        if not eq or key not in fields or key in ("arms", "model_kwargs", "seeds", "threads"):
            allowed = sorted(set(fields) - {"arms", "model_kwargs", "seeds", "threads"})
            raise SystemExit(f"convergence_sweep.py: variant {name!r}: bad item {item!r}; use field=value with a field "
                             f"of {allowed} or arm=...")
        kind = type(getattr(base, key))
        try:
            if kind is bool:
                if value.lower() not in ("0", "1", "true", "false"):
                    raise ValueError(value)
                changes[key] = value.lower() in ("1", "true")
            else:
                changes[key] = kind(float(value)) if kind is int else kind(value)
        except ValueError:
            raise SystemExit(f"convergence_sweep.py: variant {name!r}: {key}={value!r} is not a {kind.__name__}") from None
    return name, arm, dataclasses.replace(base, **changes)


def vanilla_config(cfg: conv.ConvConfig, base: conv.ConvConfig) -> conv.ConvConfig:
    """The config of a variant's baseline: the variant's with the REPA-only fields of the base."""
    return dataclasses.replace(cfg, **{k: getattr(base, k) for k in REPA_ONLY})


def speedups(repa: Dict[str, Any], vanilla: Dict[str, Any], steps: int) -> Dict[str, Optional[float]]:
    """Steps for REPA's curve to reach vanilla's final FD, and the speedups in steps and wall clock."""
    target = vanilla["curve"][-1]["fd"]
    reach = conv.steps_to_reach([(p["step"], p["fd"]) for p in repa["curve"]], target)
    return {
        "steps_to_vanilla_final": reach,
        "speedup_steps": steps / reach if reach else None,
        "speedup_wallclock": steps * vanilla["median_step_s"] / (reach * repa["median_step_s"]) if reach else None,
        "reached_at_first_eval": bool(reach is not None and reach == repa["curve"][0]["step"]),
    }


def _mean(xs: Sequence[Optional[float]]) -> Optional[float]:
    return statistics.fmean(xs) if xs and all(x is not None for x in xs) else None


def format_table(rows: List[Dict[str, Any]]) -> str:
    lines = ["| variant | arm | changes | FD final (vanilla) | steps to vanilla's final | speedup (steps) | per seed | "
             "speedup (wall clock) | s/step (vanilla) | class consistency (vanilla) | precision / recall (vanilla) |",
             "|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        bound = ">= " if r["reached_at_first_eval"] else ""
        reach = r["steps_to_vanilla_final"]
        lines.append(
            f"| {r['name']} | {r['arm']} | {r['changes'] or '-'} | {r['fd_final']:.1f} ({r['vanilla_fd_final']:.1f}) | "
            f"{'not reached' if reach is None else f'{reach:.0f}'} | {bound}{conv._fmt(r['speedup_steps'], '.2f')} | "
            f"{', '.join(conv._fmt(x, '.2f') for x in r['speedup_steps_per_seed'])} | "
            f"{bound}{conv._fmt(r['speedup_wallclock'], '.2f')} | {r['step_s']:.3f} ({r['vanilla_step_s']:.3f}) | "
            f"{conv._fmt(r.get('final_class_consistency'), '.3f')} ({conv._fmt(r.get('vanilla_final_class_consistency'), '.3f')}) | "
            f"{conv._fmt(r.get('final_precision'), '.2f')} / {conv._fmt(r.get('final_recall'), '.2f')} "
            f"({conv._fmt(r.get('vanilla_final_precision'), '.2f')} / {conv._fmt(r.get('vanilla_final_recall'), '.2f')}) |"
        )
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variants", nargs="*", help=f"name:field=value,... (default: {' '.join(DEFAULT_VARIANTS)})")
    p.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (tests); its numbers mean nothing")
    p.add_argument("--seeds", type=int, default=None, help=f"seeds per variant (default: {SWEEP['seeds']})")
    for name in ("steps", "eval_every", "samples", "sample_steps"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None, help=f"(default: {SWEEP[name]})")
    p.add_argument("--data", default=None, help="folder of the Fashion-MNIST IDX files")
    p.add_argument("--teacher-weights", default=None, help="fmnist-vit weights file (default: the registry's)")
    p.add_argument("--out", default=None, help="output folder (default: benchmarks/results/convergence-sweep)")
    p.add_argument("--evaluator-dir", default=None, help="where the evaluator is kept (default: benchmarks/results/evaluator)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    values: Dict[str, Any] = dict(SWEEP)
    if args.tiny:
        values.update(conv.TINY)
        values["seeds"] = 1
    for name in ("seeds", "steps", "eval_every", "samples", "sample_steps"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    if args.teacher_weights:
        values["teacher_weights"] = args.teacher_weights
    base = conv.ConvConfig(**values)
    if base.seeds < 1:
        raise SystemExit(f"convergence_sweep.py: --seeds {base.seeds} must be at least 1")
    if base.samples < 10 or base.samples % 10:
        raise SystemExit(f"convergence_sweep.py: --samples {base.samples} must be a positive multiple of 10")
    variants = [parse_variant(v, base) for v in (args.variants or DEFAULT_VARIANTS)]
    names = [n for n, _, _ in variants]
    if len(set(names)) != len(names):
        raise SystemExit(f"convergence_sweep.py: variant names must be unique, got {names}")
    for name, _, cfg in variants:
        if not 1 <= cfg.stop_at * cfg.steps <= cfg.steps:
            raise SystemExit(f"convergence_sweep.py: variant {name!r}: stop_at {cfg.stop_at} must be in (0, 1]")
    if args.threads:
        torch.set_num_threads(args.threads)
    progress = not args.no_progress
    out = Path(args.out or Path(__file__).resolve().parent / "results" / ("convergence-sweep-tiny" if args.tiny else "convergence-sweep"))
    runs_dir = out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "benchmarks/convergence_sweep.py", *(sys.argv[1:] if argv is None else argv)])
    t_start = time.perf_counter()
    print(f"convergence sweep: {command}", flush=True)

    used_arms = {arm for _, arm, _ in variants}
    shared = dataclasses.replace(base, arms=tuple(a for a in conv.ARMS if a in used_arms or a == "vanilla"))
    data, fd_fn, floor, eval_acc, teachers = conv.prepare(
        shared, data_dir=args.data, evaluator_dir=args.evaluator_dir, progress=progress
    )

    def run(arm: str, cfg: conv.ConvConfig, seed: int) -> Dict[str, Any]:
        fp = cfg.fingerprint(arm)
        record = runs_dir / f"{arm}-{fp}-seed{seed}.json"
        if record.is_file():
            print(f"{arm} ({fp}) seed {seed}: reusing {record}")
            return json.loads(record.read_text())
        r = conv.run_arm(arm, seed, cfg, data, teachers, fd_fn, progress=progress)
        r["fingerprint"], r["config"] = fp, dataclasses.asdict(cfg)
        write_json(r, str(record))
        print(f"{arm} ({fp}) seed {seed}: FD " + ", ".join(f"{p['step']}: {p['fd']:.1f}" for p in r["curve"])
              + f"; {r['median_step_s']:.4f} s/step", flush=True)
        return r

    rows: List[Dict[str, Any]] = []
    for name, arm, cfg in variants:
        per_seed = []
        for seed in range(base.seeds):
            v = run("vanilla", vanilla_config(cfg, base), seed)
            r = run(arm, cfg, seed)
            per_seed.append((r, v, speedups(r, v, cfg.steps)))
        mean_reach = _mean([s["steps_to_vanilla_final"] for _, _, s in per_seed])
        changes = ", ".join(f"{k}={getattr(cfg, k)}" for k in (f.name for f in dataclasses.fields(cfg))
                            if getattr(cfg, k) != getattr(base, k))
        rows.append({
            "name": name,
            "arm": arm,
            "changes": changes,
            "config": dataclasses.asdict(cfg),
            "fd_final": statistics.fmean(r["curve"][-1]["fd"] for r, _, _ in per_seed),
            **{f"final_{k}": _mean([r["curve"][-1].get(k) for r, _, _ in per_seed]) for k in conv.READOUTS},
            **{f"vanilla_final_{k}": _mean([v["curve"][-1].get(k) for _, v, _ in per_seed]) for k in conv.READOUTS},
            "vanilla_fd_final": statistics.fmean(v["curve"][-1]["fd"] for _, v, _ in per_seed),
            "curves": [r["curve"] for r, _, _ in per_seed],
            "vanilla_curves": [v["curve"] for _, v, _ in per_seed],
            "steps_to_vanilla_final": mean_reach,
            "speedup_steps": _mean([s["speedup_steps"] for _, _, s in per_seed]),
            "speedup_steps_per_seed": [s["speedup_steps"] for _, _, s in per_seed],
            "speedup_wallclock": _mean([s["speedup_wallclock"] for _, _, s in per_seed]),
            "reached_at_first_eval": any(s["reached_at_first_eval"] for _, _, s in per_seed),
            "step_s": statistics.fmean(r["median_step_s"] for r, _, _ in per_seed),
            "vanilla_step_s": statistics.fmean(v["median_step_s"] for _, v, _ in per_seed),
        })

    result = {
        "format": FORMAT,
        "command": command,
        "base_config": dataclasses.asdict(base),
        "environment": environment(torch.device("cpu")),
        "evaluation": {"evaluator_test_accuracy": eval_acc, "floor_fd": floor,
                       "sampler": f"ODE {base.solver}, {base.sample_steps} steps, no guidance, EMA {base.ema_decay} weights"},
        "teachers": {k: {kk: vv for kk, vv in t.items() if kk != "targets"} if isinstance(t, dict) else t
                     for k, t in teachers.items()},
        "variants": rows,
        "total_seconds": time.perf_counter() - t_start,
    }
    write_json(result, str(out / "result.json"))
    print()
    print(format_table(rows))
    print()
    print(f"{base.seeds} seed(s), {base.samples} samples per FD; real-vs-real floor {floor:.2f}; evaluator accuracy {eval_acc:.4f}")
    print(f"wrote {out / 'result.json'} in {result['total_seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
