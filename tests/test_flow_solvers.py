"""Exactness of the attention-flow max-flow solvers (attnflow.network._solvers) against networkx and igraph.

Sizes differ on every axis (layers, tokens, sources) so that a swapped axis changes a shape or a value.
"""

from __future__ import annotations

import subprocess
import sys

import networkx as nx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from networkx.algorithms.flow import edmonds_karp, preflow_push

from attnflow._errors import MissingDependencyError, OptionError
from attnflow.network import _solvers as solvers
from attnflow.network._solvers import METHODS, estimate_seconds, max_flow_values

ATOL = 1e-9
EXACT = ("dinic", "dinic-v1", "pruned", "igraph")


# ------------------------------------------------------------------------------------------------ helpers


def residual_mix(a: np.ndarray, residual: float = 0.5) -> np.ndarray:
    """``(L, n, n)`` -> ``(1 - r) A + r I`` with rows renormalised (all-zero rows stay zero)."""
    n = a.shape[-1]
    mixed = (1 - residual) * a + residual * np.eye(n)
    sums = mixed.sum(-1, keepdims=True)
    return np.divide(mixed, sums, out=np.zeros_like(mixed), where=sums > 0)


def peaked(rng: np.random.Generator, layers: int, n: int, *, heads: int = 1, temp: float = 0.3, causal=False):
    """Head-mean of softmax(Gaussian / temp) attention, optionally causal, residual 0.5."""
    logits = rng.standard_normal((layers, heads, n, n)) / temp
    if causal:
        logits = np.where(np.tril(np.ones((n, n), bool)), logits, -np.inf)
    logits -= logits.max(-1, keepdims=True)
    att = np.exp(logits)
    att = (att / att.sum(-1, keepdims=True)).mean(1)
    return residual_mix(att)


