"""The ``repa`` command line: ``repa <command> [options]``.

Each command lives in its own module that defines ``add_arguments(parser)`` and
``main(args) -> int``; modules are imported only when their command runs, so ``repa --help``
stays fast and never imports heavy dependencies.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "encoders": ("repa.encoders.cli", "list the registered frozen encoders and whether their weights are local"),
    "teacher": ("repa.sit.teacher", "train the small offline Fashion-MNIST teacher encoder (fmnist-vit)"),
    "train": ("repa.sit.train", "train a SiT with (or without) REPA: the reference recipe"),
    "sample": ("repa.sit.sample", "sample images from a training checkpoint (PNGs + ADM .npz)"),
    "cache": ("repa.cache", "precompute encoder target tokens (and VAE latents) to disk; 'cache verify DIR'"),
    "probe": ("repa.probe", "measure alignment (CKNNA, linear probe) of a checkpoint's layers"),
    "fd": ("repa.fd", "Frechet distance between two image sets in any registry encoder's feature space"),
}


def _available() -> dict[str, tuple[str, str]]:
    return {name: spec for name, spec in COMMANDS.items() if importlib.util.find_spec(spec[0]) is not None}


def _top_parser(commands: dict[str, tuple[str, str]]) -> argparse.ArgumentParser:
    lines = "\n".join(f"  {name:<10} {help_}" for name, (_, help_) in commands.items())
    parser = argparse.ArgumentParser(
        prog="repa",
        description="REPA: representation alignment for diffusion models.",
        epilog=f"commands:\n{lines}\n\nRun 'repa <command> --help' for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from repa import __version__

    parser.add_argument("--version", action="version", version=f"repa {__version__}")
    parser.add_argument("command", nargs="?", help="one of: " + ", ".join(commands))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``repa`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = _available()
    if not argv or argv[0].startswith("-"):
        parser = _top_parser(commands)
        parser.parse_args(argv)
        parser.print_help()
        return 0 if not argv else 2
    name, rest = argv[0], argv[1:]
    if name not in commands:
        import difflib

        close = difflib.get_close_matches(name, list(commands), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        print(f"repa: unknown command {name!r}; choose from {', '.join(commands)}.{hint}", file=sys.stderr)
        return 2
    module = importlib.import_module(commands[name][0])
    parser = argparse.ArgumentParser(prog=f"repa {name}", description=commands[name][1])
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    from repa.errors import REPAError

    try:
        return int(module.main(args) or 0)
    except REPAError as exc:
        print(f"repa {name}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
