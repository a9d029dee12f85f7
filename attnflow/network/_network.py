"""The one network every method routes through: nodes per stream and depth, edge blocks per sublayer.

For one batch item, a trace becomes a layered DAG over the real tokens of the streams the explained
stream draws on. Nodes come in groups, one per ``(stream, depth)``: depth 0 holds a stream's input
tokens, and every layer whose queries are that stream's tokens makes its next depth. A step (one per
sublayer, in the order the model ran them) connects the new group to groups below it:

* self-attention on stream S: ``(S, d+1, i) -> (S, d, j)`` with weight ``Â[i, j]``, ``Â = (1 - r) A + r I``
  (rows renormalised), exactly the network of Abnar & Zuidema (2020);
* cross-attention from S to K: ``(S, d+1, i) -> (S, d, i)`` with weight ``r`` (the residual) and
  ``(S, d+1, i) -> (K, e, j)`` with weight ``(1 - r) A[i, j]``, where ``e`` is the depth K had when the layer
  ran (an encoder-decoder's encoder output); rows renormalised. A method whose cross-attention matrix has one
  column more than the key stream has tokens gives the residual's weight per query itself, in that last
  column (ALTI+: the residual's contribution); then ``r`` is not used and the rows are taken as they are;
* a link (vision patches feeding image tokens): a new depth-0 group of S whose fed tokens point at the
  source's group with the link's weights and whose other tokens point at their own input node (weight 1).

Rollout is proportional routing through it (`route`), flow is max-flow through it
(`attnflow.network._layered`); methods only change the matrices ``A`` the steps are built from.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import numpy as np

from .._errors import OptionError
from ..trace import AttentionTrace

#: ``weights(layer_index, batch_index) -> (query real tokens, key real tokens)`` non-negative matrix; for a
#: cross-attention layer it may have one more column, the residual's weight per query (see the module docstring).
EdgeWeights = Callable[[int, int], np.ndarray]


@dataclasses.dataclass(frozen=True)
class NodeGroup:
    """The nodes of one stream at one depth: one per real token, ``positions`` in the padded stream."""

    stream: str
    depth: int
    positions: np.ndarray
    linked: bool = False  # a depth-0 group made by a link (not an input of its own)

    @property
    def size(self) -> int:
        return int(self.positions.size)


@dataclasses.dataclass(frozen=True)
class Step:
    """What makes group ``creates`` from the groups ``below``: one ``(n_creates, n_below)`` matrix per group.

    The matrices are computed from the trace each time `blocks` is read and are not kept, so a network
    holds no more than one layer's matrices at a time while a method walks it (read ``below`` for the group
    indices alone).
    """

    creates: int
    below: tuple[int, ...]
    layer: int | None  # index of the trace layer; None for a link
    kind: str  # "self", "cross" or "link"
    matrices: Callable[[], tuple[np.ndarray, ...]] = dataclasses.field(repr=False, compare=False)

    @property
    def blocks(self) -> tuple[tuple[int, np.ndarray], ...]:
        """``(group below, (n_creates, n_below) float64 matrix)`` pairs, computed now."""
        return tuple(zip(self.below, self.matrices()))


@dataclasses.dataclass(frozen=True)
class Network:
    """The layered network of one batch item (see the module docstring).

    Attributes:
        groups: node groups; input groups first, then in the order the steps create them.
        steps: in execution order; ``steps[k]`` creates ``groups[steps[k].creates]``.
        inputs: stream name -> index of its input group (depth 0), for every stream drawn on.
        explained: the stream whose output is explained.
        outputs: indices of the explained stream's groups after each of its (selected) layers, in order;
            the last is the output.
    """

    groups: tuple[NodeGroup, ...]
    steps: tuple[Step, ...]
    inputs: dict[str, int]
    explained: str
    outputs: tuple[int, ...]

    @property
    def output(self) -> int:
        return self.outputs[-1] if self.outputs else self.inputs[self.explained]

    def input_streams(self) -> list[str]:
        return list(self.inputs)

    def max_row_sum(self) -> float:
        """The largest out-capacity of any node (1 for attention networks); computes every step's matrices."""
        return max((row_sum_max(step.blocks) for step in self.steps), default=0.0)


def row_sum_max(blocks: Sequence[tuple[int, np.ndarray]]) -> float:
    """The largest row sum over the blocks of one step (the out-capacity of its busiest node)."""
    total = sum(matrix.sum(axis=1) for _, matrix in blocks)
    return float(np.max(total)) if np.size(total) else 0.0


def explained_stream(trace: AttentionTrace, stream: str | None) -> str:
    """``stream`` checked against the trace, or the trace's default stream."""
    if stream is None:
        return trace.default_stream()
    if not isinstance(stream, str):
        raise OptionError(f"stream must be a stream name, got {stream!r}; the trace's streams are {list(trace.streams)}.")
    if stream not in trace.streams:
        raise OptionError(f"The trace has no stream {stream!r}; its streams are {list(trace.streams)}.")
    return stream


