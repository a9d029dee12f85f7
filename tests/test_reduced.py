"""Reduced keys (SegFormer's spatial-reduction attention): each block's patch queries over its pooled keys, the
pooled keys a stream of their own linked to the patches they pool (1/sr² each), stages linked by the
overlapping patch embedding's receptive field; equal to the model's own attention, and rollout routed through
the links equal to an independent hand-written rollout."""

from __future__ import annotations

import numpy as np
import pytest

import attnflow


def _segformer():
    import torch
    import transformers

    torch.manual_seed(0)
    return transformers.SegformerModel(transformers.SegformerConfig(
        num_channels=3, num_encoder_blocks=2, depths=[2, 3], sr_ratios=[2, 1], hidden_sizes=[8, 12],
        patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2],
    )).eval()


def _pixels():
    import torch

    return torch.randn(2, 3, 40, 24, generator=torch.Generator().manual_seed(1))  # stage grids 10x6, 5x3


def _own_attentions(model, pixels):
    import torch

    reference = model.__class__(model.config).eval()
    reference.load_state_dict(model.state_dict())
    reference.set_attn_implementation("eager")
    with torch.no_grad():
        return [a.numpy() for a in reference(pixel_values=pixels, output_attentions=True).attentions]


def _pool(height, width, ratio):
    """Independently: pooled key k covers the patches whose (row // ratio, column // ratio) is k's cell."""
    cols = width // ratio
    out = np.zeros(((height // ratio) * cols, height * width))
    for h in range(height // ratio * ratio):
        for w in range(cols * ratio):
            out[(h // ratio) * cols + w // ratio, h * width + w] = 1 / ratio**2
    return out


def _receptive(before, after, kernel, stride):
    """Independently: stage-1 patch (a, b) reads stage-0 patches whose padded coordinate lies in its kernel."""
    (height, width), (rows, cols) = before, after
    out = np.zeros((rows * cols, height * width))
    for a in range(rows):
        for b in range(cols):
            inside = [
                (h, w) for h in range(height) for w in range(width)
                if 0 <= h + kernel // 2 - a * stride < kernel and 0 <= w + kernel // 2 - b * stride < kernel
            ]
            for h, w in inside:
                out[a * cols + b, h * width + w] = 1 / len(inside)
    return out


@pytest.fixture(scope="module")
def captured():
    model, pixels = _segformer(), _pixels()
    return attnflow.capture(model, pixel_values=pixels), _own_attentions(model, pixels)


def test_spatial_reduction_is_patches_over_a_linked_stream_of_pooled_keys(captured):
    trace, own = captured
    assert list(trace.streams) == ["stage0.keys0", "stage0", "stage0.keys1", "stage1"]
    assert trace.streams["stage0"].grid == (10, 6) and trace.streams["stage0.keys1"].grid == (5, 3)
    assert trace.streams["stage1"].grid == (5, 3)
    expected = [("stage0", "stage0.keys0", "cross"), ("stage0", "stage0.keys1", "cross")] + [("stage1",) * 2 + ("self",)] * 3
    assert [(la.query_stream, la.key_stream, la.kind) for la in trace.layers] == expected
    assert len(own) == trace.num_layers == 5
    for layer, weights in zip(trace.layers, own):
        assert layer.weights.shape == weights.shape
        np.testing.assert_array_equal(layer.weights, weights)  # exactly the model's own
    assert own[0].shape[-2:] == (60, 15)
    links = {(link.stream, link.source): link for link in trace.links}
    assert {key: link.depth for key, link in links.items()} == {
        ("stage0.keys0", "stage0"): 0, ("stage0.keys1", "stage0"): 1, ("stage1", "stage0"): 2,
    }
    for name in ("stage0.keys0", "stage0.keys1"):
        np.testing.assert_array_equal(links[name, "stage0"].weights[1], _pool(10, 6, 2))
    np.testing.assert_allclose(links["stage1", "stage0"].weights[0], _receptive((10, 6), (5, 3), 3, 2), atol=1e-15)
    assert trace.default_stream() == "stage1"


def _hand_rollout(trace, b, r=0.5):
    """Rollout written out: a reduced block is r·I + (1-r)·A·P (queries keep their residual, the attention
    goes to the pooled keys, each pooled key to its patches), a full block r·I + (1-r)·A, the stage link E."""
    layers = trace.layers

    def step(attention, to_keys):  # the residual and the attention, each row renormalised (float32 rows sum to 1 ± 1e-7)
        n = attention.shape[0]
        total = r + (1 - r) * attention.sum(-1, keepdims=True)
        return (r * np.eye(n) + (1 - r) * attention @ to_keys) / total

    pool = [link.weights[b] for link in trace.links if link.stream.startswith("stage0.keys")]
    embed = next(link.weights[b] for link in trace.links if link.stream == "stage1")
    stage0 = np.eye(60)
    for layer, p in zip(layers[:2], pool):
        stage0 = step(layer.weights[b].mean(0).astype(np.float64), p) @ stage0
    stage1 = np.eye(15)
    for layer in layers[2:]:
        stage1 = step(layer.weights[b].mean(0).astype(np.float64), np.eye(15)) @ stage1
    return stage1 @ embed @ stage0, stage0


def _routes_key_only_links() -> bool:
    """Whether attnflow's network feeds a stream that is only ever attended to (never a query) through its link."""
    from attnflow import AttentionTrace, LayerAttention, Link, Stream

    weights = np.full((1, 1, 2, 1), 1.0)
    trace = AttentionTrace(
        [LayerAttention(weights, "a", kind="cross", query_stream="q", key_stream="k")],
        streams=[Stream("q"), Stream("k")], links=[Link("k", "q", 0, np.full((1, 1, 2), 0.5))],
    )
    return float(attnflow.rollout(trace, stream="q").sum()) > 1.5


def test_rollout_from_a_patch_reaches_the_patches_through_the_pooled_links(captured):
    trace, _ = captured
    for b in range(2):
        expected, expected0 = _hand_rollout(trace, b)
        np.testing.assert_allclose(attnflow.rollout(trace)[b], expected, atol=1e-9, rtol=0)
        np.testing.assert_allclose(attnflow.rollout(trace, stream="stage0")[b], expected0, atol=1e-9, rtol=0)
        np.testing.assert_allclose(expected.sum(-1), 1.0, atol=1e-12)


def test_a_stream_only_attended_to_is_fed_by_its_link():
    """Core routing: a linked stream that no layer reads as queries (pooled keys) still takes its link's mass."""
    assert _routes_key_only_links()
