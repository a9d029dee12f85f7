"""The ``attnflow`` command line: explain, compare, batch, evaluate.

Each subcommand lives in its own module exposing ``add_parser(subparsers)``, which registers the
subcommand and sets ``func(args) -> int`` as its entry. Subcommand modules import no framework at
import time.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from .._errors import AttnflowError
from .._version import __version__

SUBCOMMANDS: tuple[str, ...] = ("attnflow.cli._explain", "attnflow.cli._compare", "attnflow.cli._batch")
SUBCOMMANDS += ("attnflow.cli._evaluate",)  # faithfulness over a data set


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnflow", description="Attention rollout and attention flow for transformer models."
    )
    parser.add_argument("--version", action="version", version=f"attnflow {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS:
        importlib.import_module(module).add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status.

    Every expected failure is one line on stderr, ``attnflow: error: ...``, and status 1: attnflow's own
    errors, and (as a last resort) an operating-system error that no command turned into one. Ctrl-C is
    status 130. Usage errors are argparse's (status 2).
    """
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except AttnflowError as exc:
        print(f"attnflow: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"attnflow: error: {exc.strerror or exc}{where}.", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("attnflow: interrupted.", file=sys.stderr)
        return 130


def _one_line(exc: BaseException) -> str:
    """The message on one line (errors quoting other libraries' messages may span several)."""
    return " ".join(part.strip() for part in str(exc).splitlines() if part.strip())

