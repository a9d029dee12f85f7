"""Reduced keys (SegFormer's spatial-reduction attention): refused with the cause, and the advice it gives
(capture the stages whose keys are their own tokens) works and equals the model's own attention."""

from __future__ import annotations

import numpy as np
import pytest

import attnflow


def _segformer():
    import torch
    import transformers

    torch.manual_seed(0)
    return transformers.SegformerModel(transformers.SegformerConfig(
        num_channels=3, num_encoder_blocks=2, depths=[1, 2], sr_ratios=[2, 1], hidden_sizes=[8, 12],
        patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2],
    )).eval()


def test_spatial_reduction_is_refused_and_the_advice_captures_the_rest():
    import torch

    model = _segformer()
    pixels = torch.randn(2, 3, 40, 24, generator=torch.Generator().manual_seed(1))  # stage grids 10x6, 5x3
    with pytest.raises(attnflow.AdapterError) as caught:
        attnflow.capture(model, pixel_values=pixels)
    message = str(caught.value)
    assert "runs spatial-reduction attention (stages.0.blocks.0.attention reduces its keys by 2)" in message
    assert "keys are not its tokens" in message
    advice = "adapter_options={'modules': ['stages.1.blocks.0.attention', 'stages.1.blocks.1.attention']}"
    assert advice in message
    trace = attnflow.capture(
        model, pixel_values=pixels,
        adapter_options={"modules": ["stages.1.blocks.0.attention", "stages.1.blocks.1.attention"]},
    )
    reference = model.__class__(model.config).eval()
    reference.load_state_dict(model.state_dict())
    reference.set_attn_implementation("eager")
    with torch.no_grad():
        own = reference(pixel_values=pixels, output_attentions=True).attentions
    assert trace.num_layers == 2 and own[0].shape[-1] == 60 // 4  # stage 0: 60 patches over 15 pooled keys
    for layer, weights in zip(trace.layers, own[1:]):
        assert layer.weights.shape == (2, 2, 15, 15)
        np.testing.assert_allclose(layer.weights, weights.numpy(), atol=1e-6, rtol=0)
