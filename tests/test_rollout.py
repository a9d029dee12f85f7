"""Raw attention and rollout: the paper's definitions, property-based and against reference code."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import attnflow
from attnflow import AttentionTrace, OptionError


def dirichlet_layers(rng, layers, batch, heads, seq, concentration=1.0):
    return [rng.dirichlet(np.full(seq, concentration), size=(batch, heads, seq)) for _ in range(layers)]


def paper_rollout(att_mat: np.ndarray) -> np.ndarray:
    """The paper's released compute_joint_attention (numpy), on (layers, heads, n, n) of one item."""
    att = att_mat.sum(axis=1) / att_mat.shape[1]
    aug = att + np.eye(att.shape[1])[None, ...]
    aug = aug / aug.sum(axis=-1)[..., None]
    joint = np.zeros(aug.shape)
    joint[0] = aug[0]
    for i in np.arange(1, aug.shape[0]):
        joint[i] = aug[i].dot(joint[i - 1])
    return joint


def vit_explain_rollout(attentions, discard_ratio, head_fusion):
    """vit-explain's rollout (torch), with its row normalisation written as intended; (1, heads, n, n) each."""
    import torch

    result = torch.eye(attentions[0].shape[-1], dtype=torch.float64)
    with torch.no_grad():
        for attention in attentions:
            attention = torch.from_numpy(attention)
            fused = getattr(attention, head_fusion)(axis=1)
            fused = fused if isinstance(fused, torch.Tensor) else fused.values  # max/min return (values, indices)
            flat = fused.view(fused.size(0), -1)
            _, indices = flat.topk(int(flat.size(-1) * discard_ratio), -1, False)
            indices = indices[indices != 0]
            flat[0, indices] = 0
            eye = torch.eye(fused.size(-1), dtype=torch.float64)
            a = (fused + 1.0 * eye) / 2
            a = a / a.sum(dim=-1, keepdim=True)
            result = torch.matmul(a, result)
    return result[0].numpy() if result.ndim == 3 else result.numpy()


@settings(max_examples=40, deadline=None)
@given(
    layers=st.integers(1, 5), heads=st.integers(1, 4), seq=st.integers(1, 9), seed=st.integers(0, 2**32 - 1),
    concentration=st.sampled_from([0.05, 0.3, 1.0, 5.0]),
)
def test_matches_the_papers_code(layers, heads, seq, seed, concentration):
    rng = np.random.default_rng(seed)
    weights = dirichlet_layers(rng, layers, 1, heads, seq, concentration)
    trace = AttentionTrace.from_arrays(weights)
    expected = paper_rollout(np.stack([w[0] for w in weights]))
    got = attnflow.rollout(trace, all_layers=True)[:, 0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    seq=st.integers(2, 8), residual=st.floats(0.0, 1.0), seed=st.integers(0, 2**32 - 1),
    fusion=st.sampled_from(["mean", "max", "min"]), discard=st.sampled_from([0.0, 0.1, 0.5, 0.9]),
)
def test_rows_are_distributions(seq, residual, seed, fusion, discard):
    rng = np.random.default_rng(seed)
    trace = AttentionTrace.from_arrays(dirichlet_layers(rng, 3, 2, 3, seq, 0.5))
    result = attnflow.rollout(trace, head_fusion=fusion, residual=residual, discard_ratio=discard)
    assert result.shape == (2, seq, seq)
    assert (result >= 0).all()
    sums = result.sum(-1)
    if residual > 0 or discard == 0:
        np.testing.assert_allclose(sums, 1.0, atol=1e-9)
    else:  # with no residual, discarding can empty a row of an inner layer: mass is lost, never created
        assert (sums <= 1 + 1e-9).all()


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("discard", [0.0, 0.3, 0.75])
def test_discard_and_fusion_match_vit_explain(fusion, discard):
    rng = np.random.default_rng(7)
    weights = dirichlet_layers(rng, 4, 1, 3, 6, 0.7)  # heads 3, seq 6, layers 4
    trace = AttentionTrace.from_arrays(weights)
    expected = vit_explain_rollout(weights, discard, fusion)
    got = attnflow.rollout(trace, head_fusion=fusion, discard_ratio=discard)[0]
    np.testing.assert_allclose(got, expected, atol=1e-12)


def test_discard_never_drops_first_entry():
    weights = np.full((1, 1, 1, 3, 3), 1e-6)
    weights[..., :, 2] = 1 - 2e-6  # entry [0, 0] is among the lowest
    trace = AttentionTrace.from_arrays(weights)
    fused = attnflow.rollout(trace, residual=0.0, discard_ratio=0.5)[0]
    assert fused[0, 0] > 0 and fused[1, 0] == 0


def test_padding_equals_the_item_alone():
    rng = np.random.default_rng(3)
    seq, real = 7, 4
    short = dirichlet_layers(rng, 3, 1, 2, real)
    padded = []
    for w in short:
        full = dirichlet_layers(rng, 1, 2, 2, seq)[0]
        full[1] = 0
        full[1, :, :real, :real] = w[0]
        full[1, :, real:, :real] = 1.0 / real  # padded queries: whatever the model did, over real keys
        padded.append(full)
    mask = np.zeros((2, seq), bool)
    mask[0] = True
    mask[1, :real] = True
    trace = AttentionTrace.from_arrays(padded, mask=mask)
    alone = attnflow.rollout(AttentionTrace.from_arrays(short), discard_ratio=0.2)[0]
    got = attnflow.rollout(trace, discard_ratio=0.2)
    np.testing.assert_allclose(got[1, :real, :real], alone, atol=1e-12)
    assert not got[1, real:].any() and not got[1, :, real:].any()
    raw = attnflow.raw(trace)
    assert not raw[1, real:].any() and not raw[1, :, real:].any()


