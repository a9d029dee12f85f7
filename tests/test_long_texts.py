"""An over-long text is measured on a bounded prefix, never tokenised whole (issue 20, D11): truncation gives
the same ids as truncating the whole text, and a refusal comes without tokenising the whole line."""

from __future__ import annotations

import numpy as np
import pytest

import attnflow

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["##s"]


class Spy:
    """The real tokenizer, recording the longest text it was asked to tokenise."""

    def __init__(self, tokenizer):
        self.tokenizer, self.longest = tokenizer, 0

    def __call__(self, texts=None, *args, **kwargs):
        items = [texts] if isinstance(texts, str) else list(texts or [])
        self.longest = max([self.longest, *map(len, items)])
        return self.tokenizer(texts, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


@pytest.fixture()
def tokenizer():
    from transformers import BertTokenizer

    tok = BertTokenizer(vocab={token: i for i, token in enumerate(VOCAB)})
    tok.model_max_length = 40
    return tok


def long_text(words: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    return " ".join("".join(rng.choice(letters, size=rng.integers(1, 4))) + ("s" if rng.random() < 0.2 else "")
                    for _ in range(words))


def test_truncation_equals_truncating_the_whole_text(tokenizer):
    adapter = attnflow.get_adapter("transformers")
    texts = [long_text(12_000, seed=1), "a b c", long_text(8_000, seed=2)]
    spy = Spy(tokenizer)
    encoded = adapter.encode(spy, texts, max_length=24)
    whole = tokenizer(texts, padding=True, truncation=True, max_length=24, return_tensors="pt")
    assert encoded["input_ids"].tolist() == whole["input_ids"].tolist()
    assert encoded["attention_mask"].tolist() == whole["attention_mask"].tolist()
    assert spy.longest < 5_000 < min(len(texts[0]), len(texts[2]))


def test_an_over_long_text_is_refused_without_tokenising_it_whole(tokenizer):
    adapter = attnflow.get_adapter("transformers")
    spy = Spy(tokenizer)
    text = long_text(50_000, seed=3)
    with pytest.raises(attnflow.OptionError, match=r"Text 1 \(.* characters\) is more than 40 tokens long"):
        adapter.encode(spy, ["a b", text])
    assert spy.longest < 5_000
    with pytest.raises(attnflow.OptionError, match="Text 0 is 42 tokens long"):  # just over: counted exactly
        adapter.encode(tokenizer, [" ".join("abcdefghijklmnopqrstuvwxyz"[i % 26] for i in range(40))])


def test_batch_with_no_valid_line_exits_non_zero(tmp_path, capsys):
    """issue 20, D10: nothing valid to do is a failure, not a success with zero rows."""
    from attnflow.cli import main

    path = tmp_path / "in.jsonl"
    path.write_text('{"nope": 1}\nnot json\n')
    assert main(["batch", str(path), "--out", str(tmp_path / "out"), "--no-progress"]) == 1
    assert "has no valid line" in capsys.readouterr().err
