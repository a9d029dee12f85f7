"""Banded and block-sparse local attention: Longformer's band placed at its key positions when the model pads its
input to a window multiple on its own (no mask, no global tokens), and BigBird's block-sparse attention refused
with the cause and the fix (the families matrix covers Longformer and LED with padding and global tokens)."""

from __future__ import annotations

import numpy as np
import pytest
from families import WINDOW, _banded_layers, _longformer, _seeded

import attnflow

N = 9  # padded to 12 inside the model


def test_longformer_without_mask_or_globals_is_cropped_to_the_input():
    import torch

    model = _seeded(_longformer)()
    ids = torch.randint(2, 50, (2, N), generator=torch.Generator().manual_seed(3))
    trace = attnflow.capture(model, input_ids=ids)
    real = torch.ones(2, N, dtype=torch.long)
    expected, _ = _banded_layers(model, {"input_ids": ids}, model, (ids, real, torch.zeros_like(real)))
    assert trace.num_layers == len(expected) and trace.mask.shape == (2, N)
    for layer, weights in zip(trace.layers, expected):
        np.testing.assert_allclose(layer.weights, weights.numpy(), atol=1e-6, rtol=0)
        far = np.abs(np.arange(N)[:, None] - np.arange(N)[None, :]) > WINDOW // 2
        assert np.all(layer.weights[..., far] == 0.0)


def _bigbird(kind: str):
    import torch
    import transformers

    torch.manual_seed(0)
    if kind == "pegasus":
        return transformers.BigBirdPegasusModel(transformers.BigBirdPegasusConfig(
            vocab_size=50, d_model=24, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4,
            decoder_attention_heads=2, encoder_ffn_dim=20, decoder_ffn_dim=20, max_position_embeddings=64,
            attention_type="block_sparse", block_size=2, num_random_blocks=1, pad_token_id=0, bos_token_id=1,
            eos_token_id=1, decoder_start_token_id=1,
        )).eval()
    return transformers.BigBirdModel(transformers.BigBirdConfig(
        vocab_size=50, hidden_size=24, num_hidden_layers=2, num_attention_heads=4, intermediate_size=20,
        max_position_embeddings=64, attention_type="block_sparse", block_size=2, num_random_blocks=1,
        sep_token_id=3,
    )).eval()


@pytest.mark.parametrize("kind", ["pegasus", "bigbird"])
def test_block_sparse_attention_is_refused_naming_original_full(kind):
    import torch

    model = _bigbird(kind)
    ids = torch.randint(4, 50, (2, 20), generator=torch.Generator().manual_seed(4))
    inputs = {"input_ids": ids}
    if kind == "pegasus":
        inputs["decoder_input_ids"] = ids[:, :5]
    with pytest.raises(attnflow.AdapterError) as caught:
        attnflow.capture(model, **inputs)
    message = str(caught.value)
    assert "runs block-sparse attention" in message and "attention_type='block_sparse'" in message
    assert 'load it with attention_type="original_full"' in message
    assert "at most 14 tokens" in message  # (5 + 2 * 1 random block) * block size 2, as BigBird decides
    model.config.attention_type = "original_full"  # the advice, followed: a fresh model with full attention
    full = type(model)(model.config).eval()
    trace = attnflow.capture(full, **inputs)
    for layer in trace.layers:
        np.testing.assert_allclose(layer.weights.sum(-1), 1.0, atol=1e-5)
