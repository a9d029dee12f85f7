"""Traces of several token streams: encoder-decoder, two towers, linked vision tokens.

The network semantics are checked against references written here from the issue's definition, not
from attnflow's code: a numpy proportional routing and a networkx max-flow on a graph built here.
Sizes differ on every axis: batch 2, heads 3, encoder 7 positions (item 1: 5 real), decoder 4 (item 1: 3
real), encoder layers 3, decoder blocks 2.
"""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from networkx.algorithms.flow import edmonds_karp

import attnflow
from attnflow import AttentionTrace, Link, OptionError, Stream, TraceError

BATCH, HEADS, ENC, DEC, ENC_LAYERS, DEC_BLOCKS = 2, 3, 7, 4, 3, 2
ENC_REAL, DEC_REAL = (7, 5), (4, 3)


def softmax_rows(rng, shape, key_mask, causal=False, temp=0.7):
    """Random attention ``(batch, heads, q, k)`` with no mass on masked keys (and none on the future if causal)."""
    logits = rng.standard_normal(shape) / temp
    allowed = np.broadcast_to(key_mask[:, None, None, :], shape).copy()
    if causal:
        allowed &= np.tril(np.ones(shape[-2:], bool))
    logits = np.where(allowed, logits, -np.inf)
    logits -= logits.max(-1, keepdims=True)
    w = np.exp(logits)
    return w / w.sum(-1, keepdims=True)


def masks(lengths, size):
    return np.arange(size)[None, :] < np.asarray(lengths)[:, None]


def encoder_decoder(rng, enc_layers=ENC_LAYERS, dec_blocks=DEC_BLOCKS, enc=ENC, dec=DEC, enc_real=ENC_REAL,
                    dec_real=DEC_REAL, heads=HEADS):
    """Weights in execution order: encoder self layers, then per decoder block its self and cross layer."""
    enc_mask, dec_mask = masks(enc_real, enc), masks(dec_real, dec)
    batch = len(enc_real)
    weights, streams = [], []
    for _ in range(enc_layers):
        weights.append(softmax_rows(rng, (batch, heads, enc, enc), enc_mask))
        streams.append("encoder")
    for _ in range(dec_blocks):
        weights.append(softmax_rows(rng, (batch, heads, dec, dec), dec_mask, causal=True))
        streams.append("decoder")
        weights.append(softmax_rows(rng, (batch, heads, dec, enc), enc_mask))
        streams.append(("decoder", "encoder"))
    trace = AttentionTrace.from_arrays(
        weights, layer_streams=streams,
        streams={"encoder": {"mask": enc_mask}, "decoder": {"mask": dec_mask}},
    )
    return trace, weights, streams, enc_mask, dec_mask


# -------------------------------------------------------------------------------- references (from the issue)


def residual_self(a, r):
    m = (1 - r) * a + r * np.eye(a.shape[0])
    s = m.sum(-1, keepdims=True)
    return np.divide(m, s, out=np.zeros_like(m), where=s > 0)


def reference_rollout(weights, streams, enc_mask, dec_mask, b, r=0.5):
    """Numpy proportional routing, written from the definition: encoder rollout E; the decoder's state
    over [encoder inputs | decoder inputs] goes through Â for self layers and r·R + (1-r)·Ā·[E | 0] for
    cross layers (keys = the encoder's last layer)."""
    ev, dv = np.flatnonzero(enc_mask[b]), np.flatnonzero(dec_mask[b])
    ne, nd = ev.size, dv.size
    enc_state = np.eye(ne)
    dec_state = np.hstack([np.zeros((nd, ne)), np.eye(nd)])
    for w, stream in zip(weights, streams):
        fused = w[b].mean(0)
        if stream == "encoder":
            enc_state = residual_self(fused[np.ix_(ev, ev)], r) @ enc_state
        elif stream == "decoder":
            dec_state = residual_self(fused[np.ix_(dv, dv)], r) @ dec_state
        else:
            cross = fused[np.ix_(dv, ev)]
            keys = np.hstack([enc_state, np.zeros((ne, nd))])
            dec_state = r * dec_state + (1 - r) * cross @ keys
    return dec_state[:, :ne], dec_state[:, ne:], ev, dv


