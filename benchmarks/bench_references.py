"""The cost of each faithfulness reference, as a ratio to blank-out's, on the packaged all-MiniLM-L6-v2.

    python benchmarks/bench_references.py [--sentences 4] [--rounds 3]

One process, interleaved runs (every round times every reference once, in turn; the median of the rounds
is reported), one thread. Two targets:

- the embedding target (a 384-dimensional vector, what ``attnflow evaluate`` uses on this model):
  ``grad_norm``/``grad_x_input`` need the Jacobian (384 backward passes per item, batched as one vmapped
  backward); ``grad_norm_proj`` one backward pass. ``jacobian limit`` is the same number of backward passes
  done as ONE backward over 384 copies of each item (its forward not timed): the Jacobian should stay within
  1.5x of it. ``jacobian loop`` is one backward pass per output dimension, one after another.
- a scalar target (one hidden unit of [CLS]): every reference should cost at most 2x blank-out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModel, AutoTokenizer

    import attnflow
    from attnflow.evaluate import ProbeRequest, resolve_target
    from attnflow.recording._registry import get_adapter

    torch.set_num_threads(1)
    directory = attnflow.packaged_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModel.from_pretrained(directory).eval()
    lines = (ROOT / "examples" / "data" / "sentences.jsonl").read_text().splitlines()[: args.sentences]
    texts = [json.loads(line)["text"] for line in lines]
    inputs = dict(tokenizer(texts, return_tensors="pt", padding=True))
    mask = inputs["attention_mask"].numpy().astype(bool)
    adapter = get_adapter("transformers")

    def probe(target: object, references: tuple[str, ...]) -> attnflow.evaluate.Probe:
        request = ProbeRequest(target=resolve_target(target, len(texts)), target_position=None, blank="mask",
                               tokenizer=tokenizer, mask=mask, causal=False, references=references)
        return adapter.probe(model, request, **inputs)

    items, columns = np.nonzero(mask)
    blanked = np.zeros((items.size, mask.shape[1]), bool)
    blanked[np.arange(items.size), columns] = True

    def limit() -> None:
        """384 backward passes as one backward over 384 copies of each item (the forward is not timed)."""
        embedding = model.get_input_embeddings()
        e = embedding(inputs["input_ids"]).detach()
        dim = model.config.hidden_size
        copies = e.repeat(dim, 1, 1).requires_grad_(True)
        m = inputs["attention_mask"].repeat(dim, 1)
        hidden = model(inputs_embeds=copies, attention_mask=m).last_hidden_state
        pooled = (hidden * m[..., None]).sum(1) / m.sum(1, keepdim=True)
        which = torch.arange(dim).repeat_interleave(len(texts))
        score = pooled[torch.arange(pooled.shape[0]), which].sum()
        start = time.perf_counter()
        torch.autograd.grad(score, copies)
        timings.setdefault("jacobian limit", []).append(time.perf_counter() - start)

    def loop() -> None:
        """One backward pass per output dimension, one after another."""
        kept = {}
        handle = model.get_input_embeddings().register_forward_hook(
            lambda module, i, o: kept.setdefault("e", o.detach().requires_grad_(True)))
        try:
            with torch.enable_grad():
                hidden = model(**inputs).last_hidden_state
        finally:
            handle.remove()
        m = inputs["attention_mask"]
        pooled = (hidden * m[..., None]).sum(1) / m.sum(1, keepdim=True)
        for d in range(pooled.shape[1]):
            torch.autograd.grad(pooled[:, d].sum(), kept["e"], retain_graph=True)

    scalar = lambda output: output.last_hidden_state[:, 0, 0]  # noqa: E731
    runs = {
        "blankout (embedding)": lambda: probe("embedding", ("blankout",)).scores(items, blanked),
        "grad_norm (embedding: Jacobian)": lambda: probe("embedding", ("grad_norm",)).gradients(),
        "grad_norm_proj (embedding)": lambda: probe("embedding", ("grad_norm_proj",)).gradients(),
        "jacobian loop": loop,
        "blankout (scalar)": lambda: probe(scalar, ("blankout",)).scores(items, blanked),
        "grad_norm (scalar)": lambda: probe(scalar, ("grad_norm",)).gradients(),
        "grad_x_input (scalar)": lambda: probe(scalar, ("grad_x_input",)).gradients(),
    }
    timings: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            timings.setdefault(name, []).append(time.perf_counter() - start)
        limit()
    median = {name: statistics.median(values) for name, values in timings.items()}
    print(f"{len(texts)} sentences, {int(mask.sum())} tokens, {args.rounds} interleaved rounds, 1 thread "
          f"(median seconds; ratio to blank-out of the same target)")
    for name, seconds in median.items():
        base = median["blankout (scalar)" if "scalar" in name else "blankout (embedding)"]
        print(f"  {name:34s} {seconds:8.3f} s  {seconds / base:7.2f}x blank-out")
    ratio = median["grad_norm (embedding: Jacobian)"] / median["jacobian limit"]
    print(f"  Jacobian / limit (384 backward passes in one batch): {ratio:.2f}x (goal: at most 1.5x)")


if __name__ == "__main__":
    main()
