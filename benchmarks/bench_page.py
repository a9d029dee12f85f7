"""Benchmark the interactive HTML page: the default page against the page with flow at every layer (issue 24,
point 3), and where the every-layer flow's time goes.

Run: ``.venv/bin/python benchmarks/bench_page.py`` (about 2 minutes on 2 cores), ``--quick`` for a smoke test
with 32 tokens, ``--repeat K`` for K interleaved runs of each page (median reported).

Both pages are built the way ``attnflow explain --html`` builds them, on the packaged all-MiniLM-L6-v2 (6 layers
x 12 heads) at 128 tokens of plain prose, one thread: ``attnflow.explain(trace)`` (raw, rollout, flow; flow after
the last layer only) or ``attnflow.explain(trace, all_layers=True)`` (flow from every layer's nodes), then
``explanation.to_html(trace)``. The table below splits the every-layer flow by source level: the seconds of the
exact solver (``max_flow_values(..., tops=[level])``, every source token to every input token) and the share of
pairs whose flow sits at the trivial cut bound ``min(out-capacity of the source, in-capacity of the sink)``, which
the solver settles without a residual phase.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_flow import minilm_inputs, residual_mix  # noqa: E402

import attnflow  # noqa: E402
from attnflow.network._solvers import max_flow_values  # noqa: E402


def minilm_trace(tokens: int) -> attnflow.AttentionTrace:
    """The packaged MiniLM's attention on TEXT cut to exactly ``tokens`` tokens, captured by attnflow."""
    import torch

    model, tokenizer, batch = minilm_inputs(tokens)
    with torch.no_grad():
        return attnflow.capture(model, **batch, tokens=tokenizer)


def page_seconds(trace: attnflow.AttentionTrace, all_layers: bool) -> tuple[float, float, int]:
    """``(seconds for the whole page, of which flow, page bytes)``."""
    start = time.perf_counter()
    explanation = attnflow.explain(trace, all_layers=True if all_layers else None)
    page = explanation.to_html(trace)
    return time.perf_counter() - start, explanation.metadata["seconds"]["flow"], len(page.encode("utf-8"))


def levels_table(trace: attnflow.AttentionTrace) -> list[tuple[int, float, float]]:
    """Per source level ``(level, solver seconds, share of pairs at the trivial cut bound)``."""
    fused = np.stack([np.asarray(layer.weights[0], dtype=np.float64).mean(axis=0) for layer in trace.layers])
    adj = residual_mix(fused)
    n = adj.shape[1]
    rows = []
    for level in range(1, adj.shape[0] + 1):
        start = time.perf_counter()
        values = max_flow_values(adj, list(range(n)), tops=[level])[0]
        seconds = time.perf_counter() - start
        trivial = np.minimum(adj[level - 1].sum(axis=1)[:, None], adj[0].sum(axis=0)[None, :])
        rows.append((level, seconds, float((np.abs(values - trivial) <= 1e-9).mean())))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="32 tokens (smoke test)")
    parser.add_argument("--repeat", type=int, default=2, help="interleaved runs of each page (default 2)")
    args = parser.parse_args()
    tokens = 32 if args.quick else 128

    trace = minilm_trace(tokens)
    start = time.perf_counter()
    attnflow.flow(attnflow.AttentionTrace.from_arrays([np.full((1, 1, 4, 4), 0.25)] * 3), sources=[0], progress=False)
    print(f"{trace!r}; first flow call (numba compile or cache load): {time.perf_counter() - start:.2f} s (not timed)")

    default, every = [], []
    for _ in range(args.repeat):  # interleaved, so that a change of machine load hits both
        default.append(page_seconds(trace, all_layers=False))
        every.append(page_seconds(trace, all_layers=True))
    d_s, d_flow = statistics.median(r[0] for r in default), statistics.median(r[1] for r in default)
    e_s, e_flow = statistics.median(r[0] for r in every), statistics.median(r[1] for r in every)
    print()
    print("page | seconds | of which flow | page MiB")
    print(f"default (flow after the last layer) | {d_s:.2f} | {d_flow:.2f} | {default[0][2] / 2**20:.2f}")
    print(f"flow at every layer | {e_s:.2f} | {e_flow:.2f} | {every[0][2] / 2**20:.2f}")
    print(f"every-layer page / default page: {e_s / d_s:.1f}x (target: within 3x); median of {args.repeat} "
          "interleaved runs, wall clock, one thread")

    print()
    print("source level | exact solver s (all sources, all sinks) | pairs at the trivial cut bound")
    for level, seconds, share in levels_table(trace):
        how = " (closed form)" if level <= 2 else ""
        print(f"{level} | {seconds:.2f}{how} | {share:.1%}")


if __name__ == "__main__":
    main()
