"""The ``attnflow`` command line: explain, compare, batch.

Each subcommand lives in its own module exposing ``add_parser(subparsers)``, which registers the
subcommand and sets ``func(args) -> int`` as its entry. Subcommand modules import no framework at
import time.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from ._errors import AttnflowError

SUBCOMMANDS = ("attnflow._cli_explain", "attnflow._cli_compare", "attnflow._cli_batch")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnflow", description="Attention rollout and attention flow for transformer models."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS:
        importlib.import_module(module).add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (1 for an attnflow error, with its message)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except AttnflowError as exc:
        print(f"attnflow: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
