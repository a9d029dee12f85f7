"""Attention flow on decoder-length inputs: the flow from the last token, today's solver against the first.

Run: ``.venv/bin/python benchmarks/bench_causal.py`` (about 5 minutes on 2 cores), ``--quick`` for a smoke test,
``--v1-large`` to time the first kernel at 32 x 2048 too (about 10 more minutes), ``--stretch`` to add 32 x 4096
(the default solver only, about 9 GB of memory).

Input: synthetic causal attention with an attention sink on the first token, as decoders have. Per layer 4-8
heads (drawn), each softmax(Gaussian / 1.0 + 3 on the first key) under the causal mask, stored as float32 in an
``AttentionTrace``; at 32 x 2048 and above the heads are fused before the trace is built (the solver sees the
same network; it saves the trace's memory). Timed through ``attnflow.flow(trace, sources=[-1])``, all of it
(head fusion, the network, the solve), side by side in one run:

* ``method="dinic"``: the default solver (pruned per sink, cheap cut bounds first);
* ``method="dinic-v1"``: the first compiled kernel, kept as the reference;
* per-pair igraph max-flow on a sample of sinks, extrapolated to all of them, and the values checked on them;
* ``attnflow.rollout`` of the same trace, for scale;
* the estimate ``flow`` checks ``max_seconds`` against.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import attnflow  # noqa: E402
from attnflow.methods._flow import estimate_flow_seconds  # noqa: E402
from attnflow.methods._options import Options  # noqa: E402


def causal_sink_trace(layers: int, n: int, *, seed: int = 0, fuse: bool = False) -> attnflow.AttentionTrace:
    """``layers`` x ``(1, 4..8 heads, n, n)`` float32 causal softmax attention with a sink on token 0."""
    rng = np.random.default_rng(seed)
    future = ~np.tril(np.ones((n, n), bool))
    weights = []
    for _ in range(layers):
        heads = int(rng.integers(4, 9))
        layer = np.empty((1, 1 if fuse else heads, n, n), np.float32)
        total = np.zeros((n, n)) if fuse else None
        for h in range(heads):
            logits = rng.standard_normal((n, n), dtype=np.float32)
            logits[:, 0] += 3.0
            logits[future] = -np.inf
            logits -= logits.max(-1, keepdims=True)
            np.exp(logits, out=logits)
            logits /= logits.sum(-1, keepdims=True)
            if fuse:
                total += logits
            else:
                layer[0, h] = logits
        if fuse:
            layer[0, 0] = total / heads
        weights.append(layer)
    return attnflow.AttentionTrace.from_arrays(weights, causal=True)


def timed(fn, repeat: int = 1):
    """``(result, median wall seconds)``."""
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return result, float(np.median(times))


def igraph_sample(trace: attnflow.AttentionTrace, sinks: list[int]) -> tuple[np.ndarray, float]:
    """Per-pair igraph max-flow from the last token to ``sinks``: values and seconds extrapolated to every sink."""
    graph = attnflow.flow_network(trace)
    n = trace.seq_len
    top = graph.vcount() - 1  # the last token of the last layer
    start = time.perf_counter()
    values = np.array([graph.maxflow_value(top, j, capacity="capacity") for j in sinks])
    return values, (time.perf_counter() - start) * n / len(sinks)


def case(layers: int, n: int, *, v1: bool, igraph_sinks: int, repeat: int) -> dict:
    fuse = layers * n >= 32 * 2048
    trace = causal_sink_trace(layers, n, fuse=fuse)
    row: dict = {"case": f"{layers} x {n}" + (" (heads fused)" if fuse else "")}
    options = Options(flow_solver="dinic")
    row["estimate"] = estimate_flow_seconds(trace, options, stream=None, sources=[-1], all_layers=False)
    fast, row["dinic"] = timed(lambda: attnflow.flow(trace, sources=[-1], normalize=False, max_seconds=np.inf,
                                                     progress=False), repeat)
    if v1:
        old, row["dinic-v1"] = timed(lambda: attnflow.flow(trace, sources=[-1], normalize=False, method="dinic-v1",
                                                           max_seconds=np.inf, progress=False))
        row["diff v1"] = float(np.abs(old - fast).max())
    if igraph_sinks:
        sinks = sorted({int(j) for j in np.linspace(0, n - 1, igraph_sinks).round()})
        reference, row["igraph"] = igraph_sample(trace, sinks)
        row["diff igraph"] = float(np.abs(reference - fast[0, 0, sinks]).max())
    _, row["rollout"] = timed(lambda: attnflow.rollout(trace), repeat)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    parser.add_argument("--v1-large", action="store_true", help="also time the first kernel at 32 x 2048")
    parser.add_argument("--stretch", action="store_true", help="add 32 x 4096 (default solver only)")
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    warm = causal_sink_trace(3, 8)
    for method in ("dinic", "dinic-v1"):
        _, seconds = timed(lambda m=method: attnflow.flow(warm, sources=[-1], method=m, progress=False))
        print(f"first call of {method!r} in this process (load or compile the kernel): {seconds:.2f} s (not timed below)")
    if args.quick:
        plan = [(4, 64, True, 8, 1), (6, 128, True, 8, 1)]
    else:
        # no igraph sample at 32 x 2048: its graph, built through Python lists, would take over 10 GB
        plan = [(12, 512, True, 8, 3), (24, 512, True, 8, 3), (12, 1024, True, 4, 3), (32, 2048, args.v1_large, 0, 1)]
        if args.stretch:
            plan.append((32, 4096, False, 0, 1))
    print()
    print("| layers x tokens | flow, last token: dinic | dinic-v1 (first kernel) | speedup | per-pair igraph "
          "(extrapolated) | rollout | estimate / actual | max |dinic - v1| | max |dinic - igraph| |")
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    for layers, n, v1, sinks, repeat in plan:
        r = case(layers, n, v1=v1, igraph_sinks=sinks, repeat=repeat)
        v1 = f"{r['dinic-v1']:.2f} s" if "dinic-v1" in r else "not run"
        speedup = f"{r['dinic-v1'] / r['dinic']:.1f}x" if "dinic-v1" in r else ""
        graph = f"{r['igraph']:.0f} s ({r['igraph'] / r['dinic']:.0f}x)" if "igraph" in r else "not run"
        print(
            f"| {r['case']} | {r['dinic']:.2f} s | {v1} | {speedup} | {graph} | {r['rollout']:.2f} s | "
            f"{r['estimate'] / r['dinic']:.2f} | {r.get('diff v1', float('nan')):.1e} | "
            f"{r.get('diff igraph', float('nan')):.1e} |", flush=True
        )
    print("(wall clock, n_jobs=1; dinic and rollout: median of 3 below 32 layers, else one run; dinic-v1 one run; "
          "the igraph loop timed on a few sinks and scaled to all n)")


if __name__ == "__main__":
    main()
