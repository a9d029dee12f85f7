"""How good is the estimate ``attnflow.flow`` checks ``max_seconds`` against? Prints estimate / actual per case.

Run: ``.venv/bin/python benchmarks/bench_estimate.py`` (about 7 minutes on 2 cores; ``--quick`` for a smoke test,
``--only levels`` or ``--only all_layers`` for one half, ``--fit`` to also print the least-squares constants of the
``"dinic"`` cost model from these measurements, which is how ``attnflow/network/_solvers.py``'s constants were
chosen). The target: every ratio within 3x either way.

Cases, each timed through ``attnflow.flow`` (``n_jobs=1``, median of 2; of 3 when a run takes under a second)
next to its estimate:
* causal: decoder-like attention with a sink on the first token (as in ``bench_causal.py``), from the last token
  and from every token;
* encoder: softmax(Gaussian / T) attention, T = 1.0 (diffuse) and T = 0.3 (peaked), 8 heads, from the first
  token and from every token;
* MiniLM: real all-MiniLM-L6-v2 attention, every token (needs torch and the packaged model; skipped with a note
  when they are missing);
* the igraph methods on small sizes;
* ``all_layers=True`` (flow from every layer's nodes; the shallow levels 3-5 cost the most, see
  `attnflow.network._solvers.estimate_seconds`): MiniLM at 128 tokens from every token, the two encoders at
  6 x 128 from every token and at 12 x 512 from the first, causal attention from the last token at 12 x 512.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_causal import causal_sink_trace  # noqa: E402

import attnflow  # noqa: E402
from attnflow.methods._flow import estimate_flow_seconds  # noqa: E402
from attnflow.methods._options import Options  # noqa: E402
from attnflow.network import _solvers as solvers  # noqa: E402
from attnflow.network._solvers import estimate_seconds  # noqa: E402


def encoder_trace(layers: int, n: int, temperature: float, *, seed: int = 0) -> attnflow.AttentionTrace:
    rng = np.random.default_rng(seed)
    weights = []
    for _ in range(layers):
        logits = rng.standard_normal((1, 8, n, n), dtype=np.float32) / temperature
        logits -= logits.max(-1, keepdims=True)
        np.exp(logits, out=logits)
        weights.append(logits / logits.sum(-1, keepdims=True))
    return attnflow.AttentionTrace.from_arrays(weights, causal=False)


def minilm_trace(tokens: int) -> attnflow.AttentionTrace | None:
    try:
        import torch
        from bench_flow import TEXT
        from transformers import AutoModel, AutoTokenizer
    except ImportError as exc:
        print(f"(MiniLM case skipped: {exc})")
        return None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model_dir = attnflow.packaged_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir, attn_implementation="eager").eval()
    batch = tokenizer(TEXT, truncation=True, max_length=tokens, return_tensors="pt")
    torch.set_num_threads(1)
    with torch.no_grad():
        attentions = model(**batch, output_attentions=True).attentions
    return attnflow.AttentionTrace.from_arrays([a.numpy() for a in attentions])


def measure(name: str, trace, sources, method: str = "dinic", repeat: int = 2, all_layers: bool = False) -> tuple:
    options = Options(flow_solver=method)
    calls = []  # the estimate_seconds calls behind the estimate, replayed by fit() with other constants

    def record(*args, **kwargs):
        calls.append((args, kwargs))
        return estimate_seconds(*args, **kwargs)

    solvers.estimate_seconds = record
    try:
        estimate = estimate_flow_seconds(trace, options, stream=None, sources=sources, all_layers=all_layers)
    finally:
        solvers.estimate_seconds = estimate_seconds
    times: list[float] = []
    # cases under a second get a third run, so that one pause (a garbage collection after the big cases) is not
    # half of their median
    while len(times) < repeat or (len(times) < repeat + 1 and min(times) < 1.0):
        start = time.perf_counter()
        attnflow.flow(trace, sources=sources, method=method, max_seconds=np.inf, progress=False, all_layers=all_layers)
        times.append(time.perf_counter() - start)
    actual = float(np.median(times))
    label = "all" if sources is None else str(sources)
    row = (name, method, trace.num_layers, trace.seq_len, label, estimate, actual, all_layers, calls)
    print(f"  {name:<22} {method:<8} {trace.num_layers:>3} x {trace.seq_len:<5} sources={label:<5} "
          f"{'all_layers ' if all_layers else 'top layer  '}"
          f"estimate {estimate:8.3f} s  actual {actual:8.3f} s  ratio {estimate / actual:5.2f}", flush=True)
    return row


FITTED = ("_DINIC_SECONDS", "_DINIC_LAYERS", "_DINIC_TOKENS", "_SHALLOW_SECONDS", "_SHALLOW_TOKENS", "_SHALLOW_DECAY")


def fit(rows: list) -> None:
    """Least-squares fit of log(seconds) for the "dinic" rows: the constants `FITTED` of estimate_seconds's
    cost model, each row's estimate recomputed by estimate_seconds itself (its recorded calls)."""
    from scipy.optimize import least_squares

    data = [r for r in rows if r[1] == "dinic" and r[6] > 0.02]
    logs = {"_DINIC_SECONDS", "_SHALLOW_SECONDS", "_SHALLOW_DECAY"}  # fitted as logarithms
    saved = {name: getattr(solvers, name) for name in FITTED}

    def residuals(p):
        for name, value in zip(FITTED, p):
            setattr(solvers, name, float(np.exp(value) if name in logs else value))
        return [np.log(sum(estimate_seconds(*a, **k) for a, k in r[8])) - np.log(r[6]) for r in data]

    try:
        start = [np.log(saved[name]) if name in logs else saved[name] for name in FITTED]
        solution = least_squares(residuals, start).x
        ratios = np.exp(residuals(solution))
    finally:
        for name, value in saved.items():
            setattr(solvers, name, value)
    found = ", ".join(f"{name} = {np.exp(v) if name in logs else v:.3g}" for name, v in zip(FITTED, solution))
    print(f"fit over {len(data)} rows: {found}")
    print(f"  ratios {np.round(ratios, 2).tolist()}; within 3x: {int(((ratios >= 1 / 3) & (ratios <= 3)).sum())}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--fit", action="store_true")
    parser.add_argument("--only", choices=("levels", "all_layers"), help="run one half of the cases")
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    attnflow.flow(causal_sink_trace(3, 8), sources=[-1], progress=False)  # load the kernel
    rows = []
    real = minilm_trace(64 if args.quick else 128)
    if args.only != "all_layers":
        rows += top_layer_cases(args.quick, real)
    if args.only != "levels":
        rows += all_layers_cases(args.quick, real)
    ratios = np.array([r[5] / r[6] for r in rows])
    print()
    print(f"estimate / actual over {len(rows)} cases: min {ratios.min():.2f}, median {np.median(ratios):.2f}, "
          f"max {ratios.max():.2f}; within 3x either way: {int(((ratios >= 1 / 3) & (ratios <= 3)).sum())}/{len(rows)}")
    if args.fit:
        fit(rows)


