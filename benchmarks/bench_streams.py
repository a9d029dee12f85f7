"""Attention flow on an encoder-decoder: a T5-small-sized random model against one stream of the same size.

T5-small's shape (6 encoder and 6 decoder layers, 8 heads, d_model 512, randomly initialised) on 64 source
and 32 target tokens; its network has 6 + 12 sublayers over 64 + 32 tokens. The same run times one
self-attention stream of 96 tokens and 18 layers (synthetic softmax attention) for the same number of
sources, and checks the fast solver against the per-pair igraph reference on a few sinks. Run with
``make bench`` or ``python benchmarks/bench_streams.py``; prints one table.
"""

from __future__ import annotations

import time

import numpy as np

import attnflow

SRC, TGT, LAYERS, HEADS = 64, 32, 6, 8


def t5_small_trace():
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=512, d_model=512, d_kv=64, d_ff=2048, num_layers=LAYERS, num_decoder_layers=LAYERS,
        num_heads=HEADS, decoder_start_token_id=0, pad_token_id=0,
    )
    model = transformers.T5Model(config).eval()
    generator = torch.Generator().manual_seed(1)
    inputs = {
        "input_ids": torch.randint(1, 512, (1, SRC), generator=generator),
        "decoder_input_ids": torch.randint(1, 512, (1, TGT), generator=generator),
    }
    start = time.perf_counter()
    trace = attnflow.capture(model, **inputs)
    return trace, time.perf_counter() - start


def single_stream_trace(rng):
    n, layers = SRC + TGT, 3 * LAYERS
    logits = rng.standard_normal((layers, 1, HEADS, n, n)) / 0.5
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    return attnflow.AttentionTrace.from_arrays(weights / weights.sum(-1, keepdims=True))


def timed(fn, repeat=3):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return result, float(np.median(times))


def main() -> None:
    trace, capture_seconds = t5_small_trace()
    attnflow.flow(trace, sources=[-1])  # load the compiled solver
    rows = []
    flows, seconds = timed(lambda: attnflow.flow(trace))
    rows.append(("T5-small-sized, all 32 decoder tokens", seconds))
    _, seconds = timed(lambda: attnflow.flow(trace, sources=[-1]))
    rows.append(("T5-small-sized, last decoder token", seconds))
    _, seconds = timed(lambda: attnflow.rollout(trace))
    rows.append(("T5-small-sized rollout, all tokens", seconds))
    single = single_stream_trace(np.random.default_rng(2))
    _, seconds = timed(lambda: attnflow.flow(single, sources=list(range(SRC, SRC + TGT))))
    rows.append(("one stream, 96 tokens x 18 layers, 32 sources", seconds))
    # exactness against the per-pair igraph reference on a few sinks
    reference = attnflow.flow(trace, sources=[0, -1], normalize=False, method="igraph")
    fast = attnflow.flow(trace, sources=[0, -1], normalize=False)
    diff = max(float(np.abs(reference[name] - fast[name]).max()) for name in fast)
    print(f"capture of the T5-small-sized model: {capture_seconds:.2f} s")
    print(f"{'case':<52} {'seconds':>9}")
    for name, seconds in rows:
        print(f"{name:<52} {seconds:>9.3f}")
    ratio = rows[0][1] / rows[3][1]
    print(f"encoder-decoder / one stream of the same size: {ratio:.2f}x")
    print(f"max |fast - igraph reference| (sources 0 and -1, both streams): {diff:.1e}")
    total = flows["encoder"].sum(-1) + flows["decoder"].sum(-1)
    print(f"normalised rows sum to 1 within {float(np.abs(total - 1).max()):.1e}")


if __name__ == "__main__":
    main()
