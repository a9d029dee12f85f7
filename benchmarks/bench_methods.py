"""Every method's cost, as a ratio to one plain forward pass of the packaged MiniLM over 128 tokens.

Capture costs (the forward pass with hooks, plus what a method needs: one backward pass for gradients,
the value-side tensors, the L·n re-runs of one layer for value zeroing) and the method's own computation
on the captured trace are timed separately, side by side in one run. The gradient target is the norm of
the [CLS] embedding (MiniLM is a sentence-embedding model without logits). The trace's memory is reported
per capture: weights, and the extras the methods need.

Run: python benchmarks/bench_methods.py [--tokens N] [--repeat N]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # a multi-threaded BLAS on a busy 2-core machine spins

import argparse
import statistics
import time

import torch
from transformers import AutoModel, AutoTokenizer

import attnflow


def timed(fn, repeat):
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def megabytes(trace: attnflow.AttentionTrace) -> tuple[float, float]:
    weights = sum(layer.weights.nbytes for layer in trace.layers)
    extras = sum(value.nbytes for layer in trace.layers for value in layer.extras.values())
    return weights / 2**20, extras / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    directory = attnflow.packaged_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModel.from_pretrained(directory).eval()
    text = " ".join(["The keys to the old cabinet in the hall are on the kitchen table."] * 20)
    inputs = tokenizer([text], return_tensors="pt", truncation=True, max_length=args.tokens)
    if inputs["input_ids"].shape[1] != args.tokens:
        raise SystemExit(f"the text gave {inputs['input_ids'].shape[1]} tokens, not {args.tokens}")

    def target(output):
        return output.last_hidden_state[:, 0].norm(dim=-1)

    def forward():
        with torch.no_grad():
            return model(**inputs)

    plain, _ = timed(forward, args.repeat)
    captures = {
        "weights": {},
        "weights + gradients (target=)": {"target": target},
        "weights + values (values=True)": {"values": True},
        "weights + value zeroing": {"value_zeroing": True},
    }
    traces = {}
    rows = [("forward pass alone", plain, None)]
    for label, keywords in captures.items():
        seconds, trace = timed(lambda keywords=keywords: attnflow.capture(model, **keywords, **inputs), args.repeat)
        traces[label] = trace
        rows.append((f"capture: {label}", seconds, megabytes(trace)))
    needs = {"attn_grad": "weights + gradients (target=)", "grad_rollout": "weights + gradients (target=)",
             "norm": "weights + values (values=True)", "norm_residual": "weights + values (values=True)",
             "alti": "weights + values (values=True)", "effective_attention": "weights + values (values=True)",
             "value_zeroing": "weights + value zeroing"}
    for name in attnflow.list_methods():
        trace = traces[needs.get(name, "weights")]
        for sources, what in ((None, "all tokens"), ([0], "[CLS]")):
            if name == "flow" and sources is None:
                continue  # every row of flow is 128 max-flow problems per source: see bench_flow.py
            seconds, _ = timed(lambda trace=trace, name=name, sources=sources: attnflow.explain(
                trace, [name], sources=sources, all_layers=False), args.repeat)
            rows.append((f"method {name} ({what})", seconds, None))

    print(f"packaged MiniLM (6 layers x 12 heads, hidden 384), {args.tokens} tokens, batch 1, one thread, "
          f"median of {args.repeat}")
    print(f"{'what':<52}{'seconds':>9}{'x forward':>11}{'weights MiB':>13}{'extras MiB':>12}")
    for label, seconds, memory in rows:
        sizes = "" if memory is None else f"{memory[0]:13.1f}{memory[1]:12.1f}"
        print(f"{label:<52}{seconds:9.3f}{seconds / plain:11.1f}{sizes}")


if __name__ == "__main__":
    main()
