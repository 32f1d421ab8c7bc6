"""Command-line helpers shared by the `repa` subcommands: the old flag names kept as hidden aliases."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_hidden_alias"]


def add_hidden_alias(parser: Any, *flags: str, dest: str, **kwargs: Any) -> None:
    """Accept ``flags`` as another spelling of the option stored in ``dest``, left out of ``--help``.

    The alias sets no default (the documented flag owns it), so giving neither keeps that default
    and giving the alias stores into the same ``dest`` as the documented flag.
    """
    parser.add_argument(*flags, dest=dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs)
