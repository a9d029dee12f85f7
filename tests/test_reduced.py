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


# -- value-side methods on the reduced keys ------------------------------------------------------------------------
# float64, sizes apart on every axis: batch 2, stage grids 12x6 (72 patches) and 6x3 (18), pooled keys 4x2 (8, sr 3),
# heads 3 and 4 of size 4 and 5 (widths 12 and 20), blocks 2 + 2, Mix-FFN widths 24 and 40.
def _segformer64():
    import torch
    import transformers

    torch.manual_seed(2)
    model = transformers.SegformerModel(transformers.SegformerConfig(
        num_channels=3, num_encoder_blocks=2, depths=[2, 2], sr_ratios=[3, 1], hidden_sizes=[12, 20],
        patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[3, 4], mlp_ratios=[2, 2], initializer_range=0.3,
    )).double().eval()
    return model, torch.randn(2, 3, 48, 24, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def _block_inputs(model, pixels):
    """Each block's input ``(hidden, height, width)``, output and own eager attention, per stage and block, from
    hooks on a copy."""
    import copy

    import torch

    reference = copy.deepcopy(model)
    seen, handles = {}, []
    for i, stage in enumerate(reference.stages):
        for j, block in enumerate(stage.blocks):
            def before(module, args, kwargs, key=(i, j)):
                seen[key] = [args[0], args[1], args[2]]

            def after(module, args, kwargs, output, key=(i, j)):
                seen[key].append(output)

            handles += [block.register_forward_pre_hook(before, with_kwargs=True),
                        block.register_forward_hook(after, with_kwargs=True)]
    reference.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = iter(reference(pixel_values=pixels, output_attentions=True).attentions)
    for handle in handles:
        handle.remove()
    for key in sorted(seen):
        seen[key].append(next(attentions))
    return reference, seen


def _block_by_hand(block, x, height, width, attention):
    """One SegFormer block of one item written out in float64 with its own attention ``(H, q, k)``: the keys pooled
    by a stride-sr convolution and a norm, ``f^h(k_j) = v^h_j W_O^h``. Returns ``Σ_h α^h_ij f^h(k_j)``
    ``(q, k, d)``, the stream after attention ``y`` and the block's output ``y + MixFFN(ln2(y))``; the attention
    recomputed from the queries and keys is checked against the model's."""
    import torch
    import torch.nn.functional as F
    from test_value_zeroing import layer_norm

    att, width_d = block.attention, x.shape[-1]
    h = layer_norm(x, block.layernorm_before)
    ratio, keys = att.sequence_reduction_ratio, h
    if ratio > 1:
        pooling = att.sequence_reduction
        image = h.T.reshape(1, width_d, height, width)
        conv = F.conv2d(image, pooling.sequence_reduction.weight, pooling.sequence_reduction.bias, stride=ratio)
        keys = layer_norm(conv.reshape(width_d, -1).T, pooling.layer_norm)
    heads = att.num_attention_heads
    size = width_d // heads
    q, k = F.linear(h, att.q_proj.weight, att.q_proj.bias), F.linear(keys, att.k_proj.weight, att.k_proj.bias)
    v = F.linear(keys, att.v_proj.weight, att.v_proj.bias)
    cut = [slice(i * size, (i + 1) * size) for i in range(heads)]
    own = torch.stack([torch.softmax(q[:, c] @ k[:, c].T / size ** 0.5, -1) for c in cut])
    torch.testing.assert_close(own, attention, rtol=0, atol=1e-6)  # the model's softmax runs in float32
    f = torch.stack([v[:, c] @ att.o_proj.weight[:, c].T for c in cut])
    moved = torch.einsum("hij,hjd->ijd", attention, f)
    y = x + moved.sum(1) + att.o_proj.bias
    return moved, y, y + _mix_ffn(block, y, height, width)


def _mix_ffn(block, y, height, width):
    """SegFormer's Mix-FFN on ``(..., patches, d)``: fc1, a depthwise 3x3 convolution (padding 1) over the patch
    grid, GELU, fc2, after the second norm."""
    import torch.nn.functional as F
    from test_value_zeroing import layer_norm

    mlp, conv = block.mlp, block.mlp.dwconv.dwconv
    inner = F.linear(layer_norm(y, block.layernorm_after), mlp.fc1.weight, mlp.fc1.bias).transpose(-1, -2)
    padded = F.pad(inner.reshape(*inner.shape[:-1], height, width), (1, 1, 1, 1))
    inner = conv.bias[:, None, None] + sum(conv.weight[:, 0, r, c][:, None, None] * padded[..., r:r + height, c:c + width]
                                           for r in range(3) for c in range(3))
    inner = inner.reshape(*inner.shape[:-2], -1).transpose(-1, -2)
    return F.linear(F.gelu(inner), mlp.fc2.weight, mlp.fc2.bias)


def test_norm_and_alti_on_reduced_keys_follow_the_papers():
    """norm (Kobayashi et al., 2020) and ALTI (Ferrando et al., 2022) with the pooled keys as sources: a reduced
    block's patch ``i`` draws ``Σ_h α^h_ij f^h(k_j)`` from pooled key ``j`` and its residual ``x_i`` as one more
    source (``[T_i(k_j) | x_i]``, as ALTI+ decomposes a cross-attention block); rolled out through the pooling
    (1/sr² per patch) and the stage link, against a float64 reimplementation from the block inputs."""
    import torch
    from test_methods import alti_rows

    model, pixels = _segformer64()
    trace = attnflow.capture(model, values=True, pixel_values=pixels)
    assert trace.metadata["values_layout"] == "pre_ln" and trace.streams["stage0.keys1"].grid == (4, 2)
    e = attnflow.explain(trace, ["norm", "norm_residual", "alti"])
    last0 = attnflow.explain(trace, ["norm", "norm_residual"], stream="stage0")
    reference, seen = _block_inputs(model, pixels)
    pool, embed = _pool(12, 6, 3), _receptive((12, 6), (6, 3), 3, 2)
    with torch.no_grad():
        for b in range(2):
            c0, c1, index = np.eye(72), np.eye(18), 0
            for i, stage in enumerate(reference.stages):
                for j, block in enumerate(stage.blocks):
                    x, height, width, output, attention = seen[i, j]
                    moved, y, out = _block_by_hand(block, x[b], height, width, attention[b])
                    torch.testing.assert_close(out, output[b], rtol=0, atol=1e-12)  # the block written out is the model's
                    moved, x_b, y = moved.numpy(), x[b].numpy(), y.numpy()
                    if i == 0:  # reduced: the residual one more source, last
                        shares = np.concatenate([moved, x_b[:, None]], axis=1)
                        c = alti_rows(shares, y)
                        c0 = c[:, :-1] @ pool @ c0 + c[:, -1:] * c0
                    else:
                        shares = moved.copy()
                        shares[np.arange(18), np.arange(18)] += x_b
                        c1 = alti_rows(shares, y) @ c1
                    if j == len(stage.blocks) - 1:
                        norm, residual = (last0["norm"]["stage0.keys1"], last0["norm_residual"]["stage0.keys1"]) \
                            if i == 0 else (e["norm"], e["norm_residual"])
                        np.testing.assert_allclose(norm[b], np.linalg.norm(moved, axis=-1), rtol=0, atol=1e-9)
                        keys = moved.shape[1]  # a reduced block's residual column is no key: left out of the view
                        np.testing.assert_allclose(residual[b], np.linalg.norm(shares, axis=-1)[:, :keys], rtol=0,
                                                   atol=1e-9)
                    index += 1
            expected = c1 @ embed @ c0
            np.testing.assert_allclose(e["alti"][b], expected, rtol=0, atol=1e-9)
            np.testing.assert_allclose(expected.sum(-1), 1.0, atol=1e-12)


def test_value_zeroing_on_reduced_keys_follows_the_paper():
    """Value zeroing (Mohebbi et al., 2023) on SegFormer: each pooled key's (or patch's) values zeroed in the block
    written out, ``1 - cos`` of every patch's block output, against the capture's; then the method's rollout: a
    reduced block's rows (no self-attention partner, no residual column) normalised on their own and routed through
    the pooling (1/sr² per patch) and the stage link, plain products as in the paper's code."""
    import torch
    from test_value_zeroing import distance

    model, pixels = _segformer64()
    trace = attnflow.capture(model, value_zeroing=True, pixel_values=pixels)
    explained = attnflow.explain(trace, ["value_zeroing"])["value_zeroing"]
    reference, seen = _block_inputs(model, pixels)
    pool, embed = _pool(12, 6, 3), _receptive((12, 6), (6, 3), 3, 2)
    with torch.no_grad():
        for b in range(2):
            c0, c1 = np.eye(72), np.eye(18)
            for index, key in enumerate(sorted(seen)):
                x, height, width, _, attention = seen[key]
                got = trace.layers[index].extras["value_zeroing"]
                assert got.dtype == np.float64 and got.shape == (2, *attention.shape[-2:])
                block = reference.stages[key[0]].blocks[key[1]]
                moved, y, original = _block_by_hand(block, x[b], height, width, attention[b])
                # key j's values zeroed (bias included): its f^h(k_j) is 0, so the stream after attention loses
                # moved[:, j] and the Mix-FFN runs on what is left; every key at once, (keys, patches, d)
                zeroed = y[None] - moved.transpose(0, 1)
                expected = distance(zeroed + _mix_ffn(block, zeroed, height, width), original[None]).T.numpy()
                np.testing.assert_allclose(got[b], expected, rtol=0, atol=1e-9)
                rows = expected / expected.sum(-1, keepdims=True)
                if key[0] == 0:
                    c0 = rows @ pool @ c0
                else:
                    c1 = rows @ c1
            np.testing.assert_allclose(explained[b], c1 @ embed @ c0, rtol=0, atol=1e-9)


def test_a_last_stage_over_pooled_keys_is_the_default_stream():
    """A SegFormer whose last stage pools its keys (sr 2 on a one-stage model): the stage feeds only its own pooled
    keys, so it is still the stream rollout and flow explain by default (no stream= needed), and that default
    equals the explicit one."""
    import torch
    import transformers

    torch.manual_seed(4)
    model = transformers.SegformerModel(transformers.SegformerConfig(
        num_channels=3, num_encoder_blocks=1, depths=[2], sr_ratios=[2], hidden_sizes=[8], patch_sizes=[7],
        strides=[4], num_attention_heads=[2], mlp_ratios=[2],
    )).eval()
    trace = attnflow.capture(model, pixel_values=torch.randn(3, 3, 20, 28, generator=torch.Generator().manual_seed(5)))
    pooled = [name for name in trace.streams if name != "stage0"]
    assert pooled and all(link.source == "stage0" for link in trace.links)
    assert trace.default_stream() == "stage0"
    np.testing.assert_array_equal(attnflow.rollout(trace), attnflow.rollout(trace, stream="stage0"))


def test_a_model_without_logits_gets_the_embedding_target_over_its_feature_map():
    """SegformerModel returns a (batch, channels, height, width) feature map and no logits: gradient methods take
    the embedding target, ⟨h, h₀/‖h₀‖⟩ of each item's mean over the map's positions, written out here from the
    model's own output; methods="all" skips nothing for want of a target."""
    import torch
    from attnflow.adapters._torch._torch_common import embedding_score

    model, pixels = _segformer64()
    output = model(pixel_values=pixels)
    hidden = output.last_hidden_state
    assert hidden.ndim == 4
    pooled = hidden.mean(dim=(2, 3))
    expected = (pooled * pooled / pooled.norm(dim=-1, keepdim=True)).sum()
    torch.testing.assert_close(embedding_score(output, None, torch), expected, rtol=1e-12, atol=0)
    trace = attnflow.capture(model, methods="all", pixel_values=pixels)
    skipped = trace.metadata.get("skipped_methods") or {}
    assert not any("target" in str(reason) or "logits" in str(reason) for reason in dict(skipped).values()), skipped
    assert all("attn_grad" in layer.extras for layer in trace.layers)
