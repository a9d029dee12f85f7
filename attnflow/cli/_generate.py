"""``attnflow explain --generate N TEXT``: a decoder continues TEXT, then every generated token is explained by
the prompt tokens (and earlier generated tokens) it draws on."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import OptionError
from .._explanation import Explanation, explain
from .._tensorfile import atomic_write
from .._version import __version__
from ..methods._fusion import stream_layer_indices
from ..methods._options import Options
from ..plot._figure import pyplot
from ..plot._layers import NUMBERING
from ..recording._capture import attach
from ..recording._plan import CapturePlan


def run_generation(
    args: argparse.Namespace, plan: CapturePlan, options: Options, adapter: Any, model: Any, tokenizer: Any,
    location: Any, out: Path, timings: dict[str, float],
) -> int:
    """Generate ``args.generate`` tokens greedily inside ``attach()``, explain them (``sources="generated"``),
    print each one's top prompt tokens and write the generated x prompt heatmap, the trace, the explanation
    and JSON to ``out``."""
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        raise OptionError(
            f"{location} is an encoder-decoder model. Generate its output first, then explain it with --target-text "
            "OUTPUT: that teacher-forced pass is exactly the attention of the generation (attnflow stitches "
            "generate() into the same trace; in Python: with attnflow.attach(model) as rec: model.generate(...))."
        )
    if not callable(getattr(model, "generate", None)) or not _can_generate(model):
        raise OptionError(
            f"{location} ({type(model).__name__}) cannot generate text: --generate needs a decoder with a "
            "language-model head (GPT-2, Llama, Mistral...)."
        )
    start = time.perf_counter()
    inputs = adapter.encode(tokenizer, [args.text], max_length=args.max_length)
    from ._common import place
    from ._explain import plan_keywords

    _, inputs = place(adapter, None, inputs, device=args.device, dtype=args.dtype)
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    # what the methods need beyond the weights comes from one teacher-forced pass over the finished sequences
    rerun = "rerun" if plan.kinds - {"weights"} else None
    with attach(model, adapter=adapter, tokens=tokenizer, generation=rerun, **plan_keywords(plan, args.target_value),
                **args.adapter_options) as rec:
        model.generate(**inputs, max_new_tokens=args.generate, do_sample=False, pad_token_id=pad)
    trace = rec.trace
    timings["generate+capture"] = time.perf_counter() - start
    stream = trace.streams[trace.default_stream()]
    if not stream.causal:
        raise OptionError(
            f"{location} ({type(model).__name__}) attends in both directions (an encoder); its generate() output "
            "is not a decoder's continuation. --generate needs a decoder such as GPT-2 or Llama."
        )
    trace = trace.replace(metadata={**trace.metadata, "model_location": str(location)})
    from ._common import check_layers
    from ._explain import planned_methods, print_skipped

    check_layers(trace, args.layers)
    explanation = explain(trace, planned_methods(plan), options=options, sources="generated")
    print_skipped(explanation)
    timings.update(dict(explanation.metadata["seconds"].items()))
    rows = generated_rows(explanation, args.top, exclude_special=args.exclude_special)
    written = write_generation(out, trace, explanation, rows, timings, args)
    print_generation(explanation, rows)
    print("seconds: " + ", ".join(f"{k} {v:.4f}" for k, v in timings.items()))
    print(f"wrote {out}/ ({', '.join(written)}, trace.safetensors, explanation.safetensors, explanation.json)")
    return 0


def _can_generate(model: Any) -> bool:
    can = getattr(model, "can_generate", None)
    try:
        return bool(can()) if callable(can) else True
    except Exception:  # an older or third-party model class: let generate() itself decide
        return True


def generated_rows(explanation: Explanation, top: int, *, exclude_special: bool) -> list[dict[str, Any]]:
    """Per generated token (item 0): its text, the position that predicts it, and per method its ``top``
    prompt tokens ``[(token, position, score)]`` (shares of that position's total, or of the ordinary
    prompt tokens with ``exclude_special``)."""
    generation = explanation.metadata["generation"]
    first = int(generation["first_generated"])
    produced = generation.get("generated_tokens", [[str(t) for t in generation["generated_ids"][0]]])[0]
    stream = explanation.streams[explanation.stream]
    labels = explanation.tokens(explanation.stream)[0]
    prompt = [int(p) for p in stream.valid_index(0) if p < first]
    if exclude_special and stream.special is not None:
        prompt = [p for p in prompt if not stream.special[0, p]] or prompt
    positions = explanation.sources[0].tolist()
    count = min(len(produced), len(positions))
    out = []
    for r in range(count):
        entry: dict[str, Any] = {"token": produced[r], "position": int(positions[r]), "methods": {}}
        for method in explanation.methods:
            scores = np.asarray(explanation.scores(method, explanation.stream)[0, r], dtype=np.float64)
            values = scores[prompt]
            if exclude_special and values.sum() > 0:
                values = values / values.sum()
            order = np.argsort(-values, kind="stable")[:top]
            entry["methods"][method] = [(labels[prompt[j]], prompt[j], float(values[j])) for j in order]
        out.append(entry)
    return out


def print_generation(explanation: Explanation, rows: list[dict[str, Any]]) -> None:
    from ._explain import shown_layer

    generation = explanation.metadata["generation"]
    first = int(generation["first_generated"])
    stream = explanation.streams[explanation.stream]
    labels = explanation.tokens(explanation.stream)[0]
    prompt = [labels[p] for p in stream.valid_index(0) if p < first]
    print(f"prompt ({len(prompt)} tokens): {' '.join(prompt)}")
    print(f"generated ({len(rows)} tokens): {' '.join(row['token'] for row in rows)}")
    for method in explanation.methods:
        print(f"Top prompt tokens per generated token ({method}, {shown_layer(explanation, method)}; each explained at "
              "the position that predicts it):")
        for row in rows:
            cells = "  ".join(f"{token[:12]} {score:.3f}" for token, _, score in row["methods"][method])
            print(f"  {row['token'][:14]:<14} {cells}")


def write_generation(
    out: Path, trace: Any, explanation: Explanation, rows: list[dict[str, Any]], timings: dict[str, float],
    args: argparse.Namespace,
) -> list[str]:
    """``generation.{png,svg,pdf}`` (generated x prompt, one panel per method), the optional HTML page, the
    trace, the explanation and ``explanation.json``; returns the picture and page names written."""
    from .. import plot
    from ._explain import write_picture

    written = []
    figure = plot.generation_map(explanation, exclude_special=args.exclude_special, dpi=args.dpi)
    try:
        for fmt in args.format_list:
            write_picture(out / f"generation.{fmt}", figure, fmt, args.dpi)
            written.append(f"generation.{fmt}")
    finally:
        pyplot().close(figure)
    if args.html is not None:
        target = Path(args.html) if args.html else out / "explanation.html"
        page = explanation.to_html(trace).encode("utf-8")
        atomic_write(target, lambda tmp: tmp.write_bytes(page), what="HTML page")
        written.append(str(target) if args.html else target.name)
    trace.save(out / "trace.safetensors")
    explanation.save(out / "explanation.safetensors")
    generation = explanation.metadata["generation"]
    document = {
        "attnflow": __version__,
        "model": trace.model_name,
        "model_location": trace.metadata.get("model_location"),
        "prompt": args.text,
        "tokens": explanation.tokens(explanation.stream)[0],
        "first_generated": int(generation["first_generated"]),
        "generated_ids": generation["generated_ids"][0],
        "generated": [
            {"token": row["token"], "explained_position": row["position"],
             "top": {m: [{"token": t, "position": p, "score": s} for t, p, s in cells]
                     for m, cells in row["methods"].items()}}
            for row in rows
        ],
        "layer_numbering": NUMBERING,
        "layers": {method: [i + 1 for i in explanation.layer_indices(method)] for method in explanation.methods},
        "stream_layers": [trace.layers[i].name for i in stream_layer_indices(trace, explanation.stream)],
        "options": explanation.options.to_dict(),
        "seconds": timings,
    }
    text = json.dumps(document, indent=1)
    atomic_write(out / "explanation.json", lambda tmp: tmp.write_text(text), what="explanation")
    return written
