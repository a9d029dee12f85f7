"""``attnflow explain TEXT``: raw attention, rollout and flow of one input (or several, or an image), as
pictures (PNG/SVG/PDF), an interactive HTML page, JSON and a table."""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import AdapterError, OptionError
from .._explanation import Explanation, explain
from .._models import packaged_model_dir
from .._tensorfile import atomic_write, check_writable_target, make_directory
from .._version import __version__
from ..methods._fusion import stream_layer_indices
from ..methods._options import Options
from ..methods._registry import ALL, get_method, list_methods
from ..plot._figure import parse_formats, pyplot, write_figure
from ..plot._layers import NUMBERING, after_layer
from ..recording._adapter import check_adapter_options, load_model
from ..recording._capture import capture
from ..recording._plan import CapturePlan, capture_plan
from ..recording._registry import get_adapter
from ._common import (
    add_methods_flag,
    add_model_flags,
    add_option_flags,
    add_placement_flags,
    add_sources_flag,
    add_target_flag,
    check_device,
    check_layers,
    options_from,
    parse_sources,
    parse_target,
    place,
    resolve_sources,
    warn_deprecated,
)

_TABLE_COLUMNS = 4


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "explain",
        help="explain one input with raw attention, rollout and flow",
        description="Run a model on TEXT and write heatmaps, per-token scores, the trace, the explanation and JSON "
        "to --out. For an encoder-decoder, give the decoder's text with --target-text: every decoder token is "
        "explained by the encoder tokens (and earlier decoder tokens) it draws on.",
    )
    parser.add_argument("text", nargs="?", default=None,
                        help="the input text (an encoder-decoder's encoder text); or use --texts or --image")
    parser.add_argument("--texts", default=None, metavar="FILE",
                        help="explain several texts at once: one text per line of FILE (empty lines skipped)")
    parser.add_argument("--image", default=None, metavar="PATH",
                        help="explain an image (PNG/JPEG) with an image model (--model VIT_DIR); writes overlay.png")
    parser.add_argument("--target-text", default=None, help="the decoder's text, for encoder-decoder models")
    parser.add_argument(
        "--generate", type=int, default=None, metavar="N",
        help="let a decoder (--model DIR with a language-model head) continue TEXT by N tokens (greedy), then "
        "explain every generated token: its top prompt tokens, and a generated x prompt heatmap",
    )
    add_model_flags(parser, out="attnflow-out")
    add_methods_flag(parser)
    add_target_flag(parser)
    parser.add_argument("--top", type=int, default=5, help="input tokens to list per method (default 5)")
    add_sources_flag(parser)
    parser.add_argument("--layer", type=int, default=None, help=argparse.SUPPRESS)  # deprecated: --layers ..N+1
    parser.add_argument(
        "--exclude-special", action="store_true",
        help="leave special tokens (CLS, SEP, BOS...) out of the pictures and the table and renormalise the rest "
        "(the JSON and safetensors files keep the scores as computed)",
    )
    parser.add_argument("--format", default="png", help="picture formats, comma-separated: png,svg,pdf (default png)")
    parser.add_argument("--dpi", type=float, default=150, help="resolution of PNG pictures (default 150)")
    parser.add_argument(
        "--html", nargs="?", const="", default=None, metavar="PATH",
        help="also write the interactive page (default path: OUT/explanation.html)",
    )
    parser.add_argument(
        "--adapter-option", action="append", default=[], metavar="KEY=VALUE",
        help="an option of the adapter (VALUE read as JSON when it parses, else as text); repeat for several",
    )
    add_placement_flags(parser)
    add_option_flags(parser)
    parser.set_defaults(func=run)


