"""Does a better teacher give a larger, longer-lasting REPA gain? The teacher-quality ladder.

    python benchmarks/teacher_ladder.py --threads 1          # 1 seed, 1,500 steps per run (~2 h on 2 cores)
    python benchmarks/teacher_ladder.py --threads 1 --rungs ssl-12ep supervised-ft   # add rungs to a ladder
    python benchmarks/teacher_ladder.py --threads 1 --unconditional --out benchmarks/results/teacher-ladder-unconditional
    python benchmarks/teacher_ladder.py --tiny               # seconds: the test suite's smoke run

The REPA arm of ``convergence.py`` (weight 4, 128-wide projector, block 2 of ``SiT-T/4``) is
trained against the same vanilla baseline with one teacher after another, everything else
fixed (the protocol, seed, data order, noise, evaluator and sampler of ``convergence_sweep.py``):

- ``random``: a randomly initialized ``fmnist-vit`` (the control: any extra target);
- ``ssl-1ep``: ``repa teacher --objective simclr-nn --epochs 1`` (a short self-supervised run);
- ``shipped``: the registry's ``fmnist-vit`` (``simclr-nn``, 8 epochs; kNN 0.859);
- ``ssl-12ep``: the shipped teacher trained 4 epochs more with the same objective (``--init``,
  peak learning rate 1e-3): a longer self-supervised run;
- ``supervised-2ep``: ``repa teacher --objective supervised --epochs 2`` (trained on the labels
  from random weights);
- ``supervised-ft``: the shipped teacher fine-tuned on the labels for 2 epochs (``--init``,
  peak learning rate 1e-3): the "semantic" upper bound, features that know the classes.

Missing teacher files are trained first (into ``--teachers-dir``, with their record beside
them). Each teacher's quality is measured on the same data: kNN accuracy (k = 20, cosine,
mean-pooled tokens) and the accuracy of a linear probe (``repa.metrics.linear_probe``) on the
same features. Reported: a table of teacher quality beside the gain it gives (final FD, the
steps REPA needs to reach vanilla's final FD, the speedup, class consistency), the sweep's
``result.json``, ``ladder.json`` and a plot of the gain against teacher quality. Runs are stored
under ``--out``/runs and reused, as in ``convergence_sweep.py``.

``--rungs`` runs some rungs only. The rows of the other rungs are kept from the folder's earlier
``ladder.json`` only where its vanilla curve is the one just computed (every FD equal to 1e-9
relative: the same evaluator, data, seed and baseline); otherwise they are dropped, with a
message, and must be run again.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import convergence as conv  # noqa: E402
import convergence_sweep as sweep  # noqa: E402
from _common import write_json  # noqa: E402

FORMAT = "repa-teacher-ladder/1"
#: The shipped teacher's weights, the starting point of the teachers trained with ``init``.
SHIPPED = Path(__file__).resolve().parents[1] / "src" / "repa" / "encoders" / "assets" / "fmnist-vit.safetensors"
#: name -> settings of the teachers trained here (``repa teacher`` options); "shipped" and
#: "random" need no training; ``init="shipped"`` starts from the shipped weights.
TRAINED: Dict[str, Dict[str, Any]] = {
    "ssl-1ep": dict(objective="simclr-nn", epochs=1.0),
    "ssl-12ep": dict(objective="simclr-nn", epochs=4.0, lr=1e-3, init="shipped"),
    "supervised-2ep": dict(objective="supervised", epochs=2.0),
    "supervised-ft": dict(objective="supervised", epochs=2.0, lr=1e-3, init="shipped"),
}
LADDER = ("random", "ssl-1ep", "shipped", "ssl-12ep", "supervised-2ep", "supervised-ft")
#: the REPA setting every rung uses (convergence.py's defaults; the sweep's base differs)
REPA = "proj_coeff=4.0,projector_dim=128"


def teacher_file(name: str, folder: Path) -> Path:
    return folder / f"fmnist-vit-{name}.safetensors"


def shown(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it (records stay machine-independent)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def ensure_teachers(folder: Path, names: Sequence[str], data: Optional[str], tiny: bool, progress: bool) -> None:
    """Train the missing teachers among ``names`` (``repa teacher`` settings; tiny: a few steps on 256 images)."""
    from repa.sit.teacher import save_teacher, train_teacher

    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        if name not in TRAINED or teacher_file(name, folder).is_file():
            continue
        path, settings = teacher_file(name, folder), dict(TRAINED[name])
        if settings.get("init") == "shipped":
            settings["init"] = shown(SHIPPED)
        print(f"training teacher {name}: " + ", ".join(f"{k} {v}" for k, v in settings.items()), flush=True)
        extra: Dict[str, Any] = dict(max_steps=3, train_limit=256, eval_limit=200, batch_size=64) if tiny else {}
        result = train_teacher(data, seed=0, progress=progress, **settings, **extra)
        words = ["repa", "teacher"]
        for key, value in settings.items():
            words += ["--" + key.replace("_", "-"), str(value)]
        save_teacher(result, path, command=shlex.join([*words, "--seed", "0", "--out", shown(path)]))


def variants(folder: Path, names: Sequence[str], unconditional: bool = False) -> List[str]:
    """The sweep's variant strings of the rungs ``names`` (``unconditional=true`` added when asked)."""
    out = []
    setting = REPA + (",unconditional=true" if unconditional else "")
    for name in names:
        if name == "random":
            out.append(f"random:arm=random-teacher,{setting}")
        elif name == "shipped":
            out.append(f"shipped:{setting}")
        else:
            out.append(f"{name}:teacher_weights={shown(teacher_file(name, folder))},{setting}")
    return out


