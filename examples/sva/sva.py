"""Subject-verb agreement: a small grammar with agreement attractors, a word tokenizer and a 6-layer encoder.

The data set of Abnar & Zuidema's Table 1 (Linzen et al.'s sentences) is not redistributable here, so this
builds its own, deterministic from a seed. A sentence is the prefix up to its main verb; the label is the
verb's number, which is the subject's::

    [CLS] in the old houses the key to the cabinets that the men like   -> singular ("... is")

- an optional preamble (an adverb, or a prepositional phrase with a noun of its own) comes before the
  subject, so "the first noun" is not always the subject;
- the subject is a noun phrase (determiner, optional adjective, noun), a coordination of two ("the key and
  the dog": plural whatever their numbers), or a quantified plural ("one of the keys", "each of the keys":
  singular; "two of the keys", "some of the keys": plural);
- 0-3 modifiers follow: prepositional phrases ("to the old cabinets") and relative clauses ("that the men
  like", whose verb agrees with its own noun);
- an **attractor** is a noun after the subject's head and before the verb whose number differs from the
  verb's (Linzen et al., 2016): "cabinets" in "the key to the cabinets", "keys" in "one of the keys", "key"
  in "the key and the dog". Determiners carry no number; only nouns (and relative-clause verbs) do.

The model is a pre-LN transformer encoder (``nn.TransformerEncoder`` with ``norm_first=True``, like the
paper's GPT-2 blocks without the causal mask) whose final ``[CLS]`` embedding feeds a 2-way classifier.
attnflow's ``torch`` adapter captures its ``nn.MultiheadAttention`` layers unmodified.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

SPECIAL = ("[PAD]", "[CLS]", "[UNK]")
PAD, CLS, UNK = 0, 1, 2
NOUNS = (
    ("key", "keys"), ("cabinet", "cabinets"), ("dog", "dogs"), ("author", "authors"), ("table", "tables"),
    ("book", "books"), ("teacher", "teachers"), ("student", "students"), ("car", "cars"), ("house", "houses"),
    ("friend", "friends"), ("picture", "pictures"), ("idea", "ideas"), ("letter", "letters"), ("box", "boxes"),
    ("child", "children"), ("man", "men"), ("woman", "women"), ("city", "cities"), ("river", "rivers"),
    ("painter", "painters"), ("garden", "gardens"), ("window", "windows"), ("bottle", "bottles"),
)
VERBS = (("likes", "like"), ("sees", "see"), ("wants", "want"), ("finds", "find"), ("loves", "love"))
ADJECTIVES = ("old", "new", "small", "big", "red", "young", "famous", "quiet", "strange", "wooden")
PREPOSITIONS = ("to", "of", "near", "behind", "on", "under", "with", "from", "beside", "for")
DETERMINERS = ("the", "my", "our", "their")
ADVERBS = ("yesterday", "today", "often", "sometimes", "apparently")
QUANTIFIERS = ("one", "each", "two", "some")
WORDS = sorted(
    {w for pair in NOUNS + VERBS for w in pair} | set(ADJECTIVES) | set(PREPOSITIONS) | set(DETERMINERS)
    | set(ADVERBS) | set(QUANTIFIERS) | {"that", "in", "at", "and", "of"}
)
SINGULAR, PLURAL = 0, 1
LABELS = ("singular", "plural")


@dataclasses.dataclass(frozen=True)
class Example:
    words: tuple[str, ...]  # the prefix up to the verb, without [CLS]
    label: int  # the verb's number: 0 singular, 1 plural
    attractors: int  # intervening nouns of the other number
    subject: int  # index of the subject's head in words (its first noun, or its quantifier)


def _noun_phrase(rng: np.random.Generator, number: int) -> list[str]:
    words = [DETERMINERS[rng.integers(len(DETERMINERS))]]
    if rng.random() < 0.5:
        words.append(ADJECTIVES[rng.integers(len(ADJECTIVES))])
    words.append(NOUNS[rng.integers(len(NOUNS))][number])
    return words


def sample(rng: np.random.Generator, modifiers: int | None = None) -> Example:
    """One sentence prefix; ``modifiers`` (0-3) between subject and verb, default uniform."""
    words: list[str] = []
    roll = rng.random()
    if roll < 0.2:
        words.append(ADVERBS[rng.integers(len(ADVERBS))])
    elif roll < 0.4:
        words += [("in", "at")[rng.integers(2)], *_noun_phrase(rng, int(rng.integers(2)))]
    kind = rng.random()
    if kind < 0.15:  # coordination: plural
        first, second = int(rng.integers(2)), int(rng.integers(2))
        words += _noun_phrase(rng, first)
        subject = len(words) - 1
        words += ["and", *_noun_phrase(rng, second)]
        number, attractors = PLURAL, int(second == SINGULAR)
    elif kind < 0.3:  # a quantified plural: the quantifier decides
        quantifier = QUANTIFIERS[rng.integers(len(QUANTIFIERS))]
        subject = len(words)
        words += [quantifier, "of", *_noun_phrase(rng, PLURAL)]
        number = SINGULAR if quantifier in ("one", "each") else PLURAL
        attractors = int(number == SINGULAR)
    else:
        number = int(rng.integers(2))
        words += _noun_phrase(rng, number)
        subject = len(words) - 1
        attractors = 0
    for _ in range(int(rng.integers(4)) if modifiers is None else modifiers):
        other = int(rng.integers(2))
        attractors += other != number
        if rng.random() < 0.7:
            words += [PREPOSITIONS[rng.integers(len(PREPOSITIONS))], *_noun_phrase(rng, other)]
        else:
            words += ["that", *_noun_phrase(rng, other), VERBS[rng.integers(len(VERBS))][other]]
    return Example(tuple(words), number, attractors, subject)


def dataset(size: int, seed: int, *, exclude: set[tuple[str, ...]] | None = None) -> list[Example]:
    """``size`` distinct examples, deterministic from ``seed``, none of whose sentences is in ``exclude``."""
    rng = np.random.default_rng(seed)
    seen = set(exclude or ())
    out: list[Example] = []
    while len(out) < size:
        example = sample(rng)
        if example.words not in seen:
            seen.add(example.words)
            out.append(example)
    return out


class Tokenizer:
    """Word-level: ``[CLS]`` first, ``[UNK]`` for unknown words, padding on the right. It has no mask token
    (as the paper's model), so blank-out uses ``blank="unk"``."""

    pad_token_id, cls_token_id, unk_token_id, mask_token_id = PAD, CLS, UNK, None
    all_special_ids = (PAD, CLS, UNK)

    def __init__(self, words: tuple[str, ...] | list[str] = tuple(WORDS)):
        self.vocabulary = list(SPECIAL) + [w for w in words if w not in SPECIAL]
        self.ids = {w: i for i, w in enumerate(self.vocabulary)}

    def __len__(self) -> int:
        return len(self.vocabulary)

    def encode(self, sentences: list[tuple[str, ...]]) -> tuple[np.ndarray, np.ndarray]:
        """``(input_ids, attention_mask)``, int64 ``(batch, longest + 1)``."""
        length = max(len(s) for s in sentences) + 1
        ids = np.full((len(sentences), length), PAD, dtype=np.int64)
        mask = np.zeros_like(ids)
        for b, words in enumerate(sentences):
            ids[b, : len(words) + 1] = [CLS, *(self.ids.get(w, UNK) for w in words)]
            mask[b, : len(words) + 1] = 1
        return ids, mask

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self.vocabulary[int(i)] for i in ids]

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({"vocabulary": self.vocabulary}, indent=0))

    @classmethod
    def load(cls, path: Path) -> Tokenizer:
        tokenizer = cls()
        tokenizer.vocabulary = json.loads(path.read_text())["vocabulary"]
        tokenizer.ids = {w: i for i, w in enumerate(tokenizer.vocabulary)}
        return tokenizer


