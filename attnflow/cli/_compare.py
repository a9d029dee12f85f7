"""``attnflow compare A.safetensors B.safetensors``: are two saved traces the same, within tolerance?

Prints the [`ComparisonReport`][attnflow.ComparisonReport] table. Exit status: 0 when the traces agree, 1 when
they disagree beyond tolerance (like ``diff``; an error, e.g. traces that cannot be compared, also
exits 1 with an ``attnflow: error:`` message). ``--png`` / ``--html`` write a per-layer/head heatmap
of the max absolute attention difference, ``--json`` the report as JSON.
"""

from __future__ import annotations

import argparse
import base64
import functools
import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from .._compare import ALIGN_HELP, ComparisonReport, compare
from .._errors import OptionError
from .._tensorfile import atomic_write, check_writable_target
from ..trace import load
from ._common import (
    add_methods_flag,
    add_option_flags,
    add_sources_flag,
    parse_sources,
    resolve_sources,
    warn_deprecated,
)

#: The Options flags compare takes (what attnflow.compare() reads).
COMPARE_OPTIONS = ("head_fusion", "residual")
#: Compared whatever --methods says: raw attention and rollout, and flow unless --no-flow.
ALWAYS_COMPARED = ("raw", "rollout", "flow")


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "compare",
        help="compare two saved traces layer by layer and head by head",
        description="Compare two traces saved with AttentionTrace.save (e.g. a PyTorch model and its JAX port "
        "on the same input). Exits 0 when they agree within tolerance, 1 when they do not.",
    )
    parser.add_argument("trace_a", help="first trace (.safetensors)")
    parser.add_argument("trace_b", help="second trace (.safetensors)")
    parser.add_argument("--atol", type=float, default=None,
                        help="max |difference| of attention per head (default: by dtype, 1e-5 for float32)")
    parser.add_argument("--mean-atol", type=float, default=None, help="also limit each head's mean |difference|")
    parser.add_argument("--rollout-atol", type=float, default=None, help="max |difference| of rollout (default: atol)")
    parser.add_argument("--flow-atol", type=float, default=None, help="max |difference| of flow (default: atol)")
    parser.add_argument("--min-spearman", type=float, default=0.95,
                        help="lowest Spearman correlation of per-token scores (default 0.95; -1 to accept any)")
    parser.add_argument("--spearman-tie-tol", type=float, default=None,
                        help="scores closer than this rank as ties (default: by dtype, 1e-5 for float32)")
    parser.add_argument("--no-flow", action="store_true", help="skip attention flow (the costly part)")
    add_sources_flag(parser)  # the tokens whose flow and Spearman correlation are compared
    parser.add_argument("--flow-sources", nargs="+", default=None, help=argparse.SUPPRESS)  # deprecated: --sources
    parser.add_argument("--align", default="index", help=f"how to pair layers: {ALIGN_HELP}")
    parser.add_argument("--allow-unmatched", action="store_true",
                        help="with --align names/numbers, accept layers that only one trace has")
    add_methods_flag(parser)  # raw attention and rollout are always compared, flow unless --no-flow
    parser.add_argument("--methods-atol", type=float, default=None, help="their tolerance (default: rollout-atol)")
    add_option_flags(parser, COMPARE_OPTIONS)
    parser.add_argument("--png", default=None, metavar="PATH", help="write the per-layer/head difference heatmap")
    parser.add_argument("--html", default=None, metavar="PATH", help="write the table and heatmap as one HTML page")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the report as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.flow_sources is not None:
        if args.sources is not None:
            raise OptionError("--flow-sources is the deprecated form of --sources; give only --sources.")
        warn_deprecated("--flow-sources", "--sources")
        args.sources = args.flow_sources
    sources = parse_sources(args.sources)
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    extra = [m for m in names if m not in ALWAYS_COMPARED]
    for path, what in ((args.png, "heatmap"), (args.html, "HTML report"), (args.json, "JSON report")):
        if path:
            check_writable_target(path, what)  # before the (possibly long) comparison
    trace_a, trace_b = load(args.trace_a), load(args.trace_b)
    report = compare(
        trace_a, trace_b, atol=args.atol, mean_atol=args.mean_atol,
        rollout_atol=args.rollout_atol, flow_atol=args.flow_atol, min_spearman=args.min_spearman,
        spearman_tie_tol=args.spearman_tie_tol, flow=not args.no_flow,
        flow_sources=compared_sources(trace_a, args.sources, sources),
        align=args.align, allow_unmatched=args.allow_unmatched, head_fusion=args.head_fusion, residual=args.residual,
        methods=extra, methods_atol=args.methods_atol,
    )
    print(f"A = {args.trace_a}\nB = {args.trace_b}")
    print(report.to_table())
    outputs = (
        (args.png, "heatmap", lambda: heatmap_png(report)),
        (args.html, "HTML report", lambda: report_html(report, title=f"{args.trace_a} vs {args.trace_b}").encode()),
        (args.json, "JSON report", lambda: json.dumps(report.to_dict(), indent=1).encode()),
    )
    for path, what, render in outputs:
        if path:
            data = render()
            atomic_write(path, functools.partial(Path.write_bytes, data=data), what=what)
            print(f"wrote {path}")
    return 0 if report.ok else 1


