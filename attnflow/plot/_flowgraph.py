"""The flow graph: layers as columns, tokens as nodes, and the widest paths of one maximum flow from the
explained token down to the input tokens, drawn from `attnflow.flow_network`.

What is drawn: a super-sink is joined to every input-token node; one maximum flow from the explained
token's output node to that sink is computed on the network's capacities (igraph); the flow is then
decomposed greedily into paths, each time taking the path whose smallest edge flow is largest and removing
that much flow along it. The first ``top_k`` paths are drawn, edge width by the flow they carry. A maximum
flow is not unique, so neither is the decomposition; and attention flow's per-token score (``attnflow.flow``)
is the max-flow to *each* input token alone, which can exceed what that token receives in the joint flow.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from .._errors import OptionError
from ._figure import capped_size, check_view_options, label_ticks, make_scale, new_figure, positioned
from ._matrices import _wrap

_EPS = 1e-12


@dataclasses.dataclass(frozen=True)
class FlowPaths:
    """Paths of one maximum flow from an explained token's output node to the input tokens.

    Attributes:
        graph: the ``igraph.Graph`` of `attnflow.flow_network` (vertex attributes ``stream``, ``layer``,
            ``token``, ``position``, ``label``, ``input``; edge attribute ``capacity``).
        source: the vertex id of the explained token's output node.
        paths: ``(flow, vertex ids from the source to an input token, both included)``, widest first.
        total: the value of the maximum flow (what all paths together carry, not only the first ``top_k``).
        received: input vertex id -> flow it receives in this maximum flow.
    """

    graph: Any
    source: int
    paths: list[tuple[float, list[int]]]
    total: float
    received: dict[int, float]


def flow_paths(trace: Any, *, batch_index: int = 0, source: int = 0, top_k: int = 10, options: Any = None,
               stream: str | None = None) -> FlowPaths:
    """Decompose one maximum flow from an explained token into paths (see the module docstring).

    Args:
        trace: an `attnflow.AttentionTrace`.
        batch_index: which item.
        source: the explained token's position in the explained stream (negative: from the last real token).
        top_k: how many paths to keep (widest first).
        options: an `attnflow.Options` (head fusion, residual, discard ratio, layers, heads).
        stream: the explained stream (default: the trace's default stream).
    """
    from ..methods._flow import flow_network
    from ..methods._options import Options

    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise OptionError(f"top_k must be a positive int (paths to draw), got {top_k!r}.")
    options = options if options is not None else Options()
    if options.weights != "attention":
        raise OptionError("flow_paths draws the attention network; leave Options.weights at 'attention'.")
    graph = flow_network(trace, batch_index, head_fusion=options.head_fusion, residual=options.residual,
                         discard_ratio=options.discard_ratio, layers=options.layers, stream=stream, heads=options.heads)
    explained = stream or trace.default_stream()
    start = _source_vertex(graph, trace, explained, batch_index, source)
    inputs = [v.index for v in graph.vs if v["input"]]
    sink = graph.vcount()
    work = graph.copy()
    work.add_vertices(1)
    work.add_edges([(v, sink) for v in inputs])
    capacity = list(graph.es["capacity"]) + [float(len(inputs) + 1)] * len(inputs)
    work.es["capacity"] = capacity
    result = work.maxflow(start, sink, capacity="capacity")
    flow = np.asarray(result.flow, dtype=np.float64)
    ends = np.asarray(work.get_edgelist(), dtype=np.int64)
    received = {int(ends[e, 0]): float(flow[e]) for e in range(graph.ecount(), work.ecount()) if flow[e] > _EPS}
    paths = _widest_paths(ends, flow, start, sink, work.vcount(), int(top_k))
    return FlowPaths(graph=graph, source=start, paths=paths, total=float(result.value), received=received)


def _source_vertex(graph: Any, trace: Any, explained: str, batch_index: int, source: int) -> int:
    if isinstance(source, bool) or not isinstance(source, (int, np.integer)):
        raise OptionError(f"source must be a token position (int), got {source!r}.")
    valid = trace.streams[explained].valid_index(batch_index)
    position = int(valid[source]) if -valid.size <= source < 0 else int(source)
    if position not in set(valid.tolist()):
        raise OptionError(f"Position {source} is not a real token of item {batch_index} ({valid.size} real tokens).")
    own = [v for v in graph.vs if v["stream"] == explained]
    top = max(v["layer"] for v in own)
    for v in own:
        if v["layer"] == top and v["position"] == position and not v["input"]:
            return int(v.index)
    raise OptionError(f"Stream {explained!r} has no layer above its inputs; there is no flow to draw.")


def _stream_labels(graph: Any, trace: Any, b: int, streams: list[str], explained: str,
                   predicted: Sequence[str] | None) -> dict[str, dict[int, str]]:
    """Per stream, row (``token``) -> its label: the stream's own token at that position (``predicted``'s for
    the explained stream when given), with the position added where a text repeats."""
    out = {}
    for name in streams:
        rows = sorted({(v["token"], v["position"]) for v in graph.vs if v["stream"] == name})
        if name == explained and predicted is not None:
            if len(predicted) != len(rows):
                raise OptionError(f"predicted has {len(predicted)} tokens; stream {name!r} has {len(rows)} real "
                                  "tokens in this item (one predicted token per position).")
            texts = [str(t) for t in predicted]
        else:
            texts = [trace.streams[name].tokens[b][p] for _, p in rows]
        out[name] = dict(zip([t for t, _ in rows], positioned(texts, [p for _, p in rows])))
    return out


def _widest_paths(ends: np.ndarray, flow: np.ndarray, start: int, sink: int, count: int,
                  top_k: int) -> list[tuple[float, list[int]]]:
    """Greedy decomposition of an acyclic flow: repeatedly the path with the largest bottleneck."""
    flow = flow.copy()
    carrying = np.flatnonzero(flow > _EPS)
    out_edges: dict[int, list[int]] = {}
    for e in carrying.tolist():
        out_edges.setdefault(int(ends[e, 0]), []).append(e)
    order = _topological(out_edges, ends, start)
    paths: list[tuple[float, list[int]]] = []
    while len(paths) < top_k:
        best = np.full(count, -1.0)
        via = np.full(count, -1, dtype=np.int64)
        best[start] = np.inf
        for u in order:
            if best[u] <= 0:
                continue
            for e in out_edges.get(u, ()):
                width = min(best[u], flow[e])
                v = int(ends[e, 1])
                if width > best[v]:
                    best[v], via[v] = width, e
        if best[sink] <= _EPS:
            break
        width = float(best[sink])
        vertices, v = [], sink
        while v != start:
            e = int(via[v])
            flow[e] -= width
            v = int(ends[e, 0])
            vertices.append(v)
        paths.append((width, vertices[::-1]))
    return paths


def _topological(out_edges: dict[int, list[int]], ends: np.ndarray, start: int) -> list[int]:
    order, seen, stack = [], set(), [(start, False)]
    while stack:
        node, done = stack.pop()
        if done:
            order.append(node)
            continue
        if node in seen:
            continue
        seen.add(node)
        stack.append((node, True))
        for e in out_edges.get(node, ()):
            if int(ends[e, 1]) not in seen:
                stack.append((int(ends[e, 1]), False))
    return order[::-1]


def flow_graph(
    trace: Any, *, batch_index: int = 0, source: int = 0, top_k: int = 10, options: Any = None,
    stream: str | None = None, exclude_special: bool = False, log: bool = False, vmin: float | None = None,
    vmax: float | None = None, cmap: str = "viridis", dpi: float = 150, title: str | None = None,
    predicted: Sequence[str] | None = None,
) -> Any:
    """The layered flow graph of one explained token (see the module docstring for what is drawn).

    Columns are the network's layers (depth 0 = input tokens, left; one block of columns per stream),
    rows the real tokens; grey dots are nodes, coloured lines the ``top_k`` widest paths of one maximum
    flow from the explained token (boxed, right), line width by the flow each carries; input tokens are
    coloured by the flow they receive.

    Args:
        trace: as in `flow_paths`.
        batch_index: as in `flow_paths`.
        source: as in `flow_paths`.
        top_k: as in `flow_paths`.
        options: as in `flow_paths`.
        stream: as in `flow_paths`.
        exclude_special: leave out paths that end at special tokens (CLS, SEP...) and show the others'
            flow as shares of what remains (the title says so).
        log: a logarithmic scale for line widths and node colours.
        vmin: the scale's lower end (values below are clipped).
        vmax: the scale's upper end (values above are clipped).
        cmap: a matplotlib colour map for the input nodes.
        dpi: resolution.
        title: replaces the generated title.
        predicted: the token each position of the explained stream predicts (a decoder's next tokens, e.g.
            the generated or target tokens), one per real token; its rows are then labelled by them and the
            axis says so (default: labelled by the input token at each position, and the axis says that).

    Rows are labelled with each stream's own tokens (an encoder-decoder: the encoder's on the left axis, the
    decoder's on the right); a token text that repeats carries its position (``"the₃"``).

    Returns:
        A matplotlib Figure.
    """
    check_view_options(log=log, vmin=vmin, vmax=vmax, dpi=dpi)
    found = flow_paths(trace, batch_index=batch_index, source=source, top_k=top_k, options=options, stream=stream)
    graph = found.graph
    b = int(batch_index)
    paths = found.paths
    received = dict(found.received)
    if exclude_special:
        special = {name: s.special[b] for name, s in trace.streams.items()}

        def is_special(v: int) -> bool:
            return bool(special[graph.vs[v]["stream"]][graph.vs[v]["position"]])

        paths = [(w, p) for w, p in paths if not is_special(p[-1])]
        received = {v: w for v, w in received.items() if not is_special(v)}
        kept = sum(received.values()) or 1.0
        paths = [(w / kept, p) for w, p in paths]
        received = {v: w / kept for v, w in received.items()}
    streams = [name for name in trace.streams if name in set(graph.vs["stream"])]
    columns = sorted({(streams.index(v["stream"]), v["layer"]) for v in graph.vs})
    x_of = {key: i for i, key in enumerate(columns)}
    tokens = max(graph.vs["token"]) + 1
    width, height = capped_size(2.5 + 1.1 * len(columns), 1.6 + 0.2 * tokens + (0.8 if len(streams) > 1 else 0))
    figure, axes = new_figure(width, height, dpi=dpi, layout="constrained")
    ax = axes[0, 0]
    xs = np.array([x_of[(streams.index(v["stream"]), v["layer"])] for v in graph.vs], dtype=float)
    ys = np.array(graph.vs["token"], dtype=float)
    ax.scatter(xs, ys, s=6, color="0.8", zorder=1)
    values = [w for w, _ in paths] + list(received.values())
    scale = make_scale([np.asarray(values or [1.0])], log=log, vmin=vmin, vmax=vmax)
    norm = scale.norm()
    import matplotlib

    several = len(streams) > 1
    explained_stream = graph.vs[found.source]["stream"]
    shown = _stream_labels(graph, trace, b, streams, explained_stream, predicted)
    for rank, (w, path) in enumerate(paths):
        level = float(np.clip(norm(w), 0, 1)) if w > 0 else 0.0
        end = graph.vs[path[-1]]
        into = shown[end["stream"]].get(end["token"], end["label"])
        ax.plot(xs[path], ys[path], color=f"C{rank % 10}", linewidth=0.6 + 7 * level, alpha=0.75,
                solid_capstyle="round", zorder=2,
                label=f"{w:.3f} → " + (f"{end['stream']}:{into}" if several else into))
    colours = matplotlib.colormaps[cmap]
    for v, w in received.items():
        ax.scatter([xs[v]], [ys[v]], s=40, color=colours(float(np.clip(norm(w), 0, 1))), edgecolor="black",
                   linewidth=0.4, zorder=3)
    ax.scatter([xs[found.source]], [ys[found.source]], s=90, marker="s", facecolor="none", edgecolor="#1f4fbf",
               linewidth=2, zorder=4)
    ax.set_xlim(-0.5, len(columns) - 0.5)
    ax.set_ylim(tokens - 0.5, -0.5)
    ax.set_xticks(range(len(columns)),
                  [(f"{streams[s]}\n" if several else "") + ("inputs" if layer == 0 else f"L{layer}")
                   for s, layer in columns], fontsize=7)
    causal = trace.streams[explained_stream].causal or predicted is not None
    row_name = (f"{explained_stream}: " + ("the token each position predicts" if predicted is not None
                                           else "input token at each position")) if causal else f"{explained_stream} token"
    if several:  # each stream's own tokens: the other (encoder) stream's on the left, the explained stream's right
        other = next(name for name in streams if name != explained_stream)
        label_ticks(ax.yaxis, [shown[other].get(t, "") for t in range(tokens)], height - 1.6, fontsize=7)
        ax.set_ylabel(f"{other} token", fontsize=8)
        right = ax.twinx()
        right.set_ylim(ax.get_ylim())
        label_ticks(right.yaxis, [shown[explained_stream].get(t, "") for t in range(tokens)], height - 1.6, fontsize=7)
        right.set_ylabel(row_name, fontsize=8)
        figure.legend(*ax.get_legend_handles_labels(), fontsize=6, loc="outside lower center", ncol=3,
                      title="path flow → input token", title_fontsize=7, frameon=False)
    else:
        label_ticks(ax.yaxis, [shown[explained_stream].get(t, "") for t in range(tokens)], height - 1.6, fontsize=7)
        ax.set_ylabel(row_name, fontsize=8)
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="path flow → input token",
                  title_fontsize=7, frameon=False)
    ax.set_xlabel("after layer l (L1 = the stream's first attention layer)", fontsize=8)
    explained = graph.vs[found.source]["label"]
    opts = options.describe() if options is not None else "paper defaults (mean heads, residual 0.5)"
    heading = title or "; ".join(
        [f"{trace.model_name or 'model'}: attention flow paths from {explained!r}",
         f"top {len(paths)} of one max flow (value {found.total:.3f}), widest first", opts]
        + (["paths into special tokens left out, flows renormalised over the rest"] if exclude_special else [])
        + (["log width scale"] if log else [])
    )
    figure.suptitle(_wrap(heading, width, 9), fontsize=9)
    return figure