def test_causal_rollout_has_no_future():
    rng = np.random.default_rng(4)
    weights = []
    for _ in range(3):
        w = np.tril(rng.random((2, 3, 6, 6)))
        weights.append(w / w.sum(-1, keepdims=True))
    trace = AttentionTrace.from_arrays(weights)
    assert trace.causal
    result = attnflow.rollout(trace)
    assert not np.triu(result, k=1).any()


def test_layer_selection_and_all_layers():
    rng = np.random.default_rng(5)
    weights = dirichlet_layers(rng, 5, 2, 3, 4)
    trace = AttentionTrace.from_arrays(weights)
    sub = AttentionTrace.from_arrays(weights[1:4])
    np.testing.assert_allclose(attnflow.rollout(trace, layers=(1, 4)), attnflow.rollout(sub), atol=1e-14)
    np.testing.assert_allclose(attnflow.rollout(trace, layers=slice(1, 4)), attnflow.rollout(sub), atol=1e-14)
    np.testing.assert_allclose(attnflow.rollout(trace, layers=[1, 2, 3]), attnflow.rollout(sub), atol=1e-14)
    every = attnflow.rollout(trace, all_layers=True)
    assert every.shape == (5, 2, 4, 4)
    np.testing.assert_allclose(every[-1], attnflow.rollout(trace), atol=0)
    np.testing.assert_allclose(every[0], attnflow.rollout(trace, layers=[0]), atol=0)


def test_numpy_integers_and_floats_are_options_too():
    rng = np.random.default_rng(9)
    trace = AttentionTrace.from_arrays(dirichlet_layers(rng, 4, 1, 2, 5))
    expected = attnflow.rollout(trace, layers=(0, 3), residual=0.25)
    got = attnflow.rollout(trace, layers=(np.int64(0), np.int64(3)), residual=np.float32(0.25))
    np.testing.assert_allclose(got, expected, atol=1e-7)  # (start, end), not the index list [0, 3]


def test_residual_extremes():
    rng = np.random.default_rng(6)
    trace = AttentionTrace.from_arrays(dirichlet_layers(rng, 3, 1, 2, 5))
    np.testing.assert_allclose(attnflow.rollout(trace, residual=1.0)[0], np.eye(5))
    fused = [w.mean(1)[0] for w in (layer.weights for layer in trace.layers)]
    np.testing.assert_allclose(attnflow.rollout(trace, residual=0.0)[0], fused[2] @ fused[1] @ fused[0], atol=1e-12)


def test_raw_is_head_fused_layer():
    rng = np.random.default_rng(8)
    weights = dirichlet_layers(rng, 3, 2, 4, 5)
    trace = AttentionTrace.from_arrays(weights)
    np.testing.assert_allclose(attnflow.raw(trace, 1, head_fusion="max"), weights[1].max(1))
    np.testing.assert_allclose(attnflow.raw(trace), weights[-1].mean(1))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"discard_ratio": 1.0}, "discard_ratio"),
        ({"discard_ratio": -0.1}, "discard_ratio"),
        ({"residual": 1.5}, "residual"),
        ({"head_fusion": "median"}, "head_fusion"),
        ({"layers": [2, 1]}, "increasing"),
        ({"layers": [0, 9]}, "out of range"),
        ({"layers": (2, 2)}, "selects no layer"),
        ({"layers": slice(None, None, -1)}, "increasing"),
        ({"layers": "01"}, "list of ints"),
        ({"residual": True}, "residual"),
    ],
)
def test_bad_options(kwargs, message):
    trace = AttentionTrace.from_arrays(dirichlet_layers(np.random.default_rng(0), 3, 1, 2, 4))
    with pytest.raises(OptionError, match=message):
        attnflow.rollout(trace, **kwargs)


def test_raw_bad_layer():
    trace = AttentionTrace.from_arrays(dirichlet_layers(np.random.default_rng(0), 3, 1, 2, 4))
    with pytest.raises(OptionError, match="layer"):
        attnflow.raw(trace, 3)


def _tiny_trace():
    rng = np.random.default_rng(7)
    return attnflow.AttentionTrace.from_arrays([rng.dirichlet(np.ones(5), size=(2, 3, 5)) for _ in range(4)])


@pytest.mark.parametrize("call", [
    lambda t: attnflow.explain(t, methods=1.5),
    lambda t: attnflow.explain(t, methods=[["rollout"]]),
    lambda t: attnflow.explain(t, "rollout", sources=True),
    lambda t: attnflow.explain(t, "rollout", sources=1.5),
    lambda t: attnflow.explain(t, "rollout", all_layers=np.zeros(2)),
    lambda t: attnflow.rollout(t, head_fusion=np.zeros(2)),
    lambda t: attnflow.rollout(t, all_layers=np.zeros(2)),
    lambda t: attnflow.flow(t, method=np.zeros(2), progress=False),
    lambda t: attnflow.raw(t, head_fusion=["mean"]),
    lambda t: attnflow.Options(flow_solver=np.zeros(2)),
    lambda t: t.select(0, crop=np.zeros(2)),
    lambda t: attnflow.AttentionTrace.from_arrays([layer.weights for layer in t.layers], names=5),
    lambda t: attnflow.AttentionTrace.from_arrays([layer.weights for layer in t.layers], causal=np.zeros(2)),
], ids=lambda call: str(call.__code__.co_firstlineno))
def test_values_of_the_wrong_type_are_clear_errors(call):
    """Found by a fuzz pass of 5,000 calls with values of the wrong type: each raised TypeError or ValueError
    from inside numpy or Python instead of an AttnflowError naming the argument."""
    with pytest.raises(attnflow.AttnflowError):
        call(_tiny_trace())
