"""Compiled (numba) Dinic max-flow kernel for the layered attention network.

Imported lazily by `attnflow.network._solvers` only; importing this module imports numba.

Layout: ``cap`` is ``(L, n, n)`` with ``cap[l, i, k]`` the capacity of the edge ``(l + 1, i) -> (l, k)``;
``res`` (same shape) holds the residual capacity ``cap - flow`` of each edge, so ``cap - res`` is the flow
that a reverse arc may cancel. For one source ``(top, s)`` (``1 <= top <= L``) and one sink ``(0, j)`` only
layers ``0..top`` take part, and of them only ``s`` in layer ``top`` and only ``j`` in layer 0. Node
``(l, i)`` has label ``d[l * n + i]``: its distance to the sink in the level graph, or -1 (dead/unreachable).

``res`` equals ``cap`` between pairs: every entry a pair changes is logged and restored.

Exactness: a pair's value is a feasible flow (phase one, then augmenting paths) that is stopped only when it
meets an upper bound (a cut: `live_bound`, `layer_bound`) to within ``tol``, or when no augmenting
path with more than ``eps`` of residual capacity is left (max-flow min-cut).

The pruned solver's residual phases (`_later_phases` with ``row_bfs``) label nodes with
`_row_bfs_labels`: the same exact distance-to-sink labels as the first kernel's queue BFS
(`_bfs_labels`), hence the same level graphs, augmenting paths and values, but computed
layer-synchronously with row accesses only (forward arcs pulled by the unlabelled nodes, which stop at the first
usable arc; reverse arcs pushed from the frontier). On peaked, local causal heads (12 x 256 to 512 tokens, flow
from the last token) about half the sinks need those phases, and their cost is dominated not by the labelling
but by the number of augmenting paths: the minimum cut of a far sink is a staircase (tokens at or after a
threshold per layer, the threshold falling by the reach of one layer) crossed by ~1e4-1e6 small arcs that each
need a path of their own, for every sink anew.

Warm push-relabel across sinks (the default solver's answer to that, issue 24): the sinks of one source are
taken from the last to the first, and phase one (run here with residuals down to ``eps`` counted: far sinks of
peaked, local heads otherwise fall short by ~1e-11, the sum of the arcs below ``tol``) still settles most of
them. A sink it does not certify gets Dinic phases from phase one's flow, unless it is the third such sink in a
row and its network is at least ``warm_width`` nodes wide on average over layers ``1..top - 1``: then it, and the next ``_RETRY - 1`` sinks without
trying phase one, go to the first phase of FIFO push-relabel (`_warm_push_relabel`) on one preflow *kept* from
sink to sink (``wres``, a private copy of the capacities made on first use, and the excesses ``ex``). Every arc
out of the source is saturated once; a node's excess is pushed along admissible residual arcs (forward down a
row, reverse up a column); labels are exact after each global relabel (`_global_labels`: `_row_bfs_labels`,
rows only, at the start of every sink and after as many relabels as a quarter of the nodes). When the sink moves from
``j'`` to ``j``, ``(0, j')`` becomes an ordinary node whose excess (the flow it received) is pushed back and
rerouted; nothing else changes, so only the part of the flow that must change is touched. Exactness: a preflow
for one sink is a preflow for any other, and the first phase of push-relabel from any preflow with valid labels
ends with a maximum preflow, whose excess at the sink is the max-flow value (the min cut: the nodes that cannot
reach the sink in the residual network, arcs with at most ``eps`` left counting as saturated, as in the Dinic
phases); it also stops once the sink's excess is within ``tol`` of the `live_bound`. Nodes: those reachable from
the source that reach the sink or hold flow from an earlier sink (`_warm_nodes`).
Two details of that loop carry much of its speed: the flows are kept a second time, transposed (``flo[l, k, i]``
is the flow on ``(l + 1, i) -> (l, k)``, always set to ``cap - res`` of that arc so that both agree to the bit),
so that the reverse arcs out of a node are one row (a column of ``res`` is a cache miss per arc; the price is one
more ``(T, n, n)`` float64 array per thread while a source uses the warm solver: 1 GiB at 32 x 2,048); and a relabel
stops at the first neighbour at ``d[u] + 1`` (every arc changes layer by one, so exact labels have the parity of
the layer, and after a discharge found no neighbour at ``d[u] - 1`` none lies lower), its discharge going on from
that arc. On peaked, local heads at 12 x 1,024 (``bench_causal.py`` kind b) the relabels' scans fell from 11.0e9
to 3.0e9 arcs and the run from 63 s to 49 s (standalone, one thread); what is left is the discharges' scans
(9.7e9 arcs, ~19e6 discharges and 4.9e8 pushes over 606 sinks), i.e. about one full scan of a node's arcs per
relabel. Third: **windows**. An arc with at most ``eps`` of capacity never has more than ``eps`` left either
way, so it is never admissible; each node scans only the span of its row (forward) and of its column (reverse)
with more than ``eps`` (`spans` with ``above = eps``, `_column_spans`), and the global relabels' BFS works
over the same spans. Causal rows end at the diagonal and recency-biased rows begin ~280 tokens back at
1,024 (``exp(-0.1 d)`` falls below 2**-50), so at 12 x 1,024 kind b the discharges' scans fell from 9.7e9 to
3.4e9, relabels' to 1.4e9, and the solve (`max_flow_values`, flow from the last token) from 49.6 s to 28.9 s with
the same pushes, labels and values to the bit; phase one takes the same spans (2 s of it). The BFS then lists
each layer's frontier in token order so that a node pulls over the frontier nodes in its window only (28.5 s
-> 26.1 s). With the BFS that cheap, global relabels pay more often: after half as many relabels as nodes instead
of as many, 26.8 s -> 22.2 s at 1,024 (two runs each, interleaved; a quarter: 21.7 s; an eighth: 24 s), unchanged at
512 (4.1 s; a quarter there: 8% slower). Then the BFS pulls reverse arcs as well (each unlabelled node scans its
row of ``flo`` over the frontier inside its column window, where each frontier node used to push over its row
window: 2.7e9 scans at 1,024): 21.9 s -> 20.3 s. With that, a quarter of the nodes between global relabels is
faster at 1,024 (19.2 s -> 17.2-18.0 s; an eighth 17.9 s) and equal at 512 (3.7 s). Last, phase one's *cost*
counts, not only its failures: on (b) the near sinks it certifies change a median 3.8e4 arcs (90th percentile
6.5e5; the 1 << 20 log overflows, forcing a full restore), on (a), (c) and the trained decoder at most 1.3e4,
1.9e4 and 3.2e3 (``n * top`` = 12,288 and 3,072); a sink certified after more than ``_HEAVY = 2`` arcs per node
counts toward the streak that hands sinks to the warm solver (17.2-18.0 s -> 16.9 s; (a), (c), (d) unchanged to
the millisecond, same values). Left at 12 x 1,024 kind b (perf, before that change): this loop ~18 s, the
global relabels ~5 s, phase one ~4 s. Not faster there: reading a reverse push's capacity from a transposed copy of
``cap`` (a row, not a column: one cache miss less on half the pushes; 28.4 s vs 29.1 s), scanning windows by token
instead of through the node lists (dense, non-listed nodes labelled ``big``: 5% slower), ``_RETRY`` 48, stopping
once the excess left on nodes that reach the sink is within ``tol`` (no gain). Tried before the windows and not
faster: nearest arcs first (2x slower: twice the relabels), the gap heuristic (16 gaps at 512 tokens), global
relabels twice or half as often (fewer scans, more BFS; within 5%), and a perfect upper bound would have saved a
third of the discharges (the sink's excess reaches its value after two thirds).
Measured (12 layers, flow from the last token, one loaded 2-core machine; ``benchmarks/bench_causal.py``): on
peaked, local heads at 512 tokens 15-18 s against 60-80 s for phase one plus Dinic phases (phase one alone, over
every sink, costs ~13 s there: each far sink's flow spreads over ~1e5 small arcs, cold); near-uniform and mixed
heads at 1,024 tokens are unchanged (~1.1 s). Tried and slower: highest-label selection (2x), more frequent
global relabels, warm Dinic (the flow moved to the next sink, the excess cancelled back to the source, then
Dinic phases: 1.5x slower than cold), cold push-relabel per sink (1.6x slower than Dinic phases).

Encoder attention, flow at every layer (issue 24 point 3; packaged MiniLM, 6 layers x 128 tokens, every source and
sink, one thread, levels 3/4/5): phase one certifies 2.3%/2.4%/27% of the pairs and falls short of the maximum by a
median 3.0%/3.8%/4.8%; the rest take 0.9/2.0/2.9 Dinic phases with augmenting paths of ~6/8/10 arcs (reverse arcs
included), and 83%/64%/14% of them end with the proof BFS (no bound is met), so the residual phases are ~85% of the
1.3/3.4/3.9 s. A BFS over such a residual network costs 18/27/33 us; every pair needs a few sweeps of its whole
network. Tried there, exact and not faster: the warm push-relabel across sinks (``_WARM_WIDTH`` 0: 7.1/16.9/12.2 s;
every sink, ``mode`` 2: 7.4/14.7/14.9 s); multi-push blocking flows in the residual phases (unchanged to 1%); the
bound ``sum_k min(cap[top - 1, s, k], F_{top-1}(k, j))`` from the exact flows one level down (tight for 3%/12%/44%
of the pairs, all of which `layer_bound` already settles); the previous source's minimum cut for the same sink,
re-evaluated in O(n) for the next source with the top layer re-chosen per node (certifies 1.8e3/1.4e3/87 more
pairs, time unchanged); sink-major warm starts across sources (the previous source's flow kept, its source arcs
capped to the new source's capacities, the excess outflow cancelled down the flow arcs layer by layer, then phase
one on that residual and Dinic phases: 1.8/3.9/3.3 s). The work per pair is a few sweeps of an O(L n^2) network.

Bitsets (`_bit_phases`, networks up to 512 tokens): those sweeps were mostly checks of arcs that cannot be used
(counted per pair at level 4: ~35,000 reverse-arc checks in the BFS, an unlabelled node reading its column
against the frontier where few arcs carry flow, and ~33,000 in the DFS). Candidates now come 64 to a word:
forward arcs from `arc_bits` (``cap > eps`` per row, read only, shared by the threads), reverse arcs from per-node
bits of the arcs that may carry flow (set for each arc the pair changes: phase one's, from the log; the sink's
column; each augmentation's; cleared from the log after the pair), ANDed with the frontier (BFS) or the labelled
nodes one level down (DFS); each candidate is checked against ``res`` as before, so labels, paths and values are
the same to the bit. Levels 3/4/5: 1.16/3.06/3.05 s -> 0.55/1.53/1.81 s. Exact bitsets (four, transposed ones
too, so that the frontier pushes) were slower: syncing them from phase one's ~1,900 logged arcs per pair cost more
than the BFS saved. Left per pair at level 4: phase one with the bounds ~30 us, the bit sync ~8 us, 2.7 BFS ~14 us
(2,600 candidate tests), the DFS and ~160 augmentations ~39 us. A multi-push DFS there (as phase one's) gave
the same times (1.49 s against 1.50 s at level 4), Dinic phases from zero flow instead of phase one 2.3-2.7x more.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from llvmlite import ir
from numba import njit
from numba.core import types
from numba.core.extending import intrinsic

_RETRY = 16  # see `pruned_source_flows`
_HEAVY = 2
_STREAK = 2

# The hot loops below are written out by hand, without helper functions taking arrays: numba would add an
# atomic reference-count increment and decrement around every such call, which cost about half the run time.


@njit(cache=True, nogil=True)
def _phase_one(cap, res, top, s, j, reach, span, bound, tol, work, lim, got, col, log):
    """Blocking flow on the layered DAG with zero initial flow (levels = layers), multi-push DFS.

    Arcs out of ``(l, i)`` are tried diagonal first (the residual term makes it the widest), then by token
    index over live heads only, within ``span[l - 1, i] = (first, last)`` positive entries. A node that cannot
    pass on what it is offered is dead for the phase and is skipped by everyone through a skip list
    (``nxt``: per layer, the next live index at or after each index, with path halving). Layer-2 nodes push
    straight into the sink through layer 1 (``col``, ``(n,)``, holds what the edges ``(1, k) -> (0, j)`` have
    left). Residuals up to ``tol`` count as zero here (this phase only has to find a good feasible flow, not
    prove it optimal). Returns ``(value, log_len)``; ``log_len`` is -1 if the log overflowed. ``res[0, :, j]``
    is left stale: the caller copies ``col`` into it.
    """
    n = cap.shape[1]
    w = n + 1
    size = log.size
    d = work[0]
    cur = work[1]
    sl = work[2]
    si = work[3]
    nxt = work[4]
    for k in range(n):
        col[k] = res[0, k, j]
    for lay in range(top + 1):
        for i in range(n):
            d[lay * n + i] = lay if (0 < lay < top and reach[lay, i]) else -1
            cur[lay * n + i] = -1
    for k in range(n):
        if col[k] <= tol:
            d[n + k] = -1
    d[j] = 0
    d[top * n + s] = top
    for lay in range(1, top):
        base = lay * w
        for i in range(n):
            nxt[base + i] = i if d[lay * n + i] >= 0 else i + 1
        nxt[base + n] = n
    log_len = 0
    depth = 0
    sl[0] = top
    si[0] = s
    lim[0] = bound
    got[0] = 0.0
    while True:
        lu = sl[depth]
        iu = si[depth]
        want = lim[depth] - got[depth]
        if want > tol:
            if lu == 1:  # only a source in layer 1 gets here
                a = want if want < col[iu] else col[iu]
                col[iu] -= a
                got[depth] += a
            elif lu == 2:  # feed the sink through the layer-1 nodes
                last = span[1, iu, 1]
                c = cur[2 * n + iu]
                k = iu  # the diagonal first, then the live nodes in index order
                if c >= 0:
                    k = c
                    while nxt[w + k] != k:
                        nxt[w + k] = nxt[w + nxt[w + k]]
                        k = nxt[w + k]
                elif d[n + iu] < 0 or res[1, iu, iu] <= tol:
                    c = span[1, iu, 0]
                    k = c
                    while nxt[w + k] != k:
                        nxt[w + k] = nxt[w + nxt[w + k]]
                        k = nxt[w + k]
                while k <= last:
                    r1 = res[1, iu, k]
                    if r1 > tol and (k != iu or c < 0):
                        r0 = col[k]
                        a = r1 if r1 < r0 else r0
                        if want < a:
                            a = want
                        res[1, iu, k] = 0.0 if a >= r1 else r1 - a
                        if a >= r0 or r0 - a <= tol:
                            col[k] = 0.0
                            d[n + k] = -1
                            nxt[w + k] = k + 1
                        else:
                            col[k] = r0 - a
                        got[depth] += a
                        want -= a
                        if 0 <= log_len < size:
                            log[log_len] = (n + iu) * n + k
                            log_len += 1
                        else:
                            log_len = -1
                        if want <= tol:
                            break
                    if c < 0:  # leaving the diagonal
                        c = span[1, iu, 0]
                        k = c
                    else:
                        k += 1
                    while nxt[w + k] != k:
                        nxt[w + k] = nxt[w + nxt[w + k]]
                        k = nxt[w + k]
                    c = k
                cur[2 * n + iu] = c
                if want > tol:
                    d[2 * n + iu] = -1
                    if top > 2:
                        nxt[2 * w + iu] = iu + 1
            else:
                lo = lu - 1
                u = lu * n + iu
                c = cur[u]
                found = -1
                if c < 0:
                    if d[lo * n + iu] >= 0 and res[lo, iu, iu] > tol:
                        found = iu
                    else:
                        c = span[lo, iu, 0]
                if found < 0:
                    base = lo * w
                    last = span[lo, iu, 1]
                    while True:
                        while nxt[base + c] != c:
                            nxt[base + c] = nxt[base + nxt[base + c]]
                            c = nxt[base + c]
                        if c > last:
                            break
                        if c != iu and res[lo, iu, c] > tol:
                            found = c
                            break
                        c += 1
                    cur[u] = c
                if found >= 0:
                    r = res[lo, iu, found]
                    depth += 1
                    sl[depth] = lo
                    si[depth] = found
                    lim[depth] = r if r < want else want
                    got[depth] = 0.0
                    continue
                d[u] = -1
                if lu < top:
                    nxt[lu * w + iu] = iu + 1
        # hand what this node passed on back to its parent
        g = got[depth]
        if depth == 0:
            return g, log_len
        depth -= 1
        if g > 0.0:
            ip = si[depth]
            r = res[lu, ip, iu]
            res[lu, ip, iu] = 0.0 if g >= r else r - g
            if 0 <= log_len < size:
                log[log_len] = (lu * n + ip) * n + iu
                log_len += 1
            else:
                log_len = -1
            got[depth] += g


@njit(cache=True, nogil=True)
def _relevant_nodes(top, s, j, reach, q, rel, cnt):
    """Per layer, the nodes on some source-to-sink path: ``rel[l * n : l * n + cnt[l]]``.

    Only they can lie on an augmenting path: a node that reaches the sink in the residual network reached it
    in the original one (reverse arcs start at nodes that carry flow), and likewise from the source; ``q > 0``
    marks the nodes reachable from ``(top, s)`` (see `source_chain`).
    """
    n = q.shape[1]
    cnt[0] = 1
    rel[0] = j
    cnt[top] = 1
    rel[top * n] = s
    for lay in range(1, top):
        c = 0
        for i in range(n):
            if reach[lay, i] and q[lay, i] > 0.0:
                rel[lay * n + c] = i
                c += 1
        cnt[lay] = c


@njit(cache=True, nogil=True)
def _bfs_labels(cap, res, top, s, j, eps, work):
    """Exact distance-to-sink labels in the residual network (-1: no path). True if the source has one."""
    n = cap.shape[1]
    d, ql, qi, rel, cnt = work[0], work[5], work[6], work[7], work[8]
    for v in range((top + 1) * n):
        d[v] = -1
    src = top * n + s
    d[j] = 0
    head = 0
    tail = 1
    ql[0] = 0
    qi[0] = j
    while head < tail:
        lv = ql[head]
        kv = qi[head]
        head += 1
        dv = d[lv * n + kv]
        if d[src] >= 0 and dv >= d[src]:
            break
        if lv + 1 <= top:  # forward arcs (lv + 1, i) -> (lv, kv) with spare capacity
            base = (lv + 1) * n
            for p in range(cnt[lv + 1]):
                i = rel[base + p]
                if d[base + i] < 0 and res[lv, i, kv] > eps:
                    d[base + i] = dv + 1
                    ql[tail] = lv + 1
                    qi[tail] = i
                    tail += 1
        if lv >= 2:  # reverse arcs (lv - 1, i) -> (lv, kv), cancelling flow on (lv, kv) -> (lv - 1, i)
            base = (lv - 1) * n
            for p in range(cnt[lv - 1]):
                i = rel[base + p]
                if d[base + i] < 0 and cap[lv - 1, kv, i] - res[lv - 1, kv, i] > eps:
                    d[base + i] = dv + 1
                    ql[tail] = lv - 1
                    qi[tail] = i
                    tail += 1
    return d[src] >= 0


@njit(cache=True, nogil=True)
def _row_bfs_labels(cap, res, top, s, j, eps, work, windowed, rsp, csp, flo):
    """`_bfs_labels` (the same exact distance-to-sink labels over the same arcs), level by level with
    every access along a row of ``res``: a forward arc ``(l + 1, i) -> (l, k)`` is *pulled* (each unlabelled
    node scans its own row over the frontier of the layer below and stops at the first arc with spare
    capacity; on dense attention that is almost always the first one); a reverse arc is *pushed* (each
    frontier node scans its own row of flows; networks up to 512 tokens wide take `_bit_phases` instead, where
    reverse arcs are pulled over bitsets). The queue-driven version reads a column per node, one cache miss per
    arc. Scratch: ``work[1]`` (frontier sizes per layer) and ``work[4]`` (frontier lists).

    ``windowed`` (the warm solver): ``rsp[l, i]`` holds the first and last ``k`` with ``cap[l, i, k] > eps``
    (`spans`), ``csp[l, k]`` the first and last ``i`` of that column (`_column_spans`), and ``flo[l, k, i]`` the
    flow on ``(l + 1, i) -> (l, k)``; arcs outside those windows never have more than ``eps`` left. Both kinds
    of arc are pulled (reverse ones along a row of ``flo``), each over the frontier nodes inside the puller's
    window only (each layer's frontier listed in token order in ``work[2]``, which the warm solver rebuilds
    after a global relabel). Otherwise ``rsp``, ``csp`` and ``flo`` are not read."""
    n = cap.shape[1]
    w = n + 1
    d, fcnt, flist, ql, qi, rel, cnt = work[0], work[1], work[4], work[5], work[6], work[7], work[8]
    for v in range((top + 1) * n):
        d[v] = -1
    src = top * n + s
    d[j] = 0
    ql[0] = 0
    qi[0] = j
    start = 0
    end = 1
    level = 0
    while start < end and d[src] < 0:
        for lay in range(top + 1):
            fcnt[lay] = 0
        for p in range(start, end):
            lay = ql[p]
            flist[lay * w + fcnt[lay]] = qi[p]
            fcnt[lay] += 1
        tail = end
        level += 1
        if windowed:
            fpos = work[2]  # [0, n]: frontier nodes of one layer before each token; [w, w + c): that frontier
            for lay in range(top):
                if fcnt[lay] == 0:
                    continue
                lb = lay * n
                got = 0
                for k in range(n):
                    fpos[k] = got
                    if d[lb + k] == level - 1:
                        fpos[w + got] = k
                        got += 1
                fpos[n] = got
                base = (lay + 1) * n  # forward arcs (lay + 1, i) -> (lay, k), pulled by the layer above
                for p in range(cnt[lay + 1]):
                    i = rel[base + p]
                    if d[base + i] >= 0:
                        continue
                    for r in range(fpos[rsp[lay, i, 0]], fpos[rsp[lay, i, 1] + 1]):
                        if res[lay, i, fpos[w + r]] > eps:
                            d[base + i] = level
                            ql[tail] = lay + 1
                            qi[tail] = i
                            tail += 1
                            break
                if lay == 0:
                    continue
                base = (lay - 1) * n  # reverse arcs (lay - 1, i) -> (lay, k), pulled by the layer below
                for p in range(cnt[lay - 1]):
                    i = rel[base + p]
                    if d[base + i] >= 0:
                        continue
                    for r in range(fpos[csp[lay - 1, i, 0]], fpos[csp[lay - 1, i, 1] + 1]):
                        if flo[lay - 1, i, fpos[w + r]] > eps:
                            d[base + i] = level
                            ql[tail] = lay - 1
                            qi[tail] = i
                            tail += 1
                            break
            start = end
            end = tail
            continue
        for lay in range(top):  # forward arcs into the frontier, pulled by the layer above
            c = fcnt[lay]
            if c == 0:
                continue
            base = (lay + 1) * n
            fb = lay * w
            for p in range(cnt[lay + 1]):
                i = rel[base + p]
                if d[base + i] >= 0:
                    continue
                for r in range(c):
                    if res[lay, i, flist[fb + r]] > eps:
                        d[base + i] = level
                        ql[tail] = lay + 1
                        qi[tail] = i
                        tail += 1
                        break
        for p in range(start, end):  # reverse arcs into the frontier, pushed from it
            lv = ql[p]
            if lv < 1:
                continue
            kv = qi[p]
            base = (lv - 1) * n
            for r in range(cnt[lv - 1]):
                i = rel[base + r]
                if d[base + i] < 0 and cap[lv - 1, kv, i] - res[lv - 1, kv, i] > eps:
                    d[base + i] = level
                    ql[tail] = lv - 1
                    qi[tail] = i
                    tail += 1
        start = end
        end = tail
    return d[src] >= 0


@njit(cache=True, nogil=True)
def _later_phases(cap, res, top, s, j, reach, q, total, bound, eps, tol, work, log, log_len, row_bfs):
    """Dinic phases on the residual network (BFS levels, arcs both ways) until no augmenting path is left,
    over the nodes of `_relevant_nodes` only. ``row_bfs``: label with `_row_bfs_labels` (the
    pruned solver) instead of `_bfs_labels` (``"dinic-v1"``); the labels, and so the phases, are the
    same."""
    n = cap.shape[1]
    d, cur, sl, si, rel, cnt = work[0], work[1], work[2], work[3], work[7], work[8]
    _relevant_nodes(top, s, j, reach, q, rel, cnt)
    unwindowed = np.zeros((1, 1, 2), dtype=np.int64)  # windows the BFS does not read
    while (
        _row_bfs_labels(cap, res, top, s, j, eps, work, False, unwindowed, unwindowed, res)
        if row_bfs
        else _bfs_labels(cap, res, top, s, j, eps, work)
    ):
        for v in range((top + 1) * n):
            cur[v] = 0
        depth = 0
        sl[0] = top
        si[0] = s
        while depth >= 0:
            lu = sl[depth]
            iu = si[depth]
            if lu == 0:
                delta = np.inf
                cut = 0
                for p in range(depth):
                    if sl[p + 1] < sl[p]:
                        r = res[sl[p + 1], si[p], si[p + 1]]
                    else:
                        r = cap[sl[p], si[p + 1], si[p]] - res[sl[p], si[p + 1], si[p]]
                    if r < delta:
                        delta = r
                        cut = p
                for p in range(depth):
                    la, ia, lb, ib = sl[p], si[p], sl[p + 1], si[p + 1]
                    if lb < la:
                        lay, i, k = lb, ia, ib
                        res[lay, i, k] = 0.0 if p == cut else res[lay, i, k] - delta
                    else:
                        lay, i, k = la, ib, ia
                        res[lay, i, k] = cap[lay, i, k] if p == cut else res[lay, i, k] + delta
                    if 0 <= log_len < log.size:
                        log[log_len] = (lay * n + i) * n + k
                        log_len += 1
                    else:
                        log_len = -1
                total += delta
                if total >= bound - tol:
                    return total, log_len
                depth = cut
                continue
            u = lu * n + iu
            want = d[u] - 1
            down = cnt[lu - 1]
            up = cnt[lu + 1] if lu < top else 0
            found = -1
            a = cur[u]
            while a < down + up:
                if a < down:
                    k = rel[(lu - 1) * n + a]
                    if d[(lu - 1) * n + k] == want and res[lu - 1, iu, k] > eps:
                        found = (lu - 1) * n + k
                        break
                else:
                    k = rel[(lu + 1) * n + a - down]
                    if d[(lu + 1) * n + k] == want and cap[lu, k, iu] - res[lu, k, iu] > eps:
                        found = (lu + 1) * n + k
                        break
                a += 1
            cur[u] = a
            if found >= 0:
                depth += 1
                sl[depth] = found // n
                si[depth] = found - sl[depth] * n
            else:
                d[u] = -1
                depth -= 1
    return total, log_len


@njit(cache=True, nogil=True)
def source_chain(cap, top, s, q):
    """Tree bounds from the source: ``q[m, k]`` >= max-flow from ``(top, s)`` to ``(m, k)``, ``m < top``.

    ``q[top - 1] = cap[top - 1, s]`` and ``q[m - 1, k] = sum_i min(q[m, i], cap[m - 1, i, k])`` (the flow into
    ``(m - 1, k)`` through ``(m, i)`` is at most both terms). ``q`` is ``(L, n)``.
    """
    n = cap.shape[1]
    for k in range(n):
        q[top - 1, k] = cap[top - 1, s, k]
    for m in range(top - 1, 0, -1):
        for k in range(n):
            q[m - 1, k] = 0.0
        for i in range(n):
            qi = q[m, i]
            if qi > 0.0:
                for k in range(n):
                    c = cap[m - 1, i, k]
                    q[m - 1, k] += c if c < qi else qi


@njit(cache=True, nogil=True)
def sink_chain(cap, j, h):
    """Tree bounds to the sink: ``h[m, k]`` >= max-flow from ``(m, k)`` to ``(0, j)`` for ``1 <= m < L``.

    ``h[1, k] = cap[0, k, j]`` and ``h[m, k] = sum_i min(cap[m - 1, k, i], h[m - 1, i])``; ``h`` is
    ``(L, n)``.
    """
    num_layers, n, _ = cap.shape
    if num_layers < 2:
        return
    for k in range(n):
        h[1, k] = cap[0, k, j]
    for m in range(2, num_layers):
        for k in range(n):
            total = 0.0
            for i in range(n):
                c = cap[m - 1, k, i]
                hi = h[m - 1, i]
                total += c if c < hi else hi
            h[m, k] = total


@njit(cache=True, nogil=True)
def layer_bound(q, h, top, j):
    """Upper bound on the flow from ``(top, s)`` to ``(0, j)``: every path crosses each layer ``m`` once, so
    the flow is at most ``sum_k min(q[m, k], h[m, k])`` for each ``0 < m < top``, and at most ``q[0, j]``."""
    n = q.shape[1]
    bound = q[0, j]
    for m in range(1, top):
        total = 0.0
        for k in range(n):
            a = q[m, k]
            b = h[m, k]
            total += a if a < b else b
        if total < bound:
            bound = total
    return bound


@njit(cache=True, nogil=True)
def _sharpen_and_finish(cap, res, top, s, j, reach, q, chain, col, total, bound, eps, tol, work, log, log_len, row_bfs, bits):
    """After `_phase_one` fell short of ``bound``: sharpen it with the sink's chain (`layer_bound`) and, if the
    flow still falls short, copy phase one's sink column ``col`` into ``res`` and run `_bit_phases` (``bits``:
    ``(avail, flow, lv, fr)`` as it takes them, with ``row_bfs``) or else `_later_phases`.
    Returns ``(value, log_len)``."""
    sharper = layer_bound(q, chain, top, j)
    if sharper < bound:
        bound = sharper
    if total < bound - tol:
        for k in range(cap.shape[1]):
            res[0, k, j] = col[k]
        avail, flow, lv, fr = bits
        if row_bfs and lv.shape[0] > 0:
            total, log_len = _bit_phases(cap, res, top, s, j, reach, q, total, bound, eps, tol, work, log, log_len,
                                         avail, flow, lv, fr)
        else:
            total, log_len = _later_phases(cap, res, top, s, j, reach, q, total, bound, eps, tol, work, log, log_len,
                                           row_bfs)
    return total, log_len


@njit(cache=True, nogil=True)
def _restore(cap, res, top, j, log, log_len):
    """Set ``res`` back to ``cap`` after a pair: the sink's column, then every logged entry (all of layers
    ``0..top - 1`` when the log overflowed, ``log_len < 0``)."""
    n = cap.shape[1]
    for k in range(n):
        res[0, k, j] = cap[0, k, j]
    if log_len < 0:
        res[:top] = cap[:top]
    else:
        flat_res = res.reshape(-1)
        flat_cap = cap.reshape(-1)
        for p in range(log_len):
            flat_res[log[p]] = flat_cap[log[p]]


@njit(cache=True, nogil=True)
def pair_flow(cap, res, top, s, j, reach, span, bound, eps, tol, work, fwork, log, q, hc, hdone):
    """Exact max-flow value from ``(top, s)`` to ``(0, j)``; ``res == cap`` on entry and again on return.

    ``reach[l, i]``: node ``(l, i)`` has a path of positive capacity down to ``(0, j)``. ``span[l, i]`` is the
    first and last ``k`` with ``cap[l, i, k] > 0`` (``(n, -1)`` for none). ``bound`` is an upper bound on the
    value (a cut). The search stops once the flow found is within ``tol`` of it, or of the sharper
    `layer_bound` (from ``q``, the `source_chain` of ``(top, s)``, and ``hc[j]``, the
    `sink_chain` of ``j``, computed here on first use and flagged in ``hdone[j]``), otherwise when no
    augmenting path is left. Scratch: ``work`` ``(9, (L + 1) * (n + 1))`` int64, ``fwork``
    ``(3, (L + 1) * (n + 1))`` float64, ``log`` int64 of any length (a full log costs a full reset of
    ``res``).
    """
    if bound <= eps or not reach[top, s]:
        return 0.0
    col = fwork[2]
    lim = fwork[0]
    got = fwork[1]
    total, log_len = _phase_one(cap, res, top, s, j, reach, span, bound, tol, work, lim, got, col, log)
    if total < bound - tol:
        if not hdone[j]:
            sink_chain(cap, j, hc[j])
            hdone[j] = True
        total, log_len = _sharpen_and_finish(
            cap, res, top, s, j, reach, q, hc[j], col, total, bound, eps, tol, work, log, log_len, False, _no_bits()
        )
    _restore(cap, res, top, j, log, log_len)
    return total


@njit(cache=True, nogil=True)
def source_flows(cap, res, top, s, reach, span, bounds, sinks, eps, tol, out, work, fwork, log, q, hc, hdone):
    """``out[j]`` = max-flow from ``(top, s)`` to ``(0, j)`` for every ``j`` in ``sinks``.

    ``reach`` is ``(n, L + 1, n)`` bool, ``reach[j, l, i]``: node ``(l, i)`` reaches ``(0, j)``. ``bounds``
    and ``out`` are ``(n,)``; ``bounds[j]`` is an upper bound on the ``j``-th value (used only to stop early).
    ``q`` is ``(L, n)`` scratch, ``hc`` ``(n, L, n)`` and ``hdone`` ``(n,)`` bool a cache of sink chains that
    may be kept across calls on the same ``cap``. Other arguments as in `pair_flow`.
    """
    source_chain(cap, top, s, q)
    for p in range(sinks.size):
        j = sinks[p]
        out[j] = pair_flow(
            cap, res, top, s, j, reach[j], span, bounds[j], eps, tol, work, fwork, log, q, hc, hdone
        )


@njit(cache=True, nogil=True)
def reach_to_sinks(cap, span):
    """``(n, L + 1, n)`` bool; ``[j, l, i]``: node ``(l, i)`` has a positive-capacity path to ``(0, j)``.

    Same as `attnflow.network._solvers.reach_to_sinks`, without BLAS (whose idle worker threads would spin
    beside the solver); scans each row (diagonal first, then from its last positive entry back) only until it
    finds a way down.
    """
    num_layers, n, _ = cap.shape
    reach = np.zeros((n, num_layers + 1, n), dtype=np.bool_)
    for j in range(n):
        reach[j, 0, j] = True
        lo = j  # the reaching nodes of the layer below lie in lo..hi
        hi = j
        for lay in range(1, num_layers + 1):
            below = reach[j, lay - 1]
            new_lo = n
            new_hi = -1
            for i in range(n):
                found = below[i] and cap[lay - 1, i, i] > 0.0
                if not found:
                    for k in range(min(span[lay - 1, i, 1], hi), max(span[lay - 1, i, 0], lo) - 1, -1):
                        if below[k] and cap[lay - 1, i, k] > 0.0:
                            found = True
                            break
                if found:
                    reach[j, lay, i] = True
                    new_hi = i
                    if new_lo == n:
                        new_lo = i
            if new_hi < 0:
                break
            lo = new_lo
            hi = new_hi
    return reach


# ----------------------------------------------------------------------------------------------------------
# The pruned solver ("dinic"): the pieces above, with per-sink pruning and cheap cut bounds first. Everything
# compiled stays in this one file: numba's on-disk cache does not notice edits to functions it calls from
# other modules, so a helper moved elsewhere could leave stale machine code behind.


@njit(cache=True, nogil=True)
def spans(cap, above):
    """``(L, n, 2)`` int64: first and last ``k`` with ``cap[l, i, k] > above`` (``(n, -1)`` for none)."""
    num_layers, n, _ = cap.shape
    out = np.empty((num_layers, n, 2), dtype=np.int64)
    for lay in range(num_layers):
        for i in range(n):
            first = n
            for k in range(n):
                if cap[lay, i, k] > above:
                    first = k
                    break
            last = -1
            for k in range(n - 1, first - 1, -1):
                if cap[lay, i, k] > above:
                    last = k
                    break
            out[lay, i, 0] = first
            out[lay, i, 1] = last
    return out


@njit(cache=True, nogil=True)
def reach_to_sink(cap, diag, span, j, reach, live):
    """Fill ``reach`` (``(L + 1, n)`` bool): ``reach[l, i]`` when ``(l, i)`` has a positive path to ``(0, j)``,
    and ``live[l]`` with the number of such nodes in layer ``l``.

    ``diag[l, i] = cap[l, i, i]`` (contiguous: reading the diagonal of ``cap`` row by row misses the cache on
    every row). A row is scanned only between the reaching nodes' extremes of the layer below, so under causal
    attention a dead token costs nothing.
    """
    num_layers, n, _ = cap.shape
    for lay in range(num_layers + 1):
        live[lay] = 0
        for i in range(n):
            reach[lay, i] = False
    reach[0, j] = True
    live[0] = 1
    lo = j
    hi = j
    for lay in range(1, num_layers + 1):
        new_lo = n
        new_hi = -1
        count = 0
        for i in range(n):
            found = reach[lay - 1, i] and diag[lay - 1, i] > 0.0
            if not found:
                start = span[lay - 1, i, 1] if span[lay - 1, i, 1] < hi else hi
                stop = span[lay - 1, i, 0] if span[lay - 1, i, 0] > lo else lo
                for k in range(start, stop - 1, -1):
                    if reach[lay - 1, k] and cap[lay - 1, i, k] > 0.0:
                        found = True
                        break
            if found:
                reach[lay, i] = True
                count += 1
                new_hi = i
                if new_lo == n:
                    new_lo = i
        live[lay] = count
        if new_hi < 0:
            return
        lo = new_lo
        hi = new_hi


@njit(cache=True, nogil=True)
def live_bound(q, qsum, reach, live, top, j):
    """Upper bound on the flow from ``(top, s)`` to ``(0, j)`` from the source chain ``q`` alone: every path
    crosses layer ``m`` at a node that reaches the sink, and at most ``q[m, k]`` flows through ``(m, k)``. Also
    at most ``q[0, j]`` (which is at most the sink's in-capacity). ``qsum[m]`` is ``q[m].sum()``, used where
    every node of the layer is live (``live`` as from `reach_to_sink`)."""
    n = q.shape[1]
    bound = q[0, j]
    for m in range(1, top):
        if live[m] == n:
            total = qsum[m]
        else:
            total = 0.0
            for k in range(n):
                if reach[m, k]:
                    total += q[m, k]
        if total < bound:
            bound = total
    return bound


@njit(cache=True, nogil=True)
def pruned_sink_chain(cap, j, reach, h, rel, cnt):
    """`sink_chain` over the nodes that reach ``(0, j)`` only (``h`` is 0 elsewhere); cost
    ``sum_m live_m * live_(m-1)`` instead of ``L n^2``. ``rel``/``cnt`` as in `_relevant_nodes`."""
    num_layers, n, _ = cap.shape
    for m in range(num_layers):
        c = 0
        for i in range(n):
            h[m, i] = 0.0
            if reach[m, i]:
                rel[m * n + c] = i
                c += 1
        cnt[m] = c
    if num_layers < 2:
        return
    for p in range(cnt[1]):
        k = rel[n + p]
        h[1, k] = cap[0, k, j]
    for m in range(2, num_layers):
        dense = cnt[m - 1] == n  # every node live (encoders): a contiguous loop the compiler vectorises
        for p in range(cnt[m]):
            k = rel[m * n + p]
            total = 0.0
            if dense:
                for i in range(n):
                    c = cap[m - 1, k, i]
                    hi = h[m - 1, i]
                    total += c if c < hi else hi
            else:
                for r in range(cnt[m - 1]):
                    i = rel[(m - 1) * n + r]
                    c = cap[m - 1, k, i]
                    hi = h[m - 1, i]
                    total += c if c < hi else hi
            h[m, k] = total


@njit(cache=True, nogil=True)
def _warm_nodes(top, j, reach, q, touched, rel, cnt):
    """Per layer ``0..top - 1`` the nodes the warm push-relabel works on: reachable from the source (``q > 0``)
    and either reaching the sink ``(0, j)`` or holding flow or excess from an earlier sink (``touched``)."""
    n = q.shape[1]
    for lay in range(top):
        c = 0
        for i in range(n):
            if q[lay, i] > 0.0 and (reach[lay, i] or touched[lay * n + i] != 0):
                rel[lay * n + c] = i
                c += 1
        cnt[lay] = c
    cnt[top] = 0


@njit(cache=True, nogil=True)
def _global_labels(cap, res, top, s, j, eps, big, work, rsp, csp, flo):
    """Exact distances to the sink ``(0, j)`` in the residual network over the nodes of `_warm_nodes`, ``big``
    for those that cannot reach it: `_row_bfs_labels` (rows only), which runs to the end here because the
    source is not among the nodes (and layer-0 nodes other than the sink, which hold an earlier sink's flow,
    are labelled through their reverse arcs)."""
    n = cap.shape[1]
    d, rel, cnt = work[0], work[7], work[8]
    _row_bfs_labels(cap, res, top, s, j, eps, work, True, rsp, csp, flo)
    for lay in range(top):
        for p in range(cnt[lay]):
            v = lay * n + rel[lay * n + p]
            if d[v] < 0:
                d[v] = big


@njit(cache=True, nogil=True)
def _column_spans(cap, top, above):
    """``(top, n, 2)`` int64: first and last ``i`` with ``cap[l, i, k] > above`` (``(n, -1)`` for none)."""
    n = cap.shape[1]
    out = np.empty((top, n, 2), dtype=np.int64)
    for lay in range(top):
        for k in range(n):
            out[lay, k, 0] = n
            out[lay, k, 1] = -1
        for i in range(n):
            for k in range(n):
                if cap[lay, i, k] > above:
                    if i < out[lay, k, 0]:
                        out[lay, k, 0] = i
                    out[lay, k, 1] = i
    return out


@njit(cache=True, nogil=True)
def _positions(top, rel, cnt, pos):
    """``pos[l, k]``: how many of the nodes of layer ``l`` listed in ``rel`` (ascending) come before token ``k``
    (``k = 0..n``)."""
    n = pos.shape[1] - 1
    for lay in range(top + 1):
        c = cnt[lay]
        p = 0
        for k in range(n + 1):
            while p < c and rel[lay * n + p] < k:
                p += 1
            pos[lay, k] = p


@njit(cache=True, nogil=True)
def _warm_push_relabel(cap, res, flo, top, s, j, bound, eps, tol, work, ex, touched, rsp, csp, pos):
    """The first phase of FIFO push-relabel towards the sink ``(0, j)``, from the preflow in ``res``/``ex``
    (left by earlier sinks of the same source): returns the excess at the sink when no node that can reach it
    has excess left (the max-flow value), or as soon as it is within ``tol`` of ``bound``. A node scans only
    the arcs with more than ``eps`` of capacity: its row window ``rsp`` and column window ``csp`` (`spans`,
    `_column_spans`), located in the node lists by ``pos`` (`_positions`)."""
    n = cap.shape[1]
    d, cur, qu, inq, rel, cnt = work[0], work[1], work[2], work[3], work[7], work[8]
    big = 1
    for lay in range(top):
        big += cnt[lay]
    nq = (top + 1) * n
    every = (big + 3) // 4  # relabels between global relabels
    relabels = every
    head = 0
    tail = 0
    size = 0
    while ex[j] < bound - tol:
        if relabels >= every:
            relabels = 0
            _global_labels(cap, res, top, s, j, eps, big, work, rsp, csp, flo)
            head = 0
            tail = 0
            size = 0
            for lay in range(top):
                for p in range(cnt[lay]):
                    v = lay * n + rel[lay * n + p]
                    cur[v] = 0
                    inq[v] = 0
                    if v != j and ex[v] > 0.0 and d[v] < big:
                        qu[tail] = v
                        tail += 1
                        size += 1
                        inq[v] = 1
        if size == 0:
            break
        u = qu[head]
        head += 1
        if head == nq:
            head = 0
        size -= 1
        inq[u] = 0
        lu = u // n
        iu = u - lu * n
        # the arcs a node scans, numbered as positions in the node lists: forward arcs [fa, fb) of layer lu - 1,
        # then reverse arcs [ra, rb) (down + a position in layer lu + 1); arcs to the source are never scanned
        down = cnt[lu - 1] if lu >= 1 else 0
        fa, fb, ra, rb = 0, 0, down, down
        if lu >= 1:
            fa, fb = pos[lu - 1, rsp[lu - 1, iu, 0]], pos[lu - 1, rsp[lu - 1, iu, 1] + 1]
        if lu + 1 < top:
            ra, rb = down + pos[lu + 1, csp[lu, iu, 0]], down + pos[lu + 1, csp[lu, iu, 1] + 1]
        while d[u] < big:
            a = cur[u]
            if a < fa:
                a = fa
            want = d[u] - 1
            while True:
                if fb <= a < ra:
                    a = ra
                if a >= rb:
                    break
                if a < down:  # forward arc (lu, iu) -> (lu - 1, k)
                    k = rel[(lu - 1) * n + a]
                    v = (lu - 1) * n + k
                    r = res[lu - 1, iu, k] if d[v] == want else 0.0
                else:  # reverse arc (lu, iu) -> (lu + 1, k): cancels flow on (lu + 1, k) -> (lu, iu)
                    k = rel[(lu + 1) * n + a - down]
                    v = (lu + 1) * n + k
                    r = flo[lu, iu, k] if d[v] == want else 0.0
                if r > eps:
                    e = ex[u]
                    amt = e if e < r else r
                    if a < down:
                        res[lu - 1, iu, k] = r - amt
                        flo[lu - 1, k, iu] = cap[lu - 1, iu, k] - res[lu - 1, iu, k]
                    else:
                        res[lu, k, iu] += amt
                        flo[lu, iu, k] = cap[lu, k, iu] - res[lu, k, iu]
                    ex[u] = e - amt
                    ex[v] += amt
                    touched[v] = 1
                    if v != j and inq[v] == 0:
                        qu[tail] = v
                        tail += 1
                        if tail == nq:
                            tail = 0
                        size += 1
                        inq[v] = 1
                    if ex[u] <= 0.0:
                        break
                a += 1
            cur[u] = a
            if ex[u] <= 0.0 or ex[j] >= bound - tol:
                break
            # relabel: one more than the lowest neighbour over a residual arc. Arcs change layer by one, so
            # exact labels have the parity of the layer, and none of these neighbours is below d[u] + 1 (the
            # scan above found none at d[u] - 1): the first at d[u] + 1 ends the search, and the discharge
            # goes on from that arc (the ones before it are not admissible at the new label).
            m = big
            low = d[u] + 1
            first = 0
            a = fa
            while True:
                if fb <= a < ra:
                    a = ra
                if a >= rb:
                    break
                if a < down:
                    k = rel[(lu - 1) * n + a]
                    v = (lu - 1) * n + k
                    r = res[lu - 1, iu, k] if d[v] < m else 0.0
                else:
                    k = rel[(lu + 1) * n + a - down]
                    v = (lu + 1) * n + k
                    r = flo[lu, iu, k] if d[v] < m else 0.0
                if r > eps:
                    m = d[v]
                    if m == low:
                        first = a
                        break
                a += 1
            d[u] = m + 1 if m + 1 < big else big
            cur[u] = first
            relabels += 1
            if relabels >= every:  # u, if still active, is queued again by the global relabel
                break
    return ex[j]


@njit(cache=True, nogil=True)
def pruned_source_flows(
    cap, res, top, s, span, espan, diag, sinks, eps, tol, out, work, fwork, log, q, reaches, lives, chains, done, mode,
    warm_width, bits,
):
    """``out[j]`` = max-flow from ``(top, s)`` to ``(0, j)`` for every ``j`` in ``sinks``; ``res == cap`` on
    entry and again on return.

    Sinks are taken in reverse order. Per sink: the nodes that reach it (`reach_to_sink`), a cut bound from the
    source chain over them (`live_bound`), then `_phase_one` up to that bound; only when its flow falls short,
    ``mode`` 0 sharpens the bound with the `pruned_sink_chain` and finishes with `_later_phases` (Dinic from
    phase one's flow); ``mode`` 1 (the default solver) does the same, except on the third sink in a row that
    phase one either did not certify or certified only after changing more than ``_HEAVY`` arcs per node (and a
    network at least ``warm_width`` nodes wide): then that sink, if not certified, and the next ``_RETRY - 1``
    ones (the next ``_RETRY`` if it was certified) go without trying phase one to `_warm_push_relabel` on the
    preflow kept across sinks (see the module doc); ``mode`` 2 sends every sink there. ``espan`` is `spans` of
    ``cap`` above ``eps`` (the only arcs that can carry flow). Per-sink data is kept across calls on the same
    ``cap`` when the arrays have one entry per sink, else recomputed in entry 0: ``reaches`` ``(n or 1, L + 1, n)`` bool, ``lives`` ``(n or 1, L + 1)`` int64, ``chains`` ``(n or 1, L, n)``,
    ``done`` ``(n or 1, 2)`` bool (reach, chain computed). ``q`` is ``(L, n)``, ``diag`` ``(L, n)`` the
    diagonals of ``cap``; other arguments as in `pair_flow`.
    """
    num_layers, n, _ = cap.shape
    cached = chains.shape[0] > 1
    col = fwork[2]
    lim = fwork[0]
    got = fwork[1]
    source_chain(cap, top, s, q)
    qsum = np.zeros(num_layers)
    for m in range(1, top):
        for k in range(n):
            qsum[m] += q[m, k]
    csp = np.empty((0, n, 2), dtype=np.int64)  # the warm solver's column windows and node positions: on first use
    pos = np.empty((0, n + 1), dtype=np.int64)
    wres = np.empty((0, n, n))  # the warm preflow, made on first use
    wflo = np.empty((0, n, n))  # its flows, transposed: wflo[l, k, i] = flow on (l + 1, i) -> (l, k)
    ex = np.zeros((top + 1) * n)
    touched = np.zeros((top + 1) * n, dtype=np.int64)
    skip = 0  # sinks left to send straight to the warm push-relabel (mode 1)
    streak = 0  # sinks in a row that phase one did not certify, or certified at a high cost (mode 1)
    for p in range(sinks.size - 1, -1, -1):
        j = sinks[p]
        c = j if cached else 0
        reach = reaches[c]
        if not (cached and done[c, 0]):
            reach_to_sink(cap, diag, span, j, reach, lives[c])
            done[c, 0] = cached
        bound = live_bound(q, qsum, reach, lives[c], top, j)
        if bound <= eps or not reach[top, s]:
            out[j] = 0.0
            continue
        warm = mode == 2 or (mode == 1 and skip > 0)
        if not warm:
            # mode 1: residuals down to eps count (more sinks certified: far sinks of peaked, local heads fall
            # short by ~1e-11 when the arcs below tol are left out)
            low = tol if mode == 0 else eps
            total, log_len = _phase_one(cap, res, top, s, j, reach, espan, bound, low, work, lim, got, col, log)
            certified = total >= bound - tol
            # a certified sink whose phase one changed more than _HEAVY arcs per node counts as a miss too: on
            # peaked, local heads the near sinks' cold flows spread over ~1e5-1e6 arcs, which the warm solver
            # mostly keeps from sink to sink
            heavy = log_len < 0 or log_len > _HEAVY * n * top
            streak = streak + 1 if not certified or (heavy and mode == 1) else 0
            if streak > _STREAK and mode == 1:  # wide enough for the warm solver to pay?
                size = 0
                for lay in range(1, top):
                    size += lives[c, lay]
                if size < warm_width * (top - 1):
                    streak = _STREAK
            if not certified and (mode == 0 or streak <= _STREAK):
                if not (cached and done[c, 1]):
                    pruned_sink_chain(cap, j, reach, chains[c], work[7], work[8])
                    done[c, 1] = cached
                total, log_len = _sharpen_and_finish(
                    cap, res, top, s, j, reach, q, chains[c], col, total, bound, eps, tol, work, log, log_len, True, bits
                )
            _restore(cap, res, top, j, log, log_len)
            if mode == 0 or streak <= _STREAK or certified:
                out[j] = total
                if mode == 1 and streak > _STREAK:  # the next sinks go to the warm solver
                    skip = _RETRY
                continue
            skip = _RETRY
        skip -= 1
        if wres.shape[0] == 0:
            csp = _column_spans(cap, top, eps)
            pos = np.zeros((top + 1, n + 1), dtype=np.int64)
            wres = cap[:top].copy()
            wflo = np.zeros((top, n, n))
            for k in range(n):
                r = cap[top - 1, s, k]
                if r > 0.0:
                    wres[top - 1, s, k] = 0.0
                    wflo[top - 1, k, s] = r
                    ex[(top - 1) * n + k] += r
                    touched[(top - 1) * n + k] = 1
        _warm_nodes(top, j, reach, q, touched, work[7], work[8])
        _positions(top, work[7], work[8], pos)
        out[j] = _warm_push_relabel(cap, wres, wflo, top, s, j, bound, eps, tol, work, ex, touched, espan, csp, pos)



def _ctz_typing(typingctx, x):
    sig = types.int64(types.uint64)

    def codegen(context, builder, signature, args):
        return builder.cttz(args[0], ir.Constant(ir.IntType(1), 1))

    return sig, codegen


#: Index of the lowest set bit of a nonzero uint64 (LLVM's cttz), inside compiled code.
_ctz: Any = intrinsic(_ctz_typing)


_ONE = np.uint64(1)
_ALL = np.uint64(0xFFFFFFFFFFFFFFFF)


@njit(cache=True, nogil=True)
def arc_bits(cap, eps):
    """``(L, n, W)`` uint64, ``W = ceil(n / 64)``: bit ``k`` of ``[l, i]`` set when ``cap[l, i, k] > eps``."""
    num_layers, n, _ = cap.shape
    words = (n + 63) // 64
    out = np.zeros((num_layers, n, words), dtype=np.uint64)
    for lay in range(num_layers):
        for i in range(n):
            for k in range(n):
                if cap[lay, i, k] > eps:
                    out[lay, i, k >> 6] |= _ONE << np.uint64(k & 63)
    return out


@njit(cache=True, nogil=True)
def _bit_phases(cap, res, top, s, j, reach, q, total, bound, eps, tol, work, log, log_len, avail, flow, lv, fr):
    """`_later_phases` with candidate arcs from bitsets, each checked against ``res`` as there (so the labels,
    paths and values are the same): ``avail[l, i]`` bit ``k`` when ``cap[l, i, k] > eps`` (a forward arc that
    can be usable; read only), ``flow[l, k]`` bit ``i`` when the arc ``(l + 1, i) -> (l, k)`` may carry flow (a
    usable reverse arc): set for every arc the pair changed (phase one's, from the log, the sink's column, and
    each augmentation's) and cleared again before returning. ``lv`` ``(rows, L + 1, W)``: per label and layer
    the labelled nodes still alive (a bigger one is made for a phase whose source label is ``rows`` or more);
    ``fr`` ``(L + 1, W)``: a level's frontier."""
    n = cap.shape[1]
    words = avail.shape[2]
    d, cur, sl, si, rel, cnt = work[0], work[1], work[2], work[3], work[7], work[8]
    ql, qi, fcnt = work[5], work[6], work[4]
    _relevant_nodes(top, s, j, reach, q, rel, cnt)
    if log_len < 0:
        for lay in range(top):
            for i in range(n):
                for w in range(words):
                    flow[lay, i, w] = _ALL
    else:
        shift = _token_shift(n)
        for p in range(log_len):
            lay, i, k = _logged_arc(log[p], n, shift)
            flow[lay, k, i >> 6] |= _ONE << np.uint64(i & 63)
    for w in range(words):
        flow[0, j, w] = _ALL
    src = top * n + s
    while True:
        # ---- labels: exact distances to the sink over usable arcs, layer-synchronous, bitset frontiers
        for lay in range(top + 1):
            base = lay * n
            for p in range(cnt[lay]):
                d[base + rel[base + p]] = -1
        d[j] = 0
        ql[0] = 0
        qi[0] = j
        start = 0
        end = 1
        level = 0
        while start < end and d[src] < 0:
            for lay in range(top + 1):
                fcnt[lay] = 0
                for w in range(words):
                    fr[lay, w] = np.uint64(0)
            for p in range(start, end):
                lay = ql[p]
                k = qi[p]
                fr[lay, k >> 6] |= _ONE << np.uint64(k & 63)
                fcnt[lay] += 1
            tail = end
            level += 1
            for lay in range(top):  # forward arcs (lay + 1, i) -> (lay, k) into the frontier
                if fcnt[lay] == 0:
                    continue
                base = (lay + 1) * n
                for p in range(cnt[lay + 1]):
                    i = rel[base + p]
                    if d[base + i] >= 0:
                        continue
                    hit = False
                    for w in range(words):
                        m = avail[lay, i, w] & fr[lay, w]
                        while m:
                            k = (w << 6) + _ctz(m)
                            if res[lay, i, k] > eps:
                                hit = True
                                break
                            m &= m - _ONE
                        if hit:
                            break
                    if hit:
                        d[base + i] = level
                        ql[tail] = lay + 1
                        qi[tail] = i
                        tail += 1
            for lay in range(1, top + 1):  # reverse arcs (lay - 1, i) -> (lay, k) into the frontier
                if fcnt[lay] == 0:
                    continue
                base = (lay - 1) * n
                for p in range(cnt[lay - 1]):
                    i = rel[base + p]
                    if d[base + i] >= 0:
                        continue
                    hit = False
                    for w in range(words):
                        m = flow[lay - 1, i, w] & fr[lay, w]
                        while m:
                            k = (w << 6) + _ctz(m)
                            if cap[lay - 1, k, i] - res[lay - 1, k, i] > eps:
                                hit = True
                                break
                            m &= m - _ONE
                        if hit:
                            break
                    if hit:
                        d[base + i] = level
                        ql[tail] = lay - 1
                        qi[tail] = i
                        tail += 1
            start = end
            end = tail
        if d[src] < 0:
            break
        top_label = d[src]
        if top_label >= lv.shape[0]:  # more labels than the workspace holds sets for (rare): a bigger one, here
            lv = np.zeros((top_label + 1, top + 1, words), dtype=np.uint64)
        for t in range(top_label):
            for lay in range(top + 1):
                for w in range(words):
                    lv[t, lay, w] = np.uint64(0)
        for lay in range(top + 1):
            base = lay * n
            for p in range(cnt[lay]):
                i = rel[base + p]
                t = d[base + i]
                if 0 <= t < top_label:
                    lv[t, lay, i >> 6] |= _ONE << np.uint64(i & 63)
                cur[base + i] = 0
        # ---- blocking flow: DFS along admissible arcs, one augmenting path at a time (the augmentation is written
        # out as in `_later_phases`: as a helper taking the arrays it made the page's levels 3-5 10% slower)
        depth = 0
        sl[0] = top
        si[0] = s
        while depth >= 0:
            lu = sl[depth]
            iu = si[depth]
            if lu == 0:
                delta = np.inf
                cutp = 0
                for p in range(depth):
                    if sl[p + 1] < sl[p]:
                        r = res[sl[p + 1], si[p], si[p + 1]]
                    else:
                        r = cap[sl[p], si[p + 1], si[p]] - res[sl[p], si[p + 1], si[p]]
                    if r < delta:
                        delta = r
                        cutp = p
                for p in range(depth):
                    la, ia, lb, ib = sl[p], si[p], sl[p + 1], si[p + 1]
                    if lb < la:
                        lay, i, k = lb, ia, ib
                        res[lay, i, k] = 0.0 if p == cutp else res[lay, i, k] - delta
                    else:
                        lay, i, k = la, ib, ia
                        res[lay, i, k] = cap[lay, i, k] if p == cutp else res[lay, i, k] + delta
                    flow[lay, k, i >> 6] |= _ONE << np.uint64(i & 63)
                    if 0 <= log_len < log.size:
                        log[log_len] = (lay * n + i) * n + k
                        log_len += 1
                    else:
                        log_len = -1
                total += delta
                if total >= bound - tol:
                    _clear_flow_bits(top, j, log, log_len, flow)
                    return total, log_len
                depth = cutp
                continue
            u = lu * n + iu
            want = d[u] - 1
            found = -1
            pos = cur[u]
            if pos < n:  # forward arcs to layer lu - 1
                w = pos >> 6
                m = avail[lu - 1, iu, w] & lv[want, lu - 1, w] & (_ALL << np.uint64(pos & 63))
                while True:
                    while m:
                        k = (w << 6) + _ctz(m)
                        if res[lu - 1, iu, k] > eps:
                            found = (lu - 1) * n + k
                            pos = k
                            break
                        m &= m - _ONE
                    if found >= 0:
                        break
                    w += 1
                    if w >= words:
                        break
                    m = avail[lu - 1, iu, w] & lv[want, lu - 1, w]
                if found < 0:
                    pos = n
            if found < 0 and lu < top:  # reverse arcs to layer lu + 1
                off = pos - n
                w = off >> 6
                m = flow[lu, iu, w] & lv[want, lu + 1, w] & (_ALL << np.uint64(off & 63))
                while True:
                    while m:
                        k = (w << 6) + _ctz(m)
                        if cap[lu, k, iu] - res[lu, k, iu] > eps:
                            found = (lu + 1) * n + k
                            pos = n + k
                            break
                        m &= m - _ONE
                    if found >= 0:
                        break
                    w += 1
                    if w >= words:
                        break
                    m = flow[lu, iu, w] & lv[want, lu + 1, w]
                if found < 0:
                    pos = 2 * n
            cur[u] = pos
            if found >= 0:
                depth += 1
                sl[depth] = found // n
                si[depth] = found - sl[depth] * n
            else:
                lv[d[u], lu, iu >> 6] &= ~(_ONE << np.uint64(iu & 63))
                d[u] = -1
                depth -= 1
    _clear_flow_bits(top, j, log, log_len, flow)
    return total, log_len


@njit(cache=True, nogil=True)
def _clear_flow_bits(top, j, log, log_len, flow):
    """Clear the flow bits of every arc a pair changed (of all layers ``0..top - 1`` if the log overflowed)."""
    n = flow.shape[1]
    words = flow.shape[2]
    if log_len < 0:
        for lay in range(top):
            for i in range(n):
                for w in range(words):
                    flow[lay, i, w] = np.uint64(0)
        return
    shift = _token_shift(n)
    for p in range(log_len):
        lay, i, k = _logged_arc(log[p], n, shift)
        flow[lay, k, i >> 6] = np.uint64(0)
    for w in range(words):
        flow[0, j, w] = np.uint64(0)


@njit(cache=True, nogil=True)
def _token_shift(n):
    """``log2(n)`` when ``n`` is a power of two (log entries then decode with shifts), else -1."""
    if n & (n - 1):
        return -1
    shift = 0
    while (1 << shift) < n:
        shift += 1
    return shift


@njit(cache=True, nogil=True)
def _logged_arc(e, n, shift):
    """``(l, i, k)`` of the log entry ``e = (l n + i) n + k`` (``shift``: `_token_shift` of ``n``)."""
    if shift >= 0:
        row = e >> shift
        return row >> shift, row & (n - 1), e & (n - 1)
    row = e // n
    lay = row // n
    return lay, row - lay * n, e - row * n


@njit(cache=True, nogil=True)
def _no_bits():
    """Empty bitsets: `_sharpen_and_finish` then takes `_later_phases`."""
    e3 = np.empty((0, 0, 0), dtype=np.uint64)
    return (e3, e3, e3, np.empty((0, 0), dtype=np.uint64))
