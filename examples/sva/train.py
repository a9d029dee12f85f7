"""Train the subject-verb agreement classifier on CPU and report held-out accuracy, overall and by attractors.

    python examples/sva/train.py --out sva-out          # ~40k sentences, 4 epochs: a few minutes on 2 cores

Writes ``OUT/model.safetensors`` (weights only), ``OUT/config.json``, ``OUT/vocab.json`` and
``OUT/accuracy.json``. Everything is deterministic from ``--seed`` (data, initialisation, batch order).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sva  # noqa: E402

TEST_SEED_OFFSET = 1000  # held-out sentences come from seed + 1000, minus any sentence seen in training


def held_out(train: list[sva.Example], size: int, seed: int) -> list[sva.Example]:
    return sva.dataset(size, seed + TEST_SEED_OFFSET, exclude={e.words for e in train})


def longer(size: int, seed: int) -> list[sva.Example]:
    """Held-out sentences with 4 or 5 modifiers: longer, and with more attractors, than any in training (0-3)."""
    rng = np.random.default_rng(seed + 2 * TEST_SEED_OFFSET)
    return [sva.sample(rng, modifiers=int(rng.integers(4, 6))) for _ in range(size)]


def accuracy(model, tokenizer: sva.Tokenizer, examples: list[sva.Example], batch: int = 500) -> dict:
    """Overall accuracy and accuracy by number of attractors."""
    import torch

    correct = np.zeros(len(examples), bool)
    with torch.no_grad():
        for start in range(0, len(examples), batch):
            chunk = examples[start : start + batch]
            ids, mask = tokenizer.encode([e.words for e in chunk])
            logits = model(torch.as_tensor(ids), torch.as_tensor(mask))
            correct[start : start + len(chunk)] = logits.argmax(-1).numpy() == [e.label for e in chunk]
    attractors = np.array([e.attractors for e in examples])
    by = {int(a): {"accuracy": float(correct[attractors == a].mean()), "n": int((attractors == a).sum())}
          for a in sorted(set(attractors.tolist()))}
    return {"accuracy": float(correct.mean()), "n": len(examples), "by_attractors": by}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="sva-out", help="directory for the model (default sva-out/)")
    parser.add_argument("--train", type=int, default=40_000, help="training sentences")
    parser.add_argument("--test", type=int, default=4_000, help="held-out sentences for the accuracy")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one is fastest on a busy small machine)")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train = sva.dataset(args.train, args.seed)
    test = held_out(train, args.test, args.seed)
    tokenizer = sva.Tokenizer()
    config = sva.Config(vocab_size=len(tokenizer), width=args.width, heads=args.heads, feedforward=4 * args.width)
    model = sva.build_model(config)
    ids, mask = tokenizer.encode([e.words for e in train])
    labels = torch.as_tensor([e.label for e in train])
    ids, mask = torch.as_tensor(ids), torch.as_tensor(mask)
    steps = args.epochs * ((len(train) + args.batch_size - 1) // args.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train), generator=generator)
        total = 0.0
        for first in range(0, len(train), args.batch_size):
            batch = order[first : first + args.batch_size]
            length = int(mask[batch].sum(1).max())  # trim the padding columns of this batch
            logits = model(ids[batch, :length], mask[batch, :length])
            loss = torch.nn.functional.cross_entropy(logits, labels[batch])
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(batch)
        model.eval()
        held = accuracy(model, tokenizer, test[:1000])
        print(f"epoch {epoch + 1}: loss {total / len(train):.4f}, held-out accuracy {held['accuracy']:.4f} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
    model.eval()
    result = accuracy(model, tokenizer, test)
    result["longer"] = accuracy(model, tokenizer, longer(args.test // 4, args.seed))
    result.update({"train": len(train), "epochs": args.epochs, "seconds": round(time.perf_counter() - start, 1),
                   "config": vars(args)})
    out = Path(args.out)
    sva.save(model, tokenizer, out)
    (out / "accuracy.json").write_text(json.dumps(result, indent=1))
    print(f"held-out accuracy {result['accuracy']:.4f} on {result['n']} sentences; by attractors: " + ", ".join(
        f"{a}: {v['accuracy']:.4f} (n={v['n']})" for a, v in result["by_attractors"].items()))
    long = result["longer"]
    print(f"longer than training (4-5 modifiers): accuracy {long['accuracy']:.4f} on {long['n']}; by attractors: " + ", ".join(
        f"{a}: {v['accuracy']:.4f} (n={v['n']})" for a, v in long["by_attractors"].items()))
    print(f"wrote {out}/model.safetensors, config.json, vocab.json, accuracy.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
