"""REPA on one GPU: SiT-B/2 and SiT-XL/2 at 256 px with DINOv2-B, bf16, compile off and on.

    bash benchmarks/gpu_benchmark.sh                    # offline, tees the log, writes JSON
    python benchmarks/gpu_benchmark.py --json gpu.json  # the same without the wrapper
    python benchmarks/gpu_benchmark.py --tiny           # the same code path on CPU in seconds

For each model (SiT-B/2 at batch 256; SiT-XL/2 at 256, falling back to 128 when memory runs
out) and each compile mode it measures the four arms of ``overhead.py`` interleaved (vanilla,
online encoder, cached features, stopped): images/s, model FLOP utilization (MFU = counted
FLOPs per step / step time / the GPU's dense bf16 peak), REPA's overhead ratios against
vanilla beside their FLOP expectation, and peak memory. Needs only torch, timm and this repo
(random weights, nothing downloaded). Prints one markdown table and writes every number as JSON.
Runs in about 5-8 minutes on an H100/H200 (compilation is most of it); ``--budget-s``
skips what would start too late.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import _common  # noqa: E402

#: (model, batch sizes to try in order): the paper's 256 per GPU, XL falls back to 128.
GPU_RUNS: Tuple[Tuple[str, Tuple[int, ...]], ...] = (("SiT-B/2", (256,)), ("SiT-XL/2", (256, 128)))
TINY_RUNS: Tuple[Tuple[str, Tuple[int, ...]], ...] = ((_common.TINY_SIT, (4, 2)),)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="One-GPU benchmark of REPA's cost: SiT-B/2 and SiT-XL/2 with DINOv2-B, bf16, compile off/on.",
    )
    parser.add_argument("--tiny", action="store_true", help="tiny SiT and encoder on CPU (tests, dry runs)")
    parser.add_argument("--encoder", default=None, help="encoder registry name (default dinov2-vit-b; tiny: tiny-vit)")
    parser.add_argument("--resolution", type=int, default=None, help="image px (default 256; tiny: 64)")
    parser.add_argument("--dtype", choices=sorted(_common.DTYPES), default="bf16", help="autocast dtype (default bf16)")
    parser.add_argument("--device", default=None, help="default cuda (tiny: cpu)")
    parser.add_argument("--compile-modes", default="off,on", help="comma list of off/on, run in order (default off,on)")
    parser.add_argument("--compile-backend", default="inductor", help="backend for the SiT (default inductor)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds, eager (default 3; tiny 1)")
    parser.add_argument("--compile-warmup", type=int, default=None, help="untimed rounds, compiled (default 3; tiny 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 10; tiny 2)")
    parser.add_argument("--projector-dim", type=int, default=None, help="MLP projector width (default 2048; tiny 64)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the GPU's dense bf16 peak for MFU")
    parser.add_argument("--budget-s", type=float, default=420.0, help="start no new run after this many seconds (default 420)")
    parser.add_argument("--json", default="gpu_benchmark.json", metavar="PATH", help="where to write the results (default gpu_benchmark.json)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def _pick(value: Any, default: Any, tiny_default: Any, tiny: bool) -> Any:
    return value if value is not None else (tiny_default if tiny else default)


def plan_runs(args: argparse.Namespace) -> List[_common.BenchConfig]:
    """The measurements to make, in order (eager first: compilation is the slow part)."""
    tiny = args.tiny
    runs = TINY_RUNS if tiny else GPU_RUNS
    modes = [m.strip() for m in args.compile_modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("off", "on")]
    if bad or not modes:
        raise SystemExit(f"--compile-modes takes a comma list of 'off' and 'on', got {args.compile_modes!r}")
    configs = []
    for mode in modes:
        for model, batches in runs:
            compiled = mode == "on"
            warmup = _pick(args.compile_warmup if compiled else args.warmup, 3, 1, tiny)
            configs.append(
                _common.BenchConfig(
                    model=model,
                    encoder=_pick(args.encoder, "dinov2-vit-b", _common.TINY_ENCODER, tiny),
                    batch_size=batches[0],
                    resolution=_pick(args.resolution, 256, 64, tiny),
                    dtype=args.dtype,
                    compile=compiled,
                    compile_backend=args.compile_backend,
                    device=_pick(args.device, "cuda", "cpu", tiny),
                    warmup=warmup,
                    repeats=_pick(args.repeats, 10, 2, tiny),
                    projector_dim=_pick(args.projector_dim, 2048, 64, tiny),
                    peak_tflops=args.peak_tflops,
                )
            )
    return configs


def fallback_batches(model: str, tiny: bool) -> Tuple[int, ...]:
    """The batch sizes to try for ``model``, largest first."""
    for name, batches in TINY_RUNS if tiny else GPU_RUNS:
        if name == model:
            return batches
    return ()


def is_out_of_memory(exc: BaseException) -> bool:
    """True for a CUDA out-of-memory error, also when compilation wrapped it in another exception."""
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    while exc is not None:
        if isinstance(exc, oom) or "out of memory" in str(exc).lower():
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _free_memory() -> None:
    torch._dynamo.reset()  # compiled graphs of a finished run hold its model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_with_fallback(
    cfg: _common.BenchConfig,
    batches: Sequence[int],
    measure: Callable[[_common.BenchConfig], Dict[str, Any]],
    log: Callable[[str], None] = print,
) -> Tuple[Optional[Dict[str, Any]], List[Dict[str, Any]]]:
    """Measure ``cfg`` at the first batch size of ``batches`` that fits in memory.

    Returns the result (None when none fit) and the attempts that ran out of memory.
    """
    failures: List[Dict[str, Any]] = []
    for batch in batches:
        attempt = dataclasses.replace(cfg, batch_size=batch)
        try:
            return measure(attempt), failures
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else "out of memory"
            log(f"  {cfg.model} at batch {batch}: out of memory ({first_line[:120]}); trying a smaller batch")
            failures.append({"batch_size": batch, "error": first_line})
        _free_memory()
    return None, failures


def summary_table(runs: List[Dict[str, Any]]) -> str:
    """One markdown row per (model, batch, compile): throughput, MFU, REPA ratios, memory."""
    lines = [
        "| model | batch | compile | vanilla img/s | vanilla MFU | online img/s | online / vanilla (expected) "
        "| cached / vanilla (expected) | stopped / vanilla | peak mem vanilla / online (GiB) |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def pct(x: Optional[float]) -> str:
        return "-" if x is None else f"{100 * x:.1f}%"

    def gib(x: Optional[float]) -> str:
        return "-" if x is None else f"{x / 1024:.1f}"

    for run in runs:
        cfg, arms = run["config"], run["arms"]
        v, on, ca, st = arms["vanilla"], arms["online"], arms["cached"], arms["stopped"]
        lines.append(
            f"| {cfg['model']} | {cfg['batch_size']} | {'on' if cfg['compile'] else 'off'} | "
            f"{v['images_per_s']:.1f} | {pct(v['mfu'])} | {on['images_per_s']:.1f} | "
            f"{on['ratio_to_vanilla']:.3f} ({on['expected_ratio']:.3f}) | "
            f"{ca['ratio_to_vanilla']:.3f} ({ca['expected_ratio']:.3f}) | {st['ratio_to_vanilla']:.3f} | "
            f"{gib(v['peak_mem_mib'])} / {gib(on['peak_mem_mib'])} |"
        )
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    command = _common.invoked_command()
    print(f"Command: {command}")
    configs = plan_runs(args)
    device = torch.device(configs[0].device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device is visible; run on a GPU machine, or pass --tiny for the CPU dry run")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 leftovers outside autocast
        torch.backends.cudnn.allow_tf32 = True
    env = _common.environment(device)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else _common.gpu_peak_flops(device)
    print(
        f"Device: {env.get('device_name', env['device'])}, torch {env['torch']}, "
        f"peak {'unknown (pass --peak-tflops for MFU)' if peak is None else f'{peak / 1e12:.0f} TFLOP/s dense bf16'}"
    )

    output: Dict[str, Any] = {"command": command, "environment": env, "peak_flops": peak, "runs": [], "skipped": [], "oom": []}
    for cfg in configs:
        elapsed = time.perf_counter() - started
        label = f"{cfg.model}, compile {'on' if cfg.compile else 'off'}"
        if elapsed > args.budget_s:
            print(f"Skipping {label}: {elapsed:.0f} s spent, over --budget-s {args.budget_s:.0f}")
            output["skipped"].append({"model": cfg.model, "compile": cfg.compile, "reason": "time budget"})
            continue
        print(f"Running {label} ({elapsed:.0f} s so far)")
        result, failures = run_with_fallback(
            cfg,
            fallback_batches(cfg.model, args.tiny),
            lambda c: _common.run_benchmark(c, progress=not args.no_progress),
        )
        output["oom"] += [{"model": cfg.model, "compile": cfg.compile, **f} for f in failures]
        if result is None:
            output["skipped"].append({"model": cfg.model, "compile": cfg.compile, "reason": "out of memory at every batch"})
            continue
        result["resolved_command"] = _common.command_line("benchmarks/overhead.py", result_config(result))
        output["runs"].append(result)
        print(_common.format_flops(result))
        print(_common.format_table(result))
        print(f"({result['wall_s']:.0f} s)\n")
        _common.write_json(output, args.json)  # keep what is done even if a later run fails
        _free_memory()

    output["wall_s"] = time.perf_counter() - started
    print("## Summary\n")
    print(f"Command: `{command}`; {env.get('device_name', env['device'])}, torch {env['torch']}, {args.dtype}\n")
    if output["runs"]:
        print(summary_table(output["runs"]))
    for skip in output["skipped"]:
        print(f"- skipped {skip['model']} compile {'on' if skip['compile'] else 'off'}: {skip['reason']}")
    print(f"\nMemory: {output['runs'][0]['memory_measure'] if output['runs'] else '-'}")
    print(f"Total wall time {output['wall_s']:.0f} s")
    _common.write_json(output, args.json)
    print(f"Wrote {args.json}")
    return 0 if output["runs"] else 1


def result_config(result: Dict[str, Any]) -> _common.BenchConfig:
    """The :class:`BenchConfig` a result was measured with."""
    return _common.BenchConfig(**result["config"])


if __name__ == "__main__":
    sys.exit(main())
