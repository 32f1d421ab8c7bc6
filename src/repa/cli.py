"""The ``repa`` command line: ``repa <command> [options]``.

Each command lives in its own module that defines ``add_arguments(parser)`` and
``main(args) -> int``; modules are imported only when their command runs, so ``repa --help``
stays fast and never imports heavy dependencies.

Errors: every :class:`repa.errors.REPAError` and every bad-file ``OSError`` ends the command with
one line ``error: <Class>: <message>`` on stderr and exit status 2; ``repa --debug <command>``
(or ``REPA_DEBUG=1``) also prints the traceback. Anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback
from typing import Callable, Sequence

#: exit status of a command stopped by a user error (bad input, a refused folder, a REPAError)
USER_ERROR_STATUS = 2

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "encoders": ("repa.encoders.cli", "list the registered frozen encoders and whether their weights are local"),
    "teacher": ("repa.sit.teacher", "train the small offline Fashion-MNIST teacher encoder (fmnist-vit)"),
    "train": ("repa.sit.train", "train a SiT with (or without) REPA: the reference recipe"),
    "sample": ("repa.sit.sample", "sample images from a training checkpoint (PNGs + ADM .npz)"),
    "cache": ("repa.cache", "precompute encoder target tokens (and VAE latents) to disk; 'cache verify DIR'"),
    "probe": ("repa.sit.probe", "measure alignment (CKNNA, linear probe) of a checkpoint's layers"),
    "fd": ("repa.fd", "Frechet distance between two image sets in any registry encoder's feature space"),
}


def _top_parser(commands: dict[str, tuple[str, str]]) -> argparse.ArgumentParser:
    lines = "\n".join(f"  {name:<10} {help_}" for name, (_, help_) in commands.items())
    parser = argparse.ArgumentParser(
        prog="repa",
        description="REPA: representation alignment for diffusion models.",
        epilog=f"commands:\n{lines}\n\nRun 'repa <command> --help' for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from repa._version import __version__

    parser.add_argument("--version", action="version", version=f"repa {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (also: REPA_DEBUG=1)")
    parser.add_argument("command", nargs="?", help="one of: " + ", ".join(commands))
    return parser


def debug_enabled() -> bool:
    """Whether ``REPA_DEBUG`` asks for tracebacks."""
    return os.environ.get("REPA_DEBUG", "").strip().lower() not in ("", "0", "false", "no", "off")


def error_line(exc: BaseException) -> str:
    """``error: <Class>: <message>`` on one line.

    An error re-raised from a DataLoader worker carries the worker's traceback in its message;
    only its last line (the original message) is kept.
    """
    message = str(exc)
    if "Original Traceback" in message:
        last = [line for line in message.splitlines() if line.strip()][-1]
        prefix = f"{type(exc).__module__}.{type(exc).__name__}: "
        message = last[len(prefix):] if last.startswith(prefix) else last
    message = " ".join(message.split())
    return f"error: {type(exc).__name__}: {message}"


class _StderrHandler(logging.StreamHandler):
    """Writes to the current ``sys.stderr`` (which tools and tests may replace), not the one at setup."""

    @property  # type: ignore[override]
    def stream(self):  # noqa: D401
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _show_status_messages() -> None:
    """Status messages of the ``repa`` logger (INFO and up) go to stderr, once per process.

    Only the command line does this: a program that imports ``repa`` sees its messages only
    through the logging configuration it sets up itself. A handler the user already attached to
    the ``repa`` logger is kept and none is added (a ``NullHandler`` does not count).
    """
    logger = logging.getLogger("repa")
    if not any(not isinstance(h, logging.NullHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("repa: %(message)s"))
        logger.addHandler(handler)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)


def run_command(run: Callable[[], int], debug: bool = False) -> int:
    """Run a command's ``main``; user errors become one line on stderr and exit status 2."""
    from repa.errors import REPAError

    debug = debug or debug_enabled()
    _show_status_messages()
    try:
        return int(run() or 0)
    except (REPAError, OSError) as exc:
        if debug:
            traceback.print_exc()
        print(error_line(exc), file=sys.stderr, flush=True)
        return USER_ERROR_STATUS
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("error: KeyboardInterrupt: interrupted", file=sys.stderr, flush=True)
        return 130


def finish_process(code: int) -> int:
    """The exit status to return; under a multi-process ``torchrun`` the process ends here instead.

    After a finished distributed run (process group destroyed, files closed), the gloo
    backend's threads can abort interpreter finalization ("terminate called without an active
    exception", SIGABRT), which torchrun reports as a failed run. Under torchrun with more
    than one process, logging and the standard streams are flushed and the process exits with
    ``code`` directly, skipping that finalization. Elsewhere ``code`` is returned unchanged.
    """
    if os.environ.get("TORCHELASTIC_RUN_ID") is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``repa`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = False
    while argv and argv[0] == "--debug":
        debug = True
        argv = argv[1:]
    commands = COMMANDS
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
    args = parser.parse_args(rest)  # bad flags: argparse's usage and error, exit 2
    return finish_process(run_command(lambda: module.main(args), debug))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
