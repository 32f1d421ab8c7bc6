"""Per-step time of the CPU demo (`repa train`) alone and beside one competing torch process.

On a small CPU machine another torch process (a second run, a test suite) competes for the
cores. With the OpenMP defaults each process runs one intra-op thread per core and lets idle
threads spin at every barrier, so two such processes can slow each other down by an order of
magnitude. This measures `repa train` (its own code path, through the `repa` command) under
settings given as environment variables:

    python benchmarks/cpu_contention.py --steps 16 \\
        --case "default:" --case "one-thread:OMP_NUM_THREADS=1" --case "passive:OMP_WAIT_POLICY=PASSIVE"

Each case runs once idle and once with the competitor (`torch` matmuls in a loop with its
default threads, as another user's job would). The per-step time is the median over the log
records after the first (batch / images_per_sec), so start-up and the first steps do not count.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

COMPETITOR = (
    "import torch\n"
    "a = torch.randn(384, 384)\n"
    "while True:\n"
    "    for _ in range(20):\n"
    "        b = torch.nn.functional.gelu(a @ a) * 0.001\n"
)


def run_train(env_extra: Dict[str, str], steps: int, log_every: int, workdir: Path, name: str) -> List[float]:
    """Seconds per step of each log record after the first, for one `repa train` run."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")}
    env.update(env_extra)
    env["HF_HUB_OFFLINE"] = "1"
    args = [sys.executable, "-m", "repa.cli", "train", "--max-train-steps", str(steps), "--log-every", str(log_every),
            "--checkpointing-steps", "100000", "--sample-every", "100000", "--no-progress",
            "--output-dir", str(workdir), "--exp-name", name]
    proc = subprocess.run(args, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"repa train failed ({name}):\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (workdir / name / "log.jsonl").read_text().splitlines()]
    batch = 32  # the demo's global batch
    return [batch / r["images_per_sec"] for r in records[1:]]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=16, help="training steps per run (default: 16)")
    parser.add_argument("--log-every", type=int, default=4, help="steps per log record (default: 4)")
    parser.add_argument("--case", action="append", default=[],
                        help="NAME:VAR=VALUE,VAR=VALUE (environment of `repa train`); repeatable")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    cases = args.case or ["default:"]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in cases:
            name, _, assignments = spec.partition(":")
            env = dict(a.split("=", 1) for a in assignments.split(",") if a)
            row = {"case": name, "env": env, "loadavg_before": os.getloadavg()[0]}
            row["idle"] = statistics.median(run_train(env, args.steps, args.log_every, Path(tmp), f"{name}-idle"))
            competitor = subprocess.Popen([sys.executable, "-c", COMPETITOR], env={**os.environ})
            try:
                time.sleep(2)
                row["contended"] = statistics.median(
                    run_train(env, args.steps, args.log_every, Path(tmp), f"{name}-contended")
                )
            finally:
                competitor.kill()
                competitor.wait()
            row["slowdown"] = row["contended"] / row["idle"]
            results.append(row)
            print(f"{name:<14} idle {row['idle']:.3f} s/step   with one competitor {row['contended']:.3f} s/step   "
                  f"x{row['slowdown']:.1f}   (load average before: {row['loadavg_before']:.1f})", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