def mix_residual(matrix: np.ndarray, residual: float) -> np.ndarray:
    """``(1 - r) A + r I`` with rows renormalised to sum 1; ``(n, n)`` -> ``(n, n)``. All-zero rows stay 0."""
    mixed = (1.0 - residual) * matrix
    mixed.flat[:: matrix.shape[-1] + 1] += residual
    return _normalise_rows(mixed)


def _normalise_rows(matrix: np.ndarray) -> np.ndarray:
    """Rows divided by their sums, all-zero rows left 0; in place when no row sums to zero (callers pass an array
    they own: a fresh (n, n) result costs 0.5 ms at 256 tokens, the in-place divide 0.07 ms)."""
    sums = matrix.sum(axis=-1, keepdims=True)
    if (sums > 0).all():
        matrix /= sums
        return matrix
    return np.divide(matrix, sums, out=np.zeros_like(matrix), where=sums > 0)


def build_network(
    trace: AttentionTrace,
    batch_index: int,
    weights: EdgeWeights,
    *,
    residual: float = 0.5,
    stream: str | None = None,
    skip: Sequence[int] = (),
) -> Network:
    """The network of one batch item for explaining ``stream``'s output.

    Args:
        trace: the captured attention.
        batch_index: which item.
        weights: the matrix of each layer over the real tokens (heads fused, or a method's contributions).
        residual: ``r``; see the module docstring.
        stream: the explained stream (default: [`AttentionTrace.default_stream`][attnflow.AttentionTrace.default_stream]).
        skip: trace layer indices to leave out (their step is the identity).
    """
    explained = explained_stream(trace, stream)
    b = batch_index
    drawn = trace.inputs_of(explained)
    skipped = set(skip)
    groups: list[NodeGroup] = []
    inputs: dict[str, int] = {}
    current: dict[str, int] = {}
    depth: dict[str, int] = {name: 0 for name in drawn}
    history: dict[str, list[int]] = {}  # stream -> group index at each depth
    for name in drawn:
        inputs[name] = current[name] = len(groups)
        history[name] = [len(groups)]
        groups.append(NodeGroup(name, 0, trace.valid_index(b, name)))
    steps: list[Step] = []
    outputs: list[int] = []
    links = {link.stream: link for link in trace.links if link.stream in inputs}
    for index, layer in enumerate(trace.layers):
        query, key = layer.query_stream, layer.key_stream
        if query not in inputs:
            continue
        if query in links:  # feed the linked inputs just before the stream's first layer
            _add_link(trace, b, links.pop(query), groups, steps, current, history)
        if layer.kind == "cross" and key in links:  # a linked stream that is only attended to (pooled keys)
            _add_link(trace, b, links.pop(key), groups, steps, current, history)
        if index in skipped:
            depth[query] += 1
            history[query].append(current[query])
            continue
        below = current[query]
        size_q, size_k = groups[below].size, groups[current[key]].size  # type: ignore[index]
        depth[query] += 1
        created = len(groups)
        groups.append(NodeGroup(query, depth[query], groups[below].positions))
        make = functools.partial(
            _layer_matrices, weights, index, b, layer.name, layer.kind == "self", (size_q, size_k), residual
        )
        below_groups = (below,) if layer.kind == "self" else (below, current[key])  # type: ignore[index]
        steps.append(Step(created, below_groups, index, layer.kind, make))  # type: ignore[arg-type]
        current[query] = created
        history[query].append(created)
        if query == explained:
            outputs.append(created)
    if explained in links:  # a linked stream with no layers of its own
        _add_link(trace, b, links.pop(explained), groups, steps, current, history)
    if not outputs and current[explained] != inputs[explained]:
        outputs.append(current[explained])
    network = Network(tuple(groups), tuple(steps), inputs, explained, tuple(outputs))
    return _pruned(network)


def _layer_matrices(weights, index, b, name, self_attention, shape, residual) -> tuple[np.ndarray, ...]:
    """The matrices of one layer's step: ``(Â,)`` for self-attention, ``(diagonal residual, cross part)``."""
    matrix = np.asarray(weights(index, b), dtype=np.float64)
    if not self_attention and matrix.shape == (shape[0], shape[1] + 1):  # the residual's weight given, last
        return np.diag(matrix[:, -1]), matrix[:, :-1]
    if matrix.shape != shape:
        raise OptionError(
            f"The edge weights of layer {index} ({name!r}) have shape {matrix.shape}, expected {shape} over the "
            "real tokens."
        )
    if self_attention:
        return (mix_residual(matrix, residual),)
    scaled = np.concatenate([np.full((shape[0], 1), residual), (1.0 - residual) * matrix], axis=1)
    scaled = _normalise_rows(scaled)
    return np.diag(scaled[:, 0]), scaled[:, 1:]


