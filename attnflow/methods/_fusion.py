"""From a trace's attention to the edge weights of the network: head fusion, discarding, layer selection."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .._errors import OptionError
from ..network._network import EdgeWeights, explained_stream
from ..trace import AttentionTrace

HEAD_FUSIONS = ("mean", "max", "min")
LayerSelection = slice | range | tuple[int, int] | Sequence[int] | None


def check_head_fusion(head_fusion: object) -> str | None:
    """``head_fusion`` if it is None or one of `HEAD_FUSIONS`; an [`OptionError`][attnflow.OptionError] otherwise."""
    if head_fusion is not None and (not isinstance(head_fusion, str) or head_fusion not in HEAD_FUSIONS):
        raise OptionError(f"head_fusion must be one of {HEAD_FUSIONS} (or None), got {head_fusion!r}.")
    return head_fusion


def check_flag(name: str, value: object, *, none: bool = False) -> None:
    """An [`OptionError`][attnflow.OptionError] unless ``value`` is True or False (or None where ``none``)."""
    if not (isinstance(value, (bool, np.bool_)) or (none and value is None)):
        raise OptionError(f"{name} must be True or False{' (or None)' if none else ''}, got {value!r}.")


def fuse_heads(weights: np.ndarray, head_fusion: str | None = "mean") -> np.ndarray:
    """Fuse attention heads: ``(batch, heads, q, k)`` -> ``(batch, q, k)`` float64 (None: mean)."""
    head_fusion = check_head_fusion(head_fusion) or "mean"
    w = np.asarray(weights)
    if head_fusion == "mean":  # accumulated in float64 without a float64 copy of every head
        return w.mean(axis=1, dtype=np.float64)
    return getattr(w, head_fusion)(axis=1).astype(np.float64)


def is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_number(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _iterable(value: object) -> list:
    try:
        return list(value)  # type: ignore[call-overload]
    except TypeError:
        return [None]


def stream_layer_indices(trace: AttentionTrace, stream: str) -> list[int]:
    """The trace indices of the layers whose queries are ``stream``'s tokens (what ``layers=`` indexes)."""
    indices = trace.stream_layers(stream)
    if not indices:
        raise OptionError(
            f"Stream {stream!r} has no attention layers of its own (it is only attended to); explain a stream "
            f"that draws on it, e.g. stream={trace.default_stream()!r}."
            if len(trace.streams) > 1 else f"Stream {stream!r} has no attention layers."
        )
    return indices


def select_layers(trace: AttentionTrace, layers: LayerSelection = None, stream: str | None = None) -> list[int]:
    """Trace indices of the explained stream's layers picked by ``layers``.

    ``layers`` indexes the layers whose queries are the explained stream's tokens (for a single-stream
    trace: all layers), and may be None (all), a ``(start, end)`` pair (Python-style, end exclusive,
    negatives count from the end), a ``slice``/``range``, or a sequence of layer indices in increasing order.
    """
    own = stream_layer_indices(trace, explained_stream(trace, stream))
    count = len(own)
    if layers is None:
        return own
    if isinstance(layers, tuple) and len(layers) == 2 and all(x is None or is_int(x) for x in layers):
        layers = slice(*(None if x is None else int(x) for x in layers))
    if isinstance(layers, slice):
        for part in (layers.start, layers.stop, layers.step):
            if part is not None and not is_int(part):
                raise OptionError(f"layers must be None, (start, end), a slice or a list of ints; got {layers!r}.")
        indices = list(range(count))[layers]
    else:
        if isinstance(layers, (str, bytes)) or not all(is_int(i) for i in _iterable(layers)):
            raise OptionError(f"layers must be None, (start, end), a slice or a list of ints; got {layers!r}.")
        indices = [int(i) for i in layers]
        bad = [i for i in indices if not -count <= i < count]
        if bad:
            raise OptionError(f"layers {bad} out of range: the explained stream has {count} layers (0..{count - 1}).")
        indices = [i % count for i in indices]
    if indices != sorted(set(indices)):
        raise OptionError(
            f"layers must select layers in increasing model order (rollout and flow run first layer first); "
            f"got {layers!r}."
        )
    if not indices:
        raise OptionError(f"layers={layers!r} selects no layer out of {count}.")
    return [own[i] for i in indices]


