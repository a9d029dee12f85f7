"""Exact max-flow values on the layered attention network (Abnar & Zuidema, ACL 2020).

The network of one batch item has ``L + 1`` layers of ``n`` nodes; ``adj[l, i, j]`` (``(L, n, n)``,
non-negative) is the capacity of the edge from node ``(l + 1, i)`` to node ``(l, j)``; layer 0 holds the input
tokens. The flow value ``F[s, j]`` is the max-flow from ``(L, s)`` to ``(0, j)``. Methods, all exact:

``"dinic"``  compiled (numba) Dinic on the dense layered network; no graph is built. Per pair it first finds
             a blocking flow on the plain layered DAG (multi-push DFS, diagonal arc first, dead nodes skipped
             through a skip list) and stops as soon as that flow meets a cut bound (a feasible flow that meets
             an upper bound is a maximum flow); only the pairs it does not certify get further Dinic phases on
             the residual network, which end with a proof (no augmenting path). Each pair works only on the
             nodes that can reach its sink (under causal attention the tokens at or after it), and its first
             bound is cheap (``O(L n)``: the source's tree bounds summed over those nodes, layer by layer);
             the sharper bound from the sink's own tree bounds (``O(L n^2)`` per sink) is computed only for
             the pairs the first one does not settle, and kept across sources. The sinks phase one does
             not certify get Dinic phases, except in long runs of such sinks, or of sinks certified only after
             many changed arcs, on large causal networks (peaked, local heads): those go to push-relabel on one
             preflow kept from sink to sink of the same source (warm starts: only the part of the flow that
             must change for the next sink is touched; see `attnflow.network._dinic`). Sources run in
             ``n_jobs`` threads (the kernel releases the GIL).
``"dinic-v1"`` the first compiled kernel, kept as the speed reference: the same phases on the whole network,
             with the sink tree bounds computed for every sink it meets (``O(L n^3)`` for one source: about
             ten times slower on causal attention, as fast on encoder attention).
``"pruned"`` pure numpy + igraph fallback, used by ``"auto"`` when numba is missing: closed forms for one and
             two layers, zero for pairs with a zero cut bound, and otherwise one igraph max-flow per pair on
             the network cut down to the nodes that lie on some source-to-sink path (``n_jobs`` processes).
``"igraph"`` the reference: one ``Graph.maxflow_value`` per (source, sink) pair on
             `attnflow._network.layered_graph` (``n_jobs`` processes).
``"auto"``   ``"dinic"`` when numba can be imported, else ``"pruned"``.

numba is imported lazily, only when a compiled solve runs; importing attnflow never imports it.
"""

from __future__ import annotations

import math
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Executor, ProcessPoolExecutor, ThreadPoolExecutor, wait
from contextlib import nullcontext
from typing import Any

import numpy as np

from .._errors import MissingDependencyError, OptionError

METHODS = ("auto", "dinic", "dinic-v1", "pruned", "igraph")

# Residual capacities at most EPS * max(adj) count as zero when proving optimality, and the search stops once
# a feasible flow is within TOL * max(adj) of a cut bound. Values are exact to about TOL * max(adj).
EPS = 2.0**-50
TOL = 1e-12