def same_curves(a: List[List[Dict[str, Any]]], b: List[List[Dict[str, Any]]], rtol: float = 1e-9) -> bool:
    """Whether two lists of per-seed FD curves hold the same steps and FDs (to ``rtol``)."""
    if len(a) != len(b):
        return False
    for ca, cb in zip(a, b):
        if [p["step"] for p in ca] != [p["step"] for p in cb]:
            return False
        if any(abs(p["fd"] - q["fd"]) > rtol * max(abs(p["fd"]), abs(q["fd"])) for p, q in zip(ca, cb)):
            return False
    return True


def kept_rows(previous: Optional[Dict[str, Any]], ran: Sequence[str], vanilla_curves: List[List[Dict[str, Any]]]
              ) -> List[Dict[str, Any]]:
    """Rows of an earlier ``ladder.json`` for rungs not run now, kept only over the same vanilla curves."""
    if previous is None:
        return []
    kept = []
    for row in previous.get("rows", []):
        if row["teacher"] in ran or row["teacher"] not in LADDER:
            continue
        if same_curves(row.get("vanilla_curves") or [], vanilla_curves):
            kept.append(row)
        else:
            print(f"dropping the earlier row of {row['teacher']!r}: its vanilla curve is not the one just computed "
                  f"(run it again with --rungs {row['teacher']})", flush=True)
    return kept


def teacher_records(previous: Optional[Dict[str, Any]], folder: Path, names: Sequence[str]) -> Dict[str, Any]:
    """The training records of the trained teachers among ``names`` (from ``folder``, else the earlier ladder)."""
    records = {n: r for n, r in (previous or {}).get("teacher_records", {}).items() if n in names}
    for n in names:
        if n in TRAINED and teacher_file(n, folder).with_suffix(".json").is_file():
            records[n] = json.loads(teacher_file(n, folder).with_suffix(".json").read_text())
    return records


def teacher_quality(name: str, folder: Path, cfg: conv.ConvConfig, data: Dict[str, torch.Tensor],
                    known: Dict[str, Any]) -> Dict[str, Any]:
    """kNN and linear-probe accuracy of one rung's teacher (the same measurement convergence.py prints).

    ``known``: the sweep's teacher records; a teacher it measured is not measured again.
    """
    key = {"random": "random", "shipped": "trained"}.get(name, f"file:{shown(teacher_file(name, folder))}")
    t = known.get(key) or conv._build_teacher(key, cfg, data, log=lambda *a: None)
    return {"knn_accuracy": t["knn_accuracy"], "linear_probe_accuracy": t["linear_probe_accuracy"], "weights": t["weights"]}