def bottlenecked(rng: np.random.Generator, layers: int, n: int) -> np.ndarray:
    """Sparse random capacities with a narrow middle: many pairs sit strictly below both trivial bounds."""
    adj = rng.uniform(0.0, 1.0, (layers, n, n)) * (rng.random((layers, n, n)) < 0.45)
    adj[layers // 2] *= 0.15
    return adj


def nx_flows(adj: np.ndarray, sources, top: int | None = None, flow_func=edmonds_karp) -> np.ndarray:
    """Independent reference: networkx max-flow per pair on a graph built here from ``adj`` directly."""
    layers, n, _ = adj.shape
    top = layers if top is None else top
    graph = nx.DiGraph()
    graph.add_nodes_from((lay, i) for lay in range(top + 1) for i in range(n))
    for lay in range(top):
        for i in range(n):
            for k in range(n):
                if adj[lay, i, k] > 0:
                    graph.add_edge((lay + 1, i), (lay, k), capacity=float(adj[lay, i, k]))
    return np.array(
        [
            [nx.maximum_flow_value(graph, (top, s), (0, j), flow_func=flow_func) for j in range(n)]
            for s in sources
        ]
    )


def trivial_bounds(adj: np.ndarray, sources) -> np.ndarray:
    return np.minimum(adj[-1][list(sources)].sum(1)[:, None], adj[0].sum(0)[None, :])


def solve_all(adj, sources, **kwargs) -> dict[str, np.ndarray]:
    return {m: max_flow_values(adj, sources, method=m, **kwargs) for m in EXACT}


# ------------------------------------------------------------------------------------------------ exactness


@pytest.mark.parametrize(
    "case",
    ["uniform", "peaked", "causal", "bottlenecked", "zeros"],
)
def test_all_methods_match_networkx(case):
    rng = np.random.default_rng(["uniform", "peaked", "causal", "bottlenecked", "zeros"].index(case))
    layers, n, sources = 4, 7, [6, 0, 3]
    if case == "uniform":
        adj = residual_mix(rng.uniform(size=(layers, n, n)))
    elif case == "peaked":
        adj = peaked(rng, layers, n)
    elif case == "causal":
        adj = peaked(rng, layers, n, causal=True)
    elif case == "bottlenecked":
        adj = bottlenecked(rng, layers, n)
    else:
        adj = bottlenecked(rng, layers, n)
        adj[1, :, 2] = 0.0  # a column of zeros
        adj[2, 4] = 0.0  # a node with no way down
    reference = nx_flows(adj, sources)
    for method, values in solve_all(adj, sources).items():
        assert values.shape == (len(sources), n)
        np.testing.assert_allclose(values, reference, rtol=0, atol=ATOL, err_msg=method)


@pytest.mark.parametrize("scale", [1e-3, 1e-6])
@pytest.mark.parametrize("case", ["peaked", "bottlenecked"])
def test_tiny_capacities_are_exact_relative_to_their_size(scale, case):
    """A solver that stops 1e-3 below its cut bound would pass at capacities near 1 but not here: values are
    checked relative to the capacity scale, to 1e-11."""
    rng = np.random.default_rng(int(scale * 1e9) % 97)
    adj = (peaked(rng, 4, 7) if case == "peaked" else bottlenecked(rng, 4, 7)) * scale
    sources = [6, 0, 3]
    reference = nx_flows(adj, sources, flow_func=preflow_push)
    for method, values in solve_all(adj, sources).items():
        np.testing.assert_allclose(values / scale, reference / scale, rtol=0, atol=1e-11, err_msg=method)


def test_explicit_source_levels():
    rng = np.random.default_rng(8)
    adj = bottlenecked(rng, 5, 6)
    values = max_flow_values(adj, [4, 1], tops=[3, 5])
    assert values.shape == (2, 2, 6)
    np.testing.assert_allclose(values[0], nx_flows(adj[:3], [4, 1]), atol=ATOL)
    np.testing.assert_allclose(values[1], nx_flows(adj, [4, 1]), atol=ATOL)
    with pytest.raises(OptionError, match="tops must be levels"):
        max_flow_values(adj, [0], tops=[6])
    with pytest.raises(OptionError, match="not both"):
        max_flow_values(adj, [0], tops=[2], all_layers=True)


def test_bottlenecked_cases_are_not_trivial():
    """The cases above must exercise the solver past its first phase: flows below both cut bounds."""
    adj = bottlenecked(np.random.default_rng(3), 4, 7)
    values = max_flow_values(adj, range(7))
    assert (values < trivial_bounds(adj, range(7)) - 1e-6).mean() > 0.3


def test_peaked_twelve_tokens_matches_preflow_push():
    rng = np.random.default_rng(11)
    adj = peaked(rng, 5, 12, heads=2, temp=0.2)
    sources = [0, 11, 5, 7]
    reference = nx_flows(adj, sources, flow_func=preflow_push)
    np.testing.assert_allclose(max_flow_values(adj, sources), reference, rtol=0, atol=ATOL)


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_closed_forms_and_shallow_networks(layers):
    rng = np.random.default_rng(layers)
    adj = bottlenecked(rng, layers, 6)
    reference = nx_flows(adj, [5, 2])
    for method, values in solve_all(adj, [5, 2]).items():
        np.testing.assert_allclose(values, reference, rtol=0, atol=ATOL, err_msg=method)
    if layers == 1:
        np.testing.assert_allclose(max_flow_values(adj, [5, 2]), adj[0][[5, 2]], atol=0)


def test_all_layers_equals_each_sub_network():
    rng = np.random.default_rng(5)
    layers, n, sources = 4, 6, [1, 5]
    adj = bottlenecked(rng, layers, n)
    stacked = {m: max_flow_values(adj, sources, method=m, all_layers=True) for m in EXACT}
    for method, values in stacked.items():
        assert values.shape == (layers, len(sources), n)
        for top in range(1, layers + 1):
            alone = max_flow_values(adj[:top], sources, method=method)
            np.testing.assert_allclose(values[top - 1], alone, rtol=0, atol=ATOL, err_msg=method)
            reference = nx_flows(adj, sources, top=top)
            np.testing.assert_allclose(values[top - 1], reference, rtol=0, atol=ATOL, err_msg=method)


def test_axis_order_with_distinct_sizes():
    """L=3, n=5, 2 sources: the output is (sources, sinks) and row r belongs to sources[r]."""
    rng = np.random.default_rng(8)
    adj = bottlenecked(rng, 3, 5)
    values = max_flow_values(adj, [4, 1])
    assert values.shape == (2, 5)
    assert max_flow_values(adj, [4, 1], all_layers=True).shape == (3, 2, 5)
    np.testing.assert_allclose(values[0], max_flow_values(adj, [4])[0], atol=0)
    np.testing.assert_allclose(values, nx_flows(adj, [4, 1]), atol=ATOL)
    np.testing.assert_allclose(max_flow_values(adj, [-1, -4]), values, atol=0)


def test_causal_flows_to_future_tokens_are_zero():
    adj = peaked(np.random.default_rng(4), 4, 8, causal=True)
    values = max_flow_values(adj, range(8))
    assert np.all(values[np.triu_indices(8, 1)] == 0.0)
    np.testing.assert_allclose(values, nx_flows(adj, range(8)), atol=ATOL)


def test_degenerate_inputs():
    zero = np.zeros((3, 4, 4))
    for method in METHODS:
        assert np.all(max_flow_values(zero, [0, 3], method=method) == 0.0)
    assert max_flow_values(np.ones((2, 3, 3)), []).shape == (0, 3)
    one = np.ones((3, 1, 1)) * 0.25
    assert max_flow_values(one, [0])[0, 0] == pytest.approx(0.25)


def test_large_capacities_scale():
    rng = np.random.default_rng(9)
    adj = bottlenecked(rng, 4, 6) * 1e6
    np.testing.assert_allclose(max_flow_values(adj, [0, 5]), nx_flows(adj, [0, 5]), rtol=1e-11, atol=0)


def test_compiled_reachability_matches_numpy():
    from attnflow.network import _dinic as kernel

    rng = np.random.default_rng(12)
    cases = [
        peaked(rng, 5, 9, causal=True),
        bottlenecked(rng, 6, 11),
        np.triu(bottlenecked(rng, 4, 8)),
        np.zeros((3, 4, 4)),
        bottlenecked(rng, 9, 3),
    ]
    for adj in cases:
        expected = solvers.reach_to_sinks(adj)
        assert np.array_equal(kernel.reach_to_sinks(adj, solvers._spans(adj)), expected)


def test_log_overflow_resets_the_residual_network():
    """The kernel logs the residual entries it changes; when the log is full it restores everything."""
    from attnflow.network import _dinic as kernel

    adj = bottlenecked(np.random.default_rng(2), 4, 6)
    layers, n, _ = adj.shape
    reach = solvers.reach_to_sinks(adj)
    span = solvers._spans(adj)
    bounds = solvers.cut_bounds(adj, np.array([3]), layers)[0]
    res = adj.copy()
    work = np.empty((9, (layers + 1) * (n + 1)), np.int64)
    fwork = np.empty((3, (layers + 1) * (n + 1)))
    out = np.zeros(n)
    tiny_log = np.empty(1, np.int64)
    kernel.source_flows(
        adj, res, layers, 3, reach, span, bounds, np.arange(n), 1e-15, 1e-12, out, work, fwork, tiny_log,
        np.empty((layers, n)), np.empty((n, layers, n)), np.zeros(n, bool),
    )
    assert np.array_equal(res, adj)
    np.testing.assert_allclose(out, nx_flows(adj, [3])[0], atol=ATOL)


# ------------------------------------------------------------------------------------------------ properties

capacities = st.integers(1, 5).flatmap(
    lambda layers: st.integers(1, 6).flatmap(
        lambda n: hnp.arrays(
            np.float64,
            (layers, n, n),
            elements=st.one_of(st.just(0.0), st.floats(0.0, 1.0, allow_subnormal=False)),
        )
    )
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(adj=capacities, data=st.data())
def test_properties(adj, data):
    n = adj.shape[1]
    sources = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=3))
    auto = max_flow_values(adj, sources)
    reference = max_flow_values(adj, sources, method="igraph")
    np.testing.assert_allclose(auto, reference, rtol=0, atol=ATOL)
    assert np.all(auto >= 0.0)
    assert np.all(auto <= trivial_bounds(adj, sources) + 1e-12)
    layered = max_flow_values(adj, sources, all_layers=True)
    np.testing.assert_allclose(layered[-1], auto, rtol=0, atol=ATOL)


