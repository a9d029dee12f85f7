"""How good is the estimate ``attnflow.flow`` checks ``max_seconds`` against? Prints estimate / actual per case.

Run: ``.venv/bin/python benchmarks/bench_estimate.py`` (about 5 minutes on 2 cores; ``--quick`` for a smoke test,
``--fit`` to also print the least-squares constants of the ``"dinic"`` cost model from these measurements, which
is how ``attnflow/network/_solvers.py``'s constants were chosen). The target: every ratio within 3x either way.

Cases, each timed through ``attnflow.flow`` (``n_jobs=1``, median of 2) next to its estimate:
* causal: decoder-like attention with a sink on the first token (as in ``bench_causal.py``), from the last token
  and from every token;
* encoder: softmax(Gaussian / T) attention, T = 1.0 (diffuse) and T = 0.3 (peaked), 8 heads, from the first
  token and from every token;
* MiniLM: real all-MiniLM-L6-v2 attention, every token (needs torch and the packaged model; skipped with a note
  when they are missing);
* the igraph methods on small sizes.
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


def measure(name: str, trace, sources, method: str = "dinic", repeat: int = 2) -> tuple:
    options = Options(flow_solver=method)
    estimate = estimate_flow_seconds(trace, options, stream=None, sources=sources, all_layers=False)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        attnflow.flow(trace, sources=sources, method=method, max_seconds=np.inf, progress=False)
        times.append(time.perf_counter() - start)
    actual = float(np.median(times))
    label = "all" if sources is None else str(sources)
    row = (name, method, trace.num_layers, trace.seq_len, label, estimate, actual)
    print(f"  {name:<22} {method:<8} {trace.num_layers:>3} x {trace.seq_len:<5} sources={label:<5} "
          f"estimate {estimate:8.3f} s  actual {actual:8.3f} s  ratio {estimate / actual:5.2f}", flush=True)
    return row


def fit(rows: list) -> None:
    """Least-squares fit of log(seconds) for the "dinic" rows: c * L^a * sum over sources of width^b."""
    from scipy.optimize import least_squares

    data = [r for r in rows if r[1] == "dinic" and r[6] > 0.02]

    def widths(r):
        n = r[3]
        if r[0].startswith("causal"):
            return np.arange(1, n + 1, dtype=float) if r[4] == "all" else np.array([float(n)])
        return np.full(n if r[4] == "all" else 1, float(n))

    def residuals(p):
        return [p[0] + p[1] * np.log(r[2]) + np.log((widths(r) ** p[2]).sum()) - np.log(r[6]) for r in data]

    solution = least_squares(residuals, [np.log(3e-8), 0.6, 2.4]).x
    print(f"fit over {len(data)} rows: seconds = {np.exp(solution[0]):.3g} * L^{solution[1]:.2f} * "
          f"sum(width^{solution[2]:.2f}); ratios {np.round(np.exp(residuals(solution)), 2).tolist()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--fit", action="store_true")
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    attnflow.flow(causal_sink_trace(3, 8), sources=[-1], progress=False)  # load the kernel
    rows = []
    sizes = [(6, 64), (12, 128)] if args.quick else [(6, 256), (12, 512), (24, 512), (12, 1024), (24, 1024)]
    for layers, n in sizes:
        trace = causal_sink_trace(layers, n, seed=layers + n)
        rows.append(measure("causal", trace, [-1]))
        if n <= 256:
            rows.append(measure("causal", trace, None))
        for temperature in (1.0, 0.3):
            trace = encoder_trace(layers, n, temperature, seed=n)
            rows.append(measure(f"encoder T={temperature}", trace, [0]))
    for layers, n in [(6, 64), (12, 128)] if args.quick else [(6, 128), (12, 128), (24, 128), (12, 256)]:
        trace = causal_sink_trace(layers, n, seed=n)
        rows.append(measure("causal", trace, None))
        for temperature in (1.0, 0.3):
            rows.append(measure(f"encoder T={temperature}", encoder_trace(layers, n, temperature, seed=n), None))
    real = minilm_trace(64 if args.quick else 128)
    if real is not None:
        rows.append(measure("MiniLM (real)", real, None))
        rows.append(measure("MiniLM (real)", real, [0]))
    for method in ("pruned", "igraph"):
        rows.append(measure("causal", causal_sink_trace(6, 48, seed=1), [-1], method, repeat=1))
        rows.append(measure("encoder T=1.0", encoder_trace(6, 48, 1.0, seed=1), [0], method, repeat=1))
        rows.append(measure("causal", causal_sink_trace(6, 32, seed=2), None, method, repeat=1))
        rows.append(measure("encoder T=0.3", encoder_trace(6, 32, 0.3, seed=2), None, method, repeat=1))
    ratios = np.array([r[5] / r[6] for r in rows])
    print()
    print(f"estimate / actual over {len(rows)} cases: min {ratios.min():.2f}, median {np.median(ratios):.2f}, "
          f"max {ratios.max():.2f}; within 3x either way: {int(((ratios >= 1 / 3) & (ratios <= 3)).sum())}/{len(rows)}")
    if args.fit:
        fit(rows)


if __name__ == "__main__":
    main()
