"""The Table-1 layout for the packaged all-MiniLM-L6-v2 (a sentence-embedding model, offline).

    python examples/sva/minilm.py --examples 200

MiniLM has no classifier and its checkpoint has no masked-LM head (the sentence-transformers export keeps the
encoder only), so neither a class logit nor a masked token's logit exists to explain. What the model is used
for is its sentence embedding: the mean of the last hidden states over the real tokens. The target is
therefore the cosine similarity of that embedding to the unablated one (``target="embedding"``, attnflow's
default for models without logits), and each method's scores are the mean over all explained tokens
(``source="mean"``), matching the pooling. Blank-out uses [MASK]. Its input gradients are those of the
embedding itself (the cosine's gradient is 0 at the unablated input): ``‖P ∂v/∂e_j‖_F`` and
``‖P (∂v/∂e_j) e_j‖`` with ``P`` the projection off the embedding's own direction — one backward pass per
embedding dimension (384), the slow part.

The sentences are complete sentences from the subject-verb agreement grammar (``sva.py``: "The keys to the
old cabinet are on the table."), deterministic from ``--seed``.
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

import attnflow  # noqa: E402

COMPLEMENTS = ("on the table", "very old", "here", "broken", "in the garden", "famous", "near the river", "new")


def sentences(count: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    for example in sva.dataset(count, seed):
        verb = ("is", "are")[example.label]
        complement = COMPLEMENTS[rng.integers(len(COMPLEMENTS))]
        text = " ".join((*example.words, verb, complement))
        out.append(text[0].upper() + text[1:] + ".")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--references", default="blankout,grad_norm,grad_x_input")
    parser.add_argument("--no-special", action="store_true", help="leave [CLS] and [SEP] out of the compared tokens")
    parser.add_argument("--out", default="minilm-faithfulness", help="output directory (default minilm-faithfulness/)")
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(args.threads)
    directory = attnflow.packaged_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModel.from_pretrained(directory).eval()
    texts = sentences(args.examples, args.seed)
    references = [r for r in args.references.split(",") if r]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    reports = []
    for first in range(0, len(texts), args.batch_size):
        inputs = dict(tokenizer(texts[first : first + args.batch_size], return_tensors="pt", padding=True))
        trace = attnflow.capture(model, tokens=tokenizer, **inputs)
        explanation = attnflow.explain(trace, ["raw", "rollout", "flow"], all_layers=True)  # every token explained
        reports.append(attnflow.faithfulness(model, explanation, target="embedding", source="mean", blank="mask",
                                             tokenizer=tokenizer, references=references,
                                             special=not args.no_special, **inputs))
        print(f"\r{min(first + args.batch_size, len(texts))}/{len(texts)} sentences "
              f"({time.perf_counter() - start:.0f} s)", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    report = attnflow.FaithfulnessReport.concat(reports)
    seconds = time.perf_counter() - start
    print(f"all-MiniLM-L6-v2, {report.batch_size} sentences, {seconds:.0f} s; target: {report.settings['target']}; "
          f"scores: mean over the explained tokens; blank-out by [MASK]; special tokens "
          f"{'left out' if args.no_special else 'compared'}\n")
    for reference in report.references:
        print(f"Spearman with {reference}:\n{report.table(reference)}\n")
    if report.comprehensiveness:
        print("AOPC at the last layer (ERASER bins; higher comprehensiveness, lower sufficiency = better):")
        for method, values in report.aopc.items():
            print(f"  {method:<8} comprehensiveness {values['comprehensiveness']:.4f}  "
                  f"sufficiency {values['sufficiency']:.4f}")
    with open(out / "faithfulness.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["method", "reference", "layer", "mean", "std", "n"])
        writer.writeheader()
        writer.writerows(report.rows())
    report.plot(out / "faithfulness.png", title=f"all-MiniLM-L6-v2, {report.batch_size} sentences")
    (out / "summary.json").write_text(json.dumps({
        "items": report.batch_size, "seconds": round(seconds, 1), "settings": report.settings,
        "spearman": {m: {r: np.round(v, 4).tolist() for r, v in by.items()} for m, by in report.spearman.items()},
        "aopc": report.aopc,
    }, indent=1))
    print(f"\nwrote {out}/faithfulness.csv, faithfulness.png, summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