def causal_with_sink(rng: np.random.Generator, layers: int, n: int) -> np.ndarray:
    """Decoder-like attention: causal softmax with extra mass on token 0 (an attention sink), 1-4 heads."""
    tri = np.tril(np.ones((n, n), bool))
    out = np.empty((layers, n, n))
    for lay in range(layers):
        heads = int(rng.integers(1, 5))
        logits = rng.standard_normal((heads, n, n)) / rng.uniform(0.3, 1.5)
        logits[..., 0] += rng.uniform(0.0, 4.0)
        logits = np.where(tri, logits, -np.inf)
        att = np.exp(logits - logits.max(-1, keepdims=True))
        out[lay] = (att / att.sum(-1, keepdims=True)).mean(0)
    return residual_mix(out, float(rng.uniform(0.0, 0.9)))


def igraph_flows(adj: np.ndarray, sources, top: int) -> np.ndarray:
    """Independent reference: one igraph max-flow per pair on a graph built here, node ``l * n + i``."""
    import igraph

    n = adj.shape[1]
    edges, caps = [], []
    for lay in range(top):
        for i in range(n):
            for k in range(n):
                if adj[lay, i, k] > 0:
                    edges.append(((lay + 1) * n + i, lay * n + k))
                    caps.append(adj[lay, i, k])
    graph = igraph.Graph(n=(top + 1) * n, edges=edges, directed=True)
    capacity = np.asarray(caps, dtype=np.float64).tolist()  # igraph reads other numpy scalars as 1.0
    return np.array([[graph.maxflow_value(top * n + s, j, capacity=capacity) for j in range(n)] for s in sources])


KINDS = ("causal with sink", "encoder", "bottlenecked", "causal bottlenecked")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(KINDS), layers=st.integers(1, 6), n=st.integers(1, 11), seed=st.integers(0, 2**32 - 1),
    data=st.data(),
)
def test_compiled_solvers_match_igraph_per_pair(kind, layers, n, seed, data):
    """Both compiled kernels, with one source (per-sink data recomputed) and several sources and levels
    (per-sink data kept), on every kind of network; against igraph, to 1e-9."""
    rng = np.random.default_rng(seed)
    if kind == "causal with sink":
        adj = causal_with_sink(rng, layers, n)
    elif kind == "encoder":
        adj = peaked(rng, layers, n, heads=int(rng.integers(1, 4)), temp=float(rng.uniform(0.2, 2.0)))
    else:
        adj = bottlenecked(rng, layers, n)
        if kind == "causal bottlenecked":
            adj = np.tril(adj)
    sources = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=3, unique=True))
    tops = sorted(data.draw(st.sets(st.integers(1, layers), min_size=1, max_size=3)))
    reference = np.stack([igraph_flows(adj, sources, top) for top in tops])
    for method in ("dinic", "dinic-v1"):
        several = max_flow_values(adj, sources, method=method, tops=tops)
        np.testing.assert_allclose(several, reference, rtol=0, atol=ATOL, err_msg=method)
        alone = max_flow_values(adj, sources[-1:], method=method, tops=tops[-1:])
        np.testing.assert_allclose(alone[0, 0], reference[-1, -1], rtol=0, atol=ATOL, err_msg=method)


