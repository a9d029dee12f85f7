"""What JAX capture costs beside a plain forward pass, next to the PyTorch figures for the same model (issue 25,
point 6).

Run: ``.venv/bin/python benchmarks/bench_jax_capture.py`` (a few minutes; ``--repeat N`` warm calls per setting,
default 5; ``--value-zeroing`` adds value_zeroing=True, which re-runs every layer once per token).

One process, one model: all-MiniLM-L6-v2 from the packaged checkpoint (``attnflow.packaged_model_dir()``), on a
padded batch of three sentences, as the Flax NNX port of ``examples/flax_bert.py`` (JAX) and as the transformers
model (PyTorch, CPU), each on one thread (``XLA_FLAGS`` and ``torch.set_num_threads(1)``). For each setting the
first call (in this process: for JAX it includes tracing and compiling what the call runs for the first time;
settings run in the order printed, so a later first call reuses what an earlier one compiled) and the median of
``--repeat`` warm calls, in seconds, wall and process CPU time:

* JAX: the plain forward jitted (``nnx.jit``) and eager (op by op, as a capture runs it: attnflow disables jit while
  attached so that the weights are concrete), then ``attnflow.capture`` with the weights alone, ``values=True``,
  ``target=`` (one more pass under ``jax.grad``), and both;
* PyTorch: the plain eager forward (``torch.no_grad``), then the same captures (eager attention; ``target=``
  runs autograd through the recorded pass).

The target is the [CLS] output vector along a fixed direction, per item (the models return hidden states), as in
``examples/compare_torch_jax.py``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; nothing is downloaded
# One thread on each side (set before jax is imported): on a shared machine, thread pools that spin while they wait
# for a busy core make the wall times meaningless (PyTorch's forward measured 0.9 s with 2 threads, 0.06 s with 1).
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import numpy as np

import attnflow

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import flax_bert  # noqa: E402  (the Flax port)

SENTENCES = [
    "The keys to the cabinet are on the table.",
    "Attention flow follows the residual stream.",
    "A short one.",
]


def timed(call: Callable[[], Any], repeat: int,
          ready: Callable[[Any], Any] = lambda out: out) -> tuple[float, float, float]:
    """``(first call, median of repeat warm calls, median of their process CPU time)`` in seconds (the CPU time, all
    threads, is steadier than the wall time on a shared machine); ``ready`` waits for the result (JAX dispatches
    asynchronously)."""
    start = time.perf_counter()
    ready(call())
    first = time.perf_counter() - start
    warm, cpu = [], []
    for _ in range(repeat):
        start, start_cpu = time.perf_counter(), time.process_time()
        ready(call())
        warm.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return first, statistics.median(warm), statistics.median(cpu)


def jax_rows(model_dir: Path, batch: dict, direction: np.ndarray, repeat: int, zeroing: bool) -> list[tuple]:
    import jax
    from flax import nnx

    model = flax_bert.load_bert(model_dir)
    ids, mask, types = batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
    forward = nnx.jit(lambda m, i, a, t: m(i, a, t))

    def target(out: Any) -> Any:
        return out[:, 0] @ direction

    def capture(**kwargs: Any) -> Callable[[], Any]:
        return lambda: attnflow.capture(model, ids, mask, types, **kwargs)

    rows = [
        ("forward, jitted", lambda: forward(model, ids, mask, types), jax.block_until_ready),
        ("forward, eager (op by op)", lambda: _eager(jax, lambda: model(ids, mask, types)), jax.block_until_ready),
        ("capture, weights", capture(), None),
        ("capture, values=True", capture(values=True), None),
        ("capture, target=", capture(target=target), None),
        ("capture, target= and values=True", capture(target=target, values=True), None),
    ]
    if zeroing:
        rows.append(("capture, value_zeroing=True", capture(value_zeroing=True), None))
    return [(name, *timed(call, repeat, ready or (lambda out: out))) for name, call, ready in rows]


def _eager(jax: Any, call: Callable[[], Any]) -> Any:
    with jax.disable_jit():
        return call()


def torch_rows(model_dir: Path, batch: dict, direction: np.ndarray, repeat: int, zeroing: bool) -> list[tuple]:
    import torch
    from transformers import AutoModel

    torch.set_num_threads(1)
    model = AutoModel.from_pretrained(model_dir, attn_implementation="eager").eval()
    inputs = {name: torch.from_numpy(value) for name, value in batch.items()}
    along = torch.from_numpy(direction)

    def target(out: Any) -> Any:
        return out.last_hidden_state[:, 0] @ along

    def forward() -> Any:
        with torch.no_grad():
            return model(**inputs)

    def capture(**kwargs: Any) -> Callable[[], Any]:
        return lambda: attnflow.capture(model, **kwargs, **inputs)

    rows = [
        ("forward, eager (no_grad)", forward),
        ("capture, weights", capture()),
        ("capture, values=True", capture(values=True)),
        ("capture, target=", capture(target=target)),
        ("capture, target= and values=True", capture(target=target, values=True)),
    ]
    if zeroing:
        rows.append(("capture, value_zeroing=True", capture(value_zeroing=True)))
    return [(name, *timed(call, repeat)) for name, call in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--value-zeroing", action="store_true")
    args = parser.parse_args()
    import jax
    import torch
    from transformers import AutoTokenizer

    model_dir = attnflow.packaged_model_dir()
    batch = dict(AutoTokenizer.from_pretrained(model_dir)(SENTENCES, padding=True, return_tensors="np"))
    direction = np.random.default_rng(0).standard_normal(384).astype(np.float32)
    direction /= np.linalg.norm(direction)
    print(f"all-MiniLM-L6-v2, batch {batch['input_ids'].shape[0]} x {batch['input_ids'].shape[1]} tokens; "
          f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} on CPU, "
          f"one thread each; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
          f"median of {args.repeat} warm calls\n")
    results = {"JAX (Flax NNX port)": jax_rows(model_dir, batch, direction, args.repeat, args.value_zeroing),
               "PyTorch (transformers)": torch_rows(model_dir, batch, direction, args.repeat, args.value_zeroing)}
    print("| framework | what | first call, s | warm, s | warm / plain forward | warm CPU, s |\n|---|---|---|---|---|---|")
    for framework, rows in results.items():
        plain = rows[0][2]
        for name, first, warm, cpu in rows:
            print(f"| {framework} | {name} | {first:.3f} | {warm:.4f} | {warm / plain:.1f}x | {cpu:.4f} |")


if __name__ == "__main__":
    main()
