"""Attention flow on decoder-length inputs: the flow from the last token on three kinds of synthetic causal
attention and a trained decoder's, today's solver against the first, side by side in one process.

Run: ``.venv/bin/python benchmarks/bench_causal.py`` (12 x 1,024 on kinds a-c plus the decoder row: about 6
minutes on an idle 2-core machine, most of it kind b: 18 s for the default solver, 3.3 minutes for the first
kernel; plus training the decoder once if it is not cached), ``--quick`` for a smoke test (12 x 128), ``--long`` to add the 32 x 2,048 row (kind a; the default solver only unless ``--v1-large``, which adds about 10 minutes),
``--stretch`` to add 32 x 4,096 (kind a, the default solver only, about 9 GB of memory).

Input: synthetic causal attention, per layer 4-8 heads (drawn), softmax under the causal mask, stored as float32
in an ``AttentionTrace`` (at 32 x 2,048 and above the heads are fused before the trace is built: the solver sees
the same network and the trace needs less memory). Three kinds of heads:

* (a) near-uniform with a sink: logits Gaussian / 1.0, +3 on the first key;
* (b) peaked and local: logits (Gaussian - 0.05 * distance + 0.5 on the first key) / 0.5, i.e. temperature 0.5,
  a recency bias of 0.05 per position back and a weak sink;
* (c) mixed: each head drawn from (a), (b) and peaked (Gaussian / 0.3, no bias), so that every layer mixes sink,
  local and peaked heads.

* (d) a real trained decoder: the GPT-2 of ``examples/train_decoder.py --steps 300`` (12 layers, 8 heads, 256
  positions; trained on CPU and cached in ``examples/out/docstring-gpt2`` on first use, which takes a few minutes
  to ~20 on a loaded machine; the benchmark fails, never skips, when it cannot be trained or loaded), on a
  256-token prompt of Python standard-library source (as long as its positions allow), captured with
  ``attnflow.capture``. Printed with the 12 x 1,024 rows (and with ``--quick``); igraph checks every sink; its
  times are medians of 15 runs of each solver (one run is tens of milliseconds).

Timed through ``attnflow.flow(trace, sources=[-1])`` (head fusion, the network, the solve), one after the other
in one run: ``method="dinic"`` (the default), ``method="dinic-v1"`` (the first compiled kernel, kept as the
reference), ``attnflow.rollout`` of the same trace. Exactness: max |dinic - dinic-v1| over every sink (both
solve each pair exactly and independently), and max |dinic - igraph| over 32 fixed-seed sinks of a per-pair
igraph max-flow on ``attnflow.flow_network`` at 12 x 1,024, and over every sink on the 12 x 128 rows of kinds a-c
that come first (and on the decoder's 256).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import attnflow  # noqa: E402

DECODER = ROOT / "examples" / "out" / "docstring-gpt2"
DECODER_STEPS = 300
DECODER_REPEAT = 15  # the decoder's row takes tens of milliseconds: medians of this many runs of each solver

KINDS = {
    "a": "near-uniform + sink",
    "b": "peaked, local",
    "c": "mixed (sink, local, peaked)",
}


def _head(rng: np.random.Generator, kind: str, n: int, future: np.ndarray, distance: np.ndarray) -> np.ndarray:
    logits = rng.standard_normal((n, n), dtype=np.float32)
    if kind == "a":
        logits[:, 0] += 3.0
    elif kind == "b":
        logits -= 0.05 * distance
        logits[:, 0] += 0.5
        logits /= 0.5
    else:  # peaked
        logits /= 0.3
    logits[future] = -np.inf
    logits -= logits.max(-1, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(-1, keepdims=True)
    return logits


def causal_trace(layers: int, n: int, kind: str = "a", *, seed: int = 0, fuse: bool = False) -> attnflow.AttentionTrace:
    """``layers`` x ``(1, 4..8 heads, n, n)`` float32 causal softmax attention of ``kind`` (see the module doc)."""
    rng = np.random.default_rng(seed)
    future = ~np.tril(np.ones((n, n), bool))
    distance = np.subtract.outer(np.arange(n), np.arange(n)).astype(np.float32)
    weights = []
    for _ in range(layers):
        heads = int(rng.integers(4, 9))
        layer = np.empty((1, 1 if fuse else heads, n, n), np.float32)
        total = np.zeros((n, n)) if fuse else None
        for h in range(heads):
            head_kind = kind if kind != "c" else "abp"[int(rng.integers(0, 3))]
            weights_h = _head(rng, head_kind, n, future, distance)
            if total is not None:
                total += weights_h
            else:
                layer[0, h] = weights_h
        if total is not None:
            layer[0, 0] = total / heads
        weights.append(layer)
    return attnflow.AttentionTrace.from_arrays(weights, causal=True)


def causal_sink_trace(layers: int, n: int, *, seed: int = 0, fuse: bool = False) -> attnflow.AttentionTrace:
    """Kind (a): the benchmark's first distribution (other benchmarks import it)."""
    return causal_trace(layers, n, "a", seed=seed, fuse=fuse)


