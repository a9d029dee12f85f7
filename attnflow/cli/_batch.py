"""``attnflow batch INPUT.jsonl --out DIR``: explain a whole file of texts on Dask (see [`attnflow.batch`][attnflow.batch])."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .._errors import OptionError
from ..batch import Malformed, run_batch
from ..batch._settings import DEFAULT_SOURCES
from ..batch._store import EXAMPLES_DIR, TABLE
from ._common import (
    add_batch_size_flag,
    add_methods_flag,
    add_model_flags,
    add_option_flags,
    add_progress_flag,
    add_sources_flag,
    add_target_flag,
    options_from,
    parse_sources,
    parse_target,
    warn_deprecated,
)


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
    add_model_flags(parser, out="results")
    add_methods_flag(parser)
    add_sources_flag(parser)
    parser.add_argument(
        "--all-layers", action="store_true",
        help="keep every layer (per-layer methods at each layer, cumulative ones up to each layer), not only the last",
    )
    add_target_flag(parser)
    parser.add_argument(
        "--target-field", default="target", metavar="NAME",
        help="the JSONL field holding an encoder-decoder's decoder text, whose tokens are explained (default: "
        "target); not to be confused with --target, the score gradient methods explain",
    )
    add_option_flags(parser)
    add_batch_size_flag(parser)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, default=None, help="worker processes of the embedded cluster (default: one per core)")
    where.add_argument(
        "--scheduler", default=None,
        help="address of an existing Dask scheduler, e.g. tcp://HOST:8786, or tls://HOST:8786 with the --tls-* options",
    )
    parser.add_argument("--tls-ca-file", default=None, help="with --scheduler tls://...: CA certificate (PEM) to check the scheduler")
    parser.add_argument("--tls-cert", default=None, help="with --scheduler tls://...: this client's certificate (PEM)")
    parser.add_argument("--tls-key", default=None, help="with --scheduler tls://...: this client's private key (PEM)")
    add_progress_flag(parser)
    parser.set_defaults(func=run)


def sources_from(items: list[str] | None) -> Any:
    """``--sources`` for [`attnflow.batch.run_batch`][attnflow.batch.run_batch]: positions (token texts are refused: the same text
    may sit at other positions in other lines), ``"all"``, or the default (0)."""
    if items is None:
        return DEFAULT_SOURCES
    sources = parse_sources(items)
    if sources is None:
        return "all"
    texts = [s for s in sources if isinstance(s, str)]
    if texts:
        raise OptionError(
            f"batch --sources takes token positions (or all), not token texts ({', '.join(map(repr, texts))}): a "
            "text may sit at different positions in different lines. Give positions, e.g. --sources 0,-1."
        )
    return sources


def target_from(value: str) -> int | str | None:
    """``--target`` for [`attnflow.batch.run_batch`][attnflow.batch.run_batch] (auto: the argmax logit, or the
    embedding target for a model without logits; embedding; a logit index; argmax: a deprecated alias of auto)."""
    if value == "argmax":
        warn_deprecated("--target argmax", "--target auto")
        return None
    return parse_target(value)


def run(args: argparse.Namespace) -> int:
    def report(item: Malformed) -> None:
        print(f"attnflow: {args.input}: {item}; skipped", file=sys.stderr)

    options = options_from(args)
    sources = sources_from(args.sources)
    target = target_from(args.target)
    try:
        summary = run_batch(
            args.input, args.out, model=args.model, adapter=args.adapter, methods=args.methods,
            sources=sources, all_layers=args.all_layers, options=options, target=target,
            max_length=args.max_length,
            batch_size=args.batch_size, workers=args.workers, scheduler=args.scheduler,
            progress=not args.no_progress, on_malformed=report, trust_remote_code=args.trust_remote_code,
            tls_ca_file=args.tls_ca_file, tls_cert=args.tls_cert, tls_key=args.tls_key,
            target_field=args.target_field,
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
