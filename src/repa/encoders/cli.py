"""``repa encoders``: the registered encoders and whether their weights are on this machine.

    repa encoders                 # table of every encoder
    repa encoders dinov2          # names containing "dinov2" (or a wildcard: "vit_*_dinov2*")
    repa encoders --json          # the specs plus availability, for scripts
    repa encoders --resolution 512

Nothing is built or downloaded: sizes come from the specs and availability from file checks.
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any, Dict, List, Optional

__all__ = ["add_arguments", "main", "encoder_rows"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``repa encoders``."""
    parser.add_argument(
        "pattern", nargs="?", default=None, help="substring or wildcard filter on names (case-insensitive)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON (one object per encoder) instead of a table")
    parser.add_argument(
        "--resolution", type=int, default=256, help="training-image size R for the input and grid columns (default 256)"
    )
    parser.add_argument("--cache-dir", default=None, help="Hugging Face cache to check (default: the standard one)")


def _params(spec: Any) -> int:
    if spec.params is not None:
        return int(spec.params)
    from .registry import create_encoder  # a user entry without a count: build it on the meta device

    try:
        enc = create_encoder(spec.name, pretrained=False, device="meta")
    except Exception:
        return -1
    return sum(p.numel() for p in enc.model.parameters())


def encoder_rows(
    pattern: Optional[str] = None, resolution: int = 256, cache_dir: Optional[str] = None
) -> List[Dict[str, Any]]:
    """One dict per encoder: its spec, derived sizes at ``resolution`` and local availability."""
    from .registry import get_encoder_spec, list_encoders
    from .weights import locate_weights

    rows = []
    for name in list_encoders(pattern):
        spec = get_encoder_spec(name)
        path, _ = locate_weights(spec, cache_dir)
        row = spec.to_dict()
        h, w = spec.encoder_input_size(resolution)
        gh, gw = spec.grid(resolution)
        row.update(
            resolution=resolution,
            input=[h, w],
            grid=[gh, gw],
            tokens=gh * gw,
            params=_params(spec),
            available=path is not None,
            weights_path=str(path) if path is not None else None,
        )
        rows.append(row)
    return rows


def _fmt_params(n: int) -> str:
    if n < 0:
        return "?"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _table(rows: List[Dict[str, Any]], resolution: int) -> str:
    header = ["name", "family", "dim", "patch", f"input@{resolution}", "tokens", "params", "license", "weights", "local"]
    body = []
    for r in rows:
        body.append(
            [
                r["name"],
                r["family"],
                str(r["embed_dim"]),
                str(r["patch_size"]),
                f"{r['input'][0]} ({r['resize_rule']})",
                f"{r['grid'][0]}x{r['grid'][1]}",
                _fmt_params(r["params"]),
                r["license"],
                r["weights_source"],
                "yes" if r["available"] else "no",
            ]
        )
    widths = [max([len(header[i])] + [len(row[i]) for row in body]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in body]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """Print the encoder table (or JSON); exit code 1 when the pattern matches nothing."""
    rows = encoder_rows(args.pattern, args.resolution, args.cache_dir)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        if rows:
            print(_table(rows, args.resolution))
            n_local = sum(r["available"] for r in rows)
            print(
                f"\n{len(rows)} encoders, {n_local} with weights on this machine. Local files go to "
                f"$REPA_HOME/encoders/<name>.safetensors (or .pth); see create_encoder(name, weights=...)."
            )
    if not rows:
        logging.getLogger("repa").warning("no encoder matches %r; run `repa encoders` for the full list", args.pattern)
        return 1
    return 0
