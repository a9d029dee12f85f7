"""No mask is ever dropped: a padding mask that does not fit the attention's positions is either turned into the
mask the model itself uses (audio models whose convolutional feature extractor turns samples into frames) or
refused, never replaced by "every position is real"."""

from __future__ import annotations

import numpy as np
import pytest

import attnflow
from attnflow import AdapterError, Recorder

SAMPLES, REAL = 200, 130  # conv (10, 5) then (3, 2): 19 frames; 130 real samples give 12 real frames
FRAMES, REAL_FRAMES = 19, 12


def _audio_model(family: str):
    import torch
    import transformers

    torch.manual_seed(0)
    common = dict(
        hidden_size=24, num_hidden_layers=2, num_attention_heads=4, intermediate_size=20, conv_dim=(8, 8),
        conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2,
        feat_extract_norm="layer", vocab_size=10,
    )
    config, model = {
        "wav2vec2": (transformers.Wav2Vec2Config, transformers.Wav2Vec2Model),
        "hubert": (transformers.HubertConfig, transformers.HubertModel),
    }[family]
    return model(config(**common)).eval()


def _frames_expected(model, mask):
    """The frames the model masks, from the convolution lengths written out here: (L - kernel) // stride + 1."""
    lengths = mask.sum(-1)
    for kernel, stride in zip(model.config.conv_kernel, model.config.conv_stride):
        lengths = (lengths - kernel) // stride + 1
    return np.arange(FRAMES)[None, :] < lengths[:, None]


@pytest.mark.parametrize("family", ["wav2vec2", "hubert"])
def test_padded_audio_item_equals_the_item_alone(family):
    import torch

    model = _audio_model(family)
    audio = torch.randn(2, SAMPLES, generator=torch.Generator().manual_seed(1))
    audio[1, REAL:] = 0.0  # padded as the feature extractor pads
    mask = torch.ones(2, SAMPLES, dtype=torch.long)
    mask[1, REAL:] = 0
    padded = attnflow.capture(model, input_values=audio, attention_mask=mask)
    alone = attnflow.capture(model, input_values=audio[1:, :REAL])
    np.testing.assert_array_equal(padded.mask, _frames_expected(model, mask.numpy()))
    assert padded.mask[1].sum() == REAL_FRAMES and alone.mask.shape == (1, REAL_FRAMES)
    for layer, single in zip(padded.layers, alone.layers):
        np.testing.assert_allclose(
            layer.weights[1, :, :REAL_FRAMES, :REAL_FRAMES], single.weights[0], atol=1e-5, rtol=0
        )
        assert np.all(layer.weights[1, :, :REAL_FRAMES, REAL_FRAMES:] == 0.0)
    both = attnflow.explain(padded, ["rollout", "flow"], sources=[-1])
    one = attnflow.explain(alone, ["rollout", "flow"], sources=[-1])
    for method in ("rollout", "flow"):
        item, single = np.asarray(both[method])[1], np.asarray(one[method])[0]
        np.testing.assert_allclose(item[..., :REAL_FRAMES], single, atol=1e-5, rtol=0, err_msg=method)
        assert np.all(item[..., REAL_FRAMES:] == 0.0), f"{method} sends flow to padded frames"


def test_a_mask_that_does_not_fit_is_refused_not_dropped():
    rng = np.random.default_rng(0)
    weights = rng.random((2, 3, 5, 5))
    weights /= weights.sum(-1, keepdims=True)
    rec = Recorder(framework="numpy", adapter="test")
    rec.start_call(mask=np.ones((2, 40), int))
    rec.record("layer", weights)
    with pytest.raises(AdapterError) as caught:
        rec.end_call()
    message = str(caught.value)
    assert "padding mask of stream 'tokens' has shape (2, 40)" in message
    assert "its 5 positions" in message and "never drops a mask" in message
    assert "Capture the items one at a time" in message


def test_a_mask_over_the_positions_still_fits_sequence_first():
    weights = np.full((2, 3, 4, 4), 0.25)
    rec = Recorder(framework="numpy", adapter="test")
    rec.start_call(mask=np.ones((4, 2), int))
    rec.record("layer", weights)
    rec.end_call()
    assert rec.trace.mask.shape == (2, 4)
