"""Abnar & Zuidema's Table 1 and 2 on the subject-verb agreement model: Spearman's ρ between raw attention,
rollout and flow of [CLS] (every layer) and the importance of the input tokens by blank-out and by input
gradients, over held-out sentences.

    python examples/sva/train.py --out sva-out
    python examples/sva/evaluate.py --model sva-out --examples 2000

As in the paper: the target is the predicted probability of the correct class; blank-out replaces one token
at a time by [UNK]; scores are those of [CLS], heads averaged, rollout and flow with residual 0.5; special
tokens ([CLS]) stay among the compared tokens. Writes ``MODEL/faithfulness/`` (long table as CSV, per-layer
plot, AOPC) and prints the tables beside the paper's.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sva  # noqa: E402
import train  # noqa: E402

import attnflow  # noqa: E402

# Abnar & Zuidema (2020), Tables 1 and 2 (their verb-number model, 2000 test sentences), mean ± std per layer.
PAPER = {
    "blankout": {
        "raw": ["0.69±0.27", "0.10±0.43", "-0.11±0.49", "-0.09±0.52", "0.20±0.45", "0.29±0.39"],
        "rollout": ["0.32±0.26", "0.38±0.27", "0.51±0.26", "0.62±0.26", "0.70±0.25", "0.71±0.24"],
        "flow": ["0.32±0.26", "0.44±0.29", "0.70±0.25", "0.70±0.22", "0.71±0.22", "0.70±0.22"],
    },
    "input gradients": {
        "raw": ["0.53±0.33", "0.16±0.38", "-0.06±0.42", "0.00±0.47", "0.24±0.40", "0.46±0.35"],
        "rollout": ["0.22±0.31", "0.27±0.32", "0.39±0.32", "0.47±0.32", "0.53±0.32", "0.54±0.31"],
        "flow": ["0.22±0.31", "0.31±0.34", "0.54±0.32", "0.61±0.28", "0.60±0.28", "0.61±0.28"],
    },
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sva-out", help="directory written by train.py (default sva-out/)")
    parser.add_argument("--examples", type=int, default=2000, help="held-out sentences (default 2000, as the paper)")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="output directory (default MODEL/faithfulness)")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    directory = Path(args.model)
    model, tokenizer = sva.load(directory)
    trained = json.loads((directory / "accuracy.json").read_text())
    config = trained["config"]
    examples = train.held_out(sva.dataset(config["train"], config["seed"]), args.examples, config["seed"])
    out = Path(args.out) if args.out else directory / "faithfulness"
    out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    reports = []
    for first in range(0, len(examples), args.batch_size):
        batch = examples[first : first + args.batch_size]
        ids, mask = tokenizer.encode([e.words for e in batch])
        inputs = {"input_ids": torch.as_tensor(ids), "attention_mask": torch.as_tensor(mask)}
        labels = torch.as_tensor([e.label for e in batch])

        def correct_class_probability(logits, items, labels=labels):  # rows are variants of items
            return logits.softmax(-1)[torch.arange(len(items)), labels[torch.as_tensor(items)]]

        trace = attnflow.capture(model, tokens=tokenizer, **inputs)
        explanation = attnflow.explain(trace, ["raw", "rollout", "flow"], sources=[0], all_layers=True)
        reports.append(attnflow.faithfulness(
            model, explanation, target=correct_class_probability, blank="unk", tokenizer=tokenizer, **inputs))
        print(f"\r{first + len(batch)}/{len(examples)} sentences ({time.perf_counter() - start:.0f} s)", end="",
              file=sys.stderr, flush=True)
    print(file=sys.stderr)
    report = attnflow.FaithfulnessReport.concat(reports)
    seconds = time.perf_counter() - start

    print(f"SVA model: held-out accuracy {trained['accuracy']:.4f} (n={trained['n']}); by attractors: " + ", ".join(
        f"{a}: {v['accuracy']:.4f} (n={v['n']})" for a, v in trained["by_attractors"].items()))
    if "longer" in trained:
        print(f"  longer than training (4-5 modifiers): {trained['longer']['accuracy']:.4f} (n={trained['longer']['n']})")
    print(f"faithfulness over {report.batch_size} held-out sentences in {seconds:.0f} s; target: probability of the "
          "correct class; blank-out by [UNK]\n")
    for reference in report.references:
        print(f"Spearman with {reference} (this model):\n{report.table(reference)}\n")
    for name, rows in PAPER.items():
        print(f"Abnar & Zuidema Table {1 if name == 'blankout' else 2}, {name} (their model):")
        print("         " + "  ".join(f"L{i + 1:<9}" for i in range(6)))
        for method, cells in rows.items():
            print(f"{method:<8} " + "  ".join(f"{c:<10}" for c in cells))
        print()
    print("AOPC at the last layer (ERASER bins 1/5/10/20/50%; higher comprehensiveness, lower sufficiency = better):")
    for method, values in report.aopc.items():
        print(f"  {method:<8} comprehensiveness {values['comprehensiveness']:.3f}  sufficiency {values['sufficiency']:.3f}")

    with open(out / "faithfulness.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["method", "reference", "layer", "mean", "std", "n"])
        writer.writeheader()
        writer.writerows(report.rows())
    with open(out / "aopc.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["method", "metric", "mean", "std", "n"])
        writer.writeheader()
        writer.writerows(report.aopc_rows())
    report.plot(out / "faithfulness.png", title=f"SVA model, {report.batch_size} held-out sentences")
    curves = {m: {k: np.round(v, 4).tolist() for k, v in by.items()} for m, by in report.curves.items()}
    (out / "summary.json").write_text(json.dumps({
        "accuracy": trained, "items": report.batch_size, "seconds": round(seconds, 1), "settings": report.settings,
        "spearman": {m: {r: np.round(v, 4).tolist() for r, v in by.items()} for m, by in report.spearman.items()},
        "aopc": report.aopc, "grid": report.grid, "curves": curves,
    }, indent=1))
    print(f"\nwrote {out}/faithfulness.csv, aopc.csv, faithfulness.png, summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
