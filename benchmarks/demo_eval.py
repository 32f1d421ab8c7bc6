"""Score a `repa train` Fashion-MNIST run with the convergence benchmark's evaluator.

    repa train                                                  # the demo: runs/fmnist-sit-t4-repa/
    python benchmarks/demo_eval.py runs/fmnist-sit-t4-repa      # FD, class consistency, precision/recall

Loads the run's latest checkpoint (``weights_only``; the EMA weights by default), draws
``--samples`` class-balanced samples with the run's own sampler settings (``sample_mode``,
``sample_steps``, no guidance) and scores them exactly as ``convergence.py`` scores its arms: FD
against the 10,000 test images in the evaluator CNN's 128-d features, the evaluator's accuracy
on the samples against the labels they were drawn for (class consistency), and improved
precision and recall (k = 3). The real-vs-real row (training images) is printed beside them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import convergence as conv  # noqa: E402
from _common import write_json  # noqa: E402


@torch.no_grad()
def draw(model: torch.nn.Module, settings: Dict[str, Any], n: int, batch: int = 500, seed: int = 20241007) -> torch.Tensor:
    """``n`` class-balanced samples in [-1, 1] with the run's sampler settings (fixed noise)."""
    from repa.sit.sampling import sample

    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    shape = (model.in_channels, model.input_size, model.input_size)
    noise = torch.randn(n, *shape, generator=g)
    out = []
    for i in range(0, n, batch):
        x = sample(model, noise[i : i + batch], labels[i : i + batch], method=settings["sample_mode"],
                   steps=settings["sample_steps"], cfg_scale=1.0, path=settings["path_type"], generator=g)
        out.append(x.clamp(-1, 1))
    return torch.cat(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a `repa train` run folder (or a checkpoint file) on Fashion-MNIST pixels")
    p.add_argument("--samples", type=int, default=2000, help="samples to score (a multiple of 10)")
    p.add_argument("--model-weights", choices=("ema", "model"), default="ema")
    p.add_argument("--data", default=None, help="folder of the Fashion-MNIST IDX files")
    p.add_argument("--evaluator-dir", default=None, help="where the evaluator is kept (default: benchmarks/results/evaluator)")
    p.add_argument("--json", default=None, help="also write the scores here")
    p.add_argument("--tiny", action="store_true",
                   help="the smoke-test evaluator (convergence.py --tiny's: 256 training images); numbers mean nothing")
    args = p.parse_args(argv)
    if args.samples < 10 or args.samples % 10:
        raise SystemExit(f"demo_eval.py: --samples {args.samples} must be a positive multiple of 10")
    from repa.sit.checkpoint import load_checkpoint, resolve_checkpoint
    from repa.sit.sample import load_sampling_model

    t0 = time.perf_counter()
    path = resolve_checkpoint(args.run) if Path(args.run).is_dir() else Path(args.run)
    ckpt = load_checkpoint(path)
    settings = ckpt["config"] if isinstance(ckpt.get("config"), dict) else json.loads(ckpt["config"])
    model = load_sampling_model(ckpt, args.model_weights)
    if (model.in_channels, model.input_size) != (1, 28):
        raise SystemExit(f"demo_eval.py: {path} is not a 28x28 one-channel (Fashion-MNIST pixel) model")
    tiny = {k: conv.TINY[k] for k in ("evaluator_epochs", "train_limit", "test_limit")} if args.tiny else {}
    cfg = conv.ConvConfig(samples=args.samples, **tiny)
    # arms=("vanilla",): no teacher targets are built, only the evaluator and its scorer
    _, scorer, _, eval_acc, _ = conv.prepare(dataclasses.replace(cfg, arms=("vanilla",)), data_dir=args.data,
                                             evaluator_dir=args.evaluator_dir, progress=False)
    scores = scorer.score(draw(model, settings, args.samples), torch.arange(args.samples) % 10)
    result = {"command": shlex.join(["python", "benchmarks/demo_eval.py", *(sys.argv[1:] if argv is None else argv)]),
              "checkpoint": str(path), "step": int(ckpt.get("step", -1)), "weights": args.model_weights,
              "sampler": {k: settings[k] for k in ("sample_mode", "sample_steps", "path_type")},
              "samples": args.samples, "scores": scores, "real_vs_real": scorer.floor,
              "evaluator_test_accuracy": eval_acc, "seconds": time.perf_counter() - t0}
    print(f"{path} (step {result['step']}, {args.model_weights} weights, {settings['sample_mode']} "
          f"{settings['sample_steps']} steps): FD {scores['fd']:.2f}, class consistency "
          f"{scores['class_consistency']:.3f}, precision {scores['precision']:.3f}, recall {scores['recall']:.3f} "
          f"({args.samples} samples); real vs real: FD {scorer.floor['fd']:.2f}, class consistency "
          f"{scorer.floor['class_consistency']:.3f}")
    if args.json:
        write_json(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
