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
from .._explanation import Explanation, explain
from .._models import packaged_model_dir
from .._tensorfile import atomic_write, make_directory
from ..capture._adapter import load_model
from ..capture._capture import capture
from ..capture._registry import get_adapter
from ..methods._fusion import check_max_seconds
from ..methods._options import Options
from ..methods._registry import get_method, list_methods


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "explain",
        help="explain one input with raw attention, rollout and flow",
        description="Run a model on TEXT and write heatmaps, per-token scores, the trace, the explanation and JSON "
        "to --out. For an encoder-decoder, give the decoder's text with --target-text: every decoder token is "
        "explained by the encoder tokens (and earlier decoder tokens) it draws on.",
    )
    parser.add_argument("text", help="the input text (an encoder-decoder's encoder text)")
    parser.add_argument("--target-text", default=None, help="the decoder's text, for encoder-decoder models")
    parser.add_argument(
        "--model", default=None,
        help="local Hugging Face model directory, or a hub id on machines with network "
        "(default: the packaged all-MiniLM-L6-v2)",
    )
    parser.add_argument("--adapter", default="transformers", help="adapter that loads the model (default: transformers)")
    parser.add_argument("--out", default="attnflow-out", help="output directory (default: attnflow-out/)")
    parser.add_argument("--methods", default="raw,rollout,flow", help="comma-separated methods (default raw,rollout,flow)")
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


def check_arguments(args: argparse.Namespace) -> tuple[list[str], Options]:
    """Refuse bad settings before anything is loaded; the methods and options to use."""
    options = Options(
        head_fusion=args.head_fusion, residual=args.residual, discard_ratio=args.discard_ratio,
        max_seconds=check_max_seconds(args.max_seconds),
    )
    if args.top < 1:
        raise OptionError(f"--top must be at least 1 (input tokens to list per method), got {args.top}.")
    if args.max_length is not None and args.max_length < 2:
        raise OptionError(f"--max-length must be at least 2 tokens, got {args.max_length}.")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for method in methods:
        get_method(method)  # an unknown name fails here, listing the registered ones
    if not methods:
        raise OptionError(f"--methods names no method; choose from {', '.join(list_methods())}.")
    return methods, options


def run(args: argparse.Namespace) -> int:
    methods, options = check_arguments(args)
    adapter = get_adapter(args.adapter)
    out = make_directory(Path(args.out))
    location = args.model or packaged_model_dir()
    timings: dict[str, float] = {}

    start = time.perf_counter()
    model, tokenizer = load_model(adapter, location, trust_remote_code=args.trust_remote_code)
    timings["load"] = time.perf_counter() - start
    seq2seq = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    if seq2seq and args.target_text is None:
        raise OptionError(
            f"{location} is an encoder-decoder model: give the decoder's text with --target-text (e.g. the "
            "translation or summary whose tokens you want explained)."
        )
    if not seq2seq and args.target_text is not None:
        raise OptionError(f"--target-text is for encoder-decoder models; {location} is not one.")

    start = time.perf_counter()
    targets = None if args.target_text is None else [args.target_text]
    inputs = adapter.encode(tokenizer, [args.text], max_length=args.max_length, targets=targets)
    trace = capture(model, adapter=adapter, tokens=tokenizer, **inputs)
    timings["capture"] = time.perf_counter() - start
    trace = trace.replace(metadata={**trace.metadata, "model_location": str(location)})

    explanation = explain(trace, methods, options=options)
    timings.update({f"{name}": seconds for name, seconds in explanation.metadata["seconds"].items()})
    write_outputs(out, trace, explanation, timings)
    print_table(explanation, args.top, timings)
    print(f"wrote {out}/ (heatmaps, scores, trace.safetensors, explanation.safetensors, explanation.json)")
    return 0


def explained_position(trace: Any, explanation: Explanation) -> int:
    """The token whose scores the bar chart shows: [CLS] (position 0), or the last real token when the
    explained stream is causal (a decoder)."""
    stream = trace.streams[explanation.stream]
    return int(stream.valid_index(0)[-1]) if stream.causal else 0


