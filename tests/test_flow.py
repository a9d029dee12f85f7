"""attnflow.flow and flow_network: the paper's definition, checked against networkx (the paper's code path)."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import attnflow
from attnflow import AttentionTrace, FlowTooLargeError, OptionError


def dirichlet_layers(rng, layers, batch, heads, seq, concentration=1.0):
    return [rng.dirichlet(np.full(seq, concentration), size=(batch, heads, seq)) for _ in range(layers)]


def paper_flow(att_mat: np.ndarray, normalize: bool = True) -> np.ndarray:
    """The paper's released code: mean heads, add I, renormalise, networkx Edmonds-Karp per pair.

    ``att_mat`` is (layers, heads, n, n) of one item; returns (n, n) flows from the last layer.
    """
    att = att_mat.sum(axis=1) / att_mat.shape[1]
    aug = att + np.eye(att.shape[1])[None, ...]
    aug = aug / aug.sum(axis=-1)[..., None]
    n_layers, length, _ = aug.shape
    graph = nx.DiGraph()
    for i in range(1, n_layers + 1):
        for k_f in range(length):
            for k_t in range(length):
                if aug[i - 1][k_f][k_t] > 0:
                    graph.add_edge(i * length + k_f, (i - 1) * length + k_t, capacity=aug[i - 1][k_f][k_t])
    flows = np.zeros((length, length))
    for out in range(length):
        for inp in range(length):
            u, v = n_layers * length + out, inp
            if u in graph and v in graph:
                flows[out, inp] = nx.maximum_flow_value(graph, u, v, flow_func=nx.algorithms.flow.edmonds_karp)
        if normalize:
            flows[out] /= flows[out].sum()
    return flows


@settings(max_examples=15, deadline=None)
@given(
    layers=st.integers(1, 3), heads=st.integers(1, 3), seq=st.integers(2, 5), seed=st.integers(0, 2**32 - 1),
    concentration=st.sampled_from([0.1, 1.0]), normalize=st.booleans(),
)
def test_matches_the_papers_networkx_code(layers, heads, seq, seed, concentration, normalize):
    rng = np.random.default_rng(seed)
    weights = dirichlet_layers(rng, layers, 1, heads, seq, concentration)
    trace = AttentionTrace.from_arrays(weights)
    expected = paper_flow(np.stack([w[0] for w in weights]), normalize=normalize)
    np.testing.assert_allclose(attnflow.flow(trace, normalize=normalize)[0], expected, rtol=0, atol=1e-9)


def test_peaked_case_against_networkx_and_igraph_reference():
    rng = np.random.default_rng(11)
    layers, heads, seq = 4, 3, 6
    logits = rng.normal(size=(layers, 1, heads, seq, seq)) / 0.3
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    trace = AttentionTrace.from_arrays(weights)
    expected = paper_flow(weights[:, 0], normalize=False)
    fast = attnflow.flow(trace, normalize=False)[0]
    reference = attnflow.flow(trace, normalize=False, method="igraph")[0]
    np.testing.assert_allclose(fast, expected, atol=1e-9)
    np.testing.assert_allclose(reference, expected, atol=1e-9)


def test_flow_network_gives_the_flow_values():
    rng = np.random.default_rng(2)
    trace = AttentionTrace.from_arrays(dirichlet_layers(rng, 3, 2, 2, 4), tokens=[list("abcd"), list("wxyz")])
    graph = attnflow.flow_network(trace, batch_index=1)
    assert graph.vcount() == 4 * 4 and graph.is_directed()
    assert graph.vs[0]["label"] == "L0:w" and graph.vs[15]["label"] == "L3:z"
    assert set(graph.vs["layer"]) == {0, 1, 2, 3}
    values = attnflow.flow(trace, normalize=False)[1]
    for s in range(4):
        for j in range(4):
            got = graph.maxflow_value(3 * 4 + s, j, capacity="capacity")
            assert got == pytest.approx(values[s, j], abs=1e-12)


def test_sources_padding_and_negative_indices():
    rng = np.random.default_rng(3)
    seq, real = 6, 4
    short = dirichlet_layers(rng, 3, 1, 2, real, 0.3)
    padded = []
    for w in short:
        full = dirichlet_layers(rng, 1, 2, 2, seq)[0]
        full[1] = 0
        full[1, :, :, :real] = np.concatenate([w[0], np.full((2, seq - real, real), 1 / real)], axis=1)
        padded.append(full)
    mask = np.ones((2, seq), bool)
    mask[1, real:] = False
    trace = AttentionTrace.from_arrays(padded, mask=mask)
    alone = attnflow.flow(AttentionTrace.from_arrays(short))[0]

    full = attnflow.flow(trace)
    assert full.shape == (2, seq, seq)
    np.testing.assert_allclose(full[1, :real, :real], alone, atol=1e-12)
    assert not full[1, real:].any() and not full[1, :, real:].any()

    picked = attnflow.flow(trace, sources=[0, -1])
    assert picked.shape == (2, 2, seq)
    np.testing.assert_allclose(picked[1, 0, :real], alone[0], atol=1e-12)
    np.testing.assert_allclose(picked[1, 1, :real], alone[real - 1], atol=1e-12)  # -1 = last real token
    np.testing.assert_allclose(picked[0, 1], full[0, seq - 1], atol=1e-12)
    # position 5 is padding in item 1: an error that points at negative positions, not a silent row of zeros
    with pytest.raises(OptionError, match=r"padding in batch item 1.*sources=\[-1\]"):
        attnflow.flow(trace, sources=[0, 5])


def test_left_padded_item_equals_the_item_alone():
    """Flow written at the wrong columns for a left-padded item would differ from the item run alone."""
    rng = np.random.default_rng(31)
    seq, real, pad = 7, 5, 2
    short = dirichlet_layers(rng, 3, 1, 2, real, 0.3)
    padded = []
    for w in short:
        full = dirichlet_layers(rng, 1, 2, 2, seq)[0]
        full[1] = 0.0
        full[1, :, pad:, pad:] = w[0]
        full[1, :, :pad, pad:] = 1.0 / real  # padded query rows attend somewhere real
        padded.append(full)
    mask = np.ones((2, seq), bool)
    mask[1, :pad] = False
    trace = AttentionTrace.from_arrays(padded, mask=mask)
    alone = AttentionTrace.from_arrays(short)
    np.testing.assert_allclose(attnflow.flow(trace)[1][pad:, pad:], attnflow.flow(alone)[0], atol=1e-12)
    np.testing.assert_allclose(attnflow.flow(trace, sources=[-1])[1, 0, pad:], attnflow.flow(alone)[0, -1],
                               atol=1e-12)
    np.testing.assert_allclose(attnflow.rollout(trace)[1][pad:, pad:], attnflow.rollout(alone)[0], atol=1e-12)
    assert not attnflow.flow(trace)[1][:pad].any() and not attnflow.flow(trace)[1][:, :pad].any()


def test_layer_selection_boundary():
    rng = np.random.default_rng(32)
    trace = AttentionTrace.from_arrays(dirichlet_layers(rng, 3, 1, 2, 4))
    for bad in ([3], [-4], (0, 3.0)):
        with pytest.raises(OptionError, match="out of range|layers must be"):
            attnflow.flow(trace, layers=bad)
        with pytest.raises(OptionError, match="out of range|layers must be"):
            attnflow.rollout(trace, layers=bad)
    np.testing.assert_allclose(attnflow.rollout(trace, layers=[2]), attnflow.rollout(trace, layers=[-1]), atol=0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_seconds": float("nan")}, "max_seconds"),
        ({"max_seconds": None}, "max_seconds"),
        ({"max_seconds": "10"}, "max_seconds"),
        ({"max_seconds": -1}, "max_seconds"),
        ({"n_jobs": 0}, "n_jobs"),
        ({"sources": 0}, "list of token positions"),
        ({"sources": [0.5]}, "sources must hold ints"),
        ({"stream": 3}, "stream must be a stream name"),
    ],
)
def test_bad_flow_arguments(kwargs, message):
    trace = AttentionTrace.from_arrays(dirichlet_layers(np.random.default_rng(33), 3, 1, 2, 4))
    with pytest.raises(OptionError, match=message):
        attnflow.flow(trace, **kwargs)


def test_bad_flow_network_batch_index():
    trace = AttentionTrace.from_arrays(dirichlet_layers(np.random.default_rng(34), 2, 2, 2, 4))
    for bad in (0.5, 2, -3, "0"):
        with pytest.raises(OptionError, match="batch_index"):
            attnflow.flow_network(trace, batch_index=bad)


def test_causal_flows_to_future_are_exactly_zero():
    rng = np.random.default_rng(4)
    weights = []
    for _ in range(3):
        w = np.tril(rng.random((1, 2, 5, 5)) ** 4)
        weights.append(w / w.sum(-1, keepdims=True))
    trace = AttentionTrace.from_arrays(weights)
    result = attnflow.flow(trace)[0]
    assert np.all(np.triu(result, k=1) == 0)
    np.testing.assert_allclose(result, paper_flow(np.stack([w[0] for w in weights])), atol=1e-9)


def test_all_layers():
    rng = np.random.default_rng(5)
    weights = dirichlet_layers(rng, 3, 1, 2, 4, 0.5)
    trace = AttentionTrace.from_arrays(weights)
    every = attnflow.flow(trace, all_layers=True)
    assert every.shape == (3, 1, 4, 4)
    np.testing.assert_allclose(every[-1], attnflow.flow(trace), atol=1e-12)
    for layer in range(3):
        expected = attnflow.flow(trace, layers=(0, layer + 1))
        np.testing.assert_allclose(every[layer], expected, atol=1e-9)


def igraph_level_flows(mixed: list[np.ndarray]) -> np.ndarray:
    """Per-pair igraph max-flow on the layered network of ``mixed`` ((n, n) capacity matrices, layer 1 first):
    ``[l - 1, s, j]`` is the max-flow from node ``(l, s)`` to input ``(0, j)``, for every level ``l``."""
    import igraph

    n = mixed[0].shape[0]
    edges, capacities = [], []
    for layer, matrix in enumerate(mixed):
        for i, k in zip(*np.nonzero(matrix > 0)):
            edges.append(((layer + 1) * n + int(i), layer * n + int(k)))
            capacities.append(float(matrix[i, k]))
    graph = igraph.Graph(n=(len(mixed) + 1) * n, edges=edges, directed=True)
    graph.es["capacity"] = capacities
    return np.array([[[graph.maxflow_value(level * n + s, j, capacity="capacity") for j in range(n)]
                      for s in range(n)] for level in range(1, len(mixed) + 1)])


@pytest.fixture(scope="module")
def padded_trace():
    """5 layers x 3 heads x 2 items x 7 tokens; item 1 left-padded to 4 real tokens (no weight on padding)."""
    rng = np.random.default_rng(23)
    layers, heads, batch, seq = 5, 3, 2, 7
    mask = np.ones((batch, seq), dtype=bool)
    mask[1, :3] = False
    weights = []
    for _ in range(layers):
        w = rng.dirichlet(np.full(seq, 0.4), size=(batch, heads, seq)) * mask[:, None, None, :]
        weights.append(w / w.sum(-1, keepdims=True))
    return AttentionTrace.from_arrays(weights, mask=mask), weights, mask


def test_all_layers_equal_per_pair_igraph_max_flow(padded_trace):
    """Every level's flow (the page's flow at every layer) against one igraph max-flow per (level, source,
    sink) on the paper's network over each item's real tokens: levels 1-2 have closed forms, 3-5 go to the
    solver."""
    trace, weights, mask = padded_trace
    every = attnflow.flow(trace, all_layers=True, normalize=False)
    assert every.shape == (5, 2, 7, 7)
    some = attnflow.flow(trace, all_layers=True, normalize=False, sources=[-1, -3])
    for b in range(2):
        real = np.flatnonzero(mask[b])
        mixed = []
        for w in weights:
            a = 0.5 * w[b].mean(axis=0)[np.ix_(real, real)] + 0.5 * np.eye(real.size)
            mixed.append(a / a.sum(axis=-1, keepdims=True))
        expected = igraph_level_flows(mixed)
        np.testing.assert_allclose(every[:, b][:, real][:, :, real], expected, rtol=0, atol=1e-9)
        padding = ~mask[b]
        assert not every[:, b][:, padding].any() and not every[:, b][:, :, padding].any()
        np.testing.assert_allclose(some[:, b][:, :, real], expected[:, [-1, -3]], rtol=0, atol=1e-9)


def test_oversized_problem_is_refused_with_advice():
    rng = np.random.default_rng(6)
    seq = 1024
    weights = np.tile(np.eye(seq, dtype=np.float32), (12, 1, 1, 1, 1))  # 12 layers x 1024 tokens
    weights[..., 0] += 1.0
    weights /= weights.sum(-1, keepdims=True)
    trace = AttentionTrace.from_arrays(weights)
    with pytest.raises(FlowTooLargeError, match=r"sources=\[0\]") as info:
        attnflow.flow(trace, method="igraph")
    assert "max_seconds" in str(info.value)
    small = AttentionTrace.from_arrays(dirichlet_layers(rng, 2, 1, 1, 5))
    with pytest.raises(FlowTooLargeError):
        attnflow.flow(small, max_seconds=0.0)
    assert attnflow.flow(small, max_seconds=60).shape == (1, 5, 5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sources": [5]}, "out of range"),
        ({"sources": [-6]}, "out of range"),
        ({"sources": 0}, "list of token positions"),
        ({"sources": [0.5]}, "ints"),
        ({"method": "magic"}, "method"),
        ({"n_jobs": 0}, "n_jobs"),
        ({"discard_ratio": 1.2}, "discard_ratio"),
    ],
)
def test_bad_options(kwargs, message):
    trace = AttentionTrace.from_arrays(dirichlet_layers(np.random.default_rng(0), 2, 1, 2, 5))
    with pytest.raises(OptionError, match=message):
        attnflow.flow(trace, **kwargs)


def test_estimate_costs_a_causal_source_by_its_prefix():
    """Under causal attention the flow from token p reaches only tokens 0..p: the estimate follows (none timed)."""
    from attnflow.methods._flow import estimate_flow_seconds
    from attnflow.methods._options import Options

    rng = np.random.default_rng(3)
    weights = [np.tril(rng.uniform(0.1, 1.0, (1, 2, 300, 300))) for _ in range(4)]
    weights = [w / w.sum(-1, keepdims=True) for w in weights]
    causal, encoder = AttentionTrace.from_arrays(weights), AttentionTrace.from_arrays(dirichlet_layers(rng, 4, 1, 2, 300))
    assert causal.streams[causal.default_stream()].causal
    options = Options()

    def cost(trace, sources):
        return estimate_flow_seconds(trace, options, stream=None, sources=sources, all_layers=False)

    # the last token reaches every token, as an encoder's does; shallow causal levels are priced lower (Dinic
    # phases there, not the warm solver)
    assert cost(causal, [0]) < cost(causal, [150]) < cost(causal, [-1]) < cost(encoder, [-1])
    assert cost(encoder, [0]) == pytest.approx(cost(encoder, [-1]))
    assert cost(causal, None) < cost(encoder, None) / 2
