"""Small synthetic traces for the picture and page tests: an encoder with special tokens and padding, a
decoder (causal), and an encoder-decoder. No model needed; every value is known."""

from __future__ import annotations

import numpy as np
from test_streams import softmax_rows as softmax  # random attention rows, masked (and causal) as asked

import attnflow

WORDS = ["[CLS]", "the", "keys", "to", "the", "cab", "##inet", "are", "on", "the", "table", ".", "[SEP]"]


def encoder_trace(seed: int = 0, layers: int = 3, heads: int = 2) -> attnflow.AttentionTrace:
    """Two items: the 13-token sentence, and a 9-token one padded to 13; CLS/SEP special."""
    rng = np.random.default_rng(seed)
    n = len(WORDS)
    mask = np.ones((2, n), bool)
    mask[1, 9:] = False
    second = ["[CLS]", "a", "cat", "sat", "on", "the", "mat", ".", "[SEP]"] + ["[PAD]"] * 4
    special = np.zeros((2, n), bool)
    special[0, [0, n - 1]] = True
    special[1, [0, 8]] = True
    weights = [softmax(rng, (2, heads, n, n), mask) for _ in range(layers)]
    return attnflow.AttentionTrace.from_arrays(weights, tokens=[WORDS, second], mask=mask, special=special,
                                               model_name="synthetic-encoder")


def decoder_trace(seed: int = 1, layers: int = 3) -> attnflow.AttentionTrace:
    """One causal item of 8 tokens, BOS special; the prompt is its first 4 tokens."""
    rng = np.random.default_rng(seed)
    tokens = ["<s>", "Ġthe", "Ġcat", "Ġsat", "Ġon", "Ġthe", "Ġmat", "."]
    n = len(tokens)
    mask = np.ones((1, n), bool)
    special = np.zeros((1, n), bool)
    special[0, 0] = True
    weights = [softmax(rng, (1, 2, n, n), mask, causal=True) for _ in range(layers)]
    return attnflow.AttentionTrace.from_arrays(weights, tokens=[tokens], mask=mask, special=special,
                                               model_name="synthetic-decoder", metadata={"prompt_length": 4})


def seq2seq_trace(seed: int = 2) -> attnflow.AttentionTrace:
    """An encoder (6 tokens, 2 layers) and a decoder (4 tokens, 2 self + 2 cross layers)."""
    rng = np.random.default_rng(seed)
    enc_tokens = ["[CLS]", "das", "ist", "ein", "test", "[SEP]"]
    dec_tokens = ["<s>", "this", "is", "a"]
    enc_mask, dec_mask = np.ones((1, 6), bool), np.ones((1, 4), bool)
    weights = [softmax(rng, (1, 2, 6, 6), enc_mask), softmax(rng, (1, 2, 6, 6), enc_mask)]
    streams = ["encoder", "encoder"]
    for _ in range(2):
        weights.append(softmax(rng, (1, 2, 4, 4), dec_mask, causal=True))
        weights.append(softmax(rng, (1, 2, 4, 6), enc_mask))
        streams += ["decoder", ("decoder", "encoder")]
    enc_special = np.zeros((1, 6), bool)
    enc_special[0, [0, 5]] = True
    return attnflow.AttentionTrace.from_arrays(
        weights, layer_streams=streams, model_name="synthetic-seq2seq",
        streams={"encoder": {"tokens": [enc_tokens], "special": enc_special},
                 "decoder": {"tokens": [dec_tokens], "special": np.eye(1, 4, dtype=bool)}},
    )


def renormalised(row: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """``row[keep]`` divided by its sum: what exclude-special shows."""
    kept = np.asarray(row, dtype=np.float64)[keep]
    return kept / kept.sum()
