"""The network laid out as a uniform layered graph, the shape the max-flow solvers take.

The solvers work on ``(D, N, N)`` capacities: ``D + 1`` levels of ``N`` nodes, edges only from level
``t`` to level ``t - 1``. A single-stream network already has that shape (``N`` = its tokens, ``D`` = its
layers). A multi-stream one is laid out so: step ``t`` of the network (in execution order) makes level
``t``; every node group gets a range of slots, which it occupies from the level where it is created up
to the level just below its last use; at the levels in between it is *carried* by identity edges of a
capacity ``C`` no flow can exceed (the largest out-capacity of any node), so carried copies constrain
nothing and the max-flow values are exactly those of the network. Groups whose lives do not overlap
share slots, so an encoder-decoder needs only as many slots as both streams have tokens.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ._network import Network, row_sum_max


@dataclasses.dataclass(frozen=True)
class Layered:
    """``adj[t - 1, i, j]`` is the capacity from slot ``i`` at level ``t`` to slot ``j`` at level ``t - 1``.

    ``level[g]`` and ``slots[g]`` give where group ``g`` of the network sits (its creation level and its
    first slot; its nodes are ``slots[g] + 0 .. size - 1``).
    """

    adj: np.ndarray
    level: tuple[int, ...]
    slots: tuple[int, ...]


def layered(network: Network, *, tops: tuple[int, ...] | None = None) -> Layered:
    """Lay out ``network`` (see the module docstring). ``tops``: the groups flows start from (default: the
    output); the levels above the highest of them are left out."""
    groups = network.groups
    tops = tops or (network.output,)
    if len(network.inputs) == 1 and all(step.kind == "self" for step in network.steps):
        return _single_stream(network, tops)
    level = [0] * len(groups)
    for t, step in enumerate(network.steps, start=1):
        level[step.creates] = t
    last = [level[g] for g in range(len(groups))]  # highest level each group must be present at
    for t, step in enumerate(network.steps, start=1):
        for g in step.below:
            last[g] = max(last[g], t - 1)
    height = max(level[g] for g in tops)
    # allocate slot ranges: a range is free again once its group is no longer needed
    slots = [-1] * len(groups)
    free: dict[int, list[int]] = {}
    width = 0
    by_level: dict[int, list[int]] = {}
    for g in range(len(groups)):
        by_level.setdefault(level[g], []).append(g)
    ends: dict[int, list[int]] = {}
    for t in range(height + 1):
        for g in ends.pop(t - 1, []):
            free.setdefault(groups[g].size, []).append(slots[g])
        for g in by_level.get(t, []):
            size = groups[g].size
            if free.get(size):
                slots[g] = free[size].pop()
            else:
                slots[g] = width
                width += size
            ends.setdefault(last[g], []).append(g)
    adj = np.zeros((height, width, width))
    busiest = 0.0
    for t, step in enumerate(network.steps[:height], start=1):
        blocks = step.blocks  # computed once here
        busiest = max(busiest, row_sum_max(blocks))
        rows = slice(slots[step.creates], slots[step.creates] + groups[step.creates].size)
        for g, matrix in blocks:
            adj[t - 1, rows, slots[g] : slots[g] + groups[g].size] += matrix
    # no flow from a node at or below `height` exceeds the out-capacity of the busiest node there
    carry = max(1.0, busiest)
    for g, group in enumerate(groups):
        start = slots[g]
        index = np.arange(start, start + group.size)
        for t in range(level[g] + 1, min(last[g], height) + 1):
            adj[t - 1, index, index] = carry
    return Layered(adj, tuple(level), tuple(slots))


def _single_stream(network: Network, tops: tuple[int, ...]) -> Layered:
    """One self-attention stream: the levels are its depths and every group uses the same slots."""
    level = [0] * len(network.groups)
    for t, step in enumerate(network.steps, start=1):
        level[step.creates] = t
    height = max(level[g] for g in tops)
    n = network.groups[0].size
    adj = np.empty((height, n, n))
    for t, step in enumerate(network.steps[:height]):
        adj[t] = step.blocks[0][1]
    return Layered(adj, tuple(level), (0,) * len(network.groups))