def test_causal_decoder_of_sixty_tokens_matches_igraph():
    """Big enough that most sinks are settled by the cheap bound and some need the later phases."""
    rng = np.random.default_rng(21)
    adj = causal_with_sink(rng, 6, 60)
    adj[2] = residual_mix(np.tril(rng.uniform(size=(60, 60)) * (rng.random((60, 60)) < 0.1)), 0.2)
    reference = igraph_flows(adj, [59, 30], 6)
    for method in ("dinic", "dinic-v1"):
        np.testing.assert_allclose(max_flow_values(adj, [59, 30], method=method), reference, atol=ATOL)
        np.testing.assert_allclose(max_flow_values(adj, [59], method=method, n_jobs=2), reference[:1], atol=ATOL)



def peaked_local(rng: np.random.Generator, layers: int, n: int, *, mixed: bool = False) -> np.ndarray:
    """Causal heads that are peaked and local (temperature 0.5, a recency bias per position back, a weak sink),
    or with ``mixed`` each head drawn from local, sink and peaked ones: the attention on which most sinks need
    the residual phases of the solver."""
    tri = np.tril(np.ones((n, n), bool))
    distance = np.subtract.outer(np.arange(n), np.arange(n)).astype(float)
    out = np.empty((layers, n, n))
    for lay in range(layers):
        heads = []
        for _ in range(int(rng.integers(2, 5))):
            kind = int(rng.integers(0, 3)) if mixed else 0
            logits = rng.standard_normal((n, n))
            if kind == 0:
                logits = (logits - rng.uniform(0.1, 0.4) * distance) / 0.5
                logits[:, 0] += 1.0
            elif kind == 1:
                logits[:, 0] += 3.0
            else:
                logits /= 0.3
            logits = np.where(tri, logits, -np.inf)
            att = np.exp(logits - logits.max(-1, keepdims=True))
            heads.append(att / att.sum(-1, keepdims=True))
        out[lay] = np.mean(heads, axis=0)
    return residual_mix(out)


@pytest.mark.parametrize("mixed", [False, True])
def test_peaked_local_causal_attention_matches_igraph_per_pair(mixed):
    """Peaked, local causal heads (alone and mixed with sink and peaked heads), 7 layers x 41 tokens, two
    sources at two levels: every pair against igraph, to 1e-9; some pairs lie strictly below both trivial
    bounds (the cheap bounds do not settle them)."""
    rng = np.random.default_rng(5 if mixed else 4)
    adj = peaked_local(rng, 7, 41, mixed=mixed)
    sources, tops = [40, 17], [7, 5]
    reference = np.stack([igraph_flows(adj, sources, top) for top in tops])
    bounds = trivial_bounds(adj, sources)
    assert (reference[0] < bounds - 1e-3).any()
    for method in ("dinic", "dinic-v1"):
        got = max_flow_values(adj, sources, method=method, tops=tops)
        np.testing.assert_allclose(got, reference, rtol=0, atol=ATOL, err_msg=method)
        alone = max_flow_values(adj, [40], method=method)
        np.testing.assert_allclose(alone, reference[0, :1], rtol=0, atol=ATOL, err_msg=method)


@pytest.fixture(scope="module")
def local_cases():
    """Causal networks with distinct sizes on every axis, each with its igraph reference per pair: peaked
    local heads (6 layers x 37 tokens), local mixed with sink and peaked heads (5 x 43), and the mixed kind with
    left padding (7 x 31, the first 3 tokens neither attend nor are attended to: zero rows and columns)."""
    cases = {}
    rng = np.random.default_rng(24)
    for name, layers, n, sources, tops in (
        ("local", 6, 37, [36, 19], [6, 4]),
        ("mixed", 5, 43, [42, 30], [5, 3]),
        ("padded", 7, 31, [30, 8], [7, 6]),
    ):
        adj = peaked_local(rng, layers, n, mixed=name != "local")
        if name == "padded":
            adj[:, :3, :] = 0.0
            adj[:, :, :3] = 0.0
        reference = np.stack([igraph_flows(adj, sources, top) for top in tops])
        cases[name] = (adj, sources, tops, reference)
    return cases


