"""Abnar & Zuidema's Table 1 and 2 on the subject-verb agreement model, and a leaderboard of every method:
Spearman's ρ between each method's scores of [CLS] (every layer) and the importance of the input tokens by
blank-out and by input gradients, over held-out sentences.

    python examples/sva/train.py --out sva-out
    python examples/sva/evaluate.py --model sva-out --examples 2000

As in the paper: the target is the predicted probability of the correct class; blank-out replaces one token
at a time by [UNK]; scores are those of [CLS], heads averaged, rollout and flow with residual 0.5.

Every method the ``torch`` adapter can capture for this model is explained (``--methods all``, the default:
``attnflow.capture(..., methods="all")`` and ``attnflow.explain(trace, "all", all_layers=True)``; the methods
it cannot serve are listed as skipped, with the reason) and ranked per reference by
:meth:`attnflow.FaithfulnessReport.leaderboard` (last-layer ρ and mean ρ over layers with 95% bootstrap
intervals over sentences, AOPC comprehensiveness and sufficiency) with the verdict of
:meth:`~attnflow.FaithfulnessReport.lead`. Special tokens ([CLS]) are left out of the rankings and the removal
curves by default, as :func:`attnflow.faithfulness` does (``--special include`` keeps them). The paper-layout
tables keep [CLS] among the compared tokens, as the paper did, whatever ``--special`` says.

Writes ``MODEL/faithfulness/``: ``faithfulness.csv`` (the long per-layer table of every method),
``aopc.csv``, ``faithfulness.png`` (per layer), ``leaderboard.csv`` (columns
:data:`attnflow.evaluate.LEADERBOARD_COLUMNS`) and ``leaderboard.png``, all with special tokens as
``--special`` says, and ``summary.json`` (with the paper-layout means, [CLS] included, as ``paper_spearman``);
prints the tables beside the paper's, then the leaderboards.
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
from attnflow.evaluate import LEADERBOARD_COLUMNS, format_leaderboard, plot_leaderboard  # noqa: E402

PAPER_METHODS = ("raw", "rollout", "flow")

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
    parser.add_argument("--methods", default="all",
                        help="comma-separated methods, or 'all' (default): every method the torch adapter can "
                             "capture for this model; raw, rollout and flow are always added for the paper's tables")
    parser.add_argument("--special", choices=("exclude", "include"), default="exclude",
                        help="special tokens ([CLS]) in the leaderboard's rankings and removal curves: exclude "
                             "(default, as attnflow.faithfulness) or include (as the paper)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the random baseline and of the bootstrap intervals (default 0)")
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

    methods = args.methods if args.methods.strip() == "all" else list(dict.fromkeys(
        [*PAPER_METHODS, *(m.strip() for m in args.methods.split(",") if m.strip())]))
    special = args.special == "include"
    # the gradient of the target with respect to the attention, for the methods that need it (grad_rollout,
    # attn_grad), where the adapter can record it; an explicit target= asks for it whatever the methods
    gradients = "attn_grad" in attnflow.get_adapter("torch").captures

    start = time.perf_counter()
    reports, paper_reports, skipped = [], [], {}
    for first in range(0, len(examples), args.batch_size):
        batch = examples[first : first + args.batch_size]
        ids, mask = tokenizer.encode([e.words for e in batch])
        inputs = {"input_ids": torch.as_tensor(ids), "attention_mask": torch.as_tensor(mask)}
        labels = torch.as_tensor([e.label for e in batch])

        def correct_class_probability(logits, items=None, labels=labels):  # rows are variants of items
            rows = torch.arange(len(labels)) if items is None else torch.as_tensor(items)
            return logits.softmax(-1)[torch.arange(len(rows)), labels[rows]]

        target = {"target": correct_class_probability} if gradients else {}
        trace = attnflow.capture(model, tokens=tokenizer, adapter="torch", methods=methods, **target, **inputs)
        explanation = attnflow.explain(trace, methods, sources=[0], all_layers=True)
        skipped.update(explanation.skipped)
        report = attnflow.faithfulness(
            model, explanation, target=correct_class_probability, blank="unk", tokenizer=tokenizer, special=special,
            seed=args.seed, **inputs)
        reports.append(report)
        if not special:  # the paper's tables keep [CLS] among the compared tokens: correlations only
            paper_reports.append(attnflow.faithfulness(
                model, explanation, target=correct_class_probability, blank="unk", tokenizer=tokenizer,
                special=True, curves=False, seed=args.seed, **inputs))
        print(f"\r{first + len(batch)}/{len(examples)} sentences ({time.perf_counter() - start:.0f} s)", end="",
              file=sys.stderr, flush=True)
    print(file=sys.stderr)
    report = attnflow.FaithfulnessReport.concat(reports)
    paper = attnflow.FaithfulnessReport.concat(paper_reports) if paper_reports else report
    seconds = time.perf_counter() - start
    compared = [m for m in report.methods if m != "random"]
    boards = {reference: report.leaderboard(reference, seed=args.seed) for reference in report.references}
    verdicts = {reference: report.lead(reference, seed=args.seed) for reference in report.references}

    print(f"SVA model: held-out accuracy {trained['accuracy']:.4f} (n={trained['n']}); by attractors: " + ", ".join(
        f"{a}: {v['accuracy']:.4f} (n={v['n']})" for a, v in trained["by_attractors"].items()))
    if "longer" in trained:
        print(f"  longer than training (4-5 modifiers): {trained['longer']['accuracy']:.4f} (n={trained['longer']['n']})")
    print(f"faithfulness over {report.batch_size} held-out sentences in {seconds:.0f} s; target: probability of the "
          "correct class; blank-out by [UNK]")
    print(f"methods ({'all the torch adapter can capture' if methods == 'all' else 'asked for'}): {', '.join(compared)}, "
          "and the random baseline")
    for method, reason in skipped.items():
        print(f"  skipped {method}: {reason}")
    print("special tokens ([CLS]): " + ("included in" if special else "excluded from") + " the leaderboard's "
          "rankings and removal curves (--special); included in the paper-layout tables, as the paper\n")
    shown = [m for m in paper.methods if m in PAPER_METHODS or m == "random"]
    for reference in paper.references:
        print(f"Spearman with {reference} (this model, [CLS] included):\n{paper.table(reference, methods=shown)}\n")
    for name, rows in PAPER.items():
        print(f"Abnar & Zuidema Table {1 if name == 'blankout' else 2}, {name} (their model):")
        print("         " + "  ".join(f"L{i + 1:<9}" for i in range(6)))
        for method, cells in rows.items():
            print(f"{method:<8} " + "  ".join(f"{c:<10}" for c in cells))
        print()
    print("AOPC at the last layer (ERASER bins 1/5/10/20/50%; higher comprehensiveness, lower sufficiency = better; "
          "[CLS] " + ("included" if special else "excluded") + "):")
    for method, values in report.aopc.items():
        print(f"  {method:<12} comprehensiveness {values['comprehensiveness']:.3f}  "
              f"sufficiency {values['sufficiency']:.3f}")
    for reference in report.references:
        print("\n" + format_leaderboard(boards[reference], verdicts[reference], special=special))

    with open(out / "faithfulness.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["method", "reference", "layer", "mean", "std", "n"])
        writer.writeheader()
        writer.writerows(report.rows())
    with open(out / "aopc.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["method", "metric", "mean", "std", "n"])
        writer.writeheader()
        writer.writerows(report.aopc_rows())
    with open(out / "leaderboard.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(LEADERBOARD_COLUMNS))
        writer.writeheader()
        writer.writerows(row for rows in boards.values() for row in rows)
    report.plot(out / "faithfulness.png", title=f"SVA model, {report.batch_size} held-out sentences")
    plot_leaderboard([row for rows in boards.values() for row in rows], out / "leaderboard.png",
                     title=f"SVA model, {report.batch_size} held-out sentences, [CLS] "
                           + ("included" if special else "excluded"))
    curves = {m: {k: np.round(v, 4).tolist() for k, v in by.items()} for m, by in report.curves.items()}
    (out / "summary.json").write_text(json.dumps({
        "accuracy": trained, "items": report.batch_size, "seconds": round(seconds, 1), "settings": report.settings,
        "spearman": {m: {r: np.round(v, 4).tolist() for r, v in by.items()} for m, by in report.spearman.items()},
        "aopc": report.aopc, "grid": report.grid, "curves": curves, "special": args.special,
        "skipped": skipped, "paper_spearman": {m: {r: np.round(v, 4).tolist() for r, v in by.items()}
                                               for m, by in paper.spearman.items()},
        "leaderboard": {r: rows for r, rows in boards.items()}, "lead": verdicts,
    }, indent=1, default=_finite))
    print(f"\nwrote {out}/faithfulness.csv, aopc.csv, faithfulness.png, leaderboard.csv, leaderboard.png, summary.json")
    return 0


def _finite(value):
    """JSON for numpy scalars."""
    return value.item() if hasattr(value, "item") else str(value)


if __name__ == "__main__":
    sys.exit(main())