@dataclasses.dataclass(frozen=True)
class Config:
    vocab_size: int
    layers: int = 6
    width: int = 64
    heads: int = 4
    feedforward: int = 256
    max_length: int = 40
    dropout: float = 0.1


def build_model(config: Config):
    """The classifier: token + position embeddings, ``config.layers`` pre-LN encoder layers, a final norm and a
    linear layer on ``[CLS]``. ``model(input_ids, attention_mask)`` returns ``(batch, 2)`` logits."""
    import torch

    class SVAModel(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = config
            self.tokens = torch.nn.Embedding(config.vocab_size, config.width)
            self.positions = torch.nn.Embedding(config.max_length, config.width)
            layer = torch.nn.TransformerEncoderLayer(
                config.width, config.heads, config.feedforward, config.dropout, activation="gelu", batch_first=True,
                norm_first=True,
            )
            self.encoder = torch.nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
            self.norm = torch.nn.LayerNorm(config.width)
            self.classifier = torch.nn.Linear(config.width, 2)

        def get_input_embeddings(self) -> torch.nn.Module:
            return self.tokens

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            x = self.tokens(input_ids) + self.positions(positions)[None]
            padding = None if attention_mask is None else attention_mask == 0
            hidden = self.encoder(x, src_key_padding_mask=padding)
            return self.classifier(self.norm(hidden[:, 0]))

    return SVAModel()


def save(model, tokenizer: Tokenizer, directory: Path) -> None:
    """``model.safetensors`` (weights only, no pickle), ``config.json`` and ``vocab.json``."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(dataclasses.asdict(model.config), indent=1))
    tokenizer.save(directory / "vocab.json")


def load(directory: Path):
    """``(model, tokenizer)`` saved by :func:`save`, in eval mode."""
    from safetensors.torch import load_file

    config = Config(**json.loads((directory / "config.json").read_text()))
    model = build_model(config)
    model.load_state_dict(load_file(str(directory / "model.safetensors")))
    return model.eval(), Tokenizer.load(directory / "vocab.json")