def reference_graph(weights, streams, enc_mask, dec_mask, b, r=0.5):
    """networkx graph of the same network: nodes (stream, depth, token index among real tokens)."""
    ev, dv = np.flatnonzero(enc_mask[b]), np.flatnonzero(dec_mask[b])
    graph = nx.DiGraph()
    depth = {"encoder": 0, "decoder": 0}

    def add(u, v, c):
        if c > 0:
            graph.add_edge(u, v, capacity=float(c))

    for w, stream in zip(weights, streams):
        fused = w[b].mean(0)
        if stream in ("encoder", "decoder"):
            idx = ev if stream == "encoder" else dv
            a = residual_self(fused[np.ix_(idx, idx)], r)
            d = depth[stream]
            for i in range(idx.size):
                for j in range(idx.size):
                    add((stream, d + 1, i), (stream, d, j), a[i, j])
            depth[stream] = d + 1
        else:
            d, e = depth["decoder"], depth["encoder"]
            cross = fused[np.ix_(dv, ev)]
            for i in range(dv.size):
                add(("decoder", d + 1, i), ("decoder", d, i), r)
                for j in range(ev.size):
                    add(("decoder", d + 1, i), ("encoder", e, j), (1 - r) * cross[i, j])
            depth["decoder"] = d + 1
    return graph, depth["decoder"], ev, dv


def reference_flow(graph, top, source, stream, size):
    out = np.zeros(size)
    for j in range(size):
        u, v = ("decoder", top, source), (stream, 0, j)
        if u in graph and v in graph:
            out[j] = nx.maximum_flow_value(graph, u, v, flow_func=edmonds_karp)
    return out


# ----------------------------------------------------------------------------------------------------- tests


def test_format_streams_and_single_stream_accessors():
    trace, *_ = encoder_decoder(np.random.default_rng(0))
    assert list(trace.streams) == ["encoder", "decoder"]
    assert trace.streams["encoder"].length == ENC and trace.streams["decoder"].length == DEC
    assert [layer.kind for layer in trace.layers] == ["self"] * 3 + ["self", "cross"] * 2
    assert trace.streams["decoder"].causal and not trace.streams["encoder"].causal
    assert trace.default_stream() == "decoder" and trace.inputs_of("decoder") == ["encoder", "decoder"]
    for attribute in ("mask", "tokens", "seq_len", "causal", "special"):
        with pytest.raises(TraceError, match=r"streams.*'encoder', 'decoder'"):
            getattr(trace, attribute)
    assert "streams={'encoder': 7, 'decoder': 4}" in repr(trace)


def test_rollout_matches_independent_routing_and_rows_sum_to_one():
    trace, weights, streams, enc_mask, dec_mask = encoder_decoder(np.random.default_rng(1))
    rollout = attnflow.rollout(trace)
    assert set(rollout) == {"encoder", "decoder"}
    assert rollout["encoder"].shape == (BATCH, DEC, ENC) and rollout["decoder"].shape == (BATCH, DEC, DEC)
    for b in range(BATCH):
        enc_part, dec_part, ev, dv = reference_rollout(weights, streams, enc_mask, dec_mask, b)
        np.testing.assert_allclose(rollout["encoder"][b][np.ix_(dv, ev)], enc_part, atol=1e-12)
        np.testing.assert_allclose(rollout["decoder"][b][np.ix_(dv, dv)], dec_part, atol=1e-12)
        total = rollout["encoder"][b].sum(-1) + rollout["decoder"][b].sum(-1)
        np.testing.assert_allclose(total[dv], 1.0, atol=1e-12)
        assert not total[~dec_mask[b]].any()
        assert not rollout["encoder"][b][:, ~enc_mask[b]].any()


def test_rollout_of_some_rows_equals_those_rows_of_the_full_rollout():
    """A few sources are routed from the output down; they must be the full rollout's rows, for every input
    stream, with the encoder's layers in between and a layer skipped."""
    trace, weights, streams, enc_mask, dec_mask = encoder_decoder(np.random.default_rng(5))
    for layers in (None, [0, 1, 3]):
        full = attnflow.rollout(trace, layers=layers)
        part = attnflow.rollout(trace, layers=layers, sources=[-1, 0])
        for name in ("encoder", "decoder"):
            for b in range(BATCH):
                last = int(np.flatnonzero(dec_mask[b])[-1])
                np.testing.assert_allclose(part[name][b, 0], full[name][b, last], atol=1e-14)
                np.testing.assert_allclose(part[name][b, 1], full[name][b, 0], atol=1e-14)


