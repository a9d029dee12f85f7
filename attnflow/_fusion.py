"""Turning a trace into per-layer transition matrices: head fusion, discarding, residual mixing."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ._errors import OptionError
from ._trace import AttentionTrace, LayerAttention

HEAD_FUSIONS = ("mean", "max", "min")
LayerSelection = slice | range | tuple[int, int] | Sequence[int] | None


def fuse_heads(weights: np.ndarray, head_fusion: str = "mean") -> np.ndarray:
    """Fuse attention heads: ``(batch, heads, q, k)`` -> ``(batch, q, k)`` float64."""
    if head_fusion not in HEAD_FUSIONS:
        raise OptionError(f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}.")
    w = np.asarray(weights, dtype=np.float64)
    return getattr(w, head_fusion)(axis=1)


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _iterable(value: object) -> list:
    try:
        return list(value)  # type: ignore[call-overload]
    except TypeError:
        return [None]


def select_layers(trace: AttentionTrace, layers: LayerSelection = None) -> list[LayerAttention]:
    """The self-attention layers picked by ``layers``.

    ``layers`` may be None (all), a ``(start, end)`` pair (Python-style, end exclusive, negatives count
    from the end), a ``slice``/``range``, or a sequence of layer indices in increasing order.
    """
    all_layers = trace.self_layers()
    count = len(all_layers)
    if not all_layers:
        raise OptionError("The trace has no self-attention layers; rollout and flow need at least one.")
    if layers is None:
        return all_layers
    if isinstance(layers, tuple) and len(layers) == 2 and all(x is None or _is_int(x) for x in layers):
        layers = slice(*(None if x is None else int(x) for x in layers))
    if isinstance(layers, slice):
        indices = list(range(count))[layers]
    else:
        if isinstance(layers, (str, bytes)) or not all(_is_int(i) for i in _iterable(layers)):
            raise OptionError(f"layers must be None, (start, end), a slice or a list of ints; got {layers!r}.")
        indices = [int(i) for i in layers]
        bad = [i for i in indices if not -count <= i < count]
        if bad:
            raise OptionError(f"layers {bad} out of range: the trace has {count} self-attention layers.")
        indices = [i % count for i in indices]
    if indices != sorted(set(indices)):
        raise OptionError(
            f"layers must select layers in increasing model order (rollout and flow run first layer first); "
            f"got {layers!r}."
        )
    if not indices:
        raise OptionError(f"layers={layers!r} selects no layer out of {count}.")
    return [all_layers[i] for i in indices]


def check_options(residual: float, discard_ratio: float) -> None:
    if not (_is_number(residual) and 0.0 <= residual <= 1.0):
        raise OptionError(f"residual must be a number in [0, 1] (0.5 is the paper's); got {residual!r}.")
    if not (_is_number(discard_ratio) and 0.0 <= discard_ratio < 1.0):
        raise OptionError(
            f"discard_ratio must be in [0, 1): the fraction of lowest fused weights to drop; got {discard_ratio!r}."
        )


def discard_lowest(matrix: np.ndarray, ratio: float) -> np.ndarray:
    """Zero the lowest ``ratio`` fraction of entries of ``(n, n)`` ``matrix``, never entry ``[0, 0]``.

    This is vit-explain's discard: ``int(n * n * ratio)`` entries are dropped (ties broken by position).
    """
    count = int(matrix.size * ratio)
    if count == 0:
        return matrix
    flat = matrix.reshape(-1).copy()
    lowest = np.argsort(flat, kind="stable")[:count]
    flat[lowest[lowest != 0]] = 0.0
    return flat.reshape(matrix.shape)


def mix_residual(matrix: np.ndarray, residual: float) -> np.ndarray:
    """``(1 - r) A + r I`` with rows renormalised to sum 1; ``(n, n)`` -> ``(n, n)``. All-zero rows stay 0."""
    mixed = (1.0 - residual) * matrix + residual * np.eye(matrix.shape[-1])
    sums = mixed.sum(axis=-1, keepdims=True)
    return np.divide(mixed, sums, out=np.zeros_like(mixed), where=sums > 0)


def transition_matrices(
    trace: AttentionTrace,
    batch_index: int,
    *,
    head_fusion: str = "mean",
    residual: float = 0.5,
    discard_ratio: float = 0.0,
    layers: LayerSelection = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The per-layer matrices Â that rollout multiplies and flow turns into capacities.

    Returns:
        ``(adj, valid)``: ``adj`` is ``(L, n, n)`` float64 over the ``n`` real tokens of the item
        (first layer first), ``valid`` the ``(n,)`` positions of those tokens in the padded sequence.
    """
    check_options(residual, discard_ratio)
    valid = trace.valid_index(batch_index)
    b = batch_index % trace.batch_size
    chosen = select_layers(trace, layers)
    grid = np.ix_(valid, valid)
    adj = np.empty((len(chosen), valid.size, valid.size))
    for i, layer in enumerate(chosen):
        fused = fuse_heads(layer.weights[b : b + 1], head_fusion)[0][grid]
        if discard_ratio:
            fused = discard_lowest(fused, discard_ratio)
        adj[i] = mix_residual(fused, residual)
    return adj, valid
