"""Attention flow (Abnar & Zuidema, 2020): max-flow through the layered attention network."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .._errors import FlowTooLargeError, OptionError
from ..network._network import build_network, explained_stream
from ..trace import AttentionTrace
from ._fusion import (
    LayerSelection,
    check_flag,
    check_max_seconds,
    is_int,
    select_layers,
    stream_layer_indices,
)
from ._options import FlowSolver, HeadFusion, HeadSelection, Options
from ._rollout import edge_weights, shape_result
from ._sources import GeneratedSources, resolve_sources

if TYPE_CHECKING:
    import igraph

#: flow() refuses problems estimated to take longer than this unless the caller raises ``max_seconds``.
DEFAULT_MAX_SECONDS = 1800.0


def flow(
    trace: AttentionTrace,
    *,
    head_fusion: HeadFusion | None = None,
    residual: float = 0.5,
    discard_ratio: float = 0.0,
    layers: LayerSelection = None,
    normalize: bool = True,
    sources: Sequence[int] | Literal["generated"] | None = None,
    all_layers: bool = False,
    stream: str | None = None,
    heads: HeadSelection = None,
    method: FlowSolver = "auto",
    n_jobs: int = 1,
    max_seconds: float = DEFAULT_MAX_SECONDS,
    progress: bool | None = None,
) -> Any:
    """Attention flow: the max-flow from each output token to each input token.

    On one stream the network has ``L + 1`` layers of ``n`` nodes (layer 0 = input tokens); node ``(l+1, i)``
    has an edge to ``(l, j)`` with capacity ``Â_l[i, j]`` where ``Â = (1 - r) A + r I`` (heads fused, rows
    renormalised), exactly as in the paper's code. Across streams (encoder-decoder, linked vision tokens)
    it is the same network [`attnflow.rollout`][attnflow.rollout] routes through, with cross-attention and link edges
    (see `attnflow.network`), so ``flow(normalize=False) >= rollout`` entry by entry. Each batch item
    uses only its real tokens.

    Args:
        trace: the captured attention.
        head_fusion: as in [`attnflow.rollout`][attnflow.rollout].
        residual: as in [`attnflow.rollout`][attnflow.rollout].
        discard_ratio: as in [`attnflow.rollout`][attnflow.rollout].
        layers: as in [`attnflow.rollout`][attnflow.rollout].
        stream: as in [`attnflow.rollout`][attnflow.rollout].
        heads: as in [`attnflow.rollout`][attnflow.rollout].
        normalize: divide each row by its sum over all input tokens (the paper's code does); ``False``
            returns raw max-flow values.
        sources: output-token positions to compute (e.g. ``[0]`` for CLS); negative values count back
            from each item's last real token (``[-1]`` = last token of a decoder). A non-negative position
            that is padding in some item is an error (use negative positions for left-padded batches).
            ``"generated"``, for the trace of a ``generate()`` call: one row per generated token, the row
            of the position that predicts it (position ``t`` predicts token ``t + 1``, so the first row is the
            prompt's last position); rows of tokens after an item's end of sequence are 0. Default: all
            tokens.
        all_layers: also compute flows from every selected layer's nodes to the inputs (the paper's
            compute_flows). Expect it to cost several times the last layer alone on encoder attention: each
            layer's pairs are solved on the prefix of the network below it, but fewer of the middle layers' pairs
            sit at the cheap cut bound (on MiniLM at 128 tokens, 0.3-49% of layers 3-5's pairs against 95% of
            the last layer's), so they take 2-6x the last layer's time each (``benchmarks/bench_page.py``).
        method: ``"auto"`` (the compiled ``"dinic"`` solver when numba is installed, else ``"pruned"``),
            ``"dinic"``, ``"dinic-v1"`` (the first compiled kernel, kept as a reference: about 10x slower on
            causal attention), ``"pruned"`` (numpy + igraph on the network cut down per pair, closed forms for
            one and two layers) or ``"igraph"`` (one igraph max-flow per pair: the reference). All are exact
            and agree to about ``1e-12``.
        n_jobs: parallel workers: threads for ``"dinic"``, processes for ``"pruned"``/``"igraph"`` (forked on
            Linux unless JAX is loaded, whose threads make fork unsafe; otherwise started fresh, so call from
            under ``if __name__ == "__main__":``). Each ``"dinic"`` thread keeps its own copy of the network.
        max_seconds: refuse (``FlowTooLargeError``) when the estimated run time exceeds this. The estimate
            (fitted on causal and encoder attention, real and synthetic) was within 3x of the measured time
            either way on a 2-core machine; under causal attention a source costs only its prefix, so
            ``sources=[-1]`` on a decoder is the costly case and ``sources=[0]`` nearly free.
        progress: show a progress bar (None: only when the run takes more than a moment).

    Returns:
        ``(batch, S, in)`` float64 where ``S`` is the explained stream's length (all tokens) or
        ``len(sources)``; ``[b, s, j]`` is the flow from output token ``s`` to input token ``j``. Padding rows
        and columns are 0; under a causal mask flows to future tokens are exactly 0. Where the explained
        stream draws on several input streams, a dict from input stream name to such an array (normalised
        together). With ``all_layers=True`` each array is ``(layers, batch, S, in)``, entry ``l`` the flow
        from selected layer ``l``'s nodes.

    Examples:
        >>> import numpy as np
        >>> import attnflow
        >>> w = np.array([[[[1.0, 0.0], [0.5, 0.5]]]])  # (batch, heads, query, key)
        >>> trace = attnflow.AttentionTrace.from_arrays([w, w], tokens=["a", "b"])
        >>> attnflow.flow(trace)  # max flow from each output token to each input token
        array([[[1. , 0. ],
                [0.4, 0.6]]])
    """
    from ..network._solvers import METHODS

    check_flag("all_layers", all_layers)
    if not isinstance(method, str) or method not in METHODS:
        raise OptionError(f"method must be one of {METHODS}, got {method!r}.")
    options = Options(
        head_fusion=head_fusion, residual=residual, discard_ratio=discard_ratio, layers=layers, heads=heads,
        normalize=normalize, flow_solver=method, n_jobs=n_jobs, max_seconds=check_max_seconds(max_seconds),
    )
    sources = resolve_sources(trace, explained_stream(trace, stream), sources)
    scores = flow_scores(trace, options, stream=stream, sources=sources, all_layers=all_layers, progress=progress)
    return shape_result(scores, all_layers)


def flow_scores(
    trace: AttentionTrace, options: Options, *, stream: str | None, sources: Sequence[int] | None,
    all_layers: bool, progress: bool | None = False,
) -> dict[str, np.ndarray]:
    """Flow from ``sources`` (all tokens when None) as input stream -> ``(layers, batch, S, in)``."""
    from ..network._layered import layered
    from ..network._solvers import max_flow_values

    explained = explained_stream(trace, stream)
    chosen = select_layers(trace, options.layers, explained)
    skip = [i for i in stream_layer_indices(trace, explained) if i not in chosen]
    out_stream = trace.streams[explained]
    plans = [local_sources(trace, explained, b, sources) for b in range(trace.batch_size)]
    method = options.flow_solver
    estimate = estimate_flow_seconds(trace, options, stream=explained, sources=sources, all_layers=all_layers)
    if estimate > options.max_seconds:
        raise FlowTooLargeError(
            f"Attention flow for {trace.batch_size} item(s) x {out_stream.length} tokens x {len(chosen)} layers is "
            f"estimated at {estimate:,.0f} s with method={method!r}, over max_seconds={options.max_seconds:,.0f}. "
            "Narrow it with sources=[0] (or [-1] for decoders), fewer layers=, a shorter input, or use rollout(); or "
            "raise max_seconds= if you mean to wait."
        )
    weights, residual = edge_weights(trace, options, explained)
    inputs = trace.input_streams(explained)
    rows = out_stream.length if sources is None else len(sources)
    depths = len(chosen) if all_layers else 1
    result = {name: np.zeros((depths, trace.batch_size, rows, trace.streams[name].length)) for name in inputs}
    total = sum(len(local) for local, _ in plans)
    with _progress_bar(total, progress) as bar:
        for b, (local, out_rows) in enumerate(plans):
            if not local:
                continue
            network = build_network(trace, b, weights, residual=residual, stream=explained, skip=skip)
            tops = network.outputs if all_layers else (network.output,)
            grid = layered(network, tops=tops)
            values = np.zeros((len(tops), len(local), grid.adj.shape[1]))
            by_slot: dict[int, list[int]] = {}
            for t, g in enumerate(tops):
                by_slot.setdefault(grid.slots[g], []).append(t)
            for slot, which in by_slot.items():
                levels = [grid.level[tops[t]] for t in which]
                values[which] = max_flow_values(
                    grid.adj, [slot + s for s in local], method=method, tops=levels, n_jobs=options.n_jobs,
                    progress=bar.update if slot == grid.slots[tops[-1]] else None,
                )
            sinks = {name: np.arange(grid.slots[g], grid.slots[g] + network.groups[g].size)
                     for name, g in network.inputs.items()}
            if options.normalize:
                sums = sum(values[..., cols].sum(axis=-1, keepdims=True) for cols in sinks.values())
                values = np.divide(values, sums, out=np.zeros_like(values), where=sums > 0)
            for name, cols in sinks.items():
                if name not in result:
                    continue
                positions = network.groups[network.inputs[name]].positions
                result[name][:, b][:, np.asarray(out_rows)[:, None], positions[None, :]] = values[..., cols]
    return result


def estimate_flow_seconds(
    trace: AttentionTrace, options: Options, *, stream: str | None, sources: Sequence[int] | None, all_layers: bool,
) -> float:
    """Estimated seconds `flow_scores` takes with ``n_jobs=1`` (what ``max_seconds`` is checked against).

    Under causal attention on one stream a source's flow reaches only the tokens up to it, so each source is
    costed over its own prefix (the last token over the whole sequence, the first over one token).
    """
    from ..network._solvers import estimate_seconds

    explained = explained_stream(trace, stream)
    chosen = select_layers(trace, options.layers, explained)
    skip = [i for i in stream_layer_indices(trace, explained) if i not in chosen]
    depth, width = _network_size(trace, explained, len(chosen), skip)
    causal = len(trace.inputs_of(explained)) == 1 and bool(trace.streams[explained].causal)
    total = 0.0
    for b in range(trace.batch_size):
        local, _ = local_sources(trace, explained, b, sources)
        total += estimate_seconds(
            depth, int(width[b]), len(local), method=options.flow_solver,
            tops=_estimate_tops(depth, len(chosen), all_layers), widths=[s + 1 for s in local] if causal else None,
            causal=causal,
        )
    return total


def _network_size(trace: AttentionTrace, explained: str, chosen: int, skip: list[int]) -> tuple[int, np.ndarray]:
    """Upper estimates of the layered network's depth and, per item, width (for the cost estimate)."""
    drawn = trace.inputs_of(explained)
    if len(drawn) == 1:
        return chosen, trace.lengths(explained)
    steps = sum(1 for i, layer in enumerate(trace.layers) if layer.query_stream in drawn and i not in skip)
    steps += sum(1 for link in trace.links if link.stream in drawn)
    width = sum(trace.lengths(name) for name in drawn)
    return steps, np.asarray(width)


def _estimate_tops(depth: int, chosen: int, all_layers: bool) -> list[int]:
    if not all_layers:
        return [depth]
    return list(range(depth - chosen + 1, depth + 1))


def local_sources(
    trace: AttentionTrace, stream: str, b: int, sources: Sequence[int] | None
) -> tuple[list[int], list[int]]:
    """For item ``b``: source indices among the stream's real tokens, and the output rows they fill."""
    valid = trace.valid_index(b, stream)
    length = trace.streams[stream].length
    if sources is None:
        return list(range(valid.size)), valid.tolist()
    if isinstance(sources, (str, bytes)) or not hasattr(sources, "__iter__"):
        raise OptionError(f"sources must be a list of token positions, e.g. [0]; got {sources!r}.")
    position_to_local = {int(p): i for i, p in enumerate(valid)}
    local, out_rows = [], []
    for row, s in enumerate(sources):
        if not is_int(s):
            raise OptionError(f"sources must hold ints, got {s!r}.")
        if s >= length or s < -valid.size:
            raise OptionError(
                f"sources contains {s}, out of range for batch item {b} with {valid.size} real tokens "
                f"(sequence length {length}); use 0..{length - 1}, or -1..-{valid.size} to count "
                "back from the last real token."
            )
        index = valid.size + s if s < 0 else position_to_local.get(int(s))
        if isinstance(sources, GeneratedSources) and (index is None or not sources.explains(b, row)):
            continue  # a token after the item's end of sequence: a row of zeros
        if index is None:
            raise OptionError(
                f"sources contains position {s}, which is padding in batch item {b} (its real tokens are at "
                f"{valid[0]}..{valid[-1]}). Positions index the padded sequence; for left-padded batches count "
                "from the end instead, e.g. sources=[-1] for each item's last real token."
            )
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
    head_fusion: HeadFusion | None = None,
    residual: float = 0.5,
    discard_ratio: float = 0.0,
    layers: LayerSelection = None,
    stream: str | None = None,
    heads: HeadSelection = None,
) -> igraph.Graph:  # igraph is imported on first use: it pulls in matplotlib
    """The flow network of one batch item as an ``igraph.Graph``: the network rollout routes through and
    flow max-flows through.

    Vertices are ``(stream, layer, token)`` for the item's real tokens, input tokens first (for a
    single-stream trace vertex id ``layer * n + i``, layer 0 = inputs), with attributes ``stream``,
    ``layer`` (depth), ``token`` (index among real tokens), ``position`` (index in the padded stream),
    ``input`` and ``label`` (``"L{layer}:{token text}"``, prefixed by the stream name when there are
    several). Edges run from upper to lower nodes with edge attribute ``capacity``.
    ``graph.maxflow_value(src, dst, capacity="capacity")`` on it gives [`flow`][attnflow.flow] with ``normalize=False``.
    """
    from ..network._igraph import network_graph

    options = Options(head_fusion=head_fusion, residual=residual, discard_ratio=discard_ratio, layers=layers, heads=heads)
    if not is_int(batch_index) or not -trace.batch_size <= batch_index < trace.batch_size:
        raise OptionError(f"batch_index must be an int in [-{trace.batch_size}, {trace.batch_size}), got {batch_index!r}.")
    b = int(batch_index) % trace.batch_size
    explained = explained_stream(trace, stream)
    chosen = select_layers(trace, layers, explained)
    skip = [i for i in stream_layer_indices(trace, explained) if i not in chosen]
    weights, residual = edge_weights(trace, options, explained)
    network = build_network(trace, b, weights, residual=residual, stream=explained, skip=skip)
    labels = {name: s.tokens[b] for name, s in trace.streams.items()}  # type: ignore[index]
    return network_graph(network, labels)
