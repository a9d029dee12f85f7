"""Generate with a decoder and explain every generated token: which prompt tokens did it draw on?

Uses the small GPT-2 trained on the standard library's source and docstrings by ``examples/train_decoder.py``
(trained first if it is not there: about half an hour on one CPU core), loaded back by path like any model
directory. Its tokenizer starts every text with ``<|endoftext|>``, the token its attention sinks into.

Run: python examples/explain_generation.py ["prompt"] [--model DIR] [--new-tokens N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import transformers

import attnflow

sys.path.insert(0, str(Path(__file__).parent))
from train_decoder import DEFAULT_OUT, STEPS, train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt", nargs="?", default="Return a new list containing all items from the iterable in")
    parser.add_argument("--model", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--new-tokens", type=int, default=12)
    parser.add_argument("--steps", type=int, default=STEPS, help="training steps when the model is not there yet")
    args = parser.parse_args()
    if not (args.model / "config.json").exists():
        train(args.model, args.steps)
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model).eval()

    inputs = tokenizer([args.prompt], return_tensors="pt")  # its tokenizer starts every text with BOS
    with attnflow.attach(model, tokens=tokenizer) as rec:  # generate() as usual; its output is unchanged
        out = model.generate(**inputs, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    trace = rec.trace  # one causal trace over the prompt and the generated tokens
    print(trace)
    print("generated:", repr(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:])))

    prompt = inputs["input_ids"].shape[1]
    flows = attnflow.flow(trace, sources="generated")[0]  # row r: the position that predicts generated token r
    rollouts = attnflow.rollout(trace, sources="generated")[0]
    labels = trace.tokens[0]
    generated = tokenizer.convert_ids_to_tokens(out[0, prompt:].tolist())
    print(f"\n{'generated':<14} top prompt tokens by flow (share of the row over the prompt)  | by rollout")
    for r, token in enumerate(generated):
        row = flows[r, :prompt] / flows[r, :prompt].sum()
        top = np.argsort(-row)[:3]
        top_rollout = np.argsort(-rollouts[r, :prompt])[:3]
        print(f"{token:<14} " + "  ".join(f"{labels[j]!s:>10} {row[j]:.2f}" for j in top)
              + "  | " + " ".join(f"{labels[j]!s}" for j in top_rollout))

    sink = [float(layer.weights[0, :, 1:, 0].mean()) for layer in trace.layers]
    print("\nmean attention on the first token, per layer:", " ".join(f"{s:.2f}" for s in sink))


if __name__ == "__main__":
    main()
