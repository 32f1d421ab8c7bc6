"""REPA's per-step cost: vanilla vs online encoder vs cached features vs stopped, on CPU or GPU.

    python benchmarks/overhead.py                       # CPU default, about 1.5 minutes on 2 cores
    python benchmarks/overhead.py --device cuda --model SiT-XL/2 --batch-size 128 --dtype bf16 --compile
    python benchmarks/overhead.py --json overhead.json  # also write every number as JSON
    python benchmarks/overhead.py --tiny                # tiny SiT and encoder, seconds (dry run)

Same SiT, batch and data in every arm; the arms are interleaved (A B C D A B C D ...) so that
drift of the machine cancels. Prints the exact command, the counted FLOPs per image and a
markdown table: median step time (and IQR), images/s, peak memory, each arm's ratio to vanilla
beside the FLOP-based expectation, and measured / expected. Weights are random: speed does
not depend on them, and nothing is downloaded. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402

#: The CPU default: the paper's SiT-B/2 + DINOv2-B pair at 256 px (32x32x4 latents, 16x16
#: tokens, alignment after block 4), batch 2, 7 timed rounds: about 1.5 minutes on 2 idle cores.
CPU_DEFAULT = _common.BenchConfig(
    model="SiT-B/2",
    encoder="dinov2-vit-b",
    batch_size=2,
    resolution=256,
    dtype="fp32",
    device="cpu",
    warmup=1,
    repeats=7,
)


#: ``--tiny``: a tiny SiT and encoder with the real geometry, on CPU, in seconds (tests, dry runs).
TINY_DEFAULT = dataclasses.replace(
    CPU_DEFAULT,
    model=_common.TINY_SIT,
    encoder=_common.TINY_ENCODER,
    batch_size=4,
    resolution=64,
    projector_dim=64,
    warmup=1,
    repeats=3,
)


def build_parser(defaults: _common.BenchConfig = CPU_DEFAULT) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Per-step cost of REPA (online encoder, cached features, stopped) against vanilla SiT training.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--tiny", action="store_true", help="tiny SiT and encoder defaults (seconds on CPU)")
    _common.add_arguments(parser, defaults)
    parser.add_argument("--json", default=None, metavar="PATH", help="write the full result as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list | None = None) -> int:
    tiny = build_parser().parse_known_args(argv)[0].tiny
    args = build_parser(TINY_DEFAULT if tiny else CPU_DEFAULT).parse_args(argv)  # explicit options still win
    cfg = _common.config_from_args(args)
    script = os.path.relpath(os.path.abspath(__file__))
    print(f"Command: {_common.invoked_command()}")
    print(f"Resolved: {_common.command_line(script, cfg)}")
    result = _common.run_benchmark(cfg, progress=not args.no_progress)
    result["command"] = _common.invoked_command()
    result["resolved_command"] = _common.command_line(script, cfg)

    env = result["environment"]
    print()
    print(
        f"{cfg.model} + {cfg.encoder} at {cfg.resolution}px (latent {cfg.resolution // 8}x{cfg.resolution // 8}x4), "
        f"align {result['layer']}, projector {cfg.projector_dim}, batch {cfg.batch_size}, {cfg.dtype}, "
        f"compile {'on' if cfg.compile else 'off'}, {env['device']}"
        + (f" ({env['device_name']})" if "device_name" in env else f", {env['torch_threads']} threads")
        + f", torch {env['torch']}; {cfg.repeats} timed rounds after {cfg.warmup} warm-up"
    )
    print(_common.format_flops(result))
    print(f"Memory: {result['memory_measure']}")
    print()
    print(_common.format_table(result))
    print()
    print(f"Total wall time {result['wall_s']:.1f} s")
    if args.json:
        _common.write_json(result, args.json)
        print(f"Wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