def trained_decoder(path: Path = DECODER) -> Path:
    """The trained decoder's directory, training it first (``examples/train_decoder.py --steps 300``) when
    it is not cached there. Raises ``RuntimeError`` (never skips) when it cannot be trained."""
    if not (path / "config.json").is_file():
        print(f"training the decoder row's model (examples/train_decoder.py --steps {DECODER_STEPS}) into {path} ...",
              flush=True)
        done = subprocess.run(
            [sys.executable, str(ROOT / "examples" / "train_decoder.py"), "--steps", str(DECODER_STEPS), "--out", str(path)],
            check=False,
        )
        if done.returncode != 0 or not (path / "config.json").is_file():
            raise RuntimeError(
                f"could not train the decoder for the trained-decoder row (exit status {done.returncode}); run "
                f"examples/train_decoder.py --steps {DECODER_STEPS} by hand to see why (it needs torch, transformers and "
                "tokenizers)."
            )
    return path


def decoder_trace(path: Path = DECODER) -> tuple[attnflow.AttentionTrace, str]:
    """Attention of the trained decoder on a prompt as long as its positions allow (the start of the ``json``
    package's source), and a label for the table."""
    import inspect
    import json

    import torch
    import transformers

    path = trained_decoder(path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    positions = int(model.config.n_positions)
    encoded = tokenizer(inspect.getsource(json)[: 40 * positions], return_tensors="pt")
    ids = encoded["input_ids"][:, :positions]
    with torch.no_grad():
        trace = attnflow.capture(model, input_ids=ids, attention_mask=encoded["attention_mask"][:, :positions])
    layers = len(trace.layers)
    heads = trace.layers[0].shape[1]
    return trace, f"(d) trained decoder (docstring-gpt2, {DECODER_STEPS} steps, {heads} heads), {layers} x {ids.shape[1]}"


def timed(fn, repeat: int = 1):
    """``(result, median wall seconds)``."""
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return result, float(np.median(times))


def igraph_values(trace: attnflow.AttentionTrace, sinks: list[int]) -> np.ndarray:
    """Per-pair igraph max-flow from the last token to each of ``sinks``."""
    graph = attnflow.flow_network(trace)
    top = graph.vcount() - 1  # the last token of the last layer
    return np.array([graph.maxflow_value(top, j, capacity="capacity") for j in sinks])


def flow(trace: attnflow.AttentionTrace, method: str) -> np.ndarray:
    return attnflow.flow(trace, sources=[-1], normalize=False, method=method, max_seconds=np.inf, progress=False)


def case(layers: int, n: int, kind: str, *, v1: bool, igraph_sinks: int, repeat: int) -> dict:
    if kind == "d":
        trace, label = decoder_trace()
        n = int(trace.layers[0].shape[-1])
        return measure(trace, label, n, v1=v1, igraph_sinks=n, repeat=max(repeat, DECODER_REPEAT))
    fuse = layers * n >= 32 * 2048
    trace = causal_trace(layers, n, kind, fuse=fuse)
    label = f"({kind}) {KINDS[kind]}, {layers} x {n}" + (" (heads fused)" if fuse else "")
    return measure(trace, label, n, v1=v1, igraph_sinks=igraph_sinks, repeat=repeat)


def measure(trace: attnflow.AttentionTrace, label: str, n: int, *, v1: bool, igraph_sinks: int, repeat: int) -> dict:
    row: dict = {"case": label}
    fast, row["dinic"] = timed(lambda: flow(trace, "dinic"), repeat)
    fast = np.asarray(fast).reshape(-1)
    if v1:
        old, row["dinic-v1"] = timed(lambda: flow(trace, "dinic-v1"), repeat)
        row["diff v1"] = float(np.abs(np.asarray(old).reshape(-1) - fast).max())
    if igraph_sinks:
        rng = np.random.default_rng(1234)
        sinks = sorted(rng.choice(n, size=min(n, igraph_sinks), replace=False).tolist())
        reference = igraph_values(trace, sinks)
        row["diff igraph"] = float(np.abs(reference - fast[sinks]).max())
        row["igraph sinks"] = len(sinks)
    _, row["rollout"] = timed(lambda: attnflow.rollout(trace), repeat)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="12 x 128 only, igraph on every sink (smoke test)")
    parser.add_argument("--kinds", default="abcd", help="which kinds of attention (default: abcd; d: the trained decoder)")
    parser.add_argument("--long", action="store_true", help="add 32 x 2048 (kind a)")
    parser.add_argument("--v1-large", action="store_true", help="with --long, time the first kernel at 32 x 2048 too")
    parser.add_argument("--stretch", action="store_true", help="add 32 x 4096 (kind a, default solver only)")
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    warm = causal_trace(3, 8)
    for method in ("dinic", "dinic-v1"):
        _, seconds = timed(lambda m=method: flow(warm, m))
        print(f"first call of {method!r} in this process (load or compile the kernel): {seconds:.2f} s (not timed below)")
    # (layers, n, kinds, time dinic-v1, igraph sinks, repeats of the default solver and rollout)
    if args.quick:
        plan = [(12, 128, args.kinds, True, 128, 1)]
    else:
        small = args.kinds.replace("d", "")  # 12 x 128 on every sink: issue 24's exactness check at that size
        plan = ([(12, 128, small, True, 128, 1)] if small else []) + [(12, 1024, args.kinds, True, 32, 1)]
        if args.long:  # no igraph sample: its graph, built through Python lists, would take over 10 GB
            plan.append((32, 2048, "a", args.v1_large, 0, 1))
        if args.stretch:
            plan.append((32, 4096, "a", False, 0, 1))
    print()
    print("| attention, layers x tokens | flow, last token: dinic | dinic-v1 (first kernel) | speedup | rollout | "
          "max |dinic - v1| (every sink) | max |dinic - igraph| (sinks) |")
    print("|---|---|---|---|---|---|---|", flush=True)
    for layers, n, kinds, v1, sinks, repeat in plan:
        for kind in kinds:
            r = case(layers, n, kind, v1=v1, igraph_sinks=sinks, repeat=repeat)
            old = f"{r['dinic-v1']:.3g} s" if "dinic-v1" in r else "not run"
            speedup = f"{r['dinic-v1'] / r['dinic']:.1f}x" if "dinic-v1" in r else ""
            graph = f"{r['diff igraph']:.1e} ({r['igraph sinks']})" if "diff igraph" in r else "not run"
            print(
                f"| {r['case']} | {r['dinic']:.3g} s | {old} | {speedup} | {r['rollout']:.3g} s | "
                f"{r.get('diff v1', float('nan')):.1e} | {graph} |", flush=True
            )
    print(f"(wall clock, n_jobs=1, one run each (the decoder: medians of {DECODER_REPEAT}), in the order dinic, dinic-v1, "
          "igraph, rollout)")


if __name__ == "__main__":
    main()
