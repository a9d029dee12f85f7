"""Streaming capture at LLM length: heads fused inside the hook, so a trace holds L·n² values.

A random-weight Llama-architecture model (32 layers, 32 heads, hidden size 256) over 4,096 tokens. Each
measurement runs in a fresh process (peak resident memory from the kernel, ``ru_maxrss``):

* a plain eager forward pass of the model (the baseline: eager materialises every layer's attention);
* capture(head_fusion="mean", dtype="float16") followed by rollout from the last token;
* (at fewer tokens, where it fits) the same capture without fusion, for the trace size it avoids.

Run: python benchmarks/bench_long_capture.py [--tokens 4096] [--layers 32] [--heads 32]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import json
import resource
import subprocess
import sys
import time


def model_and_inputs(layers: int, heads: int, tokens: int):
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=heads // 4, max_position_embeddings=tokens, attn_implementation="eager",
    )
    model = transformers.LlamaModel(config).eval()
    ids = torch.randint(0, 1000, (1, tokens), generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": ids}


def child(what: str, layers: int, heads: int, tokens: int) -> dict:
    import numpy as np
    import torch

    import attnflow

    torch.set_num_threads(2)
    model, inputs = model_and_inputs(layers, heads, tokens)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    out: dict = {}
    if what == "forward":
        with torch.no_grad():
            model(**inputs)
    else:
        fused = what == "capture-fused"
        keywords = {"head_fusion": "mean", "dtype": "float16"} if fused else {}
        trace = attnflow.capture(model, **keywords, **inputs)
        out["capture_s"] = time.perf_counter() - start
        out["trace_gib"] = sum(layer.weights.nbytes for layer in trace.layers) / 2**30
        middle = time.perf_counter()
        row = attnflow.rollout(trace, sources=[-1])
        out["rollout_s"] = time.perf_counter() - middle
        out["rollout_sum"] = float(np.sum(row))
    out["seconds"] = time.perf_counter() - start
    out["peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    out["model_gib"] = before / 2**20
    return out


def measure(what: str, layers: int, heads: int, tokens: int) -> dict:
    command = [sys.executable, __file__, "--child", what, "--layers", str(layers), "--heads", str(heads),
               "--tokens", str(tokens)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--unfused-tokens", type=int, default=1024, help="tokens for the capture without fusion")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.layers, args.heads, args.tokens)))
        return
    rows = [
        ("eager forward pass", args.tokens, measure("forward", args.layers, args.heads, args.tokens)),
        ("capture(head_fusion='mean', dtype='float16') + rollout of the last token", args.tokens,
         measure("capture-fused", args.layers, args.heads, args.tokens)),
        ("eager forward pass", args.unfused_tokens, measure("forward", args.layers, args.heads, args.unfused_tokens)),
        ("capture without fusion + rollout of the last token", args.unfused_tokens,
         measure("capture-full", args.layers, args.heads, args.unfused_tokens)),
        ("capture(head_fusion='mean', dtype='float16') + rollout of the last token", args.unfused_tokens,
         measure("capture-fused", args.layers, args.heads, args.unfused_tokens)),
    ]
    print(f"random Llama: {args.layers} layers x {args.heads} heads, hidden 256; one process per row; "
          "peak = resident set high-water mark")
    print(f"{'what':<76}{'tokens':>7}{'seconds':>9}{'peak GiB':>10}{'trace GiB':>11}")
    for label, tokens, result in rows:
        if "error" in result:
            print(f"{label:<76}{tokens:>7}  failed: {result['error']}")
            continue
        trace = f"{result['trace_gib']:11.2f}" if "trace_gib" in result else ""
        print(f"{label:<76}{tokens:>7}{result['seconds']:9.1f}{result['peak_gib']:10.2f}{trace}")


if __name__ == "__main__":
    main()
