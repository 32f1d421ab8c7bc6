"""Per-step cost of each representation objective on the convergence benchmark's model.

    python benchmarks/objective_cost.py --threads 1 --rounds 10

Times one training step (the library's ``repa.sit.step.training_step``: forward, objective, backward,
gradient clipping, AdamW, EMA update) of the convergence
benchmark's SiT-T/4 on batches of 64 Fashion-MNIST-sized images for each arm, round-robin
(``--steps-per-round`` steps of each arm per round), so that drift in the machine's load lands
on every arm alike. Reports the median seconds per step and the ratio to vanilla. REPA's
targets are random tensors of the teacher's shape (what a feature cache feeds); no evaluation.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Dict, List

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--steps-per-round", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--arms", default="vanilla,repa,dispersive,sra,repa-dispersive")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from repa import DispersiveRegularizer, REPARegularizer, SelfAlignmentRegularizer
    from repa.sit.configs import build_model
    from repa.sit.ema import EMA
    from repa.sit.step import StepBatch, training_step
    from repa.sit.transport import get_path

    path = get_path("linear")
    arms = [a.strip() for a in args.arms.split(",")]
    setups: Dict[str, Dict] = {}
    for arm in arms:
        torch.manual_seed(0)
        model = build_model("SiT-T/4", input_size=28, in_channels=1, num_classes=10, class_dropout_prob=0.1)
        ema = EMA({"model": model}, 0.995)
        objs = {}
        if arm in ("repa", "repa-dispersive"):
            objs["repa"] = REPARegularizer(model, layers=1, encoders={"fmnist-vit": 96}, weight=4.0, projector_dim=128)
        if arm in ("dispersive", "repa-dispersive"):
            objs["dispersive"] = DispersiveRegularizer(model, layers=0, weight=0.5, temperature=0.5)
        if arm == "sra":
            objs["sra"] = SelfAlignmentRegularizer(model, ema["model"], 1, 3, weight=0.2)
        params = list(model.parameters()) + [q for o in objs.values() for q in o.parameters()]
        setups[arm] = dict(model=model, ema=ema, objs=objs, params=params, opt=torch.optim.AdamW(params, lr=1e-3))

    g = torch.Generator().manual_seed(0)
    b = args.batch_size
    x = torch.rand(b, 1, 28, 28, generator=g) * 2 - 1
    y = torch.randint(0, 10, (b,), generator=g)
    feats = {"fmnist-vit": torch.randn(b, 49, 96, generator=g)}  # (B, 49, 96) cached targets

    def step(s: Dict) -> None:
        """The library's step (repa.sit.step.training_step): loss, backward, clip 1.0, AdamW, EMA."""
        t = torch.rand(b)
        noise = torch.randn_like(x)
        drop = (torch.rand(b) < 0.1).long()
        objs = s["objs"]
        training_step(
            s["model"], StepBatch(x=x, y=y, t=t, noise=noise, drop=drop, features=feats if "repa" in objs else None),
            path=path, optimizer=s["opt"], regularizer=objs.get("repa"),
            objectives={k: v for k, v in objs.items() if k != "repa"}, max_grad_norm=1.0,
            ema=s["ema"], ema_sources={"model": s["model"]},
        )

    for s in setups.values():  # warm-up
        step(s)
    times: Dict[str, List[float]] = {a: [] for a in arms}
    for _ in range(args.rounds):
        for arm in arms:
            for _ in range(args.steps_per_round):
                t0 = time.perf_counter()
                step(setups[arm])
                times[arm].append(time.perf_counter() - t0)
    base = statistics.median(times[arms[0]])
    print(f"| arm | s/step (median of {args.rounds * args.steps_per_round}) | ratio to {arms[0]} |")
    print("|---|---:|---:|")
    for arm in arms:
        m = statistics.median(times[arm])
        print(f"| {arm} | {m:.4f} | {m / base:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
