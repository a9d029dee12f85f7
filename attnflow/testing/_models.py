"""Tiny models for adapter tests, with a distinct prime size on every axis so a swapped axis fails.

Sizes: batch 2, tokens 7 (decoder 5), heads 3, head size 5 (hidden 15), layers 3 (decoder 2), feed-forward
11, vocabulary 13. Each ``*_model()`` builds a fresh randomly initialised model in eval mode (frameworks
are imported when called) and its ``*_inputs(model)`` a padded batch as ``(args, kwargs)``.
"""

from __future__ import annotations

from typing import Any

from ..recording._adapter import import_optional

BATCH, TOKENS, DECODER_TOKENS, HEADS, HEAD_SIZE, LAYERS, DECODER_LAYERS, FFN, VOCAB = 2, 7, 5, 3, 5, 3, 2, 11, 13
HIDDEN = HEADS * HEAD_SIZE


def torch_encoder(seed: int = 0) -> Any:
    """``torch.nn.TransformerEncoder`` of ``nn.MultiheadAttention`` layers (batch first)."""
    torch = import_optional("torch", "torch")

    torch.manual_seed(seed)
    layer = torch.nn.TransformerEncoderLayer(HIDDEN, HEADS, dim_feedforward=FFN, dropout=0.0, batch_first=True)
    return torch.nn.TransformerEncoder(layer, num_layers=LAYERS, enable_nested_tensor=False).eval()


def torch_encoder_inputs(model: Any, seed: int = 1) -> tuple[tuple, dict]:
    torch = import_optional("torch", "torch")

    generator = torch.Generator().manual_seed(seed)
    padding = torch.zeros(BATCH, TOKENS, dtype=torch.bool)
    padding[1, 5:] = True
    return (torch.randn(BATCH, TOKENS, HIDDEN, generator=generator),), {"src_key_padding_mask": padding}


def bert(seed: int = 0) -> Any:
    """A tiny Hugging Face ``BertModel`` as loaded by default (SDPA attention)."""
    torch = import_optional("torch", "torch")
    transformers = import_optional("transformers", "transformers")

    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=FFN, max_position_embeddings=16, initializer_range=0.3,
    )
    return transformers.BertModel(config).eval()


def text_inputs(model: Any, seed: int = 2) -> tuple[tuple, dict]:
    """``input_ids`` and a right-padded ``attention_mask`` of (BATCH, TOKENS)."""
    torch = import_optional("torch", "torch")

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (BATCH, TOKENS), generator=generator)
    mask = torch.ones(BATCH, TOKENS, dtype=torch.long)
    mask[1, 5:] = 0
    return (), {"input_ids": ids, "attention_mask": mask}


def t5(seed: int = 0) -> Any:
    """A tiny Hugging Face ``T5Model`` (encoder-decoder) as loaded by default."""
    torch = import_optional("torch", "torch")
    transformers = import_optional("transformers", "transformers")

    torch.manual_seed(seed)
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=HIDDEN, d_kv=HEAD_SIZE, d_ff=FFN, num_layers=LAYERS,
        num_decoder_layers=DECODER_LAYERS, num_heads=HEADS, decoder_start_token_id=0, pad_token_id=0,
    )
    return transformers.T5Model(config).eval()


def seq2seq_inputs(model: Any, seed: int = 3) -> tuple[tuple, dict]:
    """Encoder ``input_ids``/``attention_mask`` (TOKENS) and decoder ones (DECODER_TOKENS), right-padded."""
    torch = import_optional("torch", "torch")

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (BATCH, TOKENS), generator=generator)
    mask = torch.ones(BATCH, TOKENS, dtype=torch.long)
    mask[1, 5:] = 0
    decoder = torch.randint(1, VOCAB, (BATCH, DECODER_TOKENS), generator=generator)
    decoder_mask = torch.ones(BATCH, DECODER_TOKENS, dtype=torch.long)
    decoder_mask[1, 4:] = 0
    return (), {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": decoder,
                "decoder_attention_mask": decoder_mask}
