"""Matrix views: output x input token heatmaps (one panel per method), the decoder x encoder map of an
encoder-decoder, the generated x prompt token map of a decoder, and a layer x head grid of raw attention."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .._errors import OptionError
from ._figure import capped_size, check_view_options, colorbar, label_ticks, make_scale, new_figure, positioned
from ._scores import METHOD_TITLES, check_batch_index, describe, method_names, score_matrix


@dataclasses.dataclass
class Panel:
    title: str
    values: np.ndarray
    rows: list[str]
    columns: list[str]
    divider: float | None = None  # a vertical line between columns (prompt | generated)
    row_positions: Any = None  # token positions (ints): repeated labels get them ("the₃"); None: as given
    column_positions: Any = None


def heatmap(
    explanation: Any, methods: str | Sequence[str] | None = None, *, batch_index: int = 0, stream: str | None = None,
    layer: int | None = None, exclude_special: bool = False, shared_scale: bool = True, log: bool = False,
    vmin: float | None = None, vmax: float | None = None, cmap: str = "viridis", dpi: float = 150,
    title: str | None = None,
) -> Any:
    """Output x input token heatmaps, one panel per method, side by side.

    Panel ``m`` shows ``explanation.layers(m)[layer, batch_index]`` over the real tokens: rows are the
    explained tokens (``explanation.sources``), columns the input tokens of ``stream``, ``(S, tokens)``.

    Args:
        explanation: an `attnflow.Explanation`.
        methods: one method name or several (default: all the explanation holds).
        batch_index: which item.
        stream: the input stream of the columns (default: the explained stream, or the only input stream).
        layer: an index among the explained stream's layers the methods were computed after (default the last).
        exclude_special: leave special tokens (CLS, SEP, BOS, registers) out of rows and columns and
            divide each row by its remaining sum; the title says so.
        shared_scale: one colour scale (and bar) for every panel, so methods compare by colour.
        log: a logarithmic colour scale.
        vmin: the colour scale's lower end (default: the smallest value shown).
        vmax: the colour scale's upper end (default: the largest value shown).
        cmap: a matplotlib colour map name.
        dpi: resolution (also what ``savefig`` uses for PNGs).
        title: replaces the generated title (which names the layer and every setting).

    Returns:
        A matplotlib Figure.
    """
    names = method_names(explanation, methods)
    matrices = [score_matrix(explanation, m, batch_index=batch_index, stream=stream, layer=layer,
                             exclude_special=exclude_special, special_rows=False) for m in names]
    panels = [Panel(METHOD_TITLES.get(m.method, m.method), m.values, m.row_labels, m.column_labels,
                    row_positions=m.rows, column_positions=m.columns) for m in matrices]
    first = matrices[0]
    ylabel = f"explained token ({explanation.stream})"
    if explanation.streams[explanation.stream].causal:
        ylabel = f"explained {explanation.stream} position, labelled by its input token"
    xlabel = f"input token ({first.stream})"
    heading = title or _heading(explanation, first, names, exclude_special, log)
    return draw_panels([panels], heading=heading, xlabel=xlabel, ylabel=ylabel, shared_scale=shared_scale, log=log,
                       vmin=vmin, vmax=vmax, cmap=cmap, dpi=dpi, bar_label="score")


def encoder_decoder_map(
    explanation: Any, methods: str | Sequence[str] | None = None, *, batch_index: int = 0, encoder: str | None = None,
    **view: Any,
) -> Any:
    """Decoder x encoder map of an encoder-decoder: what each explained decoder token draws on among the
    encoder's tokens (through cross-attention), ``(decoder tokens, encoder tokens)`` per method.

    ``encoder`` names the other input stream (default: the only input stream besides the explained one);
    the other keywords are `heatmap`'s. The rows do not sum to 1 over the encoder alone: the rest of
    each row's share sits on earlier decoder tokens (``heatmap(..., stream="decoder")``), unless
    ``exclude_special`` renormalises over the encoder's ordinary tokens.
    """
    others = [name for name in explanation.input_streams if name != explanation.stream]
    if not others:
        raise OptionError(
            f"This explanation of {explanation.stream!r} draws on no other stream; an encoder-decoder map needs the "
            "decoder's explanation (explain(trace, stream='decoder')) of an encoder-decoder trace."
        )
    if encoder is None:
        if len(others) > 1:
            raise OptionError(f"The decoder draws on several streams {others}; say which with encoder=.")
        encoder = others[0]
    return heatmap(explanation, methods, batch_index=batch_index, stream=encoder, **view)


def generation_map(
    explanation: Any, methods: str | Sequence[str] | None = None, *, prompt_length: int | None = None,
    batch_index: int = 0, include_generated: bool = False, layer: int | None = None, exclude_special: bool = False,
    shared_scale: bool = True, log: bool = False, vmin: float | None = None, vmax: float | None = None,
    cmap: str = "viridis", dpi: float = 150, title: str | None = None,
) -> Any:
    """Generated x prompt token map of a decoder (a causal stream explained over its own tokens).

    For an explanation of a ``generate()`` call (its trace's ``metadata["generation"]``, e.g.
    ``explain(rec.trace, ..., sources="generated")``), rows are the generated tokens, each explained at the
    position that predicts it (the prompt's last token for the first one; the convention of
    ``sources="generated"``) and labelled by the token generated there. Otherwise, rows are the explained
    tokens at or after ``prompt_length`` (e.g. a continuation captured in one forward pass), columns the
    prompt's tokens (and, with ``include_generated``, the generated ones too, after a dividing line). A row's values
    are its shares of the explained token's total (which also covers earlier generated tokens), unless
    ``exclude_special`` renormalises over the ordinary tokens.

    Other parameters are as in `heatmap`.

    Args:
        prompt_length: how many of the item's real tokens are the prompt (default: the trace's
            ``metadata["prompt_length"]``, which generation captures record).
    """
    b = check_batch_index(explanation, batch_index)
    stream = explanation.streams[explanation.stream]
    if not stream.causal:
        raise OptionError(
            f"Stream {explanation.stream!r} is not causal; a generated x prompt map needs a decoder's explanation "
            "(a causal stream, e.g. GPT-2 or Llama). Use heatmap() for encoders."
        )
    generation = explanation.metadata.get("generation")
    if prompt_length is None and isinstance(generation, Mapping) and generation.get("stream") == explanation.stream:
        return _generated_map(explanation, method_names(explanation, methods), generation, b,
                              layer=layer, exclude_special=exclude_special, include_generated=include_generated,
                              shared_scale=shared_scale, log=log, vmin=vmin, vmax=vmax, cmap=cmap, dpi=dpi,
                              title=title)
    if prompt_length is None:
        prompt_length = explanation.metadata.get("prompt_length")
        if prompt_length is None:
            raise OptionError("Say where the prompt ends: generation_map(explanation, prompt_length=N).")
    valid = stream.valid_index(b)
    if isinstance(prompt_length, bool) or not isinstance(prompt_length, (int, np.integer)) or not \
            1 <= prompt_length < valid.size:
        raise OptionError(
            f"prompt_length must be between 1 and {valid.size - 1} (item {b} has {valid.size} real tokens), "
            f"got {prompt_length!r}."
        )
    names = method_names(explanation, methods)
    prompt = set(valid[:prompt_length].tolist())
    panels = []
    for m in names:
        matrix = score_matrix(explanation, m, batch_index=b, layer=layer, exclude_special=exclude_special)
        rows = [r for r, p in enumerate(matrix.rows.tolist()) if p not in prompt]
        if not rows:
            raise OptionError(
                f"None of the explained tokens comes after the prompt's {prompt_length} tokens; explain the "
                "generated tokens (sources=None, or their positions)."
            )
        columns = [c for c, p in enumerate(matrix.columns.tolist()) if include_generated or p in prompt]
        divider = None
        if include_generated:
            shown = matrix.columns[columns]
            divider = float(np.searchsorted(shown, valid[prompt_length])) - 0.5
        panels.append(Panel(
            METHOD_TITLES.get(m, m), matrix.values[np.ix_(rows, columns)], [matrix.row_labels[r] for r in rows],
            [matrix.column_labels[c] for c in columns], divider, row_positions=matrix.rows[rows],
            column_positions=matrix.columns[columns],
        ))
        first = matrix
    heading = title or _heading(explanation, first, names, exclude_special, log)
    return draw_panels([panels], heading=heading, xlabel="prompt token" + (" | generated token" if include_generated else ""),
                       ylabel="generated token", shared_scale=shared_scale, log=log, vmin=vmin, vmax=vmax, cmap=cmap,
                       dpi=dpi, bar_label="share of the generated token")


def _generated_map(
    explanation: Any, names: list[str], generation: Mapping[str, Any], b: int, *, layer: int | None,
    exclude_special: bool, include_generated: bool, shared_scale: bool, log: bool, vmin: float | None,
    vmax: float | None, cmap: str, dpi: float, title: str | None,
) -> Any:
    """The map of a ``generate()`` trace: a row per generated token, explained at the position that predicts
    it (the prompt's last token for the first one), labelled by the token generated there."""
    first = int(generation["first_generated"])
    labels = generation.get("generated_tokens")
    ids = generation.get("generated_ids")
    lengths = generation.get("lengths")
    produced = labels[b] if labels is not None else [str(t) for t in ids[b]] if ids is not None else None
    panels = []
    for m in names:
        matrix = score_matrix(explanation, m, batch_index=b, layer=layer, exclude_special=exclude_special)
        count = lengths[b] if lengths is not None else None  # tokens up to the item's end of sequence
        rows = [r for r, p in enumerate(matrix.rows.tolist())
                if p >= first - 1 and (count is None or p - first + 1 < count)]
        if not rows:
            raise OptionError(
                "None of the explained tokens predicts a generated token; explain them with "
                "explain(trace, ..., sources='generated')."
            )
        row_labels = []
        for r in rows:
            k = int(matrix.rows[r]) - first + 1  # generated token k (from 0) is predicted at position first - 1 + k
            row_labels.append(produced[k] if produced is not None and k < len(produced) else f"#{k}")
        columns = [c for c, p in enumerate(matrix.columns.tolist()) if include_generated or p < first]
        divider = None
        if include_generated:
            divider = float(np.searchsorted(matrix.columns[columns], first)) - 0.5
        panels.append(Panel(
            METHOD_TITLES.get(m, m), matrix.values[np.ix_(rows, columns)], row_labels,
            [matrix.column_labels[c] for c in columns], divider, column_positions=matrix.columns[columns],
            row_positions=matrix.rows[rows] + 1,  # a generated token sits one after the position predicting it
        ))
        shown = matrix
    heading = title or _heading(explanation, shown, names, exclude_special, log)
    return draw_panels([panels], heading=heading, xlabel="prompt token" + (" | generated token" if include_generated else ""),
                       ylabel="generated token (explained where it is predicted)", shared_scale=shared_scale, log=log,
                       vmin=vmin, vmax=vmax, cmap=cmap, dpi=dpi, bar_label="share of the generated token")


def head_grid(
    trace: Any, layers: int | Sequence[int] | None = None, *, batch_index: int = 0, heads: Sequence[int] | None = None,
    exclude_special: bool = False, shared_scale: bool = True, log: bool = False, vmin: float | None = None,
    vmax: float | None = None, cmap: str = "viridis", dpi: float = 150, title: str | None = None,
) -> Any:
    """Raw attention of single heads: a grid with one row per layer and one column per head, each panel the
    ``(query, key)`` weights of that head over the real tokens.

    Other parameters are as in `heatmap`; with ``shared_scale`` every head shares one colour scale.

    Args:
        trace: an `attnflow.AttentionTrace`.
        layers: trace layer index or indices (default: all; one layer gives one row of its heads).
        heads: head indices to show (default: all).
        exclude_special: leave special tokens out of queries and keys and renormalise each row.
    """
    b = int(batch_index)
    if not -trace.batch_size <= b < trace.batch_size:
        raise OptionError(f"batch_index must be in [-{trace.batch_size}, {trace.batch_size}), got {batch_index!r}.")
    count = trace.num_layers
    chosen = list(range(count)) if layers is None else ([layers] if isinstance(layers, (int, np.integer)) else list(layers))
    if not chosen or any(isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not -count <= i < count
                         for i in chosen):
        raise OptionError(f"layers must be trace layer indices in [-{count}, {count}), got {layers!r}.")
    from ._layers import layer_label, short_label

    grid = []
    for index in chosen:
        layer = trace.layers[index]
        query, key = trace.streams[layer.query_stream], trace.streams[layer.key_stream]
        rows, cols = query.valid_index(b), key.valid_index(b)
        if exclude_special:
            rows = rows[~query.special[b][rows]]
            cols = cols[~key.special[b][cols]]
        picked = range(layer.weights.shape[1]) if heads is None else heads
        row = []
        for h in picked:
            if not 0 <= h < layer.weights.shape[1]:
                raise OptionError(f"Layer {index} has {layer.weights.shape[1]} heads; head {h} does not exist.")
            values = np.asarray(layer.weights[b, h], dtype=np.float64)[np.ix_(rows, cols)]
            if exclude_special:
                sums = values.sum(axis=1, keepdims=True)
                values = np.divide(values, sums, out=np.zeros_like(values), where=sums != 0)
            row.append(Panel(f"{short_label(trace, index)} H{h}", values, [query.tokens[b][i] for i in rows],
                             [key.tokens[b][j] for j in cols], row_positions=rows, column_positions=cols))
        grid.append(row)
    several = len(grid) > 1
    if not several and len(grid[0]) > 6:  # one layer's many heads: wrap into rows of at most 6
        per_row = -(-len(grid[0]) // -(-len(grid[0]) // 6))
        grid = [grid[0][i:i + per_row] for i in range(0, len(grid[0]), per_row)]
    name = ("layers " + ", ".join(short_label(trace, i) for i in chosen)) if several else layer_label(trace, chosen[0])
    heading = title or "; ".join(
        ["raw attention per head, " + name, f"item {b}"]
        + (["special tokens excluded, rows renormalised"] if exclude_special else [])
        + (["log colour scale"] if log else [])
    )
    return draw_panels(grid, heading=heading, xlabel="key token", ylabel="query token", shared_scale=shared_scale,
                       log=log, vmin=vmin, vmax=vmax, cmap=cmap, dpi=dpi, bar_label="attention weight", compact=True)


def draw_panels(
    grid: list[list[Panel]], *, heading: str, xlabel: str, ylabel: str, shared_scale: bool, log: bool,
    vmin: float | None, vmax: float | None, cmap: str, dpi: float, bar_label: str, compact: bool = False,
) -> Any:
    """Draw rows x columns of matrix panels with one shared colour scale (or one per panel)."""
    check_view_options(log=log, vmin=vmin, vmax=vmax, dpi=dpi)
    nrows, ncols = len(grid), max(len(row) for row in grid)
    sample = grid[0][0].values
    cell = 0.16 if compact else 0.22
    panel_w = max(2.2 if compact else 3.0, sample.shape[1] * cell)
    panel_h = max(1.6 if compact else 1.2, sample.shape[0] * cell)
    width, height = capped_size(ncols * panel_w + 2.5, nrows * panel_h + 1.8)
    figure, axes = new_figure(width, height, dpi=dpi, panels=(nrows, ncols), layout="constrained")
    everything = [p.values for row in grid for p in row]
    shared = make_scale(everything, log=log, vmin=vmin, vmax=vmax) if shared_scale else None
    room_h = (height - 1.8) / nrows
    room_w = (width - 2.5) / ncols
    image = None
    for r, row in enumerate(grid):
        for c in range(ncols):
            ax = axes[r, c]
            if c >= len(row):
                ax.set_visible(False)
                continue
            panel = row[c]
            scale = shared or make_scale([panel.values], log=log, vmin=vmin, vmax=vmax)
            shown = np.where(panel.values > 0, panel.values, np.nan) if log else panel.values
            image = ax.imshow(shown, cmap=cmap, norm=scale.norm(), aspect="auto", interpolation="nearest")
            if compact or nrows * ncols > 1:  # one panel: the figure's title names it already
                ax.set_title(panel.title, fontsize=8 if compact else 10)
            if panel.divider is not None:
                ax.axvline(panel.divider, color="white", linewidth=1.5)
            rows = panel.rows if panel.row_positions is None else positioned(panel.rows, panel.row_positions)
            columns = panel.columns if panel.column_positions is None else positioned(panel.columns,
                                                                                     panel.column_positions)
            label_ticks(ax.yaxis, rows if c == 0 or not compact else [], room_h, fontsize=6 if compact else 8)
            label_ticks(ax.xaxis, columns if r == nrows - 1 or not compact else [], room_w, rotation=90,
                        fontsize=6 if compact else 8)
            if c == 0:
                ax.set_ylabel(ylabel, fontsize=8)
            if r == nrows - 1:
                ax.set_xlabel(xlabel, fontsize=8)
            if shared is None:
                colorbar(figure, image, ax, bar_label)
    if shared is not None and image is not None:
        colorbar(figure, image, axes, bar_label + f" ({shared.describe()})")
    figure.suptitle(_wrap(heading, width), fontsize=10)
    return figure


def _heading(explanation: Any, matrix: Any, names: list[str], exclude_special: bool, log: bool) -> str:
    text = describe(explanation, names[0], layer=matrix.layer, renormalised=exclude_special, log=log)
    if len(names) > 1:
        text = text.replace(METHOD_TITLES.get(names[0], names[0]), " | ".join(names), 1)
    model = explanation.model_name or "model"
    return f"{model}: {text}"


def _wrap(text: str, width_inches: float, fontsize: float = 10) -> str:
    import textwrap

    chars = max(int(width_inches * 72 / (fontsize * 0.55)), 30)
    return "\n".join(textwrap.wrap(text, chars))