@pytest.mark.parametrize("method", ["dinic", "pruned", "igraph"])
def test_flow_matches_networkx_on_the_same_network(method):
    trace, weights, streams, enc_mask, dec_mask = encoder_decoder(np.random.default_rng(2))
    flows = attnflow.flow(trace, normalize=False, method=method)
    rollout = attnflow.rollout(trace)
    for b in range(BATCH):
        graph, top, ev, dv = reference_graph(weights, streams, enc_mask, dec_mask, b)
        for s in range(dv.size):
            for name, idx in (("encoder", ev), ("decoder", dv)):
                expected = reference_flow(graph, top, s, name, idx.size)
                np.testing.assert_allclose(flows[name][b, dv[s]][idx], expected, rtol=0, atol=1e-9)
        for name in ("encoder", "decoder"):  # max-flow can only beat proportional routing
            assert (flows[name][b] >= rollout[name][b] - 1e-12).all()
        future = np.triu(np.ones((DEC, DEC), bool), k=1)
        assert not flows["decoder"][b][future].any()  # no flow to future decoder tokens


def test_normalised_flow_rows_sum_to_one_over_both_streams():
    trace, *_ = encoder_decoder(np.random.default_rng(3))
    flows = attnflow.flow(trace, sources=[0, -1])
    assert flows["encoder"].shape == (BATCH, 2, ENC)
    total = flows["encoder"].sum(-1) + flows["decoder"].sum(-1)
    np.testing.assert_allclose(total, 1.0, atol=1e-12)


@settings(max_examples=12, deadline=None)
@given(
    enc_layers=st.integers(1, 3), dec_blocks=st.integers(1, 3), enc=st.integers(2, 6), dec=st.integers(1, 5),
    heads=st.integers(1, 3), seed=st.integers(0, 2**32 - 1),
)
def test_fast_solver_matches_networkx_on_random_encoder_decoders(enc_layers, dec_blocks, enc, dec, heads, seed):
    rng = np.random.default_rng(seed)
    trace, weights, streams, enc_mask, dec_mask = encoder_decoder(
        rng, enc_layers, dec_blocks, enc, dec, (enc,), (dec,), heads
    )
    flows = attnflow.flow(trace, normalize=False, method="dinic", sources=[-1])
    graph, top, ev, dv = reference_graph(weights, streams, enc_mask, dec_mask, 0)
    for name, idx in (("encoder", ev), ("decoder", dv)):
        np.testing.assert_allclose(flows[name][0, 0], reference_flow(graph, top, dv.size - 1, name, idx.size),
                                   rtol=0, atol=1e-9)


def test_all_layers_and_layer_selection_follow_the_decoder():
    trace, weights, streams, enc_mask, dec_mask = encoder_decoder(np.random.default_rng(4))
    every = attnflow.rollout(trace, all_layers=True)
    assert every["encoder"].shape == (2 * DEC_BLOCKS, BATCH, DEC, ENC)
    np.testing.assert_allclose(every["encoder"][-1], attnflow.rollout(trace)["encoder"], atol=1e-14)
    # after the first decoder self layer nothing has reached the encoder yet
    assert not every["encoder"][0].any()
    # selecting only the cross layers: the decoder self layers become identity
    only_cross = attnflow.rollout(trace, layers=[1, 3])
    keep = [w if s != "decoder" else None for w, s in zip(weights, streams)]
    eye = np.broadcast_to(np.eye(DEC), (BATCH, HEADS, DEC, DEC)) * dec_mask[:, None, None, :]
    eye = eye + (~dec_mask)[:, None, :, None] * dec_mask[:, None, None, :] / dec_mask.sum(1)[:, None, None, None]
    replaced = [w if w is not None else eye for w in keep]
    expected = attnflow.rollout(AttentionTrace.from_arrays(
        replaced, layer_streams=streams, streams={"encoder": {"mask": enc_mask}, "decoder": {"mask": dec_mask}}))
    np.testing.assert_allclose(only_cross["encoder"], expected["encoder"], atol=1e-12)
    with pytest.raises(OptionError, match="out of range.*4 layers"):
        attnflow.rollout(trace, layers=[4])


def test_explaining_the_encoder_gives_a_plain_array():
    trace, weights, *_ = encoder_decoder(np.random.default_rng(5))
    encoder_only = AttentionTrace.from_arrays(weights[:ENC_LAYERS], mask=trace.streams["encoder"].mask)
    np.testing.assert_allclose(attnflow.rollout(trace, stream="encoder"), attnflow.rollout(encoder_only), atol=1e-14)
    np.testing.assert_allclose(
        attnflow.flow(trace, stream="encoder", sources=[0]), attnflow.flow(encoder_only, sources=[0]), atol=1e-12
    )
    with pytest.raises(OptionError, match="no stream 'vision'"):
        attnflow.rollout(trace, stream="vision")