def write_outputs(out: Path, trace: Any, explanation: Explanation, timings: dict[str, float]) -> None:
    from .._plot import heatmap, score_bars

    stream = explanation.stream
    explained = explained_position(trace, explanation)
    rows = explanation.tokens(stream)[0]
    titles = {"raw": "raw attention (last layer, heads fused)", "rollout": "attention rollout", "flow": "attention flow"}
    several = len(explanation.input_streams) > 1
    matrices: dict[str, Any] = {}
    scores: dict[str, Any] = {}
    for method in explanation.methods:
        by_stream = explanation[method] if isinstance(explanation[method], dict) else {
            explanation.input_streams[0]: explanation[method]}
        matrices[method] = {name: matrix[0].tolist() for name, matrix in by_stream.items()}
        scores[method] = {name: matrix[0, explained].tolist() for name, matrix in by_stream.items()}
        for name, matrix in by_stream.items():
            columns = explanation.tokens(name)[0]
            file = f"{method}-{name}.png" if several else f"{method}.png"
            title = titles.get(method, method) + (f": {stream} tokens by {name} tokens" if several else "")
            write_png(out / file, lambda path, m=matrix[0], t=title, c=columns: heatmap(m, rows, path, title=t,
                                                                                      columns=c))
    if not several:
        flat = {method: np.asarray(v[explanation.input_streams[0]]) for method, v in scores.items()}
        title = f"what {rows[explained]!r} (position {explained}) draws on"
        write_png(out / "scores.png", lambda path: score_bars(flat, rows, path, title=title))
        matrices = {method: v[explanation.input_streams[0]] for method, v in matrices.items()}
        scores = {method: v[explanation.input_streams[0]] for method, v in scores.items()}
    trace.save(out / "trace.safetensors")
    explanation.save(out / "explanation.safetensors")
    document = {
        "model": trace.model_name,
        "model_location": trace.metadata.get("model_location"),
        "stream": stream,
        "tokens": rows,
        "input_tokens": {name: explanation.tokens(name)[0] for name in explanation.input_streams},
        "explained_position": explained,
        "causal": bool(trace.streams[stream].causal),
        "matrices": matrices,
        "scores": scores,
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


def print_table(explanation: Explanation, top: int, timings: dict[str, float]) -> None:
    if len(explanation.input_streams) > 1:
        _print_per_token(explanation, top)
    else:
        _print_one_token(explanation, top)
    print("seconds: " + ", ".join(f"{k} {v:.4f}" for k, v in timings.items()))


def _print_one_token(explanation: Explanation, top: int) -> None:
    stream = explanation.stream
    tokens = explanation.tokens(stream)[0]
    info = explanation.streams[stream]
    explained = int(info.valid_index(0)[-1]) if info.causal else 0
    scores = {method: explanation.scores(method)[0, explained] for method in explanation.methods}
    print(f"Top input tokens for {tokens[explained]!r} (position {explained}):")
    print(f"{'rank':>4}  " + "  ".join(f"{name:<22}" for name in scores))
    order = {name: np.argsort(-score, kind="stable") for name, score in scores.items()}
    for rank in range(min(top, len(tokens))):
        cells = []
        for name, score in scores.items():
            j = order[name][rank]
            cells.append(f"{tokens[j][:12]:<12} {score[j]:8.4f}")
        print(f"{rank + 1:>4}  " + "  ".join(f"{c:<22}" for c in cells))


def _print_per_token(explanation: Explanation, top: int) -> None:
    """Encoder-decoder: for every decoder token, the encoder tokens it draws on most, per cumulative method."""
    stream = explanation.stream
    source = next(name for name in explanation.input_streams if name != stream)
    rows = explanation.tokens(stream)[0]
    columns = explanation.tokens(source)[0]
    valid_rows = explanation.streams[stream].valid_index(0)
    valid_columns = explanation.streams[source].valid_index(0)
    for method in explanation.methods:
        matrix = explanation.scores(method, source)[0]
        print(f"Top {source} tokens per {stream} token ({method}):")
        for i in valid_rows:
            order = valid_columns[np.argsort(-matrix[i, valid_columns], kind="stable")][:top]
            cells = "  ".join(f"{columns[j][:12]} {matrix[i, j]:.3f}" for j in order)
            print(f"  {rows[i][:14]:<14} {cells}")