def compared_sources(trace: Any, given: Any, sources: list[int | str] | None) -> list[int] | None:
    """``--sources`` as positions of trace A's explained stream (token texts looked up in it); ``all``: every
    position of the shortest item; not given: compare()'s default."""
    if given is None:
        return None
    if sources is None:
        return list(range(int(trace.streams[trace.default_stream()].lengths().min())))
    return resolve_sources(trace, sources)


def heatmap_png(report: ComparisonReport) -> bytes:
    """The max |attention difference| per layer (rows) and head (columns) as a PNG, log colour scale;
    heads beyond tolerance are outlined in red."""
    from matplotlib.colors import LogNorm

    from ..plot._figure import pyplot as _pyplot

    plt = _pyplot()
    grid = report.head_matrix()
    layers, heads = grid.shape
    floor = 1e-12
    shown = np.where(np.isnan(grid), np.nan, np.maximum(grid, floor))
    finite = shown[np.isfinite(shown)]
    vmax = max(float(finite.max()) if finite.size else 1.0, report.tolerances["atol"] * 10, floor * 10)
    vmin = max(min(float(finite.min()) if finite.size else floor, report.tolerances["atol"] / 10), floor)
    fig, ax = plt.subplots(figsize=(min(3 + 0.55 * heads, 24), min(2 + 0.45 * layers, 24)))
    image = ax.imshow(shown, cmap="magma", norm=LogNorm(vmin=vmin, vmax=vmax), aspect="auto")
    for layer, head in report.failing_heads:
        ax.add_patch(plt.Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    ax.set_xticks(range(heads), labels=[str(h) for h in range(heads)])
    ax.set_yticks(range(layers), labels=[f"{layer.label}: {layer.name_a}"[:40] for layer in report.layers], fontsize=7)
    ax.set_xlabel("head")
    ax.set_ylabel("layer (trace A, numbered from 1)")
    verdict = "agree" if report.ok else "DIFFER"
    ax.set_title(f"max |attention difference| per head (tolerance {report.tolerances['atol']:.0e}): {verdict}")
    colorbar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    colorbar.ax.axhline(report.tolerances["atol"], color="red", linewidth=1.5)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def report_html(report: ComparisonReport, *, title: str = "attnflow compare") -> str:
    """One self-contained HTML page: verdict, the heatmap (inline PNG) and the text table."""
    image = base64.b64encode(heatmap_png(report)).decode("ascii")
    colour = "#1a7f37" if report.ok else "#cf222e"
    verdict = "agree within tolerance" if report.ok else "differ beyond tolerance"
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title></head>\n<body style='font-family: sans-serif'>\n"
        f"<h1>{html.escape(title)}</h1>\n<p style='color: {colour}; font-weight: bold'>The traces {verdict}.</p>\n"
        f"<img alt='per-layer/head attention difference' src='data:image/png;base64,{image}'>\n"
        f"<pre>{html.escape(report.to_table())}</pre>\n</body></html>\n"
    )