def top_layer_cases(quick: bool, real) -> list:
    rows = []
    sizes = [(6, 64), (12, 128)] if quick else [(6, 256), (12, 512), (24, 512), (12, 1024), (24, 1024)]
    for layers, n in sizes:
        trace = causal_sink_trace(layers, n, seed=layers + n)
        rows.append(measure("causal", trace, [-1]))
        if n <= 256:
            rows.append(measure("causal", trace, None))
        for temperature in (1.0, 0.3):
            trace = encoder_trace(layers, n, temperature, seed=n)
            rows.append(measure(f"encoder T={temperature}", trace, [0]))
    for layers, n in [(6, 64), (12, 128)] if quick else [(6, 128), (12, 128), (24, 128), (12, 256)]:
        trace = causal_sink_trace(layers, n, seed=n)
        rows.append(measure("causal", trace, None))
        for temperature in (1.0, 0.3):
            rows.append(measure(f"encoder T={temperature}", encoder_trace(layers, n, temperature, seed=n), None))
    if real is not None:
        rows.append(measure("MiniLM (real)", real, None))
        rows.append(measure("MiniLM (real)", real, [0]))
    attnflow.flow(encoder_trace(4, 8, 1.0), method="igraph", progress=False)  # import igraph (~0.4 s) untimed
    for method in ("pruned", "igraph"):
        rows.append(measure("causal", causal_sink_trace(6, 48, seed=1), [-1], method))
        rows.append(measure("encoder T=1.0", encoder_trace(6, 48, 1.0, seed=1), [0], method))
        rows.append(measure("causal", causal_sink_trace(6, 32, seed=2), None, method))
        rows.append(measure("encoder T=0.3", encoder_trace(6, 32, 0.3, seed=2), None, method))
    return rows


def all_layers_cases(quick: bool, real) -> list:
    """Flow from every layer's nodes (``all_layers=True``): levels 3.. of one network, each its own solve."""
    rows = []
    if real is not None:
        rows.append(measure("MiniLM (real)", real, None, all_layers=True))
    small, large = ((6, 48), (8, 128)) if quick else ((6, 128), (12, 512))
    for temperature in (1.0, 0.3):
        rows.append(measure(f"encoder T={temperature}", encoder_trace(*small, temperature, seed=small[1]), None,
                            all_layers=True))
        rows.append(measure(f"encoder T={temperature}", encoder_trace(*large, temperature, seed=large[1]), [0],
                            all_layers=True))
    layers, n = (6, 128) if quick else (12, 1024)
    rows.append(measure("causal", causal_sink_trace(layers, n, seed=layers + n), [-1], repeat=1, all_layers=True))
    return rows


if __name__ == "__main__":
    main()