@pytest.mark.parametrize("strategy, warm_width", [(0, 192), (1, 192), (1, 0), (2, 0)])
@pytest.mark.parametrize("name", ["local", "mixed", "padded"])
def test_every_sink_strategy_matches_igraph(local_cases, name, strategy, warm_width, monkeypatch):
    """Each way the default solver finishes a sink that phase one does not certify (0: Dinic phases from
    phase one's flow; 1, the default: the same, except after two such sinks in a row, for a causal network at
    least ``warm_width`` nodes wide and ``_WARM_LEVEL`` levels deep (3 with ``warm_width`` 0): warm push-relabel
    on a preflow kept across sinks, for that sink and the next
    ones; 2: warm push-relabel for every sink) gives every pair's max-flow, to 1e-9 against igraph: two
    sources at two levels (per-sink data kept), one source alone, and the sinks split over two threads (each
    thread's preflow starts afresh at its first sink)."""
    adj, sources, tops, reference = local_cases[name]
    monkeypatch.setattr(solvers, "_SINK_STRATEGY", strategy)
    monkeypatch.setattr(solvers, "_WARM_WIDTH", warm_width)
    if warm_width == 0:  # every network wide and deep enough for the warm solver
        monkeypatch.setattr(solvers, "_WARM_LEVEL", 3)
    got = max_flow_values(adj, sources, method="dinic", tops=tops)
    np.testing.assert_allclose(got, reference, rtol=0, atol=ATOL)
    alone = max_flow_values(adj, sources[:1], method="dinic")
    np.testing.assert_allclose(alone, reference[0, :1], rtol=0, atol=ATOL)
    split = max_flow_values(adj, sources[:1], method="dinic", n_jobs=2)
    np.testing.assert_allclose(split, reference[0, :1], rtol=0, atol=ATOL)
    if name == "padded":
        assert np.all(got[..., :3] == 0.0)


def test_sinks_phase_one_certifies_at_a_high_cost_hand_over_to_the_warm_solver(local_cases, monkeypatch):
    """A sink that phase one certifies only after changing more than ``_HEAVY`` arcs per node counts toward the
    streak that sends the next sinks to the warm push-relabel. Run as plain Python (``py_func``, so the module's
    constants are read at run time) with ``_HEAVY = 0``, where every certified sink counts: the warm solver is
    entered after certified sinks, and every value still matches igraph; 6 layers x 37 tokens."""
    from attnflow.network import _dinic as kernel

    adj, sources, tops, reference = local_cases["local"]
    num_layers, n, _ = adj.shape
    top, s = tops[0], sources[0]
    eps, tol = solvers.EPS * adj.max(), solvers.TOL * adj.max()
    warm = []
    plain = kernel._warm_push_relabel

    def counted(*args):
        warm.append(args[5])
        return plain(*args)

    monkeypatch.setattr(kernel, "_HEAVY", 0)
    monkeypatch.setattr(kernel, "_warm_push_relabel", counted)
    certified_before = []
    phase_one = kernel._phase_one

    def noted(cap, res, top_, s_, j, reach, span, bound, low, *rest):
        total, log_len = phase_one(cap, res, top_, s_, j, reach, span, bound, low, *rest)
        if total >= bound - tol and log_len != 0:
            certified_before.append(j)
        return total, log_len

    monkeypatch.setattr(kernel, "_phase_one", noted)
    out = np.zeros(n)
    kernel.pruned_source_flows.py_func(
        adj, adj.copy(), top, s, kernel.spans(adj, 0.0), kernel.spans(adj, eps),
        np.diagonal(adj, axis1=1, axis2=2).copy(), np.arange(n, dtype=np.int64), eps, tol, out,
        np.zeros((9, (num_layers + 1) * (n + 1)), dtype=np.int64), np.zeros((3, (num_layers + 1) * (n + 1))),
        np.empty(adj.size, dtype=np.int64), np.zeros((num_layers, n)), np.zeros((1, num_layers + 1, n), dtype=bool),
        np.zeros((1, num_layers + 1), dtype=np.int64), np.zeros((1, num_layers, n)), np.zeros((1, 2), dtype=bool),
        1, 0, kernel._no_bits(),
    )
    np.testing.assert_allclose(out, reference[0, 0], rtol=0, atol=ATOL)
    # sinks go from the last to the first: three certified ones in a row, then the warm solver
    assert warm and any(all(k in certified_before for k in (j + 1, j + 2, j + 3)) for j in warm)


def test_local_cases_need_more_than_the_cheap_bounds(local_cases):
    """The networks above are not settled by trivial cut bounds alone (so the warm solver has work to do)."""
    for adj, sources, _, reference in local_cases.values():
        assert (reference[0] < trivial_bounds(adj, sources) - 1e-3).any()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layers=st.integers(3, 6), n=st.integers(2, 12), seed=st.integers(0, 2**32 - 1), data=st.data())
def test_warm_push_relabel_matches_igraph_on_random_networks(layers, n, seed, data):
    """Strategy 2 (every sink through the warm push-relabel, sinks in any order the split gives) on random
    causal, encoder and sparse networks, against igraph to 1e-9."""
    rng = np.random.default_rng(seed)
    kind = data.draw(st.sampled_from(KINDS))
    if kind == "causal with sink":
        adj = causal_with_sink(rng, layers, n)
    elif kind == "encoder":
        adj = peaked(rng, layers, n, heads=2, temp=float(rng.uniform(0.2, 2.0)))
    else:
        adj = bottlenecked(rng, layers, n)
        if kind == "causal bottlenecked":
            adj = np.tril(adj)
    sources = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=2, unique=True))
    reference = igraph_flows(adj, sources, layers)
    saved = solvers._SINK_STRATEGY
    solvers._SINK_STRATEGY = 2
    try:
        got = max_flow_values(adj, sources, method="dinic")
    finally:
        solvers._SINK_STRATEGY = saved
    np.testing.assert_allclose(got, reference, rtol=0, atol=ATOL)