def format_table(rows: List[Dict[str, Any]]) -> str:
    lines = ["| teacher | kNN | linear probe | FD final (vanilla) | steps to vanilla's final | speedup (steps) | "
             "class consistency (vanilla) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        reach = r["steps_to_vanilla_final"]
        lines.append(
            f"| {r['teacher']} | {r['knn_accuracy']:.3f} | {r['linear_probe_accuracy']:.3f} | "
            f"{r['fd_final']:.1f} ({r['vanilla_fd_final']:.1f}) | {'not reached' if reach is None else f'{reach:.0f}'} | "
            f"{conv._fmt(r['speedup_steps'], '.2f')} | {conv._fmt(r.get('final_class_consistency'), '.3f')} "
            f"({conv._fmt(r.get('vanilla_final_class_consistency'), '.3f')}) |"
        )
    return "\n".join(lines)


def plot(rows: List[Dict[str, Any]], pixel_knn: float, path: Path, unconditional: bool = False) -> Optional[Path]:
    """Speedup in steps (left) and final FD (right) against the teacher's kNN accuracy."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return None
    rows = sorted(rows, key=lambda r: r["knn_accuracy"])  # lines run from the weakest teacher to the best
    fig = Figure(figsize=(9.0, 3.8), dpi=120)
    FigureCanvasAgg(fig)
    for i, (key, label) in enumerate((("speedup_steps", "speedup to vanilla's final FD (steps)"),
                                      ("fd_final", "final FD (lower is better)"))):
        ax = fig.add_subplot(1, 2, i + 1)
        xs = [r["knn_accuracy"] for r in rows]
        ys = [r[key] if r[key] is not None else float("nan") for r in rows]
        ax.plot(xs, ys, marker="o", color="#d62728")
        for x, y, r in zip(xs, ys, rows):
            ax.annotate(r["teacher"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        if key == "fd_final":
            ax.axhline(rows[0]["vanilla_fd_final"], ls="--", color="#444444", lw=1, label="vanilla")
        else:
            ax.axhline(1.0, ls="--", color="#444444", lw=1, label="no gain")
        ax.axvline(pixel_knn, ls=":", color="gray", lw=1, label="raw pixels' kNN")
        ax.set_xlabel("teacher kNN accuracy")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    setting = ", unconditional" if unconditional else ""
    fig.suptitle(f"REPA gain against teacher quality ({rows[0]['steps']} steps, SiT-T/4, Fashion-MNIST{setting})",
                 fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fig.savefig(str(tmp), format="png")
    os.replace(tmp, path)
    return path


def parse_args(argv: Optional[Sequence[str]] = None) -> Tuple[argparse.Namespace, List[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (tests); its numbers mean nothing")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--eval-every", type=int, default=300)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--rungs", nargs="+", choices=LADDER, default=list(LADDER),
                   help="the rungs to run (default: all); the others' rows are kept from the earlier ladder.json")
    p.add_argument("--unconditional", action="store_true",
                   help="train and sample without labels (convergence.py --unconditional) on every rung")
    p.add_argument("--data", default=None, help="folder of the Fashion-MNIST IDX files")
    p.add_argument("--out", default=None, help="output folder (default: benchmarks/results/teacher-ladder)")
    p.add_argument("--teachers-dir", default=None, help="where the ladder's teachers are kept (default: benchmarks/results/teachers)")
    p.add_argument("--evaluator-dir", default=None, help="where the evaluator is kept (default: benchmarks/results/evaluator)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    forward = ["--tiny"] if args.tiny else ["--steps", str(args.steps), "--eval-every", str(args.eval_every)]
    forward += ["--seeds", str(args.seeds)]
    for flag in ("data", "evaluator_dir", "threads"):
        if getattr(args, flag) is not None:
            forward += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    if args.no_progress:
        forward.append("--no-progress")
    return args, forward


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, forward = parse_args(argv)
    t_start = time.perf_counter()
    root = Path(__file__).resolve().parent / "results"
    out = Path(args.out or root / ("teacher-ladder-tiny" if args.tiny else "teacher-ladder"))
    folder = Path(args.teachers_dir or root / ("teachers-tiny" if args.tiny else "teachers"))
    command = shlex.join(["python", "benchmarks/teacher_ladder.py", *(sys.argv[1:] if argv is None else argv)])
    print(f"teacher ladder: {command}", flush=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    rungs = [n for n in LADDER if n in args.rungs]
    ensure_teachers(folder, rungs, args.data, args.tiny, not args.no_progress)
    previous_file = out / "ladder.json"
    previous = json.loads(previous_file.read_text()) if previous_file.is_file() else None
    code = sweep.main([*forward, "--out", str(out), *variants(folder, rungs, args.unconditional)])
    if code:
        return code
    result = json.loads((out / "result.json").read_text())
    base = conv.ConvConfig(**{**result["base_config"], "arms": tuple(result["base_config"]["arms"])})
    data = conv.load_fashion_mnist(args.data, base)
    rows = []
    for name, v in zip(rungs, result["variants"]):
        rows.append({"teacher": name, "steps": base.steps, **teacher_quality(name, folder, base, data, result["teachers"]),
                     **{k: v.get(k) for k in ("fd_final", "vanilla_fd_final", "steps_to_vanilla_final", "speedup_steps",
                                              "speedup_steps_per_seed", "speedup_wallclock", "final_class_consistency",
                                              "vanilla_final_class_consistency", "final_precision", "final_recall",
                                              "curves", "vanilla_curves")}})
    kept = kept_rows(previous, rungs, rows[0]["vanilla_curves"])
    rows = sorted(rows + kept, key=lambda r: LADDER.index(r["teacher"]))
    pixels = result["teachers"].get("pixel_knn_accuracy")
    if pixels is None:
        from repa.sit.teacher import knn_accuracy

        pixels = knn_accuracy(data["train_images"].flatten(1).float(), data["train_labels"],
                              data["test_images"].flatten(1).float(), data["test_labels"], min(20, data["train_images"].shape[0]))
    ladder = {"format": FORMAT, "command": command, "unconditional": args.unconditional, "pixel_knn_accuracy": pixels,
              "evaluation": result["evaluation"], "rows": rows, "kept_from_earlier": [r["teacher"] for r in kept],
              "teacher_records": teacher_records(previous, folder, [r["teacher"] for r in rows]),
              "total_seconds": time.perf_counter() - t_start}
    write_json(ladder, str(out / "ladder.json"))
    png = plot(rows, pixels, out / "gain_vs_teacher.png", args.unconditional)
    print()
    print(format_table(rows))
    print(f"\nraw pixels' kNN accuracy {pixels:.3f}; wrote {out / 'ladder.json'}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
