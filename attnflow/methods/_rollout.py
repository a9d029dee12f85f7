"""Raw attention and attention rollout (Abnar & Zuidema, 2020), on one stream or several."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .._errors import OptionError
from ..network._network import EdgeWeights, build_network, explained_stream, route, route_rows
from ..trace import AttentionTrace
from ._fusion import (
    LayerSelection,
    attention_weights,
    check_flag,
    fuse_heads,
    head_choice,
    select_layers,
    stream_layer_indices,
)
from ._options import HeadFusion, HeadSelection, Options

if TYPE_CHECKING:
    from ._registry import Method


def raw(
    trace: AttentionTrace, layer: int = -1, *, head_fusion: HeadFusion | None = None, stream: str | None = None
) -> np.ndarray:
    """Head-fused attention of one layer.

    Args:
        trace: the captured attention.
        layer: index among the layers of ``stream`` (its self- and cross-attention layers, in model order;
            negative counts from the end). For a single-stream trace, among all layers.
        head_fusion: ``"mean"``, ``"max"`` or ``"min"`` over heads.
        stream: whose layers (default: the explained stream, see [`AttentionTrace.default_stream`][attnflow.AttentionTrace.default_stream]).

    Returns:
        ``(batch, query, key)`` float64, ``[b, i, j]`` = attention of query ``i`` on key ``j`` (the key
        stream's tokens for a cross-attention layer); rows and columns of padding positions are 0.

    Examples:
        >>> import numpy as np
        >>> import attnflow
        >>> w = np.array([[[[1.0, 0.0], [0.5, 0.5]]]])  # (batch, heads, query, key)
        >>> trace = attnflow.AttentionTrace.from_arrays([w, w], tokens=["a", "b"])
        >>> attnflow.raw(trace)  # the last layer, (batch, sources, tokens)
        array([[[1. , 0. ],
                [0.5, 0.5]]])
    """
    own = stream_layer_indices(trace, explained_stream(trace, stream))
    if isinstance(layer, (bool, np.bool_)) or not isinstance(layer, (int, np.integer)) or not -len(own) <= layer < len(own):
        raise OptionError(f"layer must be an int in [-{len(own)}, {len(own)}); got {layer!r}.")
    chosen = trace.layers[own[layer]]
    fused = fuse_heads(chosen.weights, Options(head_fusion=head_fusion).fusion(trace))
    query_mask = trace.streams[chosen.query_stream].mask  # type: ignore[index]
    key_mask = trace.streams[chosen.key_stream].mask  # type: ignore[index]
    return fused * (query_mask[:, :, None] & key_mask[:, None, :])  # type: ignore[index]


def rollout(
    trace: AttentionTrace,
    *,
    head_fusion: HeadFusion | None = None,
    residual: float = 0.5,
    discard_ratio: float = 0.0,
    layers: LayerSelection = None,
    all_layers: bool = False,
    stream: str | None = None,
    heads: HeadSelection = None,
    sources: Sequence[int] | Literal["generated"] | None = None,
) -> Any:
    """Attention rollout: proportional routing of each output token's mass through the attention network.

    On one stream this is ``R = Â_L ··· Â_1`` with ``Â = (1 - r) A + r I`` (rows renormalised), heads fused
    before the residual is added; ``discard_ratio`` drops the lowest fused weights of each layer first
    (vit-explain), never entry ``[0, 0]``. Across streams (encoder-decoder, linked vision tokens) the mass
    follows cross-attention and links into the other streams; see `attnflow.network`.

    Args:
        trace: the captured attention.
        head_fusion: ``"mean"``, ``"max"`` or ``"min"``; None: ``"mean"`` (or the fusion the trace was
            captured with).
        residual: ``r`` in ``[0, 1]``; 0.5 is the paper's.
        discard_ratio: fraction in ``[0, 1)`` of each layer's lowest fused weights to zero.
        layers: which of the explained stream's layers, e.g. ``(2, 6)``; default all. Left-out layers are
            skipped (identity).
        all_layers: also return the rollout after every selected layer.
        stream: the stream whose output tokens are explained (default: the decoder of an encoder-decoder,
            the only stream of a single-stream trace; required where it is ambiguous, e.g. CLIP).
        heads: fuse only these heads (a list for every layer, or per layer: ``{layer: [heads]}``).
        sources: only these output tokens' rows, as in [`attnflow.flow`][attnflow.flow] (``"generated"``: one row per
            generated token of a ``generate()`` trace); default all.

    Returns:
        ``(batch, out, in)`` float64: ``[b, i, j]`` is how much output token ``i`` draws on input token ``j``.
        Each valid row sums to 1 (with ``residual=0`` and ``discard_ratio > 0`` a row of an inner layer can be
        discarded whole, and the mass through it is lost); padding rows and columns are 0. Where the
        explained stream draws on several input streams (an encoder-decoder's decoder), a dict from input
        stream name to such an array, whose rows together sum to 1. With ``all_layers=True`` each array is
        ``(layers, batch, out, in)``, entry ``l`` the rollout up to and including selected layer ``l``.

    Examples:
        >>> import numpy as np
        >>> import attnflow
        >>> w = np.array([[[[1.0, 0.0], [0.5, 0.5]]]])  # (batch, heads, query, key)
        >>> trace = attnflow.AttentionTrace.from_arrays([w, w], tokens=["a", "b"])
        >>> attnflow.rollout(trace)  # residual 0.5: 0.5 * A + 0.5 * I per layer, multiplied
        array([[[1.    , 0.    ],
                [0.4375, 0.5625]]])
    """
    check_flag("all_layers", all_layers)
    options = Options(head_fusion=head_fusion, residual=residual, discard_ratio=discard_ratio, layers=layers, heads=heads)
    from ._sources import resolve_sources

    sources = resolve_sources(trace, explained_stream(trace, stream), sources)
    return shape_result(rollout_scores(trace, options, stream=stream, sources=sources, all_layers=all_layers), all_layers)


def rollout_scores(
    trace: AttentionTrace, options: Options, *, stream: str | None, sources: Sequence[int] | None, all_layers: bool,
    method: Method | None = None,
) -> dict[str, np.ndarray]:
    """Rollout of ``sources`` (all tokens when None) as input stream -> ``(layers, batch, S, in)``, through the
    edges ``options.weights`` names, or ``method``'s edge weights when given (a method that need not be
    registered)."""
    from ._flow import local_sources

    explained = explained_stream(trace, stream)
    chosen = select_layers(trace, options.layers, explained)
    skip = [i for i in stream_layer_indices(trace, explained) if i not in chosen]
    weights, residual = edge_weights(trace, options, explained, method)
    inputs = trace.input_streams(explained)
    plans = [local_sources(trace, explained, b, sources) for b in range(trace.batch_size)]
    rows = trace.streams[explained].length if sources is None else len(sources)
    depths = len(chosen) if all_layers else 1
    result = {name: np.zeros((depths, trace.batch_size, rows, trace.streams[name].length)) for name in inputs}
    for b, (local, listed) in enumerate(plans):
        out_rows = np.asarray(listed, dtype=np.intp)
        network = build_network(trace, b, weights, residual=residual, stream=explained, skip=skip)
        if not all_layers and len(local) < network.groups[network.output].size:
            # a few rows: routed from the output down, O(S n^2) per layer instead of O(n^3)
            for name, matrix in route_rows(network, local).items():
                if name in result:
                    result[name][0, b][np.ix_(out_rows, network.groups[network.inputs[name]].positions)] = matrix
            continue
        for d, routed in enumerate(route(network, all_outputs=all_layers)):
            for name, matrix in routed.items():
                if name not in result:
                    continue
                columns = network.groups[network.inputs[name]].positions
                result[name][d, b][np.ix_(out_rows, columns)] = matrix[local]
    return result


def edge_weights(
    trace: AttentionTrace, options: Options, stream: str, method: Method | None = None
) -> tuple[EdgeWeights, float]:
    """The edge weights ``options.weights`` names (or ``method``'s), and the residual to mix in (0 for
    contributions that already account for the residual stream)."""
    if method is None and options.weights == "attention":
        heads = head_choice(trace, options.heads, stream)
        return attention_weights(trace, options.fusion(trace), options.discard_ratio, heads), options.residual
    from ._registry import get_method

    method = method if method is not None else get_method(options.weights)
    method.check(trace)
    weights = method.edge_weights(trace, options)
    if weights is None:
        raise OptionError(
            f"Method {method.name!r} gives no edge weights to route through; options.weights takes 'attention' or a "
            "contribution method (e.g. 'alti', 'norm')."
        )
    residual = method.edge_residual
    return weights, options.residual if residual is None else residual


def shape_result(result: dict[str, np.ndarray], all_layers: bool) -> Any:
    """Drop the layer axis unless ``all_layers``; a plain array when there is one input stream."""
    if not all_layers:
        result = {name: array[0] for name, array in result.items()}
    if len(result) == 1:
        return next(iter(result.values()))
    return result