@pytest.mark.parametrize("layers, n", [(5, 37), (4, 64), (6, 70), (3, 131)])
def test_dinic_phases_over_bitsets_equal_the_row_scans_and_igraph(layers, n, monkeypatch):
    """Networks up to ``_BIT_WIDTH`` tokens take their Dinic phases over bitsets of candidate arcs
    (`_bit_phases`); wider ones scan rows (`_later_phases`). Forcing each on the same networks (encoder attention,
    sparse bottlenecked capacities; one and several 64-bit words per row, token counts that are and are not
    powers of two; from level 3, where phase one leaves most pairs to the Dinic phases, and from the top) gives the
    same values to the bit, equal to igraph; the bitset phases ran, and the residuals and the flow bits are clean
    after every pair, also when the change log overflows (every bit set, then every bit cleared)."""
    from attnflow.network import _dinic as kernel

    rng = np.random.default_rng(layers * n)
    tops = sorted({3, layers})
    reached = False
    for adj in (peaked(rng, layers, n, heads=2, temp=0.5), bottlenecked(rng, layers, n)):
        sources = [0, n // 2, n - 1]
        reference = np.stack([igraph_flows(adj, sources, top) for top in tops])
        bits = max_flow_values(adj, sources, method="dinic", tops=tops)
        monkeypatch.setattr(solvers, "_BIT_WIDTH", 0)
        rows = max_flow_values(adj, sources, method="dinic", tops=tops)
        monkeypatch.undo()
        np.testing.assert_array_equal(bits, rows)
        np.testing.assert_allclose(bits, reference, rtol=0, atol=ATOL)
        eps, tol = solvers.EPS * adj.max(), solvers.TOL * adj.max()
        words = (n + 63) // 64
        for log_size, rows in ((adj.size, None), (5, 1)):  # 5: the log overflows on the first pair
            space = solvers._Workspace(adj, 2, True, bits=True)
            space.log = np.empty(log_size, dtype=np.int64)
            if rows:  # label sets for one label only: every phase makes a bigger array of its own
                space.lv = np.zeros((rows, layers + 1, words), dtype=np.uint64)
            avail = kernel.arc_bits(adj, eps)
            assert avail.shape == (layers, n, words)
            out = np.zeros(n)
            for t, top in enumerate(tops):
                for r, s in enumerate(sources):
                    kernel.pruned_source_flows(
                        adj, space.res, top, s, kernel.spans(adj, 0.0), kernel.spans(adj, eps),
                        np.diagonal(adj, axis1=1, axis2=2).copy(), np.arange(n, dtype=np.int64), eps, tol, out,
                        space.work, space.fwork, space.log, space.q, space.reach, space.live, space.hc, space.hdone, 1,
                        n + 1, (avail, space.flow, space.lv, space.fr),
                    )
                    np.testing.assert_array_equal(out, bits[t, r])
                    np.testing.assert_array_equal(space.res, adj)
                    assert not space.flow.any()
            if rows is None:  # the phases that ran leave their label sets behind
                reached = reached or bool(space.lv.any())
            np.testing.assert_array_equal(avail, kernel.arc_bits(adj, eps))
    assert reached


def test_dinic_phases_over_bitsets_on_a_wide_network(monkeypatch):
    """Up to ``_BIT_WIDTH`` (512) tokens: 3 layers x 300 tokens (five words a row, not a power of two) from
    level 3 give the same values as the row scans to the bit, and igraph's on 8 sinks."""
    import igraph

    layers, n = 3, 300
    adj = peaked(np.random.default_rng(5), layers, n, heads=2, temp=0.5)
    sources = [7, 299]
    bits = max_flow_values(adj, sources, method="dinic")
    monkeypatch.setattr(solvers, "_BIT_WIDTH", 0)
    np.testing.assert_array_equal(bits, max_flow_values(adj, sources, method="dinic"))
    lay, i, k = np.nonzero(adj > 0)
    graph = igraph.Graph(n=(layers + 1) * n, edges=list(zip(((lay + 1) * n + i).tolist(), (lay * n + k).tolist())),
                         directed=True)
    capacity = adj[lay, i, k].astype(np.float64).tolist()
    for r, s in enumerate(sources):
        for j in (0, 1, 150, 298, 299, 42, 7, 200):
            assert abs(graph.maxflow_value(layers * n + s, j, capacity=capacity) - bits[r, j]) <= ATOL


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_row_wise_labels_equal_the_queue_labels(seed):
    """The pruned solver's row-wise BFS gives the same distance labels as the first kernel's queue BFS on
    residual networks that carry flow (after the first phase, for several sinks); 6 layers x 23 tokens."""
    from attnflow.network import _dinic as kernel

    rng = np.random.default_rng(seed)
    adj = peaked_local(rng, 6, 23, mixed=bool(seed % 2))
    num_layers, n, _ = adj.shape
    top, s = num_layers, n - 1
    span = kernel.spans(adj, 0.0)
    diag = np.diagonal(adj, axis1=1, axis2=2).copy()
    q = np.empty((num_layers, n))
    kernel.source_chain(adj, top, s, q)
    compared = 0
    for j in (0, 3, 11, 20):
        res = adj.copy()
        work = np.zeros((9, (num_layers + 1) * (n + 1)), dtype=np.int64)
        fwork = np.zeros((3, (num_layers + 1) * (n + 1)))
        log = np.empty(adj.size, dtype=np.int64)
        reach = np.zeros((num_layers + 1, n), dtype=bool)
        live = np.zeros(num_layers + 1, dtype=np.int64)
        kernel.reach_to_sink(adj, diag, span, j, reach, live)
        kernel._phase_one(adj, res, top, s, j, reach, span, 1.0, 1e-12, work, fwork[0], fwork[1], fwork[2], log)
        res[0, :, j] = fwork[2][:n]
        kernel._relevant_nodes(top, s, j, reach, q, work[7], work[8])
        unwindowed = np.zeros((1, 1, 2), dtype=np.int64)
        for eps in (2.0**-50, 1e-3):
            queue, rows, windows = work.copy(), work.copy(), work.copy()
            found = kernel._bfs_labels(adj, res, top, s, j, eps, queue)
            unwindowed_args = (False, unwindowed, unwindowed, res)
            assert kernel._row_bfs_labels(adj, res, top, s, j, eps, rows, *unwindowed_args) == found
            # the warm solver's windows (each row's and column's arcs with more than eps of capacity) and its
            # transposed flows (reverse arcs pulled as rows)
            row_windows, column_windows = kernel.spans(adj, eps), kernel._column_spans(adj, top, eps)
            flows = np.ascontiguousarray((adj - res).transpose(0, 2, 1))
            assert kernel._row_bfs_labels(
                adj, res, top, s, j, eps, windows, True, row_windows, column_windows, flows
            ) == found
            size = (top + 1) * n
            np.testing.assert_array_equal(rows[0, :size], queue[0, :size])
            np.testing.assert_array_equal(windows[0, :size], queue[0, :size])
            compared += int((queue[0, :size] >= 0).sum())
    assert compared > 100


# ------------------------------------------------------------------------------------------ numba or not


def test_fallback_without_numba_gives_the_same_values(monkeypatch):
    rng = np.random.default_rng(6)
    adj = np.concatenate([peaked(rng, 3, 9), bottlenecked(rng, 2, 9)])
    with_numba = max_flow_values(adj, [8, 0, 4], all_layers=True)
    assert solvers.resolve_method("auto") == "dinic"
    monkeypatch.setitem(sys.modules, "numba", None)  # `import numba` now raises ImportError
    assert solvers.resolve_method("auto") == "pruned"
    without = max_flow_values(adj, [8, 0, 4], all_layers=True)
    np.testing.assert_allclose(without, with_numba, rtol=0, atol=1e-12)
    with pytest.raises(MissingDependencyError, match=r"attnflow\[fast\]"):
        max_flow_values(adj, [0], method="dinic")


def test_importing_attnflow_does_not_import_numba():
    code = (
        "import sys, numpy as np, attnflow, attnflow.network._solvers as s\n"
        "s.max_flow_values(np.ones((3, 2, 2)) / 2, [0], method='pruned')\n"
        "bad = [m for m in ('numba', 'torch', 'jax', 'flax', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_install_step_caches_the_kernel_flow_runs():
    """``make install`` runs ``python -m attnflow.network._compile``; afterwards a new process's first flow loads
    every compiled function from numba's cache (counted by numba, no timing asserted). A change to the argument
    types flow passes the kernel would make that process compile, and fail here."""
    from pathlib import Path

    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    recipe = makefile[makefile.index("$(KERNEL_CACHE): "):]
    assert "-m attnflow.network._compile" in recipe.split("\n\n")[0]
    assert "install: $(STAMP) $(KERNEL_CACHE)" in makefile
    subprocess.run([sys.executable, "-m", "attnflow.network._compile"], check=True, capture_output=True)
    code = (
        "import numpy as np, attnflow\n"
        "from attnflow.network import _dinic\n"
        "rng = np.random.default_rng(0)\n"
        "w = [rng.dirichlet(np.ones(7), size=(2, 3, 7)) for _ in range(4)]\n"
        "attnflow.flow(attnflow.AttentionTrace.from_arrays(w), sources=[-1])\n"
        "attnflow.flow(attnflow.AttentionTrace.from_arrays(w))\n"
        "used = [f for f in (_dinic.spans, _dinic.arc_bits, _dinic.pruned_source_flows)]\n"
        "print(sum(sum(f.stats.cache_hits.values()) for f in used), "
        "sum(sum(f.stats.cache_misses.values()) for f in used))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    hits, misses = (int(x) for x in result.stdout.split())
    assert misses == 0, "flow compiled the kernel although the install step had cached it"
    assert hits >= 3


# ------------------------------------------------------------------------------------------ options, jobs


@pytest.mark.parametrize("method", EXACT)
def test_n_jobs_and_progress(method):
    rng = np.random.default_rng(7)
    adj = bottlenecked(rng, 4, 6)
    calls: list[int] = []
    one = max_flow_values(adj, [0, 2, 5], method=method, all_layers=True)
    two = max_flow_values(adj, [0, 2, 5], method=method, all_layers=True, n_jobs=2, progress=calls.append)
    np.testing.assert_allclose(two, one, rtol=0, atol=1e-15)
    assert sum(calls) == 3 and all(k >= 1 for k in calls)
    single: list[int] = []
    max_flow_values(adj, [4], method=method, n_jobs=2, progress=single.append)
    assert single == [1]


def test_bad_options():
    adj = np.ones((2, 3, 3)) / 3
    with pytest.raises(OptionError):
        max_flow_values(adj, [0], method="fastest")
    with pytest.raises(OptionError):
        max_flow_values(adj, [3])
    with pytest.raises(OptionError):
        max_flow_values(adj, 0)
    with pytest.raises(OptionError):
        max_flow_values(adj, [0], n_jobs=0)
    with pytest.raises(OptionError):
        max_flow_values(-adj, [0])
    with pytest.raises(OptionError):
        max_flow_values(adj[0], [0])


def test_estimate_seconds_is_cheap_and_monotone():
    small = estimate_seconds(6, 32, 1)
    assert 0 < small < 60
    assert estimate_seconds(6, 128, 128) > estimate_seconds(6, 128, 1) > 0
    assert estimate_seconds(12, 512, 512, all_layers=True) > estimate_seconds(12, 512, 512) > 60
    assert estimate_seconds(6, 128, 128, method="igraph") > estimate_seconds(6, 128, 128, method="dinic")
    assert estimate_seconds(2, 512, 512, method="pruned") < 60  # closed form
    assert estimate_seconds(0, 10, 1) == 0.0
    assert estimate_seconds(6, 128, 1, tops=[3]) > estimate_seconds(6, 128, 1, tops=[6])  # shallow levels cost more
    with pytest.raises(OptionError, match="not both"):
        estimate_seconds(6, 32, 1, tops=[2], all_layers=True)
    with pytest.raises(OptionError, match="tops must be levels"):
        estimate_seconds(6, 32, 1, tops=[7])


# (layers, tokens, sources, causal) as measured by benchmarks/bench_estimate.py with all_layers=True
ALL_LAYERS_MEASURED = [(6, 128, 128, False), (12, 512, 1, False), (12, 1024, 1, True)]


def _estimate(layers, n, sources, causal, **kwargs):
    widths = [n] * sources if not causal else list(range(n - sources + 1, n + 1))  # the last tokens
    return estimate_seconds(layers, n, sources, widths=widths, causal=causal, method="dinic", **kwargs)


@pytest.mark.parametrize("layers, n, sources, causal", ALL_LAYERS_MEASURED)
def test_all_layers_estimate_costs_its_shallow_levels(layers, n, sources, causal):
    """Flow from every layer's nodes is dearer than the top level alone by more than its number of levels
    suggests: each shallow level (3, 4, ...) costs more than the top one (measured 1.3-50x: few layers to mix
    through leave most sinks to residual Dinic phases), so all_layers costs >= 4x the top level (measured
    5-50x). The old model, cost growing like T^0.47 with the level T, gave 3.4x at 6 layers. None timed."""
    top = _estimate(layers, n, sources, causal)
    assert _estimate(layers, n, sources, causal, tops=[3]) > top
    assert _estimate(layers, n, sources, causal, all_layers=True) >= 4 * top


@pytest.mark.parametrize("layers, n, sources, causal", ALL_LAYERS_MEASURED + [(24, 256, 3, True)])
def test_all_layers_estimate_is_the_sum_of_its_levels(monkeypatch, layers, n, sources, causal):
    """The levels are solved one after another on one network: with the per-call and per-capacity overheads
    set aside, all_layers costs what its levels cost alone, each level the same in any call."""
    monkeypatch.setattr(solvers, "_PASS_SECONDS", 0.0)
    monkeypatch.setattr(solvers, "_CALL_SECONDS", 0.0)
    levels = [_estimate(layers, n, sources, causal, tops=[t]) for t in range(1, layers + 1)]
    assert min(levels[2:]) > 0
    assert _estimate(layers, n, sources, causal, all_layers=True) >= sum(levels) * (1 - 1e-12)
    assert _estimate(layers, n, sources, causal, tops=[3, layers]) == pytest.approx(levels[2] + levels[-1])


def test_process_workers_are_not_forked_from_a_jax_process(tmp_path):
    """Forking a process that runs JAX can deadlock; with JAX loaded, workers start fresh (and say nothing)."""
    import subprocess
    import sys

    script = tmp_path / "run.py"
    script.write_text(
        "import multiprocessing, jax, numpy as np\n"
        "jax.numpy.ones(3).block_until_ready()  # JAX's runtime threads are up\n"
        "from attnflow.network._solvers import _process_context, max_flow_values\n"
        "if __name__ == '__main__':\n"
        "    rng = np.random.default_rng(0)\n"
        "    adj = rng.dirichlet(np.ones(5), size=(3, 5))\n"
        "    two = max_flow_values(adj, [0, 1, 2], method='igraph', n_jobs=2)\n"
        "    one = max_flow_values(adj, [0, 1, 2], method='igraph')\n"
        "    assert np.abs(two - one).max() < 1e-15\n"
        "    print(_process_context().get_start_method())\n"
    )
    result = subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", str(script)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() in ("forkserver", "spawn")
