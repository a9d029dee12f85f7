"""Train a small GPT-2-style decoder on the Python standard library's own docstrings, on CPU.

No decoder weights ship with attnflow, and random weights give near-uniform attention, which says nothing
about what flow does on a real model. This script trains one in a few minutes: a byte-level BPE tokenizer
(2,048 tokens) and a GPT-2 (12 layers, 4 heads, width 96, 128 positions) trained on text every Python
installation has. Each training sequence starts with the ``<|endoftext|>`` token, so the model can learn the
attention sink on the first token that real decoders show; at 800 steps it is weak (the strongest head per
layer puts up to 0.28 of its attention there on a 53-token docstring, 7x a uniform share; pretrained decoders
put most of it there). The result is saved with ``save_pretrained``
(safetensors) and loads back by path like any Hugging Face model directory.

Run: python examples/train_decoder.py [--out DIR] [--steps N]   (default: examples/out/docstring-gpt2)
Then: python examples/explain_generation.py
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import math
import time
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

DEFAULT_OUT = Path(__file__).parent / "out" / "docstring-gpt2"
#: Modules whose docstrings make the corpus (documented, pure-Python, present in every installation).
MODULES = (
    "abc argparse ast asyncio base64 bisect calendar collections concurrent.futures configparser contextlib copy csv "
    "dataclasses datetime decimal difflib email enum fnmatch fractions functools getopt gettext glob gzip hashlib "
    "heapq hmac html http.client http.server imaplib inspect io ipaddress itertools json logging mailbox "
    "mimetypes multiprocessing numbers operator optparse os pathlib pickle pprint queue random re sched secrets "
    "selectors shlex shutil smtplib socket socketserver statistics string struct subprocess tarfile tempfile "
    "textwrap threading timeit tokenize traceback turtle typing unittest urllib.parse urllib.request uuid warnings "
    "weakref xml.dom.minidom xml.etree.ElementTree zipfile zoneinfo"
).split()
SEQUENCE = 64
EOT = "<|endoftext|>"


def docstrings() -> list[str]:
    """Every docstring of the modules above, their classes and functions, in a fixed order."""
    texts: list[str] = []
    seen: set[int] = set()
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # e.g. turtle without tkinter
            continue
        objects = [module] + [value for _, value in sorted(vars(module).items()) if inspect.isclass(value) or inspect.isfunction(value)]
        for obj in objects:
            for member in [obj] + ([v for _, v in sorted(vars(obj).items()) if inspect.isfunction(v)] if inspect.isclass(obj) else []):
                doc = inspect.getdoc(member)
                if doc and id(doc) not in seen and len(doc) > 40:
                    seen.add(id(doc))
                    texts.append(" ".join(doc.split()))
    return texts


def train_tokenizer(texts: list[str], out: Path) -> transformers.PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2048, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=EOT, eos_token=EOT, pad_token=EOT, model_max_length=128,
    )
    fast.save_pretrained(out)
    return fast


def batches(ids: torch.Tensor, batch: int, generator: torch.Generator):
    while True:
        starts = torch.randint(0, ids.numel() - SEQUENCE, (batch,), generator=generator)
        yield torch.stack([ids[s:s + SEQUENCE] for s in starts.tolist()])


def train(out: Path = DEFAULT_OUT, steps: int = 800, batch: int = 16, seed: int = 0) -> Path:
    """Train and save the model and tokenizer to ``out``; returns ``out``."""
    torch.manual_seed(seed)
    torch.set_num_threads(1)  # small matrices: one thread is as fast, and does not thrash a busy machine
    out.mkdir(parents=True, exist_ok=True)
    texts = docstrings()
    tokenizer = train_tokenizer(texts, out)
    # every text starts with <|endoftext|>, so the token the model sees first is always the same one
    ids = torch.tensor([t for text in texts for t in [tokenizer.bos_token_id] + tokenizer(text)["input_ids"]])
    held_out = ids[-20_000:]
    ids = ids[:-20_000]
    config = transformers.GPT2Config(
        vocab_size=len(tokenizer), n_positions=128, n_embd=96, n_layer=12, n_head=4, n_inner=384,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    model = transformers.GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    model.train()
    for step, x in zip(range(steps), batches(ids, batch, generator)):
        x = torch.cat([torch.full((batch, 1), tokenizer.bos_token_id), x[:, 1:]], dim=1)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {loss.item():.3f}  {time.perf_counter() - start:6.0f} s", flush=True)
    model.eval()
    with torch.no_grad():
        chunks = held_out[: (held_out.numel() // SEQUENCE) * SEQUENCE].view(-1, SEQUENCE)[:64]
        chunks[:, 0] = tokenizer.bos_token_id
        held = model(input_ids=chunks, labels=chunks).loss.item()
    print(f"held-out loss {held:.3f} (perplexity {math.exp(held):.1f}; uniform would be {len(tokenizer)})")
    model.save_pretrained(out, safe_serialization=True)
    print(f"saved to {out} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, "
          f"{len(texts)} docstrings, {ids.numel()} training tokens, {time.perf_counter() - start:.0f} s)")
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--steps", type=int, default=800)
    args = parser.parse_args()
    train(args.out, args.steps)
