"""The attention network as an igraph graph: the user-visible [`attnflow.flow_network`][attnflow.flow_network] and the
reference the solvers are checked against."""

from __future__ import annotations

from collections.abc import Sequence

import igraph
import numpy as np

from ._network import Network


def layered_graph(adj: np.ndarray) -> igraph.Graph:
    """Build the layered DAG of ``(L, n, n)`` capacities (the solvers' layout).

    Vertex ``l * n + i`` is slot ``i`` at level ``l`` (level 0 = the input tokens). Each edge runs from
    ``(l + 1, i)`` to ``(l, j)`` and carries the edge attribute ``"capacity"`` = ``adj[l, i, j]``; zero-capacity
    pairs get no edge. Vertex attributes ``layer`` and ``token`` give each vertex's coordinates.
    """
    adj = np.asarray(adj, dtype=np.float64)
    num_layers, n, _ = adj.shape
    lay, qi, kj = np.nonzero(adj > 0)
    src = (lay + 1) * n + qi
    dst = lay * n + kj
    graph = igraph.Graph(n=(num_layers + 1) * n, edges=np.column_stack([src, dst]).tolist(), directed=True)
    # igraph reads numpy scalars other than float64 as 1.0: hand it plain Python floats.
    graph.es["capacity"] = adj[lay, qi, kj].astype(np.float64).tolist()
    graph.vs["layer"] = np.repeat(np.arange(num_layers + 1), n).tolist()
    graph.vs["token"] = np.tile(np.arange(n), num_layers + 1).tolist()
    return graph


def network_graph(network: Network, labels: dict[str, Sequence[str]]) -> igraph.Graph:
    """The network of one batch item as a directed igraph graph (edges from upper to lower nodes).

    Vertices are the groups' nodes in group order (input groups first): attributes ``stream``,
    ``layer`` (the depth), ``token`` (index among the stream's real tokens), ``position`` (index in the
    padded stream), ``input`` (True for input tokens) and ``label`` (``"L{depth}:{token}"``, prefixed with
    the stream name when there are several). Edge attribute ``capacity``.
    """
    first: list[int] = []
    count = 0
    for group in network.groups:
        first.append(count)
        count += group.size
    edges: list[np.ndarray] = []
    capacities: list[np.ndarray] = []
    for step in network.steps:
        for g, matrix in step.blocks:
            rows, cols = np.nonzero(matrix > 0)
            edges.append(np.column_stack([rows + first[step.creates], cols + first[g]]))
            capacities.append(matrix[rows, cols])
    pairs = np.concatenate(edges) if edges else np.zeros((0, 2), dtype=np.int64)
    graph = igraph.Graph(n=count, edges=pairs.tolist(), directed=True)
    graph.es["capacity"] = (np.concatenate(capacities) if capacities else np.zeros(0)).astype(np.float64).tolist()
    several = len(network.inputs) > 1
    streams, depths, tokens, positions, inputs, texts = [], [], [], [], [], []
    input_groups = set(network.inputs.values())
    for g, group in enumerate(network.groups):
        for t, position in enumerate(group.positions.tolist()):
            streams.append(group.stream)
            depths.append(group.depth)
            tokens.append(t)
            positions.append(position)
            inputs.append(g in input_groups)
            text = f"L{group.depth}:{labels[group.stream][position]}"
            texts.append(f"{group.stream}:{text}" if several else text)
    graph.vs["stream"] = streams
    graph.vs["layer"] = depths
    graph.vs["token"] = tokens
    graph.vs["position"] = positions
    graph.vs["input"] = inputs
    graph.vs["label"] = texts
    return graph
