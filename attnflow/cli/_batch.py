"""``attnflow batch INPUT.jsonl --out DIR``: explain a whole file of texts on Dask (see :mod:`attnflow.batch`)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .._errors import OptionError
from ..batch import Malformed, run_batch
from ..batch._driver import DEFAULT_BATCH_SIZE
from ..batch._settings import DEFAULT_METHODS
from ..batch._store import EXAMPLES_DIR, TABLE
from ..methods._flow import DEFAULT_MAX_SECONDS
from ..methods._options import Options
from ..methods._registry import list_methods


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "batch",
        help="explain every text of a JSONL file on a Dask cluster",
        description=(
            "Run a model on every line of INPUT (JSON objects with a \"text\" field, an optional \"id\" and, for "
            "encoder-decoder models, a \"target\": the decoder's text, whose tokens are explained) and write one "
            f"explanation per example (OUT/{EXAMPLES_DIR}/ID.safetensors, read with attnflow.load) and per-token "
            f"scores (OUT/{TABLE}: id, method, layer, source, source_token, stream, token_index, token, score). "
            "Re-running the same command skips the examples already written; malformed lines are reported "
            "with their line numbers and skipped. One run at a time may write into OUT. Security: the embedded "
            "Dask cluster listens on 127.0.0.1 without authentication while it runs, so other local users could "
            "submit work to it; on a shared machine use --scheduler tls://HOST:PORT with the --tls-* options."
        ),
    )
    parser.add_argument("input", help="JSONL file, one {\"text\": ..., \"id\": ..., \"target\": ...} object per line")
    parser.add_argument("--out", default="results", help="output directory (default: results/)")
    parser.add_argument(
        "--model", default=None,
        help="model directory on the workers (default: the packaged all-MiniLM-L6-v2)",
    )
    parser.add_argument("--adapter", default="transformers", help="adapter that loads the model (default: transformers)")
    parser.add_argument(
        "--methods", default=",".join(DEFAULT_METHODS),
        help=f"comma-separated registered methods, any of {','.join(list_methods())}, or all: every method the "
        "adapter can capture for the model (those the model cannot serve are skipped, with the reason) "
        f"(default: {','.join(DEFAULT_METHODS)})",
    )
    parser.add_argument(
        "--sources", default="0",
        help="explained token positions, comma-separated (negative counts back from the last token, e.g. "
        "--sources=-1), or 'all'; of the decoder for encoder-decoder models (default: 0, the first token)",
    )
    parser.add_argument(
        "--all-layers", action="store_true",
        help="keep every layer (per-layer methods at each layer, cumulative ones up to each layer), not only the last",
    )
    parser.add_argument(
        "--head-fusion", default=None, choices=("mean", "max", "min"),
        help="how heads are combined (default: the capture's fusion, else mean)",
    )
    parser.add_argument("--residual", type=float, default=0.5, help="residual weight r in (1-r)A + rI (default 0.5)")
    parser.add_argument("--discard-ratio", type=float, default=0.0, help="drop this fraction of lowest weights")
    parser.add_argument(
        "--layers", default=None,
        help="layers taking part, of the explained stream: START:END (end exclusive, either may be left out, "
        "negatives count from the end: --layers=-2:) or comma-separated indices (default: all)",
    )
    parser.add_argument(
        "--target", default=None,
        help="for methods that need attention gradients (grad_rollout, attn_grad): the logit index (class or "
        "vocabulary id) whose gradient weighs the attention, or 'argmax' (default); the model must have logits. "
        "Not the lines' \"target\" (an encoder-decoder's decoder text)",
    )
    parser.add_argument("--max-length", type=int, default=None, help="truncate inputs to this many tokens")
    parser.add_argument(
        "--max-seconds", type=float, default=DEFAULT_MAX_SECONDS,
        help="per example, refuse flow problems estimated to take longer (the example is reported as failed)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
        help=f"texts per forward pass and per Dask task (default {DEFAULT_BATCH_SIZE})",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, default=None, help="worker processes of the embedded cluster (default: one per core)")
    where.add_argument(
        "--scheduler", default=None,
        help="address of an existing Dask scheduler, e.g. tcp://HOST:8786, or tls://HOST:8786 with the --tls-* options",
    )
    parser.add_argument("--tls-ca-file", default=None, help="with --scheduler tls://...: CA certificate (PEM) to check the scheduler")
    parser.add_argument("--tls-cert", default=None, help="with --scheduler tls://...: this client's certificate (PEM)")
    parser.add_argument("--tls-key", default=None, help="with --scheduler tls://...: this client's private key (PEM)")
    parser.add_argument(
        "--trust-remote-code", action="store_true",
        help="allow a model directory that ships its own Python code (auto_map in config.json): this RUNS that "
        "code with your permissions on every worker; only for directories you trust",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def options_from(args: argparse.Namespace) -> Options:
    """The :class:`Options` of the command line's method flags (checked)."""
    return Options(
        head_fusion=args.head_fusion, residual=args.residual, discard_ratio=args.discard_ratio,
        layers=parse_layers(args.layers), max_seconds=args.max_seconds,
    )


def parse_layers(text: str | None) -> Any:
    """``--layers``: None, ``START:END`` as a ``(start, end)`` pair (either may be None), or a list of indices."""
    if text is None:
        return None
    try:
        if ":" in text:
            start, end = (part.strip() for part in text.split(":"))
            return (int(start) if start else None, int(end) if end else None)
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise OptionError(
            f"--layers must be START:END (e.g. 2:6, or -2: for the last two) or comma-separated layer indices "
            f"(e.g. 0,3,5); got {text!r}."
        ) from None


def parse_target(text: str | None) -> int | str | None:
    """``--target``: None (not given), ``"argmax"``, or a logit index."""
    if text is None or text == "argmax":
        return text
    try:
        return int(text)
    except ValueError:
        raise OptionError(f"--target must be a logit index (e.g. 3) or 'argmax'; got {text!r}.") from None


def run(args: argparse.Namespace) -> int:
    def report(item: Malformed) -> None:
        print(f"attnflow: {args.input}: {item}; skipped", file=sys.stderr)

    options = options_from(args)
    try:
        summary = run_batch(
            args.input, args.out, model=args.model, adapter=args.adapter, methods=args.methods,
            sources=args.sources, all_layers=args.all_layers, options=options, target=parse_target(args.target),
            max_length=args.max_length,
            batch_size=args.batch_size, workers=args.workers, scheduler=args.scheduler,
            progress=not args.no_progress, on_malformed=report, trust_remote_code=args.trust_remote_code,
            tls_ca_file=args.tls_ca_file, tls_cert=args.tls_cert, tls_key=args.tls_key,
        )
    except KeyboardInterrupt:
        print("attnflow: interrupted; the examples written so far are kept: run the same command to resume.", file=sys.stderr)
        return 130
    for note in summary.notes:
        print(f"attnflow: {note}", file=sys.stderr)
    for example_id, reason in summary.recomputed:
        print(f"attnflow: example {example_id!r} was recomputed: {reason}", file=sys.stderr)
    for example_id, reason in summary.failed:
        print(f"attnflow: example {example_id!r} failed: {reason}", file=sys.stderr)
    print(f"attnflow batch: {summary}")
    print(f"wrote {summary.out}/ ({EXAMPLES_DIR}/*.safetensors, {TABLE}: {summary.rows} rows, summary.json)")
    if summary.total == 0:
        print(f"attnflow: error: {args.input} has no valid line, so nothing was explained; each line needs a JSON "
              "object with a non-empty \"text\".", file=sys.stderr)
        return 1
    return 1 if summary.failed else 0
