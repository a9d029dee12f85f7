"""Attention flow (Abnar & Zuidema, 2020): max-flow through the layered attention network."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from ._errors import FlowTooLargeError, OptionError
from ._fusion import LayerSelection, check_options, select_layers, transition_matrices
from ._trace import AttentionTrace

if TYPE_CHECKING:
    import igraph

#: flow() refuses problems estimated to take longer than this unless the caller raises ``max_seconds``.
DEFAULT_MAX_SECONDS = 1800.0


def flow(
    trace: AttentionTrace,
    *,
    head_fusion: str = "mean",
    residual: float = 0.5,
    discard_ratio: float = 0.0,
    layers: LayerSelection = None,
    normalize: bool = True,
    sources: Sequence[int] | None = None,
    all_layers: bool = False,
    method: str = "auto",
    n_jobs: int = 1,
    max_seconds: float = DEFAULT_MAX_SECONDS,
    progress: bool | None = None,
) -> np.ndarray:
    """Attention flow: the max-flow from each output token to each input token.

    The network has ``L + 1`` layers of ``n`` nodes (layer 0 = input tokens); node ``(l+1, i)`` has an
    edge to ``(l, j)`` with capacity ``Â_l[i, j]`` where ``Â = (1 - r) A + r I`` (heads fused, rows
    renormalised), exactly as in the paper's code. Each batch item uses only its real tokens.

    Args:
        trace: the captured attention.
        head_fusion, residual, discard_ratio, layers: as in :func:`attnflow.rollout`.
        normalize: divide each row by its sum over input tokens (the paper's code does); ``False`` returns
            raw max-flow values.
        sources: output-token positions to compute (e.g. ``[0]`` for CLS); negative values count back
            from each item's last real token (``[-1]`` = last token of a decoder). Default: all tokens.
        all_layers: also compute flows from every layer's nodes to the inputs (the paper's compute_flows).
        method: ``"auto"`` (the compiled ``"dinic"`` solver when numba is installed, else ``"pruned"``),
            ``"dinic"``, ``"pruned"`` (numpy + igraph on the network cut down per pair, closed forms for one
            and two layers) or ``"igraph"`` (one igraph max-flow per pair: the reference). All are exact and
            agree to about ``1e-12``.
        n_jobs: parallel workers: threads for ``"dinic"``, processes for ``"pruned"``/``"igraph"`` (forked on
            Linux unless JAX is loaded, whose threads make fork unsafe; otherwise started fresh, so call from
            under ``if __name__ == "__main__":``).
        max_seconds: refuse (``FlowTooLargeError``) when the estimated run time exceeds this. The
            estimate is an upper bound sized for causal attention; encoder attention usually runs 4-30x
            faster than estimated.
        progress: show a progress bar (None: only when the run takes more than a moment).

    Returns:
        ``(batch, S, seq)`` float64 where ``S`` is ``seq`` (all tokens) or ``len(sources)``; ``[b, s, j]``
        is the flow from output token ``s`` to input token ``j``. Padding rows/columns are 0; under a
        causal mask flows to future tokens are exactly 0. With ``all_layers=True``,
        ``(layers, batch, S, seq)``, entry ``l`` the flow from layer ``l + 1``'s nodes.
    """
    from ._flow_solvers import METHODS, estimate_seconds, max_flow_values

    check_options(residual, discard_ratio)
    if method not in METHODS:
        raise OptionError(f"method must be one of {METHODS}, got {method!r}.")
    if not (isinstance(n_jobs, int) and n_jobs >= 1):
        raise OptionError(f"n_jobs must be a positive int, got {n_jobs!r}.")
    num_layers = len(select_layers(trace, layers))
    batch, seq = trace.batch_size, trace.seq_len
    plans = [_local_sources(trace, b, sources) for b in range(batch)]

    estimate = sum(
        estimate_seconds(num_layers, int(n), len(local), method=method, all_layers=all_layers)
        for (local, _), n in zip(plans, trace.lengths())
    )
    if estimate > max_seconds:
        raise FlowTooLargeError(
            f"Attention flow for {batch} item(s) x {seq} tokens x {num_layers} layers is estimated at "
            f"{estimate:,.0f} s with method={method!r}, over max_seconds={max_seconds:,.0f}. Narrow it with "
            "sources=[0] (or [-1] for decoders), fewer layers=, a shorter input, or use rollout(); or raise "
            "max_seconds= if you mean to wait."
        )

    rows = seq if sources is None else len(sources)
    result = np.zeros((num_layers, batch, rows, seq))
    total = sum(len(local) for local, _ in plans)
    with _progress_bar(total, progress) as bar:
        for b, (local, out_rows) in enumerate(plans):
            if not local:
                continue
            adj, valid = transition_matrices(
                trace, b, head_fusion=head_fusion, residual=residual, discard_ratio=discard_ratio, layers=layers
            )
            values = max_flow_values(
                adj, local, method=method, all_layers=all_layers, n_jobs=n_jobs, progress=bar.update
            )
            if not all_layers:
                values = values[None]
            if normalize:
                sums = values.sum(axis=-1, keepdims=True)
                values = np.divide(values, sums, out=np.zeros_like(values), where=sums > 0)
            target = result[-values.shape[0]:, b]
            target[:, np.asarray(out_rows)[:, None], valid[None, :]] = values
    return result if all_layers else result[-1]


def _local_sources(trace: AttentionTrace, b: int, sources: Sequence[int] | None) -> tuple[list[int], list[int]]:
    """For item ``b``: source indices among its real tokens, and the output rows they fill."""
    valid = trace.valid_index(b)
    if sources is None:
        return list(range(valid.size)), valid.tolist()
    if isinstance(sources, (int, np.integer)) or isinstance(sources, str):
        raise OptionError(f"sources must be a list of token positions, e.g. [0]; got {sources!r}.")
    position_to_local = {int(p): i for i, p in enumerate(valid)}
    local, out_rows = [], []
    for row, s in enumerate(sources):
        if not isinstance(s, (int, np.integer)):
            raise OptionError(f"sources must hold ints, got {s!r}.")
        if s >= trace.seq_len or s < -valid.size:
            raise OptionError(
                f"sources contains {s}, out of range for batch item {b} with {valid.size} real tokens "
                f"(sequence length {trace.seq_len}); use 0..{trace.seq_len - 1}, or -1..-{valid.size} to count "
                "back from the last real token."
            )
        index = valid.size + s if s < 0 else position_to_local.get(int(s))
        if index is not None:  # a padding position stays a row of zeros
            local.append(index)
            out_rows.append(row)
    return local, out_rows


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _progress_bar(total: int, progress: bool | None):  # -> context manager with .update(n)
    if progress is False:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    # delay: the bar appears only once flow has run for more than a moment.
    return tqdm(total=total, desc="attention flow", unit="src", delay=0.0 if progress else 1.0, leave=False)


def flow_network(
    trace: AttentionTrace,
    batch_index: int = 0,
    *,
    head_fusion: str = "mean",
    residual: float = 0.5,
    discard_ratio: float = 0.0,
    layers: LayerSelection = None,
) -> igraph.Graph:  # igraph is imported on first use: it pulls in matplotlib
    """The flow network of one batch item as an ``igraph.Graph``.

    Vertices are ``(layer, token)`` for the item's real tokens, vertex id ``layer * n + i`` (layer 0 =
    inputs), with attributes ``layer``, ``token`` (index among real tokens), ``position`` (index in the
    padded sequence) and ``label`` (``"L{layer}:{token text}"``). Edges run from layer ``l + 1`` to
    layer ``l`` with edge attribute ``capacity``. ``graph.maxflow_value(src, dst, capacity="capacity")``
    on it gives :func:`flow` with ``normalize=False``.
    """
    from ._network import layered_graph

    adj, valid = transition_matrices(
        trace, batch_index, head_fusion=head_fusion, residual=residual, discard_ratio=discard_ratio, layers=layers
    )
    graph = layered_graph(adj)
    labels = trace.tokens[batch_index % trace.batch_size]
    graph.vs["position"] = [int(valid[t]) for t in graph.vs["token"]]
    graph.vs["label"] = [f"L{v['layer']}:{labels[v['position']]}" for v in graph.vs]
    return graph
