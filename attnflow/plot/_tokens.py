"""Per-token views of one explained token: bars per method side by side, and the text itself with each
token's background coloured by its score (one block per method, one colour scale)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .._errors import OptionError
from ._figure import MAX_INCHES, capped_size, check_view_options, label_ticks, make_scale, new_figure, positioned
from ._matrices import _wrap
from ._scores import (
    METHOD_TITLES,
    check_batch_index,
    describe,
    display_token,
    method_names,
    score_matrix,
    source_row,
    starts_word,
)


def _rows(explanation: Any, methods: Any, batch_index: int, source: Any, stream: str | None, layer: int | None,
          exclude_special: bool) -> tuple[list[str], list[Any], int, str]:
    """The method names, per method the ScoreMatrix, the row of the explained token in them, and its label."""
    b = check_batch_index(explanation, batch_index)
    names = method_names(explanation, methods)
    row = source_row(explanation, b, source)
    position = int(explanation.sources[b][row])
    matrices = [score_matrix(explanation, m, batch_index=b, stream=stream, layer=layer, exclude_special=exclude_special)
                for m in names]
    hits = np.flatnonzero(matrices[0].rows == position)
    if not hits.size:
        raise OptionError(f"The explained token at position {position} is padding in item {b}; pick a real token.")
    return names, matrices, int(hits[0]), explanation.source_tokens(b)[row]


def token_bars(
    explanation: Any, methods: str | Sequence[str] | None = None, *, batch_index: int = 0,
    source: int | str | None = None, stream: str | None = None, layer: int | None = None,
    exclude_special: bool = False, shared_scale: bool = True, log: bool = False, vmin: float | None = None,
    vmax: float | None = None, dpi: float = 150, title: str | None = None,
) -> Any:
    """What one explained token draws on, as horizontal bars: one panel per method, side by side, tokens
    down the shared vertical axis (``(tokens,)`` scores per panel).

    Args:
        explanation: an `attnflow.Explanation`.
        methods: one or several method names (default all).
        source: the explained token: its position in the explained stream (negative: from the last real
            token), its text, or None (the first explained token: [CLS], or what ``sources=`` named first).
        stream: as in `heatmap`.
        layer: as in `heatmap`.
        exclude_special: as in `heatmap`.
        log: as in `heatmap`.
        vmin: as in `heatmap`.
        vmax: as in `heatmap`.
        dpi: as in `heatmap`.
        title: as in `heatmap`.
        shared_scale: one score axis for every panel (otherwise each panel spans its own values).

    Returns:
        A matplotlib Figure.
    """
    check_view_options(log=log, vmin=vmin, vmax=vmax, dpi=dpi)
    names, matrices, r, label = _rows(explanation, methods, batch_index, source, stream, layer, exclude_special)
    labels = positioned(matrices[0].column_labels, matrices[0].columns)
    n = len(labels)
    width, height = capped_size(1.6 + 2.6 * len(names), 1.4 + 0.16 * n)
    figure, axes = new_figure(width, height, dpi=dpi, panels=(1, len(names)), sharey=True, layout="constrained")
    scale = make_scale([m.values[r] for m in matrices], log=log, vmin=vmin, vmax=vmax) if shared_scale else None
    y = np.arange(n)
    for i, matrix in enumerate(matrices):
        ax = axes[0, i]
        values = matrix.values[r]
        ax.barh(y, values, height=0.8, color=f"C{i}")
        own = scale or make_scale([values], log=log, vmin=vmin, vmax=vmax)
        if log:
            ax.set_xscale("log")
        ax.set_xlim(own.vmin, own.vmax * (1 if log or vmax is not None else 1.05))
        if len(matrices) > 1:  # one panel: the figure's title names the method already
            ax.set_title(METHOD_TITLES.get(matrix.method, matrix.method), fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(axis="x", labelsize=7)
        ax.set_xlabel("share" if not exclude_special else "share among ordinary tokens", fontsize=8)
    axes[0, 0].set_ylim(n - 0.5, -0.5)
    label_ticks(axes[0, 0].yaxis, labels, height - 1.4, fontsize=7 if n < 60 else 6)
    axes[0, 0].set_ylabel(f"input token ({matrices[0].stream})", fontsize=8)
    heading = title or _title(explanation, names, matrices[0], label, exclude_special, log)
    figure.suptitle(_wrap(heading, width), fontsize=9)
    return figure


def text_highlight(
    explanation: Any, methods: str | Sequence[str] | None = None, *, batch_index: int = 0,
    source: int | str | None = None, stream: str | None = None, layer: int | None = None,
    exclude_special: bool = False, shared_scale: bool = True, log: bool = False, vmin: float | None = None,
    vmax: float | None = None, cmap: str = "Reds", dpi: float = 150, title: str | None = None,
    width_chars: int = 80, fontsize: float = 10,
) -> Any:
    """The input text with each token's background coloured by its score for one explained token: one
    wrapped block per method, one colour scale for all (``shared_scale``), the explained token boxed.

    WordPiece ``##`` pieces join the word before them; SentencePiece/byte-BPE marks are dropped. With
    ``exclude_special`` special tokens are left out of the text and the rest renormalised. Long texts wrap
    at ``width_chars`` characters (widened as needed to keep the figure within its size cap).

    Returns:
        A matplotlib Figure.
    """
    check_view_options(log=log, vmin=vmin, vmax=vmax, dpi=dpi)
    names, matrices, r, label = _rows(explanation, methods, batch_index, source, stream, layer, exclude_special)
    pieces = [(display_token(t), starts_word(t, i)) for i, t in enumerate(matrices[0].column_labels)]
    explained_column = None
    if matrices[0].stream == explanation.stream:
        hits = np.flatnonzero(matrices[0].columns == matrices[0].rows[r])
        explained_column = int(hits[0]) if hits.size else None
    char_w = fontsize * 0.6 / 72  # inches per character of a monospace font
    line_h = fontsize * 1.9 / 72
    lines = _layout(pieces, width_chars)
    while len(names) * (len(lines) * line_h + 0.45) + 1.2 > MAX_INCHES[1] and width_chars < 240:
        width_chars = int(width_chars * 1.25)
        lines = _layout(pieces, width_chars)
    if len(names) * (len(lines) * line_h + 0.45) + 1.2 > MAX_INCHES[1]:
        fontsize = max(5.0, fontsize * MAX_INCHES[1] / (len(names) * (len(lines) * line_h + 0.45) + 1.2))
        char_w, line_h = fontsize * 0.6 / 72, fontsize * 1.9 / 72
    used = max((x + len(text) for line in lines for _, x, text in line), default=1)
    width = min(max(used * char_w + 0.8, 6.0), MAX_INCHES[0])
    block = len(lines) * line_h + 0.45
    height = min(len(names) * block + 1.0, MAX_INCHES[1])
    figure, axes = new_figure(width, height, dpi=dpi)
    ax = axes[0, 0]
    ax.set_axis_off()
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_position((0, 0, 1, 1))
    scale = make_scale([m.values[r] for m in matrices], log=log, vmin=vmin, vmax=vmax) if shared_scale else None
    import matplotlib

    colours = matplotlib.colormaps[cmap]
    top = 0.75
    for matrix in matrices:
        own = scale or make_scale([matrix.values[r]], log=log, vmin=vmin, vmax=vmax)
        norm = own.norm()
        ax.text(0.3, top, f"{METHOD_TITLES.get(matrix.method, matrix.method)} ({own.describe()})", fontsize=8,
                color="0.3", va="bottom")
        for line_number, line in enumerate(lines):
            y = top + 0.1 + (line_number + 0.5) * line_h
            for column, x_chars, text in line:
                value = matrix.values[r, column]
                level = float(norm(value)) if not (log and value <= 0) else 0.0
                colour = colours(level)
                luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
                boxed = column == explained_column
                ax.text(0.4 + x_chars * char_w, y, text, fontsize=fontsize, family="monospace", va="center",
                        color="black" if luminance > 0.5 else "white", gid=f"token-{column}",
                        bbox={"boxstyle": "square,pad=0.04", "facecolor": colour,
                              "edgecolor": "#1f4fbf" if boxed else "none", "linewidth": 1.5 if boxed else 0})
        top += block
    heading = title or _title(explanation, names, matrices[0], label, exclude_special, log)
    ax.text(0.3, 0.35, _wrap(heading, width, 9), fontsize=9, va="center")
    return figure


def _layout(pieces: list[tuple[str, bool]], width_chars: int) -> list[list[tuple[int, int, str]]]:
    """Greedy line breaking at word boundaries (sub-word pieces stay with their word): per line,
    ``(column index, x in characters, text)`` of each token."""
    words: list[list[int]] = []
    for index, (_, space) in enumerate(pieces):
        if space or not words:
            words.append([index])
        else:
            words[-1].append(index)
    lines: list[list[tuple[int, int, str]]] = [[]]
    x = 0
    for word in words:
        length = sum(len(pieces[i][0]) for i in word)
        start = x + (1 if x > 0 else 0)
        if start + length > width_chars and lines[-1]:
            lines.append([])
            start = 0
        for i in word:
            lines[-1].append((i, start, pieces[i][0]))
            start += len(pieces[i][0])
        x = start
    return lines


def _title(explanation: Any, names: list[str], matrix: Any, label: str, exclude_special: bool, log: bool) -> str:
    text = describe(explanation, names[0], layer=matrix.layer, renormalised=exclude_special, log=log)
    if len(names) > 1:
        text = text.replace(METHOD_TITLES.get(names[0], names[0]), " | ".join(names), 1)
    return f"{explanation.model_name or 'model'}: what {label!r} draws on; {text}"
