"""Explaining generated tokens: capture around generate(), then rollout and flow per generated token.

The model is the 12-layer GPT-2 trained on the standard library's source and docstrings by examples/train_decoder.py
(trained first when missing). A 64-token prompt, 32 new tokens (greedy): the trace has 95 positions.
Measured side by side in one run on this machine: generate() alone vs inside attach() (stitching) vs
attach(generation="rerun"); rollout and flow for every generated token; and the per-pair igraph loop
(the reference solver) on a few generated tokens, extrapolated to all 32.

Run: python benchmarks/bench_generation.py [--model DIR] [--repeat N]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # a multi-threaded BLAS on a busy 2-core machine spins

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers

import attnflow

sys.path.insert(0, str(Path(__file__).parent.parent / "examples"))
from train_decoder import DEFAULT_OUT, docstrings, train  # noqa: E402

PROMPT, NEW, SAMPLED = 64, 32, 3


def timed(fn, repeat):
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if not (args.model / "config.json").exists():
        train(args.model)
    torch.set_num_threads(1)
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model).eval()
    text = " ".join(docstrings()[-12:])  # the held-out end of the corpus
    ids = torch.tensor([tokenizer(text)["input_ids"][:PROMPT]])  # BOS first, as in training
    if ids.shape[1] != PROMPT:
        raise SystemExit(f"the prompt text gave {ids.shape[1]} tokens, not {PROMPT}")
    settings = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "max_new_tokens": NEW,
                "min_new_tokens": NEW, "do_sample": False}

    plain, reference = timed(lambda: model.generate(**settings), args.repeat)

    def stitched():
        with attnflow.attach(model) as rec:
            out = model.generate(**settings)
        return out, rec.trace

    def rerun():
        with attnflow.attach(model, generation="rerun") as rec:
            model.generate(**settings)
        return rec.trace

    t_stitch, (out, trace) = timed(stitched, args.repeat)
    t_rerun, rerun_trace = timed(rerun, args.repeat)
    if not torch.equal(out, reference):
        raise SystemExit("generate() inside attach() changed the generated tokens")
    differences = max(float(np.abs(a.weights - b.weights).max()) for a, b in zip(trace.layers, rerun_trace.layers))
    t_rollout, rows = timed(lambda: attnflow.rollout(trace, sources="generated"), args.repeat)
    t_flow, flows = timed(lambda: attnflow.flow(trace, sources="generated", progress=False), args.repeat)
    first = trace.metadata["generation"]["first_generated"]
    picked = [first - 1, first - 1 + NEW // 2, first - 2 + NEW]  # the first, a middle and the last generated token
    t_pairs, reference_rows = timed(lambda: attnflow.flow(trace, sources=picked, method="igraph", progress=False), 1)
    np.testing.assert_allclose(reference_rows[0], flows[0, [0, NEW // 2, NEW - 1]], atol=1e-9)
    per_token_pairs = t_pairs / SAMPLED
    sink = np.mean([layer.weights[0, :, 1:, 0].mean() for layer in trace.layers])

    print(f"model: {args.model.name}, {model.config.n_layer} layers x {model.config.n_head} heads; prompt {PROMPT}, "
          f"{NEW} new tokens -> trace of {trace.streams[trace.default_stream()].length} positions; "
          f"mean attention on the first token {sink:.2f}; median of {args.repeat}")
    print(f"{'what':<44}{'seconds':>9}{'ratio':>9}")
    print(f"{'generate() alone':<44}{plain:9.3f}{1.0:9.2f}")
    print(f"{'generate() in attach() (stitched trace)':<44}{t_stitch:9.3f}{t_stitch / plain:9.2f}")
    print(f"{'generate() in attach(generation=rerun)':<44}{t_rerun:9.3f}{t_rerun / plain:9.2f}")
    print(f"{'rollout, all 32 generated tokens':<44}{t_rollout:9.3f}{t_rollout / plain:9.2f}")
    print(f"{'flow, all 32 generated tokens':<44}{t_flow:9.3f}{t_flow / plain:9.2f}")
    print(f"{'flow per-pair igraph loop, 32 tokens (est.)':<44}{per_token_pairs * NEW:9.3f}{per_token_pairs * NEW / plain:9.2f}")
    print(f"flow speed-up over the per-pair loop: {per_token_pairs * NEW / t_flow:.0f}x "
          f"(loop measured on {SAMPLED} tokens, {t_pairs:.2f} s); stitched vs re-run max difference {differences:.1e}")


if __name__ == "__main__":
    main()
