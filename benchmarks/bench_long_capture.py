"""Streaming capture at LLM length: heads fused inside the hook, so a trace holds L·n² values; on the CPU and,
where one is present, on a CUDA device (issue 24 point 5).

A random-weight Llama-architecture model (32 layers, 32 heads, hidden size 256) over 4,096 tokens. Each
measurement runs in a fresh process (peak resident memory from the kernel, ``ru_maxrss``; on a CUDA device also
the peak device memory, ``torch.cuda.max_memory_allocated``), per device:

* a plain eager forward pass of the model (the baseline: eager materialises every layer's attention);
* capture(head_fusion="mean", dtype="float16") followed by rollout and exact flow (``method="dinic"``) from the
  last token on that trace (flow runs on the CPU: the trace is host memory; ``--no-flow`` leaves it out);
* the same capture without fusion (``dtype="float16"``), for the trace size it avoids: on the CPU at
  ``--unfused-tokens`` (1,024: 32 x 32 x 4,096^2 float16 values are 32 GiB of host memory), on a device at the
  full length.

Run: python benchmarks/bench_long_capture.py [--tokens 4096] [--layers 32] [--heads 32] [--device auto|cpu|cuda]
(``auto``: the CPU rows, and the CUDA rows when ``torch.cuda.is_available()``; without a device it says so). The
CPU rows take about 10 minutes on 2 cores (flow 68 s of it); on a lent device with little time,
``--device cuda --no-flow`` runs the device rows alone (``--device-unfused-tokens`` to bound the unfused capture's
host memory).
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


def model_and_inputs(layers: int, heads: int, tokens: int, device: str = "cpu"):
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=heads // 4, max_position_embeddings=tokens, attn_implementation="eager",
    )
    model = transformers.LlamaModel(config).eval().to(device)
    ids = torch.randint(0, 1000, (1, tokens), generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": ids.to(device)}


def child(what: str, layers: int, heads: int, tokens: int, device: str, flow: bool) -> dict:
    import numpy as np
    import torch

    import attnflow

    torch.set_num_threads(2)
    model, inputs = model_and_inputs(layers, heads, tokens, device)
    cuda = device.startswith("cuda")

    def done() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    if cuda:  # CUDA's own start-up (context, cuBLAS, kernel loading) outside the timed call
        with torch.no_grad():
            model(**{name: value[:, :16] for name, value in inputs.items()})
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    out: dict = {}
    if what == "forward":
        with torch.no_grad():
            model(**inputs)
        out["seconds"] = done() - start
        out["peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    else:
        fused = what == "capture-fused"
        keywords = {"head_fusion": "mean", "dtype": "float16"} if fused else {"dtype": "float16"}
        trace = attnflow.capture(model, **keywords, **inputs)
        out["seconds"] = done() - start  # the capture alone
        out["trace_gib"] = sum(layer.weights.nbytes for layer in trace.layers) / 2**30
        middle = time.perf_counter()
        row = attnflow.rollout(trace, sources=[-1])
        out["rollout_s"] = time.perf_counter() - middle
        out["rollout_sum"] = float(np.sum(row))
        out["peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        if fused and flow:
            del model
            tiny = attnflow.AttentionTrace.from_arrays([np.full((1, 1, 4, 4), 0.25)] * 3)
            attnflow.flow(tiny, sources=[0], progress=False)  # the kernel loaded from numba's cache: not timed
            middle = time.perf_counter()
            values = attnflow.flow(trace, sources=[-1], normalize=False, method="dinic", max_seconds=np.inf,
                                   progress=False)
            out["flow_s"] = time.perf_counter() - middle
            out["flow_max"] = float(np.max(values))
            out["flow_peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    out["model_gib"] = before / 2**20
    if cuda:
        out["device_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def measure(what: str, layers: int, heads: int, tokens: int, device: str = "cpu", flow: bool = True) -> dict:
    command = [sys.executable, __file__, "--child", what, "--layers", str(layers), "--heads", str(heads),
               "--tokens", str(tokens), "--device", device] + ([] if flow else ["--no-flow"])
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode < 0:  # killed by a signal, e.g. out of memory: the last stderr line may be unrelated
        return {"error": f"killed by signal {-done.returncode} (out of memory?)"}
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def cuda_available() -> bool:
    """Whether torch sees a CUDA device (asked in a child process, so that this one never initialises CUDA)."""
    done = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                          capture_output=True, text=True)
    return done.returncode == 0 and done.stdout.strip().endswith("True")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--unfused-tokens", type=int, default=1024, help="tokens for the CPU capture without fusion")
    parser.add_argument("--device-unfused-tokens", type=int, default=None,
                        help="tokens for the device capture without fusion (default --tokens: 32 GiB of host memory "
                             "at 32 x 32 x 4,096, the trace being copied to the host)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto: the CPU rows, and the CUDA rows where a device is present")
    parser.add_argument("--no-flow", action="store_true", help="leave out flow from the last token")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    flow = not args.no_flow
    if args.child:
        print(json.dumps(child(args.child, args.layers, args.heads, args.tokens, args.device, flow)))
        return
    cuda = args.device == "cuda" or (args.device == "auto" and cuda_available())
    devices = (["cpu"] if args.device != "cuda" else []) + (["cuda"] if cuda else [])
    fused = "capture(head_fusion='mean', dtype='float16') + rollout, flow of the last token"
    rows = []
    for device in devices:
        unfused = (args.device_unfused_tokens or args.tokens) if device == "cuda" else args.unfused_tokens
        rows += [
            (device, "eager forward pass", args.tokens, measure("forward", args.layers, args.heads, args.tokens, device)),
            (device, fused, args.tokens, measure("capture-fused", args.layers, args.heads, args.tokens, device, flow)),
        ]
        if unfused != args.tokens:
            rows += [
                (device, "eager forward pass", unfused, measure("forward", args.layers, args.heads, unfused, device)),
                (device, fused, unfused, measure("capture-fused", args.layers, args.heads, unfused, device, flow)),
            ]
        rows.append((device, "capture(dtype='float16') without fusion + rollout of the last token", unfused,
                     measure("capture-full", args.layers, args.heads, unfused, device)))
    print(f"random Llama: {args.layers} layers x {args.heads} heads, hidden 256; one process per row; "
          "seconds: the forward pass or the capture (rollout and flow after it, on the CPU); peak: resident set "
          "high-water mark (host, before flow; flow's own in brackets) and torch.cuda.max_memory_allocated (device)")
    if not cuda:
        print("no CUDA device here (torch.cuda.is_available() is False): the device rows (issue 24 point 5) were not run")
    print(f"{'device':<7}{'what':<78}{'tokens':>7}{'seconds':>9}{'host GiB':>10}{'device GiB':>11}{'trace GiB':>11}"
          f"{'rollout s':>10}{'flow s':>9}")
    for device, label, tokens, result in rows:
        if "error" in result:
            print(f"{device:<7}{label:<78}{tokens:>7}  failed: {result['error']}")
            continue
        device_gib = f"{result['device_peak_gib']:11.2f}" if "device_peak_gib" in result else f"{'':11}"
        trace = f"{result['trace_gib']:11.2f}" if "trace_gib" in result else f"{'':11}"
        rollout = f"{result['rollout_s']:10.2f}" if "rollout_s" in result else f"{'':10}"
        seconds = f"{result['flow_s']:9.1f} ({result['flow_peak_gib']:.2f} GiB)" if "flow_s" in result else ""
        print(f"{device:<7}{label:<78}{tokens:>7}{result['seconds']:9.2f}{result['peak_gib']:10.2f}{device_gib}{trace}"
              f"{rollout}{seconds}")


if __name__ == "__main__":
    main()
