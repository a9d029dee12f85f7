"""``attnflow explain TEXT``: raw attention, rollout and flow of one input, as pictures, JSON and a table."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import OptionError
from .._models import packaged_model_dir
from .._tensorfile import atomic_write, make_directory
from ..capture._adapter import load_model
from ..capture._capture import capture
from ..capture._registry import get_adapter
from ..methods import flow, raw, rollout
from ..methods._fusion import check_max_seconds, check_options


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "explain",
        help="explain one input with raw attention, rollout and flow",
        description="Run a model on TEXT and write heatmaps, per-token scores, the trace and JSON to --out.",
    )
    parser.add_argument("text", help="the input text")
    parser.add_argument(
        "--model", default=None,
        help="local Hugging Face model directory, or a hub id on machines with network "
        "(default: the packaged all-MiniLM-L6-v2)",
    )
    parser.add_argument("--adapter", default="transformers", help="adapter that loads the model (default: transformers)")
    parser.add_argument("--out", default="attnflow-out", help="output directory (default: attnflow-out/)")
    parser.add_argument("--head-fusion", default="mean", choices=("mean", "max", "min"))
    parser.add_argument("--residual", type=float, default=0.5, help="residual weight r in (1-r)A + rI (default 0.5)")
    parser.add_argument("--discard-ratio", type=float, default=0.0, help="drop this fraction of lowest weights")
    parser.add_argument("--top", type=int, default=5, help="input tokens to list per method (default 5)")
    parser.add_argument("--max-seconds", type=float, default=1800.0, help="refuse flow problems estimated longer")
    parser.add_argument(
        "--max-length", type=int, default=None,
        help="explain only the first N tokens of a text longer than the model takes (default: refuse such a text)",
    )
    parser.add_argument(
        "--trust-remote-code", action="store_true",
        help="allow a model directory that ships its own Python code (auto_map in config.json): this RUNS that "
        "code with your permissions; only for directories you trust",
    )
    parser.set_defaults(func=run)


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse bad settings before anything is loaded."""
    check_options(args.residual, args.discard_ratio)
    check_max_seconds(args.max_seconds)
    if args.top < 1:
        raise OptionError(f"--top must be at least 1 (input tokens to list per method), got {args.top}.")
    if args.max_length is not None and args.max_length < 2:
        raise OptionError(f"--max-length must be at least 2 tokens, got {args.max_length}.")


def run(args: argparse.Namespace) -> int:
    check_arguments(args)
    adapter = get_adapter(args.adapter)
    out = make_directory(Path(args.out))
    location = args.model or packaged_model_dir()
    timings: dict[str, float] = {}

    start = time.perf_counter()
    model, tokenizer = load_model(adapter, location, trust_remote_code=args.trust_remote_code)
    timings["load"] = time.perf_counter() - start

    start = time.perf_counter()
    inputs = adapter.encode(tokenizer, [args.text], max_length=args.max_length)
    trace = capture(model, adapter=adapter, tokens=tokenizer, **inputs)
    timings["capture"] = time.perf_counter() - start
    trace = trace.replace(metadata={**trace.metadata, "model_location": str(location)})

    options = {"head_fusion": args.head_fusion, "residual": args.residual, "discard_ratio": args.discard_ratio}
    start = time.perf_counter()
    rollout_matrix = rollout(trace, **options)[0]
    timings["rollout"] = time.perf_counter() - start
    start = time.perf_counter()
    flow_matrix = flow(trace, max_seconds=args.max_seconds, **options)[0]
    timings["flow"] = time.perf_counter() - start
    raw_matrix = raw(trace, -1, head_fusion=args.head_fusion)[0]

    tokens = trace.tokens[0]
    explained = len(tokens) - 1 if trace.causal else 0
    matrices = {"raw": raw_matrix, "rollout": rollout_matrix, "flow": flow_matrix}
    scores = {name: matrix[explained] for name, matrix in matrices.items()}
    write_outputs(out, trace, tokens, matrices, scores, explained, timings)
    print_table(tokens, scores, explained, args.top, timings)
    print(f"wrote {out}/ (heatmaps, scores, trace.safetensors, explanation.json)")
    return 0


def write_outputs(
    out: Path, trace: Any, tokens: list[str], matrices: dict[str, np.ndarray], scores: dict[str, np.ndarray],
    explained: int, timings: dict[str, float],
) -> None:
    from .._plot import heatmap, score_bars

    titles = {"raw": "raw attention (last layer, heads fused)", "rollout": "attention rollout", "flow": "attention flow"}
    for name, matrix in matrices.items():
        write_png(out / f"{name}.png", lambda path, m=matrix, n=name: heatmap(m, tokens, path, title=titles[n]))
    title = f"what {tokens[explained]!r} (position {explained}) draws on"
    write_png(out / "scores.png", lambda path: score_bars(scores, tokens, path, title=title))
    trace.save(out / "trace.safetensors")
    document = {
        "model": trace.model_name,
        "model_location": trace.metadata.get("model_location"),
        "tokens": tokens,
        "explained_position": explained,
        "causal": trace.causal,
        "matrices": {name: matrix.tolist() for name, matrix in matrices.items()},
        "scores": {name: score.tolist() for name, score in scores.items()},
        "seconds": timings,
    }
    text = json.dumps(document, indent=1)
    atomic_write(out / "explanation.json", lambda tmp: tmp.write_text(text), what="explanation")


def write_png(path: Path, draw: Callable[[Path], Any]) -> None:
    """``draw(a_png_path)`` written atomically to ``path``; a failed write is a :class:`TraceFileError`.

    matplotlib picks the format from the file name, so the picture is drawn to ``*.png`` beside
    atomic_write's temporary file and moved onto it.
    """

    def write(tmp: Path) -> None:
        png = tmp.with_name(tmp.name + ".png")
        try:
            draw(png)
            os.replace(png, tmp)
        finally:
            with contextlib.suppress(OSError):
                png.unlink(missing_ok=True)

    atomic_write(path, write, what="picture")


def print_table(
    tokens: list[str], scores: dict[str, np.ndarray], explained: int, top: int, timings: dict[str, float]
) -> None:
    print(f"Top input tokens for {tokens[explained]!r} (position {explained}):")
    header = f"{'rank':>4}  " + "  ".join(f"{name:<22}" for name in scores)
    print(header)
    order = {name: np.argsort(-score, kind="stable") for name, score in scores.items()}
    for rank in range(min(top, len(tokens))):
        cells = []
        for name, score in scores.items():
            j = order[name][rank]
            cells.append(f"{tokens[j][:12]:<12} {score[j]:8.4f}")
        print(f"{rank + 1:>4}  " + "  ".join(f"{c:<22}" for c in cells))
    print("seconds: " + ", ".join(f"{k} {v:.4f}" for k, v in timings.items()))