def test_two_towers_need_a_stream_and_each_tower_is_alone():
    rng = np.random.default_rng(6)
    text_mask = masks((5, 3), 5)
    text = [softmax_rows(rng, (2, 3, 5, 5), text_mask, causal=True) for _ in range(2)]
    vision = [softmax_rows(rng, (2, 3, 6, 6), np.ones((2, 6), bool)) for _ in range(3)]
    trace = AttentionTrace.from_arrays(
        text + vision, layer_streams=["text"] * 2 + ["vision"] * 3,
        streams={"text": {"mask": text_mask}, "vision": {"special": np.eye(1, 6, dtype=bool).repeat(2, 0),
                                                           "grid": (1, 5)}},
    )
    with pytest.raises(TraceError, match=r"stream=.*'text'"):
        attnflow.rollout(trace)
    with pytest.raises(TraceError, match="stream="):
        attnflow.flow(trace)
    alone = AttentionTrace.from_arrays(vision)
    np.testing.assert_allclose(attnflow.rollout(trace, stream="vision"), attnflow.rollout(alone), atol=1e-14)
    assert trace.streams["text"].causal and trace.streams["vision"].grid == (1, 5)
    assert trace.streams["vision"].patch_positions(0).tolist() == [1, 2, 3, 4, 5]
    np.testing.assert_allclose(attnflow.raw(trace, stream="text", layer=-1), text[-1].mean(1) * (
        text_mask[:, :, None] & text_mask[:, None, :]), atol=1e-14)


def linked_trace(rng):
    """LLaVA-like: a vision tower (3 layers over CLS + 4 patches) whose depth-2 patches feed the image tokens
    of a 2-layer text stream of 6 positions; item 0 has image tokens at 1, 2 (patches 3, 0), item 1 at 4, 5."""
    vision = [softmax_rows(rng, (2, 3, 5, 5), np.ones((2, 5), bool)) for _ in range(3)]
    text = [softmax_rows(rng, (2, 3, 6, 6), np.ones((2, 6), bool), causal=True) for _ in range(2)]
    link = np.zeros((2, 6, 5))
    link[0, 1, 1 + 3] = link[0, 2, 1 + 0] = 1.0
    link[1, 4, 1 + 1] = link[1, 5, 1 + 2] = 1.0
    trace = AttentionTrace.from_arrays(
        vision + text, layer_streams=["vision"] * 3 + ["text"] * 2,
        streams={"vision": {"special": np.eye(1, 5, dtype=bool).repeat(2, 0), "grid": (2, 2)}, "text": {}},
        links=[Link("text", "vision", 2, link)],
    )
    return trace, vision, text, link


def test_linked_tokens_route_into_the_vision_stream():
    trace, vision, text, link = linked_trace(np.random.default_rng(7))
    assert trace.default_stream() == "text" and trace.inputs_of("text") == ["vision", "text"]
    rollout = attnflow.rollout(trace)
    flows = attnflow.flow(trace, normalize=False)
    for b in range(2):
        v = np.eye(5)
        for w in vision[:2]:  # only the layers up to the link's depth feed the text stream
            v = residual_self(w[b].mean(0), 0.5) @ v
        fed = link[b].sum(-1) > 0
        state = np.hstack([link[b] @ v, np.diag((~fed).astype(float))])  # text inputs: [vision | own]
        graph = nx.DiGraph()
        for d, w in enumerate(vision[:2]):
            a = residual_self(w[b].mean(0), 0.5)
            for i in range(5):
                for j in range(5):
                    graph.add_edge(("v", d + 1, i), ("v", d, j), capacity=a[i, j])
        for i in range(6):
            if fed[i]:
                graph.add_edge(("t", "in", i), ("v", 2, int(link[b, i].argmax())), capacity=1.0)
            else:
                graph.add_edge(("t", "in", i), ("t", 0, i), capacity=1.0)
        for d, w in enumerate(text):
            a = residual_self(w[b].mean(0), 0.5)
            state = a @ state
            for i in range(6):
                for j in range(6):
                    if a[i, j] > 0:
                        below = ("t", "in", j) if d == 0 else ("t", d, j)
                        graph.add_edge(("t", d + 1, i), below, capacity=a[i, j])
        np.testing.assert_allclose(rollout["vision"][b], state[:, :5], atol=1e-12)
        np.testing.assert_allclose(rollout["text"][b], state[:, 5:], atol=1e-12)
        assert not rollout["text"][b][:, fed].any()  # image tokens are no inputs of their own
        for s in range(6):
            for j in range(5):
                expected = nx.maximum_flow_value(graph, ("t", 2, s), ("v", 0, j), flow_func=edmonds_karp)
                assert flows["vision"][b, s, j] == pytest.approx(expected, abs=1e-9)
            for j in np.flatnonzero(~fed):
                expected = nx.maximum_flow_value(graph, ("t", 2, s), ("t", 0, j), flow_func=edmonds_karp)
                assert flows["text"][b, s, j] == pytest.approx(expected, abs=1e-9)