def check_arguments(args: argparse.Namespace) -> tuple[CapturePlan, Options]:
    """Refuse bad settings before anything is loaded; what to capture for which methods, and the options."""
    if args.layer is not None:  # deprecated: the scores after layer index LAYER (0-based) = --layers ..LAYER+1
        if args.layers is not None:
            raise OptionError("--layer is the deprecated form of --layers; give only --layers.")
        if args.layer < 0:
            raise OptionError(f"--layer must be a layer index (0 = the first layer), got {args.layer}.")
        warn_deprecated(f"--layer {args.layer} (0-based)", f"--layers ..{args.layer + 1} (layer numbers from 1)")
        args.layers = f"..{args.layer + 1}"
    options = options_from(args)
    if args.top < 1:
        raise OptionError(f"--top must be at least 1 (input tokens to list per method), got {args.top}.")
    if args.max_length is not None and args.max_length < 2:
        raise OptionError(f"--max-length must be at least 2 tokens, got {args.max_length}.")
    # unknown names, and needs the adapter cannot capture (all in one message), fail here, before the model loads
    plan = capture_plan(args.methods, get_adapter(args.adapter))
    args.target_value = target_for(args.target, plan)
    given = [name for name, value in (("TEXT", args.text), ("--texts", args.texts), ("--image", args.image)) if value]
    if len(given) != 1:
        raise OptionError(
            "Give exactly one input: a TEXT, --texts FILE (one text per line) or --image PATH"
            + (f"; got {' and '.join(given)}." if given else ".")
        )
    if args.generate is not None:
        check_generate(args)
    if args.image and args.target_text is not None:
        raise OptionError("--target-text is for encoder-decoder text models; an --image run has no decoder text.")
    for path, what in ((args.texts, "--texts"), (args.image, "--image")):
        if path and not Path(path).is_file():
            raise OptionError(f"{what} {path!r} is not a file.")
    args.format_list = parse_formats(args.format)
    if not 10 <= args.dpi <= 2400:
        raise OptionError(f"--dpi must be between 10 and 2400, got {args.dpi}.")
    args.source_list = parse_sources(args.sources)
    args.adapter_options = parse_adapter_options(args.adapter_option)
    check_adapter_options(get_adapter(args.adapter), args.adapter_options)
    check_device(get_adapter(args.adapter), args.device)
    if args.html:
        check_writable_target(args.html, "HTML page")
    if args.texts:
        args.text_list = read_texts(args.texts)
    return plan, options


def target_for(value: str, plan: CapturePlan) -> Any:
    """``--target``: None (auto), ``"embedding"`` or a logit index; refused when no method asked for needs it."""
    target = parse_target(value)
    if target is not None and "attn_grad" not in plan.kinds:
        gradient = [m for m in list_methods() if "attn_grad" in get_method(m).needs]
        raise OptionError(
            f"--target chooses the score that gradient methods ({', '.join(gradient)}) explain, and none of "
            f"{', '.join(plan.methods)} is one; leave --target out, or add one of them to --methods."
        )
    return target


def check_generate(args: argparse.Namespace) -> None:
    """``--generate N``: one prompt, no settings that choose other tokens."""
    if not 1 <= args.generate <= 4096:
        raise OptionError(f"--generate takes the number of tokens to generate, 1 to 4096; got {args.generate}.")
    clashes = [flag for flag, value in (("--texts", args.texts), ("--image", args.image),
                                         ("--target-text", args.target_text), ("--sources", args.sources)) if value]
    if clashes:
        raise OptionError(
            f"--generate explains the tokens a decoder generates from one TEXT; it cannot be combined with "
            f"{' or '.join(clashes)} (the generated tokens are the ones explained)."
        )