def check_options(residual: float, discard_ratio: float) -> None:
    if not (is_number(residual) and 0.0 <= residual <= 1.0):
        raise OptionError(f"residual must be a number in [0, 1] (0.5 is the paper's); got {residual!r}.")
    if not (is_number(discard_ratio) and 0.0 <= discard_ratio < 1.0):
        raise OptionError(
            f"discard_ratio must be in [0, 1): the fraction of lowest fused weights to drop; got {discard_ratio!r}."
        )


def check_max_seconds(max_seconds: float) -> float:
    if not is_number(max_seconds) or math.isnan(float(max_seconds)) or max_seconds < 0:
        raise OptionError(
            f"max_seconds must be a non-negative number of seconds (float('inf') for no limit); got {max_seconds!r}."
        )
    return float(max_seconds)


def discard_lowest(matrix: np.ndarray, ratio: float) -> np.ndarray:
    """Zero the lowest ``ratio`` fraction of entries of ``matrix``, never entry ``[0, 0]``.

    This is vit-explain's discard: ``int(q * k * ratio)`` entries are dropped (ties broken by position).
    """
    count = int(matrix.size * ratio)
    if count == 0:
        return matrix
    flat = matrix.reshape(-1).copy()
    lowest = np.argsort(flat, kind="stable")[:count]
    flat[lowest[lowest != 0]] = 0.0
    return flat.reshape(matrix.shape)


def head_choice(trace: AttentionTrace, heads: Any, stream: str | None = None) -> dict[int, list[int]]:
    """Trace layer index -> the heads to fuse, for layers whose heads are restricted.

    ``heads``: a list for every layer, or a mapping from the explained stream's layer index to a list.
    """
    if heads is None:
        return {}
    if isinstance(heads, Mapping):
        own = stream_layer_indices(trace, explained_stream(trace, stream))
        chosen = {}
        for position, selected in heads.items():
            if not -len(own) <= position < len(own):
                raise OptionError(f"heads names layer {position}, but the explained stream has {len(own)} layers.")
            chosen[own[position]] = list(selected)
    else:
        chosen = {index: list(heads) for index in range(trace.num_layers)}
    for index, selected in chosen.items():
        count = trace.layers[index].weights.shape[1]
        bad = [h for h in selected if not -count <= h < count]
        if bad:
            raise OptionError(
                f"heads {bad} out of range for layer {index} ({trace.layers[index].name!r}), which has {count} heads."
            )
    return chosen


def attention_weights(
    trace: AttentionTrace, head_fusion: str | None = "mean", discard_ratio: float = 0.0,
    heads: Mapping[int, Sequence[int]] | None = None,
) -> EdgeWeights:
    """The edge weights of raw attention: heads fused (only ``heads[layer]`` where given), the lowest
    ``discard_ratio`` dropped, over real tokens."""
    head_fusion = check_head_fusion(head_fusion) or "mean"
    heads = heads or {}

    def weights(index: int, b: int) -> np.ndarray:
        layer = trace.layers[index]
        rows = trace.valid_index(b, layer.query_stream)
        cols = trace.valid_index(b, layer.key_stream)
        w = layer.weights[b : b + 1]
        if index in heads:
            w = w[:, list(heads[index])]
        fused = fuse_heads(w, head_fusion)[0]
        if rows.size < fused.shape[0] or cols.size < fused.shape[1]:  # padding: keep the real tokens
            fused = fused[np.ix_(rows, cols)]
        return discard_lowest(fused, discard_ratio) if discard_ratio else fused

    return weights