# Cost model of estimate_seconds, fitted by benchmarks/bench_estimate.py --fit on a 2-core x86 VM (causal attention
# with an attention sink, softmax encoder attention at two temperatures, real MiniLM attention; 6-24 layers, 128-1024
# tokens; one source and all of them; the top level alone and every level with all_layers=True). "dinic": per
# source at level T (>= 3) whose flow can reach m tokens per layer, _DINIC_SECONDS * T^_DINIC_LAYERS *
# m^_DINIC_TOKENS (the deep levels: phase one's flow meets a cut bound for most sinks) plus _SHALLOW_SECONDS *
# m^_SHALLOW_TOKENS * _SHALLOW_DECAY^(T - 3) (the shallow levels, measured 3-50x dearer than the top one: with
# few layers to mix through, phase one falls short of the cut bounds for most sinks, which then need residual
# Dinic phases ending in a proof; see the kernel header of attnflow.network._dinic), plus _PASS_SECONDS per
# capacity for building, copying and scanning the (L, n, n) network, plus _CALL_SECONDS, once per item. Levels
# are solved one by one, so all_layers=True costs the sum of its levels. "dinic-v1": per (source, sink) pair
# _DINIC_V1_SECONDS * sqrt(T) * n^1.5 (an upper envelope: causal 1.4-4x faster, encoders 4-28x). igraph methods:
# per pair _IGRAPH_EDGE_SECONDS * T * m^2, times _IGRAPH_CAUSAL under causal attention (half the edges, and the
# flows are found sooner).
_DINIC_SECONDS = 1.0e-8
_DINIC_LAYERS = 0.57
_DINIC_TOKENS = 2.41
_SHALLOW_SECONDS = 1.4e-9
# ... times this on networks up to _BIT_WIDTH tokens, whose Dinic phases take bitsets (set by hand, not fitted: the
# shallow levels of MiniLM at 128 tokens became 2x faster, all_layers=True there 9.6 s -> 4.9 s)
_SHALLOW_BITS = 0.5
_SHALLOW_TOKENS = 3.32
_SHALLOW_DECAY = 0.43
# Causal networks' shallow levels cost a tenth of that (Dinic phases there, see _WARM_LEVEL; from the last token,
# 3 x 1,024: near-uniform heads with a sink 0.56 s, mixed heads 3.3 s; 3 x 2,048: 5.4 s).
_SHALLOW_CAUSAL = 0.1
_PASS_SECONDS = 1.5e-8
_CALL_SECONDS = 3e-3
_DINIC_V1_SECONDS = 3e-7
_IGRAPH_EDGE_SECONDS = 0.6e-7
_IGRAPH_CAUSAL = 0.3
_PAIR_OVERHEAD_SECONDS = 1e-6
# What "dinic" does with a sink that phase one does not certify: 0 Dinic phases from phase one's flow (the
# pruned solver as it was before the warm starts), 1 warm push-relabel across sinks (default), 2 warm
# push-relabel for every sink. Tests set it to check each path.
_SINK_STRATEGY = 1
# Strategy 1 sends a sink to the warm solver only when its network (the nodes that reach it, layers 1..T-1) is
# at least this many nodes wide on average: on narrower ones Dinic phases from phase one's flow are cheaper
# (measured on near-uniform causal heads at 12 x 1,024, whose uncertified sinks are the ~120 next to the source).
# Only causal networks (no arc to a later token) use it: on encoder attention the warm solver was 1.2-6x slower
# than Dinic phases at every width measured (6 x 128 to 12 x 512, levels 3-5; `_dinic` module doc).
_WARM_WIDTH = 192
# ... and only from this source level up: on shallower causal networks Dinic phases were faster on every kind of
# head measured (12 x 512 and 1,024 from the last token, levels 3-5: near-uniform heads with a sink 1.2-12x,
# mixed heads 1.6-3.5x; peaked, local heads within 0.7-1.4x), deeper the warm starts pay on peaked, local heads
# (level 6: 23 s against 31 s at 1,024 tokens; level 12: about 4x).
_WARM_LEVEL = 6
# Networks up to this many tokens wide take their Dinic phases over bitsets of candidate arcs (`_dinic._bit_phases`:
# 64 arcs to a machine word, each candidate checked against the residuals): the page's every-layer flow (MiniLM,
# 128 tokens, levels 3/4/5) 1.16/3.06/3.05 s -> 0.55/1.53/1.81 s (one run each), same values to the bit; 12 x 512
# softmax encoders, one source, all_layers=True: 3.7 -> 2.6 s (temperature 0.3), 2.1 -> 1.8 s (1.0); peaked, local
# causal heads 12 x 512 from the last token unchanged (3.5 s). Wider ones scan rows (not measured with bitsets).
_BIT_WIDTH = 512


