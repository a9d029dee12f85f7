"""Raw attention and attention rollout (Abnar & Zuidema, 2020)."""

from __future__ import annotations

import numpy as np

from ._errors import OptionError
from ._fusion import LayerSelection, fuse_heads, select_layers, transition_matrices
from ._trace import AttentionTrace


def raw(trace: AttentionTrace, layer: int = -1, *, head_fusion: str = "mean") -> np.ndarray:
    """Head-fused attention of one layer.

    Args:
        trace: the captured attention.
        layer: index among the self-attention layers (negative counts from the end).
        head_fusion: ``"mean"``, ``"max"`` or ``"min"`` over heads.

    Returns:
        ``(batch, seq, seq)`` float64, ``[b, i, j]`` = attention of query ``i`` on key ``j``; rows and
        columns of padding positions are 0.
    """
    layers = trace.self_layers()
    if isinstance(layer, (bool, np.bool_)) or not isinstance(layer, (int, np.integer)) or not -len(layers) <= layer < len(layers):
        raise OptionError(f"layer must be an int in [-{len(layers)}, {len(layers)}); got {layer!r}.")
    fused = fuse_heads(layers[layer].weights, head_fusion)
    return fused * (trace.mask[:, :, None] & trace.mask[:, None, :])


def rollout(
    trace: AttentionTrace,
    *,
    head_fusion: str = "mean",
    residual: float = 0.5,
    discard_ratio: float = 0.0,
    layers: LayerSelection = None,
    all_layers: bool = False,
) -> np.ndarray:
    """Attention rollout: ``R = Â_L ··· Â_1`` with ``Â = (1 - r) A + r I`` (rows renormalised).

    Heads are fused before the residual is added; ``discard_ratio`` drops the lowest fused weights of
    each layer first (vit-explain), never entry ``[0, 0]``.

    Args:
        trace: the captured attention.
        head_fusion: ``"mean"``, ``"max"`` or ``"min"``.
        residual: ``r`` in ``[0, 1]``; 0.5 is the paper's.
        discard_ratio: fraction in ``[0, 1)`` of each layer's lowest fused weights to zero.
        layers: which self-attention layers, e.g. ``(2, 6)``; default all.
        all_layers: also return the rollout after every selected layer.

    Returns:
        ``(batch, seq, seq)`` float64: ``[b, i, j]`` is how much output token ``i`` draws on input token
        ``j``; each valid row sums to 1 (with ``residual=0`` and ``discard_ratio > 0`` a row of an inner
        layer can be discarded whole, and the mass through it is lost), padding rows/columns are 0. With ``all_layers=True``,
        ``(layers, batch, seq, seq)`` where entry ``l`` is the rollout up to and including layer ``l``.
    """
    batch, seq = trace.batch_size, trace.seq_len
    result = np.zeros((len(select_layers(trace, layers)), batch, seq, seq))
    for b in range(batch):
        adj, valid = transition_matrices(
            trace, b, head_fusion=head_fusion, residual=residual, discard_ratio=discard_ratio, layers=layers
        )
        grid = np.ix_(valid, valid)
        acc = np.eye(valid.size)
        for i, layer_matrix in enumerate(adj):
            acc = layer_matrix @ acc
            result[i, b][grid] = acc
    return result if all_layers else result[-1]
