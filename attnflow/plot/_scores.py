"""What a picture shows, taken out of an `Explanation`: one method's scores of one item,
over the real tokens, optionally without special tokens (rows renormalised), with the labels to print."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from .._errors import OptionError

#: How titles name the built-in methods; others are named as registered.
METHOD_TITLES = {"raw": "raw attention (heads fused)", "rollout": "attention rollout", "flow": "attention flow"}


@dataclasses.dataclass(frozen=True)
class ScoreMatrix:
    """One method's scores of one item: ``values[r, c]`` is how much explained token ``rows[r]`` draws on
    input token ``columns[c]`` (both real tokens of their streams).

    Attributes:
        values: ``(rows, columns)`` float64.
        rows, columns: positions in the padded explained stream and input stream.
        row_labels, column_labels: the token texts.
        method, stream, layer: what it is (``layer`` indexes the explained stream's layers).
        renormalised: special tokens were left out and each row divided by its remaining sum.
    """

    values: np.ndarray
    rows: np.ndarray
    columns: np.ndarray
    row_labels: list[str]
    column_labels: list[str]
    method: str
    stream: str
    layer: int
    renormalised: bool


def method_names(explanation: Any, methods: str | Sequence[str] | None) -> list[str]:
    """``methods`` as a checked list (None: every method of the explanation)."""
    if methods is None:
        return list(explanation.methods)
    names = [methods] if isinstance(methods, str) else list(methods)
    if not names:
        raise OptionError(f"methods is empty; this explanation holds {list(explanation.methods)}.")
    for name in names:
        if name not in explanation:
            raise OptionError(
                f"This explanation holds {list(explanation.methods)}, not {name!r}; explain(trace, [..., {name!r}])."
            )
    return names


def layer_position(explanation: Any, method: str, layer: int | None) -> int:
    """Where ``layer`` (an index among the explained stream's layers; None or -1: the last computed) sits in
    ``explanation.layers(method)``."""
    computed = list(explanation.layer_indices(method))
    if layer is None or layer == -1:
        return len(computed) - 1
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
        raise OptionError(f"layer must be an int (an index among the explained stream's layers), got {layer!r}.")
    if int(layer) not in computed:
        more = " (flow computes only the last unless explained with all_layers=True)" if len(computed) == 1 else ""
        raise OptionError(
            f"{method!r} was computed after the layers {computed}, not after layer {layer}{more}; pick one of those."
        )
    return computed.index(int(layer))


def input_stream(explanation: Any, stream: str | None) -> str:
    """The input stream a picture's columns come from (default: the explained stream, or the only one)."""
    streams = explanation.input_streams
    if stream is None:
        return streams[0] if len(streams) == 1 else explanation.stream
    if stream not in streams:
        raise OptionError(f"The scores are over the input streams {streams}, not {stream!r}.")
    return stream


def check_batch_index(explanation: Any, batch_index: int) -> int:
    size = explanation.batch_size
    if isinstance(batch_index, bool) or not isinstance(batch_index, (int, np.integer)) or not -size <= batch_index < size:
        raise OptionError(f"batch_index must be an int in [-{size}, {size}), got {batch_index!r}.")
    return int(batch_index) % size


def score_matrix(
    explanation: Any, method: str, *, batch_index: int = 0, stream: str | None = None, layer: int | None = None,
    exclude_special: bool = False, special_rows: bool = True,
) -> ScoreMatrix:
    """One method's ``(rows, columns)`` scores of one item over real tokens.

    ``exclude_special`` drops special input tokens (CLS, SEP, BOS, registers) and divides each row by the
    sum of what is left, so the row shows shares among the ordinary tokens; with ``special_rows=False`` the
    special explained tokens are dropped too.
    """
    b = check_batch_index(explanation, batch_index)
    name = input_stream(explanation, stream)
    depth = layer_position(explanation, method, layer)
    full = explanation.layers(method)
    array = (full[name] if isinstance(full, dict) else full)[depth, b]  # (sources, tokens)
    explained = explanation.streams[explanation.stream]
    source = explanation.streams[name]
    positions = np.asarray(explanation.sources[b])
    keep_rows = np.asarray(explained.mask[b])[positions]
    if exclude_special and not special_rows:
        keep_rows &= ~np.asarray(explained.special[b])[positions]
    columns = source.valid_index(b)
    if exclude_special:
        columns = columns[~np.asarray(source.special[b])[columns]]
    if not keep_rows.any() or not columns.size:
        raise OptionError(
            f"Nothing is left to show for item {b}: {'no ordinary token' if exclude_special else 'no real token'} "
            "among the explained or input tokens; leave exclude_special off."
        )
    values = np.asarray(array, dtype=np.float64)[np.flatnonzero(keep_rows)][:, columns]
    if exclude_special:
        sums = values.sum(axis=1, keepdims=True)
        values = np.divide(values, sums, out=np.zeros_like(values), where=sums != 0)
    labels = explanation.source_tokens(b)
    row_labels = [labels[i] for i in np.flatnonzero(keep_rows)]
    column_labels = [source.tokens[b][j] for j in columns]
    return ScoreMatrix(
        values=values, rows=positions[keep_rows], columns=columns, row_labels=row_labels,
        column_labels=column_labels, method=method, stream=name, layer=explanation.layer_indices(method)[depth],
        renormalised=bool(exclude_special),
    )


def source_row(explanation: Any, batch_index: int, source: int | str | None) -> int:
    """The row (among ``explanation.sources[b]``) of the explained token ``source``: a position in the explained
    stream (negative: from the item's last real token), a token text, or None (the first explained token)."""
    b = check_batch_index(explanation, batch_index)
    positions = [int(p) for p in explanation.sources[b]]
    if source is None:
        return 0
    if isinstance(source, str):
        labels = explanation.source_tokens(b)
        if source not in labels:
            raise OptionError(f"No explained token reads {source!r}; the explained tokens are {labels}.")
        return labels.index(source)
    if isinstance(source, bool) or not isinstance(source, (int, np.integer)):
        raise OptionError(f"source must be a token position or token text, got {source!r}.")
    position = int(source)
    if position < 0:
        valid = explanation.streams[explanation.stream].valid_index(b)
        if -position > valid.size:
            raise OptionError(f"source {position} reaches before the first of item {b}'s {valid.size} real tokens.")
        position = int(valid[position])
    if position not in positions:
        raise OptionError(
            f"Token {position} of {explanation.stream!r} was not explained (explained positions: {positions}); "
            "explain it with sources=[...] including it."
        )
    return positions.index(position)


def display_token(label: str) -> str:
    """A token as printed in a sentence: WordPiece ``##`` and SentencePiece/byte-BPE word marks removed."""
    text = label[2:] if label.startswith("##") and len(label) > 2 else label
    return text.replace("▁", "").replace("Ġ", "").replace("Ċ", "⏎") or label


def starts_word(label: str, index: int) -> bool:
    """Whether a space goes before this token in running text."""
    if index == 0:
        return False
    if label.startswith("##"):
        return False
    return True


def describe(explanation: Any, method: str, *, layer: int, renormalised: bool, log: bool = False) -> str:
    """A title line naming the method, the layer and every setting."""
    name = METHOD_TITLES.get(method, method)
    from ._layers import after_layer

    several = len(explanation.input_streams) > 1
    where = after_layer(explanation, layer) + (f" of the {explanation.stream}" if several else "")
    parts = [f"{name} {where}", explanation.options.describe()]
    if renormalised:
        parts.append("special tokens excluded, rows renormalised")
    if log:
        parts.append("log colour scale")
    return "; ".join(parts)