def max_flow_values(
    adj: np.ndarray,
    sources: Sequence[int],
    *,
    method: str = "auto",
    all_layers: bool = False,
    tops: Sequence[int] | None = None,
    n_jobs: int = 1,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Raw max-flow values from output nodes to input nodes.

    Args:
        adj: ``(L, n, n)`` non-negative capacities; ``adj[l, i, j]`` is the edge ``(l + 1, i) -> (l, j)``.
        sources: token indices ``s`` (``0 <= s < n``, or negative counting from the end) of the source nodes.
        method: one of `METHODS`; all give the same values (to about ``1e-12 * adj.max()``).
        all_layers: also compute the flows from every layer's nodes (the paper's ``compute_flows``).
        tops: the levels (``1..L``) the sources sit at, instead of ``L`` (or every level with ``all_layers``).
        n_jobs: worker threads (``"dinic"``) or processes (``"pruned"``, ``"igraph"``).
        progress: called as ``progress(k)`` each time ``k`` more sources are finished.

    Returns:
        ``(len(sources), n)`` float64, ``[r, j]`` the max-flow from ``(L, sources[r])`` to ``(0, j)``. With
        ``all_layers=True``, ``(L, len(sources), n)`` whose ``[l - 1, r, j]`` is the max-flow from
        ``(l, sources[r])`` to ``(0, j)`` for ``l = 1..L``. With ``tops``, ``(len(tops), len(sources), n)``.
    """
    adj = _check_adj(adj)
    num_layers, n, _ = adj.shape
    rows = _check_sources(sources, n)
    explicit = tops is not None
    tops = _check_tops(tops, all_layers, num_layers)
    if not (isinstance(n_jobs, (int, np.integer)) and n_jobs >= 1):
        raise OptionError(f"n_jobs must be a positive int, got {n_jobs!r}.")
    requested, method = method, resolve_method(method)
    if method in ("dinic", "dinic-v1"):
        try:
            from . import _dinic  # noqa: F401  (imports numba)
        except ImportError as exc:  # numba installed but broken (e.g. a mismatched llvmlite)
            if requested != "auto":
                raise MissingDependencyError(f"method={method!r} could not import numba: {exc}") from exc
            method = "pruned"
    out = np.zeros((len(tops), rows.size, n))
    report = progress if progress is not None else (lambda k: None)
    if rows.size and n:
        solve = {
            "dinic": _solve_dinic, "dinic-v1": _solve_dinic_v1, "pruned": _solve_pruned, "igraph": _solve_igraph,
        }[method]
        solve(adj, rows, tops, out, int(n_jobs), report)
    return out if all_layers or explicit else out[0]


def estimate_seconds(
    num_layers: int, n: int, num_sources: int, *, method: str = "auto", all_layers: bool = False,
    tops: Sequence[int] | None = None, widths: Sequence[int] | None = None, causal: bool = False,
) -> float:
    """Estimated run time of `max_flow_values` with ``n_jobs=1`` (within about 3x on the attention
    measured, either side); solves nothing.

    ``num_layers`` is ``L``, ``n`` the tokens per layer, ``num_sources`` the number of sources, ``tops`` the
    source levels as in `max_flow_values`. ``widths``: per source, how many tokens of each layer its flow
    can reach (default ``n``); under causal attention (``causal=True``) a source at position ``p`` reaches
    ``p + 1``, which is what the ``"dinic"`` solver's work follows: per source and level ``T`` about
    ``T^0.57 * width^2.4`` plus, for the shallow levels, ``0.43^(T - 3) * width^3.3`` (level 3 cost 3-50x
    the top level of 6-24 layer networks measured 512 tokens wide; levels 3-5 of MiniLM at 128 tokens take
    0.56/1.5/1.8 s against 0.96 s for level 6). ``all_layers=True`` costs the sum of its levels (4.9 s on MiniLM at
    128 tokens, every source, against 0.96 s for the top level alone). The igraph methods grow like
    ``T * width^2`` per pair; layers 1 and 2 have closed forms except for ``"igraph"``. The attention itself moves
    the cost, most on the shallow levels: at one size, real MiniLM attention took 3.9x longer with
    ``all_layers=True`` than diffuse random attention (the estimate sits between, 1.7x under and 2.3x over), and
    one level 4 alone took 0.05 s or
    5.4 s (12 x 512, one source, random attention at two temperatures; estimated 0.69 s): on a network of only
    3-5 layers the estimate can be 10x off either way. The worst case measured is causal: peaked, local heads
    (``benchmarks/bench_causal.py`` kind b), whose far sinks are cut by a staircase of ~1e5-1e6 arcs, take 17 s
    at 12 x 1,024 from the last token against 0.94 s estimated.
    Not included: the first compiled call in a process that finds no kernel in numba's on-disk cache compiles
    it (10-20 s; ``make install`` fills the cache).
    """
    method = resolve_method(method)
    if num_layers <= 0 or n <= 0 or num_sources <= 0:
        return 0.0
    tops = _check_tops(tops, all_layers, num_layers)
    if widths is None:
        widths = [n] * num_sources
    if len(widths) != num_sources:
        raise OptionError(f"widths must give one width per source ({num_sources}), got {len(widths)}.")
    sized = np.clip(np.asarray(widths, dtype=np.float64), 1, n)
    deep = [top for top in tops if top >= 3]
    pairs = num_sources * n
    if method == "dinic":
        closed = pairs * _PAIR_OVERHEAD_SECONDS * (len(tops) - len(deep))  # levels 1 and 2
        if not deep:
            return float(closed)
        deep_level = float((sized**_DINIC_TOKENS).sum()) * _DINIC_SECONDS
        shallow_level = float((sized**_SHALLOW_TOKENS).sum()) * _SHALLOW_SECONDS * (_SHALLOW_CAUSAL if causal else 1.0)
        shallow_level *= _SHALLOW_BITS if n <= _BIT_WIDTH else 1.0
        solve = sum(top**_DINIC_LAYERS * deep_level + _SHALLOW_DECAY ** (top - 3) * shallow_level for top in deep)
        return float(closed + solve + max(deep) * n * n * _PASS_SECONDS + _CALL_SECONDS)
    if method == "dinic-v1":
        per_pair = sum(math.sqrt(top) * n**1.5 for top in deep) * _DINIC_V1_SECONDS
    else:
        edges = float((sized**2).mean()) * (_IGRAPH_CAUSAL if causal else 1.0) * _IGRAPH_EDGE_SECONDS
        per_pair = sum(top for top in (deep if method == "pruned" else tops)) * edges
    return float(pairs * (per_pair + _PAIR_OVERHEAD_SECONDS * len(tops)))


def _check_tops(tops: Sequence[int] | None, all_layers: bool, num_layers: int) -> list[int]:
    """The source levels: ``tops`` checked, else every level (``all_layers``) or the top one."""
    if tops is None:
        return list(range(1, num_layers + 1)) if all_layers else [num_layers]
    if all_layers:
        raise OptionError("Give all_layers=True or tops=, not both.")
    levels = [int(t) for t in tops]
    if not levels or any(not 1 <= t <= num_layers for t in levels):
        raise OptionError(f"tops must be levels in [1, {num_layers}], got {levels!r}.")
    return levels


def resolve_method(method: str) -> str:
    """The concrete method behind ``method`` (``"auto"`` -> ``"dinic"`` or ``"pruned"``)."""
    if method not in METHODS:
        raise OptionError(f"method must be one of {METHODS}, got {method!r}.")
    if method == "auto":
        return "dinic" if numba_available() else "pruned"
    if method in ("dinic", "dinic-v1") and not numba_available():
        raise MissingDependencyError(
            f"method={method!r} needs numba: pip install 'attnflow[fast]' (or use method='auto' / 'pruned')."
        )
    return method


def numba_available() -> bool:
    """Whether numba can be imported (without importing it when it is missing)."""
    if "numba" in sys.modules:
        return sys.modules["numba"] is not None
    import importlib.util

    return importlib.util.find_spec("numba") is not None


# ----------------------------------------------------------------------------------------------------------
# shared pieces


def _check_adj(adj: np.ndarray) -> np.ndarray:
    adj = np.ascontiguousarray(adj, dtype=np.float64)
    if adj.ndim != 3 or adj.shape[1] != adj.shape[2]:
        raise OptionError(f"adj must be (layers, n, n); got shape {adj.shape}.")
    if adj.shape[0] < 1:
        raise OptionError("adj must have at least one layer.")
    for layer in adj:  # one layer at a time: no (L, n, n) temporary
        if layer.size and not (np.isfinite(layer).all() and layer.min() >= 0.0):
            raise OptionError("adj must be finite and non-negative.")
    return adj


def _check_sources(sources: Sequence[int], n: int) -> np.ndarray:
    if isinstance(sources, (int, np.integer, str)):
        raise OptionError(f"sources must be a sequence of token indices, got {sources!r}.")
    rows = []
    for s in sources:
        if not isinstance(s, (int, np.integer)) or isinstance(s, bool) or not -n <= s < n:
            raise OptionError(f"sources must hold token indices in [-{n}, {n}), got {s!r}.")
        rows.append(int(s) % n)
    return np.asarray(rows, dtype=np.int64)


def reach_to_sinks(adj: np.ndarray) -> np.ndarray:
    """``(n, L + 1, n)`` bool; ``[j, l, i]``: node ``(l, i)`` has a positive-capacity path to ``(0, j)``."""
    num_layers, n, _ = adj.shape
    reach = np.zeros((num_layers + 1, n, n), dtype=bool)  # [l, i, j]
    reach[0] = np.eye(n, dtype=bool)
    current = np.eye(n, dtype=np.float32)
    for lay in range(1, num_layers + 1):
        current = ((adj[lay - 1] > 0).astype(np.float32) @ current > 0).astype(np.float32)
        reach[lay] = current > 0
    return np.ascontiguousarray(reach.transpose(2, 0, 1))


def reach_from_source(adj: np.ndarray, top: int, s: int) -> np.ndarray:
    """``(top + 1, n)`` bool; ``[l, i]``: node ``(l, i)`` is reachable from ``(top, s)``."""
    n = adj.shape[1]
    seen = np.zeros((top + 1, n), dtype=bool)
    seen[top, s] = True
    for lay in range(top - 1, -1, -1):
        seen[lay] = (adj[lay][seen[lay + 1]] > 0).any(axis=0)
    return seen


def cut_bounds(adj: np.ndarray, rows: np.ndarray, top: int) -> np.ndarray:
    """``(len(rows), n)`` trivial cut bounds ``min(out-capacity of (top, s), in-capacity of (0, j))``."""
    out_cap = adj[top - 1][rows].sum(axis=1)
    in_cap = adj[0].sum(axis=0)
    return np.minimum(out_cap[:, None], in_cap[None, :])


def two_layer_values(adj: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Closed form for a source in layer 2: the paths ``s -> k -> j`` are disjoint, so the flow is
    ``sum_k min(adj[1, s, k], adj[0, k, j])``. ``(len(rows), n)``."""
    n = adj.shape[1]
    out = np.empty((rows.size, n))
    step = max(1, (1 << 22) // max(1, n * n))
    for a in range(0, rows.size, step):
        upper = adj[1][rows[a : a + step]]
        out[a : a + step] = np.minimum(upper[:, :, None], adj[0][None, :, :]).sum(axis=1)
    return out


def _fill_closed_forms(adj: np.ndarray, rows: np.ndarray, tops: list[int], out: np.ndarray) -> list[int]:
    """Fill ``out`` for source layers 1 and 2; return the indices into ``tops`` still to solve."""
    rest = []
    for t, top in enumerate(tops):
        if top == 1:
            out[t] = adj[0][rows]
        elif top == 2:
            out[t] = two_layer_values(adj, rows)
        else:
            rest.append(t)
    return rest


def _run_tasks(
    executor: Executor | None,
    fn: Callable,
    tasks: list[tuple],
    on_done: Callable[[tuple, Any], None],
) -> None:
    """Run ``fn(*task)`` for every task (in ``executor`` if given), calling ``on_done(task, result)`` in order
    of completion, in this thread."""
    if executor is None:
        for task in tasks:
            on_done(task, fn(*task))
        return
    pending = {executor.submit(fn, *task): task for task in tasks}
    try:
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                on_done(pending.pop(future), future.result())
    finally:
        for future in pending:
            future.cancel()


class _Progress:
    """Counts finished tasks per source row and reports a row once all of its tasks are done."""

    def __init__(self, tasks_per_row: np.ndarray, report: Callable[[int], None]):
        self.left = tasks_per_row.astype(np.int64).copy()
        self.report = report
        ready = int((self.left == 0).sum())
        if ready:
            report(ready)

    def finished(self, row: int) -> None:
        self.left[row] -= 1
        if self.left[row] == 0:
            self.report(1)


# ----------------------------------------------------------------------------------------------------------
# "dinic": the compiled kernel


def _solve_dinic(adj, rows, tops, out, n_jobs, report) -> None:
    _solve_compiled(adj, rows, tops, out, n_jobs, report, version=2)


def _solve_dinic_v1(adj, rows, tops, out, n_jobs, report) -> None:
    _solve_compiled(adj, rows, tops, out, n_jobs, report, version=1)


def _solve_compiled(adj, rows, tops, out, n_jobs, report, *, version: int) -> None:
    from . import _dinic as kernel

    num_layers, n, _ = adj.shape
    rest = _fill_closed_forms(adj, rows, tops, out)
    if not rest:
        report(rows.size)
        return
    scale = float(adj.max())
    if scale <= 0.0:
        report(rows.size)
        return
    eps, tol = EPS * scale, TOL * scale
    if not adj.flags.writeable:  # a read-only array is another type to numba: one more compile otherwise
        adj = adj.copy()
    if version == 1:
        span = _spans(adj)
        reach = kernel.reach_to_sinks(adj, span)
        bounds = {t: cut_bounds(adj, rows, tops[t]) for t in rest}
        avail = None
    else:
        span = kernel.spans(adj, 0.0)
        espan = kernel.spans(adj, eps)  # the arcs the kernel may ever use (more than eps of capacity)
        diag = np.diagonal(adj, axis1=1, axis2=2).copy()  # writable and C-ordered, as the cached kernel takes
        causal = bool((span[..., 1] <= np.arange(n)).all())
        avail = kernel.arc_bits(adj, eps) if n <= _BIT_WIDTH else None  # shared, read only
    # split the sinks when there are too few (source, layer) rows to keep n_jobs threads busy
    blocks = 1 if n_jobs == 1 else max(1, min(n, math.ceil(4 * n_jobs / (rows.size * len(rest)))))
    sink_sets = [np.ascontiguousarray(part, dtype=np.int64) for part in np.array_split(np.arange(n), blocks)]
    tasks = [(t, r, b) for r in range(rows.size) for t in rest for b in range(len(sink_sets))]
    # a thread sees a sink more than once only with several (source, level) rows: then keep its sink chains
    keep_chains = rows.size * len(rest) > 1
    local = threading.local()

    def run(t: int, r: int, b: int) -> None:
        space = getattr(local, "space", None)
        if space is None:
            space = local.space = _Workspace(adj, version, keep_chains, bits=avail is not None)
        if version == 1:
            kernel.source_flows(
                adj, space.res, tops[t], int(rows[r]), reach, span, bounds[t][r], sink_sets[b], eps, tol,
                out[t, r], space.work, space.fwork, space.log, space.q, space.hc, space.hdone,
            )
        else:
            kernel.pruned_source_flows(
                adj, space.res, tops[t], int(rows[r]), span, espan, diag, sink_sets[b], eps, tol, out[t, r],
                space.work, space.fwork, space.log, space.q, space.reach, space.live, space.hc, space.hdone,
                _SINK_STRATEGY, _WARM_WIDTH if causal and tops[t] >= _WARM_LEVEL else n + 1,  # n + 1: never
                (avail, space.flow, space.lv, space.fr) if avail is not None else kernel._no_bits(),
            )

    tracker = _Progress(np.full(rows.size, len(rest) * len(sink_sets)), report)
    with ThreadPoolExecutor(n_jobs) if n_jobs > 1 else nullcontext() as executor:
        if executor is not None:
            # compile (or load the cached machine code) once, before the threads race to do it
            run(*tasks[0])
            tracker.finished(tasks[0][1])
            tasks = tasks[1:]
        _run_tasks(executor, run, tasks, lambda task, _: tracker.finished(task[1]))


class _Workspace:
    """Per-thread scratch arrays of the kernel (``res`` is a private copy of the capacities). Per-sink data
    (sink chains ``hc``; for version 2 also reachability) is kept for every sink when a thread meets a sink
    more than once (always for version 1), else recomputed in a single entry."""

    def __init__(self, adj: np.ndarray, version: int, keep: bool, bits: bool = False):
        num_layers, n, _ = adj.shape
        self.res = adj.copy()
        self.work = np.empty((9, (num_layers + 1) * (n + 1)), dtype=np.int64)
        self.fwork = np.empty((3, (num_layers + 1) * (n + 1)))
        self.q = np.empty((num_layers, n))
        self.log = np.empty(min(adj.size, 1 << 20), dtype=np.int64)
        if version == 1:
            self.hc = np.empty((n, num_layers, n))  # filled on demand
            self.hdone = np.zeros(n, dtype=bool)
            return
        kept = n if keep else 1
        if bits:  # `_dinic._bit_phases`: flow bits (kept zero between pairs), label sets, a frontier
            words = (n + 63) // 64
            self.flow = np.zeros((num_layers, n, words), dtype=np.uint64)
            # label sets for labels up to 8 per level (labels past that, rare, get a bigger array per phase)
            self.lv = np.zeros((8 * (num_layers + 1), num_layers + 1, words), dtype=np.uint64)
            self.fr = np.zeros((num_layers + 1, words), dtype=np.uint64)
        self.hc = np.empty((kept, num_layers, n))
        self.hdone = np.zeros((kept, 2), dtype=bool)
        self.reach = np.zeros((kept, num_layers + 1, n), dtype=bool)
        self.live = np.zeros((kept, num_layers + 1), dtype=np.int64)


def _spans(adj: np.ndarray) -> np.ndarray:
    """``(L, n, 2)`` int64: first and last ``k`` with ``adj[l, i, k] > 0`` (``(n, -1)`` for an empty row)."""
    n = adj.shape[1]
    positive = adj > 0
    any_positive = positive.any(axis=-1)
    first = np.where(any_positive, positive.argmax(axis=-1), n)
    last = np.where(any_positive, n - 1 - positive[..., ::-1].argmax(axis=-1), -1)
    return np.ascontiguousarray(np.stack([first, last], axis=-1), dtype=np.int64)


# ----------------------------------------------------------------------------------------------------------
# "igraph" and "pruned": one igraph max-flow per pair, optionally in processes

_graph_state: dict = {}


def _init_graph_worker(adj: np.ndarray) -> None:
    _graph_state.clear()
    _graph_state["adj"] = adj
    _graph_state["reach"] = None


def _graph(top: int):
    """The layered igraph graph of layers ``0..top`` (cached per worker)."""
    from ._igraph import layered_graph

    key = ("graph", top)
    if key not in _graph_state:
        _graph_state[key] = layered_graph(_graph_state["adj"][:top])
    return _graph_state[key]


def _graph_row(kind: str, t: int, r: int, top: int, s: int) -> np.ndarray:
    """One source row ``(n,)`` by ``kind`` ("igraph" or "pruned"); ``t, r`` only label the task."""
    return _igraph_row(top, s) if kind == "igraph" else _pruned_row(top, s)


def _igraph_row(top: int, s: int) -> np.ndarray:
    """Reference: one maxflow_value per sink on the whole layered graph."""
    adj = _graph_state["adj"]
    graph = _graph(adj.shape[0])
    n = adj.shape[1]
    src = top * n + s
    return np.array([graph.maxflow_value(src, j, capacity="capacity") for j in range(n)], dtype=np.float64)


def _pruned_row(top: int, s: int) -> np.ndarray:
    """Fallback: igraph per sink on the layers ``0..top``, cut down to the nodes on some path from
    ``(top, s)`` to ``(0, j)`` when that drops any."""
    adj = _graph_state["adj"]
    if _graph_state["reach"] is None:
        _graph_state["reach"] = reach_to_sinks(adj)
    reach = _graph_state["reach"]
    graph = _graph(top)
    n = adj.shape[1]
    bounds = cut_bounds(adj, np.array([s]), top)[0]
    down = reach_from_source(adj, top, s)
    row = np.zeros(n)
    for j in range(n):
        if bounds[j] <= 0.0 or not reach[j, top, s]:
            continue
        keep = down & reach[j, : top + 1]
        if keep[1:top].all():
            row[j] = graph.maxflow_value(top * n + s, j, capacity="capacity")
            continue
        keep[top] = False
        keep[top, s] = True
        keep[0] = False
        keep[0, j] = True
        vids = np.flatnonzero(keep.reshape(-1))  # vertex id l * n + i, layers 0..top
        sub = graph.induced_subgraph(vids.tolist(), implementation="create_from_scratch")
        src, dst = int(np.searchsorted(vids, top * n + s)), int(np.searchsorted(vids, j))
        row[j] = sub.maxflow_value(src, dst, capacity="capacity")
    return row


def _solve_graph(adj, rows, tops, out, n_jobs, report, *, kind) -> None:
    todo = _fill_closed_forms(adj, rows, tops, out) if kind == "pruned" else list(range(len(tops)))
    tasks = [(kind, t, r, tops[t], int(rows[r])) for r in range(rows.size) for t in todo]
    tracker = _Progress(np.full(rows.size, len(todo)), report)

    def done(task: tuple, row: np.ndarray) -> None:
        out[task[1], task[2]] = row
        tracker.finished(task[2])

    if n_jobs == 1 or len(tasks) <= 1:
        _init_graph_worker(adj)
        try:
            _run_tasks(None, _graph_row, tasks, done)
        finally:
            _graph_state.clear()
        return
    workers = min(n_jobs, len(tasks))
    context = _process_context()
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_graph_worker, initargs=(adj,)) as pool:
        _run_tasks(pool, _graph_row, tasks, done)


def _process_context():
    import multiprocessing

    # fork needs no `if __name__ == "__main__":` guard in the caller's script, but forking a process whose
    # native threads may hold locks can deadlock the child: JAX's runtime is such a process. Then, and off
    # Linux, start workers from a clean process (forkserver, else spawn), which needs the guard.
    methods = multiprocessing.get_all_start_methods()
    if sys.platform.startswith("linux") and "fork" in methods and "jax" not in sys.modules:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


def _solve_igraph(adj, rows, tops, out, n_jobs, report) -> None:
    _solve_graph(adj, rows, tops, out, n_jobs, report, kind="igraph")


def _solve_pruned(adj, rows, tops, out, n_jobs, report) -> None:
    _solve_graph(adj, rows, tops, out, n_jobs, report, kind="pruned")