def parse_adapter_options(items: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` items as a dict (values read as JSON when they parse, else kept as text)."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise OptionError(f"--adapter-option takes KEY=VALUE, e.g. --adapter-option output_index=1; got {item!r}.")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value
    return options


def read_texts(path: str) -> list[str]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise OptionError(f"Cannot read --texts {path!r}: {exc}.") from exc
    texts = [line.strip() for line in lines if line.strip()]
    if not texts:
        raise OptionError(f"--texts {path!r} holds no text; write one text per line.")
    return texts


def run(args: argparse.Namespace) -> int:
    plan, options = check_arguments(args)
    adapter = get_adapter(args.adapter)
    out = make_directory(Path(args.out))
    location = args.model or packaged_model_dir()
    if args.generate is not None and args.model is not None and str(args.model).startswith((".", "/", "~", "examples")) \
            and not Path(args.model).expanduser().exists():
        raise OptionError(
            f"No model directory at {args.model!r}. --generate needs a decoder with a language-model head; the "
            f"guide's one is trained by: python examples/train_decoder.py --out {args.model} --steps 300 (a few "
            "minutes: a tenth of the default 3,000 steps, which take about 36 minutes and give a stronger first-token "
            "sink)."
        )
    timings: dict[str, float] = {}

    start = time.perf_counter()
    model, tokenizer = load_model(adapter, location, trust_remote_code=args.trust_remote_code,
                                  generate=args.generate is not None)
    model, _ = place(adapter, model, None, device=args.device, dtype=args.dtype)
    timings["load"] = time.perf_counter() - start
    if args.generate is not None:
        from ._generate import run_generation

        return run_generation(args, plan, options, adapter, model, tokenizer, location, out, timings)
    seq2seq = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    if seq2seq and args.target_text is None:
        raise OptionError(
            f"{location} is an encoder-decoder model: give the decoder's text with --target-text (e.g. the "
            "translation or summary whose tokens you want explained)."
        )
    if not seq2seq and args.target_text is not None:
        raise OptionError(f"--target-text is for encoder-decoder models; {location} is not one.")

    start = time.perf_counter()
    image = None
    if args.image:
        from ..plot._image import load_image

        image = load_image(args.image)
        encode_images = getattr(adapter, "encode_images", None)
        if encode_images is None:
            raise AdapterError(f"Adapter {adapter.name!r} cannot encode images; use --adapter transformers.")
        if hasattr(tokenizer, "convert_ids_to_tokens"):
            raise OptionError(f"{location} is a text model (it has a tokenizer); --image needs an image model (ViT).")
        inputs = encode_images(tokenizer, [(image * 255).round().astype(np.uint8)])
        labels = None
    else:
        if not hasattr(tokenizer, "convert_ids_to_tokens"):
            raise OptionError(f"{location} is an image model; explain an image with --image PATH.")
        texts = args.text_list if args.texts else [args.text]
        targets = None if args.target_text is None else [args.target_text] * len(texts)
        inputs = adapter.encode(tokenizer, texts, max_length=args.max_length, targets=targets)
        labels = tokenizer
    _, inputs = place(adapter, None, inputs, device=args.device, dtype=args.dtype)
    trace = capture(model, adapter=adapter, tokens=labels, adapter_options=args.adapter_options or None,
                    **plan_keywords(plan, args.target_value), **inputs)
    timings["capture"] = time.perf_counter() - start
    trace = trace.replace(metadata={**trace.metadata, "model_location": str(location)})
    check_layers(trace, args.layers)
    sources = resolve_sources(trace, args.source_list)

    explanation = explain(trace, planned_methods(plan), options=options, sources=sources)
    print_skipped(explanation)
    timings.update({f"{name}": seconds for name, seconds in explanation.metadata["seconds"].items()})
    written = write_outputs(out, trace, explanation, timings, args=args, image=image,
                            predicted=predicted_tokens(inputs, tokenizer))
    print_table(explanation, args.top, timings, exclude_special=args.exclude_special)
    print(f"wrote {out}/ ({', '.join(written)}, trace.safetensors, explanation.safetensors, explanation.json)")
    return 0


def predicted_tokens(inputs: dict[str, Any], tokenizer: Any) -> list[list[str]] | None:
    """An encoder-decoder given ``--target-text``: per item, the token each real decoder position predicts (its
    ``labels``; the decoder reads the start token and the labels shifted right); None otherwise."""
    labels = inputs.get("labels")
    if labels is None or not hasattr(tokenizer, "convert_ids_to_tokens"):
        return None
    return [list(tokenizer.convert_ids_to_tokens([i for i in row if i != -100])) for row in labels.tolist()]


def plan_keywords(plan: CapturePlan, target: Any) -> dict[str, Any]:
    """The [`attnflow.capture`][attnflow.recording.capture] keywords that record what the plan's methods need."""
    keywords: dict[str, Any] = {"methods": planned_methods(plan)}
    if "attn_grad" in plan.kinds:
        keywords["target"] = target
    return keywords


def planned_methods(plan: CapturePlan) -> Any:
    """``"all"`` for an all-methods plan (so that kinds the model cannot serve are skipped, not fatal), else the list."""
    return ALL if plan.everything else list(plan.methods)


def print_skipped(explanation: Explanation) -> None:
    """One line per method of ``--methods all`` that was left out, with the reason (on stderr)."""
    for method, why in explanation.skipped.items():
        print(f"attnflow: skipped {method}: {why.splitlines()[0]}", file=sys.stderr)


def explained_row(explanation: Explanation, b: int = 0) -> int:
    """The row (among the explained tokens of item ``b``) that pictures and the table show: the first of
    ``--sources``, else [CLS] (position 0), or the last real token when the explained stream is causal."""
    if explanation.requested_sources is not None:
        return 0
    stream = explanation.streams[explanation.stream]
    return int(stream.valid_index(b)[-1]) if stream.causal else int(stream.valid_index(b)[0])


def write_outputs(out: Path, trace: Any, explanation: Explanation, timings: dict[str, float], *,
                  args: argparse.Namespace | None = None, image: Any = None,
                  predicted: list[list[str]] | None = None) -> list[str]:
    """Pictures (in every ``--format``), the optional HTML page, the trace, the explanation and the JSON;
    returns the picture and page names written. ``predicted``: per item, the token each decoder position
    predicts (the flow graph labels the decoder's rows by them)."""
    formats = getattr(args, "format_list", ["png"])
    dpi = getattr(args, "dpi", 150)
    exclude = bool(getattr(args, "exclude_special", False))
    written: list[str] = []
    for b in range(explanation.batch_size):
        suffix = "" if explanation.batch_size == 1 else f"-{b + 1}"
        for name, draw in pictures(trace, explanation, b, exclude=exclude, image=image, dpi=dpi,
                                   predicted=None if predicted is None else predicted[b]):
            figure = draw()
            try:
                for fmt in formats:
                    file = f"{name}{suffix}.{fmt}"
                    write_picture(out / file, figure, fmt, dpi)
                    written.append(file)
            finally:
                pyplot().close(figure)
    html = getattr(args, "html", None)
    if html is not None:
        target = Path(html) if html else out / "explanation.html"
        page = explanation.to_html(trace).encode("utf-8")
        atomic_write(target, lambda tmp: tmp.write_bytes(page), what="HTML page")
        written.append(str(target) if html else target.name)
    trace.save(out / "trace.safetensors")
    explanation.save(out / "explanation.safetensors")
    row = explained_row(explanation, 0)
    stream = explanation.stream
    matrices: dict[str, Any] = {}
    scores: dict[str, Any] = {}
    for method in explanation.methods:
        by_stream = explanation[method] if isinstance(explanation[method], dict) else {
            explanation.input_streams[0]: explanation[method]}
        matrices[method] = {name: matrix[0].tolist() for name, matrix in by_stream.items()}
        scores[method] = {name: matrix[0, row].tolist() for name, matrix in by_stream.items()}
    if len(explanation.input_streams) == 1:
        matrices = {method: v[explanation.input_streams[0]] for method, v in matrices.items()}
        scores = {method: v[explanation.input_streams[0]] for method, v in scores.items()}
    document = {
        "attnflow": __version__,
        "model": trace.model_name,
        "model_location": trace.metadata.get("model_location"),
        "stream": stream,
        "tokens": explanation.tokens(stream)[0],
        "input_tokens": {name: explanation.tokens(name)[0] for name in explanation.input_streams},
        "explained_position": int(explanation.sources[0][row]),
        "sources": explanation.sources[0].tolist(),
        "batch_size": explanation.batch_size,
        "causal": bool(trace.streams[stream].causal),
        "options": explanation.options.to_dict(),
        "layer_numbering": NUMBERING,
        "layers": {method: [i + 1 for i in explanation.layer_indices(method)] for method in explanation.methods},
        "stream_layers": [trace.layers[i].name for i in stream_layer_indices(trace, stream)],
        "matrices": matrices,
        "scores": scores,
        "seconds": timings,
    }
    text = json.dumps(document, indent=1)
    atomic_write(out / "explanation.json", lambda tmp: tmp.write_text(text), what="explanation")
    return written


def pictures(trace: Any, explanation: Explanation, b: int, *, exclude: bool, image: Any,
             dpi: float, predicted: list[str] | None = None) -> list[tuple[str, Callable[[], Any]]]:
    """``(name, draw)`` of every picture of item ``b``; ``draw()`` returns a matplotlib Figure."""
    from .. import plot

    row = explained_row(explanation, b)
    source = int(explanation.sources[b][row])
    several = len(explanation.input_streams) > 1
    found: list[tuple[str, Callable[[], Any]]] = []
    for name in explanation.input_streams:
        shared = _shared_top(explanation, b, name, exclude)
        for method in explanation.methods:
            file = f"{method}-{name}" if several else method
            found.append((file, functools.partial(
                plot.heatmap, explanation, method, batch_index=b, stream=name, exclude_special=exclude, vmin=0.0,
                vmax=shared, dpi=dpi)))
    if not several:
        found.append(("scores", lambda: plot.token_bars(explanation, batch_index=b, source=source,
                                                         exclude_special=exclude, dpi=dpi)))
    if image is not None:
        found.append(("overlay", lambda: plot.image_overlay(image, explanation, batch_index=b, source=source, dpi=dpi)))
    else:
        other = next((s for s in explanation.input_streams if s != explanation.stream), None)
        found.append(("text", lambda: plot.text_highlight(explanation, batch_index=b, source=source, stream=other,
                                                          exclude_special=exclude, dpi=dpi)))
    shown = explanation.layer_indices(explanation.methods[0])[-1]
    layer = stream_layer_indices(trace, explanation.stream)[shown]
    found.append(("heads", lambda: plot.head_grid(trace, layer, batch_index=b, exclude_special=exclude, dpi=dpi)))
    found.append(("flow-graph", lambda: plot.flow_graph(trace, batch_index=b, source=source, options=explanation.options,
                                                        stream=explanation.stream, exclude_special=exclude, dpi=dpi,
                                                        predicted=predicted)))
    return found


def _shared_top(explanation: Explanation, b: int, stream: str, exclude: bool) -> float:
    """The largest score any method gives over ``stream`` in item ``b``: one colour scale for every heatmap."""
    from ..plot._scores import score_matrix

    tops = [float(score_matrix(explanation, m, batch_index=b, stream=stream, exclude_special=exclude,
                               special_rows=False).values.max()) for m in explanation.methods]
    return max(max(tops), 1e-12)


def write_picture(path: Path, figure: Any, fmt: str, dpi: float) -> None:
    """``figure`` written atomically to ``path`` in format ``fmt``; a failed write is a [`TraceFileError`][attnflow.TraceFileError]."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            write_figure(figure, handle, fmt, dpi)

    atomic_write(path, write, what="picture")


def print_table(explanation: Explanation, top: int, timings: dict[str, float], *, exclude_special: bool = False) -> None:
    if len(explanation.input_streams) > 1:
        _print_per_token(explanation, top)
    else:
        _print_one_token(explanation, top, exclude_special)
    print("seconds: " + ", ".join(f"{k} {v:.4f}" for k, v in timings.items()))


def shown_layer(explanation: Explanation, method: str | None = None) -> str:
    """``"after layer 6 of 6"``: the layer the table shows (the last computed), numbered from 1."""
    return after_layer(explanation, explanation.layer_indices(method or explanation.methods[0])[-1])


def _print_one_token(explanation: Explanation, top: int, exclude_special: bool = False) -> None:
    from ..plot._scores import score_matrix

    for b in range(explanation.batch_size):
        row = explained_row(explanation, b)
        position = int(explanation.sources[b][row])
        matrices = {m: score_matrix(explanation, m, batch_index=b, exclude_special=exclude_special)
                    for m in explanation.methods}
        first = next(iter(matrices.values()))
        r = int(np.flatnonzero(first.rows == position)[0])
        tokens = first.column_labels
        label = explanation.source_tokens(b)[row]
        which = f"input {b + 1}: " if explanation.batch_size > 1 else ""
        note = " (special tokens excluded, renormalised)" if exclude_special else ""
        print(f"{which}Top input tokens for {label!r} (position {position}), {shown_layer(explanation)}{note}:")
        order = {name: np.argsort(-m.values[r], kind="stable") for name, m in matrices.items()}
        names = list(matrices)
        for first_column in range(0, len(names), _TABLE_COLUMNS):  # a table of at most 4 methods side by side
            shown = names[first_column:first_column + _TABLE_COLUMNS]
            print(f"{'rank':>4}  " + "  ".join(f"{name:<22}" for name in shown))
            for rank in range(min(top, len(tokens))):
                cells = []
                for name in shown:
                    j = order[name][rank]
                    cells.append(f"{tokens[j][:12]:<12} {matrices[name].values[r, j]:8.4f}")
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
        print(f"Top {source} tokens per {stream} token ({method}, {shown_layer(explanation, method)} of the {stream}):")
        for i in valid_rows:
            order = valid_columns[np.argsort(-matrix[i, valid_columns], kind="stable")][:top]
            cells = "  ".join(f"{columns[j][:12]} {matrix[i, j]:.3f}" for j in order)
            print(f"  {rows[i][:14]:<14} {cells}")
