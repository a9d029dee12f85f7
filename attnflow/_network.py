"""The layered flow network of Abnar & Zuidema (2020) as an igraph graph."""

from __future__ import annotations

import igraph
import numpy as np


def layered_graph(adj: np.ndarray) -> igraph.Graph:
    """Build the attention-flow DAG for one batch item.

    Args:
        adj: ``(L, n, n)`` non-negative capacities; ``adj[l, i, j]`` is the (residual-mixed,
            head-fused) attention of query ``i`` on key ``j`` in layer ``l`` (0 = first layer).

    Returns:
        A directed ``igraph.Graph`` with ``(L + 1) * n`` vertices. Vertex ``l * n + i`` is token ``i``
        at layer ``l`` (layer 0 = the input tokens). Each edge runs from ``(l + 1, i)`` to ``(l, j)``
        and carries the edge attribute ``"capacity"`` = ``adj[l, i, j]``; zero-capacity pairs get no
        edge. Vertex attributes ``layer`` and ``token`` give each vertex's coordinates.
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