def _link_matrices(link, b, rows, cols) -> tuple[np.ndarray, ...]:
    fed_weights = link.weights[b][np.ix_(rows, cols)]
    fed = link.weights[b][rows].sum(axis=1) > 0
    return np.diag((~fed).astype(np.float64)), fed_weights


def _add_link(trace, b, link, groups, steps, current, history) -> None:
    below = current[link.stream]
    if link.depth >= len(history[link.source]):
        raise OptionError(f"{link!r} points at a depth of {link.source!r} that is not computed.")
    source = history[link.source][link.depth]
    rows = groups[below].positions
    cols = groups[source].positions
    created = len(groups)
    groups.append(NodeGroup(link.stream, 0, rows, linked=True))
    make = functools.partial(_link_matrices, link, b, rows, cols)
    steps.append(Step(created, (below, source), None, "link", make))
    current[link.stream] = created
    history[link.stream][0] = created


def _pruned(network: Network) -> Network:
    """Drop the steps whose group the output cannot reach (e.g. vision layers after LLaVA's feature layer)."""
    needed = {network.output}
    for step in reversed(network.steps):
        if step.creates in needed:
            needed.update(step.below)
    needed.update(network.outputs)
    needed.update(network.inputs.values())
    if len(needed) == len(network.groups):
        return network
    keep = sorted(needed)
    renumber = {old: new for new, old in enumerate(keep)}
    steps = tuple(
        Step(renumber[s.creates], tuple(renumber[g] for g in s.below), s.layer, s.kind, s.matrices)
        for s in network.steps
        if s.creates in needed
    )
    return Network(
        tuple(network.groups[i] for i in keep), steps, {k: renumber[v] for k, v in network.inputs.items()},
        network.explained, tuple(renumber[g] for g in network.outputs),
    )


def route_rows(network: Network, rows: Sequence[int]) -> dict[str, np.ndarray]:
    """`route` for some output rows only: the same numbers as ``route(network)[0][name][rows]``,
    computed from the output down (``e_rows^T Â_L ··· Â_1``), in ``O(len(rows) · n²)`` per layer instead of
    the ``O(n³)`` of routing every output node.

    Returns:
        Input stream -> ``(len(rows), n_input)`` float64 over the real tokens.
    """
    selected = np.asarray(rows, dtype=np.intp)
    output = network.output
    comass: dict[int, np.ndarray] = {output: np.eye(network.groups[output].size)[selected]}
    for step in reversed(network.steps):
        above = comass.pop(step.creates, None)
        if above is None:
            continue
        for g, matrix in step.blocks:
            part = above @ matrix
            comass[g] = part if g not in comass else comass[g] + part
    empty = {name: np.zeros((len(selected), network.groups[g].size)) for name, g in network.inputs.items()}
    return {name: comass.get(g, empty[name]) for name, g in network.inputs.items()}


def route(network: Network, *, all_outputs: bool = False) -> list[dict[str, np.ndarray]]:
    """Proportional routing (attention rollout): how each output node's unit of mass spreads over inputs.

    Each node passes its mass to the nodes below in proportion to its edge weights; the mass that reaches
    the input tokens is the rollout. For one self-attention stream this is ``Â_L ··· Â_1``.

    Returns:
        One dict per explained group (only the last unless ``all_outputs``): input stream ->
        ``(n_output, n_input)`` float64 over the real tokens.
    """
    columns: dict[str, slice] = {}
    offset = 0
    for name, g in network.inputs.items():
        size = network.groups[g].size
        columns[name] = slice(offset, offset + size)
        offset += size
    last_use = {}
    for k, step in enumerate(network.steps):
        for g in step.below:
            last_use[g] = k
    wanted = set(network.outputs if all_outputs else [network.output])
    mass: dict[int, np.ndarray] = {}
    for name, g in network.inputs.items():
        start = np.zeros((network.groups[g].size, offset))
        start[:, columns[name]] = np.eye(network.groups[g].size)
        mass[g] = start
    results: dict[int, np.ndarray] = {g: mass[g] for g in wanted if g in mass}
    for k, step in enumerate(network.steps):
        total = None
        for g, matrix in step.blocks:
            part = matrix @ mass[g]
            total = part if total is None else total + part
        mass[step.creates] = total  # type: ignore[assignment]
        if step.creates in wanted:
            results[step.creates] = total  # type: ignore[assignment]
        for g in step.below:
            if last_use.get(g) == k and g not in wanted:
                mass.pop(g, None)
    order = network.outputs if all_outputs else (network.output,)
    return [{name: results[g][:, cols] for name, cols in columns.items()} for g in order]