def test_flow_network_is_the_whole_network():
    trace, weights, streams, enc_mask, dec_mask = encoder_decoder(np.random.default_rng(8))
    graph = attnflow.flow_network(trace, batch_index=1)
    ref, top, ev, dv = reference_graph(weights, streams, enc_mask, dec_mask, 1)
    assert graph.vcount() == ev.size * (ENC_LAYERS + 1) + dv.size * (2 * DEC_BLOCKS + 1)
    assert graph.ecount() == ref.number_of_edges()
    index = {(v["stream"], v["layer"], v["token"]): v.index for v in graph.vs}
    assert graph.vs[index[("encoder", 0, 2)]]["position"] == 2 and graph.vs[index[("decoder", 0, 0)]]["input"]
    assert graph.vs[index[("decoder", 1, 0)]]["label"].startswith("decoder:L1:")
    flows = attnflow.flow(trace, normalize=False)
    for s in range(dv.size):
        for j in range(ev.size):
            got = graph.maxflow_value(index[("decoder", top, s)], index[("encoder", 0, j)], capacity="capacity")
            assert got == pytest.approx(flows["encoder"][1, dv[s], ev[j]], abs=1e-9)


def test_multi_stream_round_trip(tmp_path):
    trace, *_ = linked_trace(np.random.default_rng(9))
    trace = trace.replace(metadata={"model": "llava-like", "sizes": [1, 2]})
    trace.save(tmp_path / "t.safetensors")
    loaded = attnflow.load(tmp_path / "t.safetensors")
    assert list(loaded.streams) == list(trace.streams)
    for name, stream in trace.streams.items():
        other = loaded.streams[name]
        assert (other.causal, other.grid, other.tokens) == (stream.causal, stream.grid, stream.tokens)
        np.testing.assert_array_equal(other.mask, stream.mask)
        np.testing.assert_array_equal(other.special, stream.special)
    assert loaded.links[0].depth == 2 and loaded.links[0].stream == "text"
    np.testing.assert_array_equal(loaded.links[0].weights, trace.links[0].weights)
    assert loaded.metadata == trace.metadata
    np.testing.assert_allclose(attnflow.rollout(loaded)["vision"], attnflow.rollout(trace)["vision"], atol=0)


def test_stream_errors_say_what_to_do():
    rng = np.random.default_rng(10)
    enc = softmax_rows(rng, (1, 2, 5, 5), np.ones((1, 5), bool))
    dec = softmax_rows(rng, (1, 2, 3, 3), np.ones((1, 3), bool))
    with pytest.raises(TraceError, match="several token streams.*streams= and layer_streams="):
        AttentionTrace.from_arrays([enc, dec])
    with pytest.raises(TraceError, match="names no query stream"):
        AttentionTrace.from_arrays([enc, dec], streams={"encoder": {}, "decoder": {}})
    with pytest.raises(TraceError, match="used by no layer"):
        AttentionTrace.from_arrays([enc], streams={"encoder": {}, "decoder": {}}, layer_streams=["encoder"])
    with pytest.raises(TraceError, match="inside each Stream"):
        AttentionTrace.from_arrays([enc], streams=[Stream("encoder")], mask=np.ones((1, 5)))
    with pytest.raises(TraceError, match="stream name"):
        AttentionTrace.from_arrays([enc], streams={"bad name!": {}})


def test_cropping_an_item_equals_capturing_it_alone():
    trace, weights, streams, enc_mask, dec_mask = encoder_decoder(np.random.default_rng(12))
    cropped = trace.select(1, crop=True)
    assert cropped.streams["encoder"].length == 5 and cropped.streams["decoder"].length == 3
    assert cropped.streams["encoder"].mask.all() and cropped.batch_size == 1
    full = attnflow.rollout(trace)
    alone = attnflow.rollout(cropped)
    np.testing.assert_allclose(alone["encoder"][0], full["encoder"][1][:3, :5], atol=1e-14)
    np.testing.assert_allclose(
        attnflow.flow(cropped, sources=[-1])["encoder"][0], attnflow.flow(trace, sources=[-1])["encoder"][1][:, :5],
        atol=1e-12,
    )
    linked, *_ = linked_trace(np.random.default_rng(13))
    assert linked.select(0, crop=True).links[0].weights.shape == (1, 6, 5)
