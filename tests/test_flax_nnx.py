"""The flax_nnx adapter on tiny NNX models, checked against attention computed independently in numpy,
and checked to leave the model exactly as it found it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attnflow
from attnflow import AdapterError, HiddenAttentionError

# A distinct size on every axis: batch 2, heads 3, seq 6, layers 4, features 24 (head dim 8),
# cross-attention queries 5 and keys 7.
BATCH, HEADS, SEQ, LAYERS, FEATURES, Q, K = 2, 3, 6, 4, 24, 5, 7
HEAD_DIM = FEATURES // HEADS


def attention(rngs, **kwargs):
    return nnx.MultiHeadAttention(num_heads=HEADS, in_features=FEATURES, decode=False, rngs=rngs, **kwargs)


class Block(nnx.Module):
    def __init__(self, rngs):
        self.attention = attention(rngs)

    def __call__(self, x, mask=None, is_causal=False):
        return x + self.attention(x, mask=mask, is_causal=is_causal)


class Model(nnx.Module):
    def __init__(self, rngs):
        self.layers = nnx.List([Block(rngs) for _ in range(LAYERS)])

    def __call__(self, x, mask=None, is_causal=False):
        for layer in self.layers:
            x = layer(x, mask, is_causal)
        return x

    def encode(self, x):
        return self(x)


def softmax(scores):
    scores = scores - scores.max(axis=-1, keepdims=True)
    e = np.exp(scores)
    return e / e.sum(axis=-1, keepdims=True)


def mha_reference(module, xq, xkv, mask=None):
    """Multi-head attention from the module's own parameters, in float64 numpy: (weights, output)."""

    def get(linear, name):
        return np.asarray(getattr(linear, name)[...], dtype=np.float64)

    xq, xkv = np.asarray(xq, np.float64), np.asarray(xkv, np.float64)
    q = np.einsum("bqf,fhd->bqhd", xq, get(module.query, "kernel")) + get(module.query, "bias")
    k = np.einsum("bkf,fhd->bkhd", xkv, get(module.key, "kernel")) + get(module.key, "bias")
    v = np.einsum("bkf,fhd->bkhd", xkv, get(module.value, "kernel")) + get(module.value, "bias")
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    if mask is not None:
        scores = np.where(np.asarray(mask, bool), scores, np.finfo(np.float32).min)
    weights = softmax(scores)
    heads = np.einsum("bhqk,bkhd->bqhd", weights, v)
    return weights, np.einsum("bqhd,hdf->bqf", heads, get(module.out, "kernel")) + get(module.out, "bias")


def model_reference(model, x, mask=None):
    x = np.asarray(x, np.float64)
    weights = []
    for layer in model.layers:
        w, out = mha_reference(layer.attention, x, x, mask)
        weights.append(w)
        x = x + out
    return weights, x


@pytest.fixture(scope="module")
def setup():
    x = jax.random.normal(jax.random.key(1), (BATCH, SEQ, FEATURES))
    valid = np.ones((BATCH, SEQ), dtype=bool)
    valid[1, 4:] = False
    return Model(nnx.Rngs(0)), x, valid


def padding_mask(valid):
    return np.asarray(valid[:, None, None, :])


def snapshot(model):
    """Everything that could betray a leftover: graph definition, state values, types and attributes."""
    graphdef, state = nnx.split(model)
    leaves = [np.asarray(leaf) for leaf in jax.tree.leaves(state)]
    attributes = {path: (type(module), dict(vars(module))) for path, module in nnx.iter_modules(model)}
    return graphdef, leaves, attributes


def assert_unchanged(model, before, *, nnx_jit_ran=False):
    """Every attribute is the very same object as before, except NNX's own bookkeeping that Flax itself
    renews: ``_pytree__nodes`` (a new, equal mapping after nnx.capture) and ``_pytree__state`` (a new
    object after ``nnx.jit``, when ``nnx_jit_ran``)."""
    graphdef, leaves, attributes = snapshot(model)
    assert graphdef == before[0]
    assert len(leaves) == len(before[1]) and all(np.array_equal(a, b) for a, b in zip(leaves, before[1]))
    assert attributes.keys() == before[2].keys()
    for path, (cls, attrs) in attributes.items():
        old_cls, old_attrs = before[2][path]
        assert cls is old_cls, path
        assert attrs.keys() == old_attrs.keys(), (path, set(attrs) ^ set(old_attrs))
        assert attrs["_pytree__nodes"] == old_attrs["_pytree__nodes"], path
        skip = {"_pytree__nodes", "_pytree__state"} if nnx_jit_ran else {"_pytree__nodes"}
        assert all(attrs[k] is old_attrs[k] for k in attrs if k not in skip), (path, [k for k in attrs if attrs[k] is not old_attrs[k]])


def test_capture_matches_numpy_reference_and_leaves_model_unchanged(setup):
    model, x, valid = setup
    before = snapshot(model)
    mask = padding_mask(valid)
    plain = np.asarray(model(x, mask))
    trace = attnflow.capture(model, x, mask)
    assert_unchanged(model, before)
    expected, expected_out = model_reference(model, x, mask)
    assert trace.layer_names == [f"layers/{i}/attention" for i in range(LAYERS)]
    assert trace.metadata["adapter"] == "flax_nnx" and trace.model_name == "Model" and trace.framework == "jax"
    for layer, reference in zip(trace.layers, expected):
        assert layer.weights.shape == (BATCH, HEADS, SEQ, SEQ) and layer.kind == "self"
        np.testing.assert_allclose(layer.weights, reference, atol=1e-5)
    np.testing.assert_array_equal(trace.mask, valid)
    assert not trace.causal
    np.testing.assert_allclose(plain, expected_out, atol=1e-4)
    np.testing.assert_allclose(np.asarray(model(x, mask)), plain, atol=1e-5)


def test_is_causal_and_causal_masks(setup):
    model, x, valid = setup
    full = np.broadcast_to(padding_mask(valid), (BATCH, 1, SEQ, SEQ))  # is_causal needs the full mask shape
    trace = attnflow.capture(model, x, full, True)
    causal = np.tril(np.ones((SEQ, SEQ), dtype=bool)) & full
    expected, _ = model_reference(model, x, causal)
    np.testing.assert_allclose(trace.layers[1].weights, expected[1], atol=1e-5)
    assert trace.causal
    np.testing.assert_array_equal(trace.mask, valid)
    mask = nnx.make_causal_mask(jnp.ones((BATCH, SEQ)))
    assert attnflow.capture(model, x, mask).causal


def test_model_unchanged_after_an_exception(setup):
    model, x, _ = setup
    before = snapshot(model)
    with pytest.raises(ValueError, match="Incompatible input dimension"):
        with attnflow.attach(model):
            model(jnp.ones((BATCH, SEQ, FEATURES + 1)))
    assert_unchanged(model, before)
    assert not jax.config.jax_disable_jit
    with pytest.raises(RuntimeError, match="inside"):
        with attnflow.attach(model):
            model(x)
            raise RuntimeError("raised inside the block")
    assert_unchanged(model, before)


def test_jitted_forward_is_recorded(setup):
    model, x, valid = setup
    mask = padding_mask(valid)
    nnx_forward = nnx.jit(lambda m, x, mask: m(x, mask))
    jax_forward = jax.jit(lambda x, mask: model(x, mask))
    compiled = np.asarray(jax_forward(x, mask))
    before = snapshot(model)
    with attnflow.attach(model) as rec:
        nnx_forward(model, x, mask)
        inside = np.asarray(jax_forward(x, mask))
        assert jax.config.jax_disable_jit
    assert not jax.config.jax_disable_jit
    assert_unchanged(model, before, nnx_jit_ran=True)
    assert len(rec.traces) == 2
    expected, _ = model_reference(model, x, mask)
    for trace in rec.traces:
        for layer, reference in zip(trace.layers, expected):
            np.testing.assert_allclose(layer.weights, reference, atol=1e-5)
    np.testing.assert_allclose(inside, compiled, atol=1e-5)
    # after the block the jitted functions run compiled again, recording nothing
    nnx_forward(model, x, mask)
    jax_forward(x, mask)
    assert len(rec.traces) == 2


def test_vmap_is_recorded_and_attach_inside_jit_raises(setup):
    model, x, _ = setup
    before = snapshot(model)
    expected, _ = model_reference(model, x)
    with attnflow.attach(model) as rec:
        jax.vmap(lambda item: model(item[None]))(x)  # one debug callback per example, stacked again
    assert_unchanged(model, before)
    assert len(rec.traces) == 1
    for layer, reference in zip(rec.trace.layers, expected):
        np.testing.assert_allclose(layer.weights, reference, atol=1e-5)

    @jax.jit
    def attach_inside(x):
        with attnflow.attach(model):
            return model(x)

    with pytest.raises(AdapterError, match="tracer"):
        attach_inside(x)
    assert_unchanged(model, before)


class SowingModel(nnx.Module):
    """Asks for its own attention weights through sow_weights=True, read with nnx.capture."""

    def __init__(self, rngs):
        self.attention = attention(rngs)

    def __call__(self, x):
        return self.attention(x, sow_weights=True)


def test_users_own_nnx_capture_still_works():
    x = jax.random.normal(jax.random.key(2), (BATCH, SEQ, FEATURES))
    model = SowingModel(nnx.Rngs(0))
    _, expected = nnx.capture(model, nnx.Intermediate)(x)
    with attnflow.attach(model) as rec:
        _, got = nnx.capture(model, nnx.Intermediate)(x)
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    sown = np.asarray(jax.tree.leaves(got)[0])
    np.testing.assert_allclose(sown, np.asarray(jax.tree.leaves(expected)[0]), atol=1e-6)
    np.testing.assert_array_equal(rec.trace.layers[0].weights, sown)
    assert not hasattr(model.attention, "attention_weights")


class DotProductModule(nnx.Module):
    """Attention written by hand, passing module=self to nnx.dot_product_attention."""

    def __init__(self, rngs):
        self.q = nnx.LinearGeneral(FEATURES, (HEADS, HEAD_DIM), rngs=rngs)
        self.k = nnx.LinearGeneral(FEATURES, (HEADS, HEAD_DIM), rngs=rngs)
        self.v = nnx.LinearGeneral(FEATURES, (HEADS, HEAD_DIM), rngs=rngs)

    def __call__(self, x):
        out = nnx.dot_product_attention(self.q(x), self.k(x), self.v(x), module=self)
        return out.reshape(x.shape)


class Wrapper(nnx.Module):
    def __init__(self, rngs):
        self.inner = DotProductModule(rngs)

    def __call__(self, x):
        return self.inner(x)


def test_module_passing_itself_to_dot_product_attention():
    x = jax.random.normal(jax.random.key(3), (BATCH, SEQ, FEATURES))
    model = Wrapper(nnx.Rngs(0))
    nnx.capture(model, nnx.Intermediate)(x)  # nnx.capture's first run notes '__captures__' in each module
    before = snapshot(model)
    with attnflow.attach(model) as rec:  # the model's sow goes on to the user's own nnx.capture, as before
        _, intermediates = nnx.capture(model, nnx.Intermediate)(x)
    assert_unchanged(model, before)
    trace = rec.trace
    inner = model.inner
    xs = np.asarray(x, np.float64)
    q = np.einsum("bsf,fhd->bshd", xs, np.asarray(inner.q.kernel[...])) + np.asarray(inner.q.bias[...])
    k = np.einsum("bsf,fhd->bshd", xs, np.asarray(inner.k.kernel[...])) + np.asarray(inner.k.bias[...])
    expected = softmax(np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(HEAD_DIM))
    assert trace.layer_names == ["inner"]
    np.testing.assert_allclose(trace.layers[0].weights, expected, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(jax.tree.leaves(intermediates)[0]), trace.layers[0].weights)


class MyAttention(nnx.MultiHeadAttention):
    """A subclass of nnx.MultiHeadAttention, e.g. with its own projections or defaults."""


class CrossModel(nnx.Module):
    def __init__(self, rngs):
        self.self_attention = MyAttention(num_heads=HEADS, in_features=FEATURES, decode=False, rngs=rngs)
        self.cross_attention = attention(rngs)

    def __call__(self, y, memory):
        y = y + self.self_attention(y)
        return y + self.cross_attention(y, memory)


def test_cross_attention_and_subclasses():
    y = jax.random.normal(jax.random.key(4), (BATCH, Q, FEATURES))
    memory = jax.random.normal(jax.random.key(5), (BATCH, K, FEATURES))
    model = CrossModel(nnx.Rngs(0))
    trace = attnflow.capture(model, y, memory)
    assert [(layer.name, layer.kind, layer.shape) for layer in trace.layers] == [
        ("self_attention", "self", (BATCH, HEADS, Q, Q)), ("cross_attention", "cross", (BATCH, HEADS, Q, K)),
    ]
    w_self, out = mha_reference(model.self_attention, y, y)
    w_cross, _ = mha_reference(model.cross_attention, np.asarray(y, np.float64) + out, memory)
    np.testing.assert_allclose(trace.layers[0].weights, w_self, atol=1e-5)
    np.testing.assert_allclose(trace.layers[1].weights, w_cross, atol=1e-5)


def test_each_call_is_one_trace_and_methods_count(setup):
    model, x, _ = setup
    with attnflow.attach(model) as rec:
        model(x)
        model.encode(x[:, :4])  # a public method calling __call__: still one pass
        model.layers[0](x)  # a submodule on its own: its layer, recorded as its own pass at the end
    assert [(t.num_layers, t.seq_len) for t in rec.traces] == [(LAYERS, SEQ), (LAYERS, 4), (1, SEQ)]
    assert type(model) is Model


def test_bfloat16_is_upcast():
    x = jax.random.normal(jax.random.key(6), (BATCH, SEQ, FEATURES))
    model = attention(nnx.Rngs(0), dtype=jnp.bfloat16)
    trace = attnflow.capture(model, x)
    layer = trace.layers[0]
    assert layer.name == "MultiHeadAttention"
    assert layer.weights.dtype == np.float32 and layer.source_dtype == "bfloat16"
    expected, _ = mha_reference(model, x, x)
    np.testing.assert_allclose(layer.weights, expected, atol=3e-2)


def test_opaque_attention_fn_is_hidden_attention(setup):
    _, x, _ = setup

    def opaque(query, key, value, *, module=None, **kwargs):
        return jax.nn.dot_product_attention(query, key, value)

    model = attention(nnx.Rngs(0), attention_fn=opaque)
    before = snapshot(model)
    with pytest.raises(HiddenAttentionError, match="did not sow"):
        attnflow.capture(model, x)
    assert_unchanged(model, before)


def test_adapter_claims():
    model = Model(nnx.Rngs(0))
    adapter = attnflow.get_adapter("flax_nnx")
    assert adapter.claims(model) and adapter.claims(model.encode)
    assert not adapter.claims(lambda x: x) and not attnflow.get_adapter("flax_linen").claims(model)


class EncoderBlock(nnx.Module):
    def __init__(self, rngs):
        self.attention = attention(rngs)

    def __call__(self, x, mask):
        return x + self.attention(x, mask=mask)


class DecoderBlock(nnx.Module):
    def __init__(self, rngs):
        self.self_attention = attention(rngs)
        self.cross_attention = attention(rngs)

    def __call__(self, y, memory, self_mask, cross_mask):
        y = y + self.self_attention(y, mask=self_mask)
        return y + self.cross_attention(y, memory, mask=cross_mask)


class Seq2Seq(nnx.Module):
    """An encoder-decoder of nnx.MultiHeadAttention: 2 encoder blocks, 3 decoder blocks."""

    def __init__(self, rngs):
        self.encoder = nnx.List([EncoderBlock(rngs) for _ in range(2)])
        self.decoder = nnx.List([DecoderBlock(rngs) for _ in range(3)])

    def __call__(self, src, tgt, src_valid):
        enc_mask = src_valid[:, None, None, :] & src_valid[:, None, :, None]
        for block in self.encoder:
            src = block(src, enc_mask)
        causal = jnp.tril(jnp.ones((tgt.shape[1], tgt.shape[1]), bool))[None, None]
        cross = jnp.broadcast_to(src_valid[:, None, None, :], (tgt.shape[0], 1, tgt.shape[1], src.shape[1]))
        for block in self.decoder:
            tgt = block(tgt, src, causal, cross)
        return tgt


def test_encoder_decoder_captures_streams_and_cross_layers():
    src = jax.random.normal(jax.random.key(11), (BATCH, K, FEATURES))
    tgt = jax.random.normal(jax.random.key(12), (BATCH, Q, FEATURES))
    valid = jnp.array([[True] * K, [True] * 5 + [False] * (K - 5)])
    model = Seq2Seq(nnx.Rngs(3))
    trace = attnflow.capture(model, src, tgt, valid)
    assert list(trace.streams) == ["encoder", "decoder"]
    assert [(layer.query_stream, layer.key_stream) for layer in trace.layers] == (
        [("encoder", "encoder")] * 2 + [("decoder", "decoder"), ("decoder", "encoder")] * 3
    )
    assert trace.streams["encoder"].mask.tolist() == np.asarray(valid).tolist() and trace.streams["decoder"].causal
    # the reference: every layer recomputed in numpy from the module's own parameters
    enc_mask = np.asarray(valid)[:, None, None, :] & np.asarray(valid)[:, None, :, None]
    h = np.asarray(src, np.float64)
    expected = []
    for block in model.encoder:
        w, out = mha_reference(block.attention, h, h, enc_mask)
        expected.append(w)
        h = h + out
    y = np.asarray(tgt, np.float64)
    causal = np.tril(np.ones((Q, Q), bool))[None, None]
    cross = np.broadcast_to(np.asarray(valid)[:, None, None, :], (BATCH, 1, Q, K))
    for block in model.decoder:
        w, out = mha_reference(block.self_attention, y, y, causal)
        expected.append(w)
        y = y + out
        w, out = mha_reference(block.cross_attention, y, h, cross)
        expected.append(w)
        y = y + out
    for layer, w in zip(trace.layers, expected):
        np.testing.assert_allclose(layer.weights * np.asarray(
            trace.streams[layer.key_stream].mask)[:, None, None, :], w * np.asarray(
            trace.streams[layer.key_stream].mask)[:, None, None, :], atol=1e-5)
    rollout = attnflow.rollout(trace)
    np.testing.assert_allclose(rollout["encoder"].sum(-1) + rollout["decoder"].sum(-1), 1.0, atol=1e-9)


# -- stacked layers under nnx.scan (with nnx.remat), named like their unrolled twin ------------------------------
STACK = 3


class StackedModel(nnx.Module):
    def __init__(self, rngs):
        @nnx.split_rngs(splits=STACK)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(rngs):
            return Block(rngs)

        self.layers = create(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        @nnx.remat
        def body(x, layer):
            return layer(x)

        return body(x, self.layers)


def test_stacked_layers_under_scan_and_remat_pair_with_their_unrolled_twin(setup):
    _, x, _ = setup
    stacked = StackedModel(nnx.Rngs(3))
    unrolled = Model(nnx.Rngs(4))
    unrolled.layers = nnx.List(list(unrolled.layers)[:STACK])
    state = nnx.state(stacked.layers)
    for i, block in enumerate(unrolled.layers):
        nnx.update(block, jax.tree.map(lambda a, i=i: a[i], state))
    before = snapshot(stacked)
    with attnflow.attach(stacked) as rec:
        grads = nnx.grad(lambda m: m(x).sum())(stacked)  # grad through remat: each layer recorded once
    assert_unchanged(stacked, before, nnx_jit_ran=True)  # nnx.grad renews _pytree__state, as nnx.jit does
    assert jax.tree.leaves(grads)
    a = rec.trace
    assert len(rec.traces) == 1 and a.layer_names == [f"layers/{i}/attention" for i in range(STACK)]
    b = attnflow.capture(unrolled, x)
    assert b.layer_names == [f"layers/{i}/attention" for i in range(STACK)]
    report = attnflow.compare(a, b, align="names")
    assert report.ok and len(report.layers) == STACK, report
    expected, _ = model_reference(unrolled, x)
    for layer, reference in zip(a.layers, expected):
        np.testing.assert_allclose(layer.weights, reference, atol=1e-5)
    with attnflow.attach(stacked) as rec:  # vmap over examples of the scan: per layer, the examples restacked
        nnx.vmap(lambda m, item: m(item[None]), in_axes=(None, 0))(stacked, x)
    assert rec.trace.layer_names == a.layer_names
    for layer, reference in zip(rec.trace.layers, expected):
        np.testing.assert_allclose(layer.weights, reference, atol=1e-5)


# -- attention written by hand: modules= and layout= -------------------------------------------------------------
class HandAttention(nnx.Module):
    """Causal attention written by hand: nnx.softmax over (batch, query, head, key)."""

    def __init__(self, rngs):
        self.qkv = nnx.LinearGeneral(FEATURES, (3, HEADS, HEAD_DIM), rngs=rngs)
        self.out = nnx.LinearGeneral((HEADS, HEAD_DIM), FEATURES, axis=(-2, -1), rngs=rngs)

    def __call__(self, x):
        q, k, v = jnp.moveaxis(self.qkv(x), 2, 0)
        logits = jnp.einsum("bqhd,bkhd->bqhk", q, k) / np.sqrt(HEAD_DIM)
        causal = jnp.tril(jnp.ones((x.shape[1], x.shape[1]), bool))[None, :, None, :]
        probs = nnx.softmax(jnp.where(causal, logits, -jnp.inf), axis=-1)
        return self.out(jnp.einsum("bqhk,bkhd->bqhd", probs, v))


class HandModel(nnx.Module):
    def __init__(self, rngs):
        self.blocks = nnx.List([HandAttention(rngs) for _ in range(2)])

    def __call__(self, x):
        for block in self.blocks:
            x = x + block(x)
        return x


def hand_reference(model, x):
    h, weights = np.asarray(x, np.float64), []
    causal = np.tril(np.ones((h.shape[1], h.shape[1]), bool))
    for block in model.blocks:
        kernel = np.asarray(block.qkv.kernel[...], np.float64)
        q, k, v = np.moveaxis(np.einsum("bsf,fthd->bsthd", h, kernel) + np.asarray(block.qkv.bias[...]), 2, 0)
        probs = softmax(np.where(causal, np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(HEAD_DIM), -np.inf))
        weights.append(probs)
        out = np.einsum("bhqk,bkhd->bqhd", probs, v)
        h = h + np.einsum("bqhd,hdf->bqf", out, np.asarray(block.out.kernel[...])) + np.asarray(block.out.bias[...])
    return weights


def test_modules_option_records_hand_written_attention():
    x = jax.random.normal(jax.random.key(5), (BATCH, SEQ, FEATURES))
    model = HandModel(nnx.Rngs(5))
    before = snapshot(model)
    with pytest.raises(AdapterError, match=r"recorded no attention.*blocks/0 \(HandAttention\).*modules="):
        attnflow.capture(model, x)
    for selector in (HandAttention, "blocks/?"):
        with attnflow.attach(model, modules=[selector], layout="bqhk") as rec:
            model(x)
            assert type(model.blocks[0]) is not HandAttention  # swapped while attached
        assert_unchanged(model, before)
        trace = rec.trace
        assert trace.layer_names == ["blocks/0", "blocks/1"] and trace.causal
        for layer, reference in zip(trace.layers, hand_reference(model, x)):
            np.testing.assert_allclose(layer.weights, reference, atol=1e-5)
    with pytest.raises(HiddenAttentionError, match=r"layout='bqkh' \(it computed softmaxes of shapes \[\(2, 6, 3, 6\)\]"):
        attnflow.capture(model, x, adapter_options={"modules": [HandAttention], "layout": "bqkh"})
    assert_unchanged(model, before)


# -- values=True and value_zeroing=True on a GPT-2-style pre-LN decoder, float64 (issue 25) -----------------------------
# Its own distinct sizes: batch 3, layers 2, heads 4, tokens 6, head dim 5 (width 20), vocabulary 9, MLP 7.
GB, GL, GH, GT, GDH, GV, GF = 3, 2, 4, 6, 5, 9, 7
GD = GH * GDH


class GPTBlock(nnx.Module):
    def __init__(self, rngs):
        f64 = dict(param_dtype=jnp.float64, dtype=jnp.float64, rngs=rngs)
        self.ln_1 = nnx.LayerNorm(GD, epsilon=1e-5, **f64)
        self.attn = nnx.MultiHeadAttention(num_heads=GH, in_features=GD, decode=False, **f64)
        self.ln_2 = nnx.LayerNorm(GD, epsilon=1e-5, **f64)
        self.fc = nnx.Linear(GD, GF, **f64)
        self.proj = nnx.Linear(GF, GD, **f64)

    def __call__(self, x, mask):
        x = x + self.attn(self.ln_1(x), mask=mask)
        return x + self.proj(nnx.gelu(self.fc(self.ln_2(x))))


class TinyGPT(nnx.Module):
    def __init__(self, rngs):
        self.wte = nnx.Embed(GV, GD, param_dtype=jnp.float64, dtype=jnp.float64, rngs=rngs)
        self.h = nnx.List([GPTBlock(rngs) for _ in range(GL)])
        self.ln_f = nnx.LayerNorm(GD, param_dtype=jnp.float64, dtype=jnp.float64, rngs=rngs)

    def __call__(self, ids, valid):
        mask = nnx.combine_masks(nnx.make_causal_mask(ids), nnx.make_attention_mask(valid, valid))
        x = self.wte(ids)
        for block in self.h:
            x = block(x, mask)
        return self.wte.attend(self.ln_f(x))


def gpt_block_reference(block, x, allowed, keep=None):
    """One block written out in float64 numpy, the value vectors multiplied by ``keep`` (batch, keys): the block's
    output and what values=True records."""

    def p(module, name):
        return np.asarray(getattr(module, name)[...], np.float64)

    def norm(z, module):
        centred = z - z.mean(-1, keepdims=True)
        return centred / np.sqrt((centred**2).mean(-1, keepdims=True) + 1e-5) * p(module, "scale") + p(module, "bias")

    a = block.attn
    h = norm(x, block.ln_1)
    q, k, v = (np.einsum("btd,dhe->bthe", h, p(m, "kernel")) + p(m, "bias") for m in (a.query, a.key, a.value))
    if keep is not None:
        v = v * keep[:, :, None, None]
    scores = np.where(allowed[:, None], np.einsum("bqhe,bkhe->bhqk", q, k) / np.sqrt(GDH), np.finfo(np.float64).min)
    probs = softmax(scores)
    moved = np.einsum("bhqk,bkhe,hed->bqd", probs, v, p(a.out, "kernel"))
    y = x + moved + p(a.out, "bias")
    up = np.einsum("btd,df->btf", norm(y, block.ln_2), p(block.fc, "kernel")) + p(block.fc, "bias")
    gelu = 0.5 * up * (1 + np.tanh(np.sqrt(2 / np.pi) * (up + 0.044715 * up**3)))  # nnx.gelu: tanh approximation
    out = y + np.einsum("btf,fd->btd", gelu, p(block.proj, "kernel")) + p(block.proj, "bias")
    kept = {"value": v.transpose(0, 2, 1, 3), "out_weight": p(a.out, "kernel")[None], "out_bias": p(a.out, "bias")[None],
            "residual": x, "block_output": y, "weights": probs}
    return out, kept


def zeroing_reference(block, x, allowed, valid):
    """Value zeroing (Mohebbi et al., 2023) of one block: 1 - cos(output_i, output_i with token j's values zeroed),
    real tokens only, causal (j <= i)."""
    out = np.zeros((GB, GT, GT))
    for b in range(GB):
        original, _ = gpt_block_reference(block, x[b : b + 1], allowed[b : b + 1])
        for j in np.flatnonzero(valid[b]):
            keep = np.ones((1, GT))
            keep[0, j] = 0.0
            zeroed, _ = gpt_block_reference(block, x[b : b + 1], allowed[b : b + 1], keep)
            cos = (zeroed * original).sum(-1) / np.linalg.norm(zeroed, axis=-1) / np.linalg.norm(original, axis=-1)
            for i in np.flatnonzero(valid[b]):
                out[b, i, j] = (1.0 - cos[0, i]) if j <= i else 0.0
    return out


@pytest.fixture(scope="module")
def tiny_gpt():
    from attnflow.adapters import FlaxValueMap
    from attnflow.adapters._jax import _flax_methods

    saved = dict(_flax_methods.VALUE_MAPS)
    attnflow.adapters.register_flax_value_map("TinyGPT", FlaxValueMap(
        attention="attn", value="attn/value", out="attn/out", residual="ln_1", block_output="ln_2", layout="pre_ln"))
    ids = np.array([[1, 3, 5, 2, 6, 7], [4, 0, 2, 1, 0, 0], [8, 8, 2, 1, 3, 0]])
    valid = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]])
    with jax.enable_x64(True):
        graphdef, state = nnx.split(nnx.eval_shape(lambda: TinyGPT(nnx.Rngs(2))))
        rng = np.random.default_rng(2)  # random parameters of the model's shapes (initialising runs op by op: slower)
        model = nnx.merge(graphdef, jax.tree.map(lambda s: rng.normal(0.0, 0.4, s.shape), state))
        before = snapshot(model)
        trace = attnflow.capture(model, ids, valid, values=True, value_zeroing=True)
    yield model, before, ids, valid, trace
    _flax_methods.VALUE_MAPS.clear()
    _flax_methods.VALUE_MAPS.update(saved)


def test_pre_ln_values_and_value_zeroing_equal_a_float64_recomputation(tiny_gpt):
    from test_flax_linen import check_pre_ln_methods

    model, before, ids, valid, trace = tiny_gpt
    assert_unchanged(model, before)
    allowed = np.tril(np.ones((GT, GT), bool))[None] & valid[:, None, :].astype(bool) & valid[:, :, None].astype(bool)
    x = np.asarray(model.wte.embedding[...], np.float64)[ids]
    kept = []
    assert trace.metadata["values_layout"] == "pre_ln" and trace.layer_names == ["h/0/attn", "h/1/attn"]
    for layer, block in zip(trace.layers, model.h):
        expected = zeroing_reference(block, x, allowed, valid)
        x_next, found = gpt_block_reference(block, x, allowed)
        kept.append(found)
        np.testing.assert_allclose(layer.weights, found["weights"], atol=1e-12)
        for name in ("value", "out_weight", "out_bias", "residual", "block_output"):
            np.testing.assert_allclose(layer.extras[name], found[name], atol=1e-12, err_msg=name)
        zeroing = layer.extras["value_zeroing"]
        assert zeroing.dtype == np.float64 and zeroing.shape == (GB, GT, GT) and expected.max() > 1e-3
        np.testing.assert_allclose(zeroing, expected, atol=1e-12)
        x = x_next
    check_pre_ln_methods(trace, kept, valid, 1e-10)
    vz = attnflow.explain(trace, ["value_zeroing"], sources=[3])["value_zeroing"]
    assert vz.shape == (GB, 1, GT) and not vz[1, 0, 4:].any()  # item 1's padding gets nothing


def test_value_zeroing_alone_and_its_errors(tiny_gpt, setup):
    model, before, ids, valid, trace = tiny_gpt
    with jax.enable_x64(True):
        alone = attnflow.capture(model, ids, valid, value_zeroing=True)
    assert "values_layout" not in alone.metadata and sorted(alone.layers[0].extras) == ["value_zeroing"]
    np.testing.assert_array_equal(alone.layers[1].extras["value_zeroing"], trace.layers[1].extras["value_zeroing"])
    assert_unchanged(model, before)
    other = setup[0]
    with pytest.raises(AdapterError, match=r"value_zeroing=True needs to know where Model.*register_flax_value_map"):
        attnflow.capture(other, np.ones((1, SEQ, FEATURES), np.float32), value_zeroing=True)
    with pytest.raises(attnflow.OptionError, match="value_zeroing= .*leave out modules="):
        attnflow.capture(model, ids, valid, value_zeroing=True, adapter_options={"modules": [nnx.MultiHeadAttention]})


def test_value_map_alternatives_take_the_one_each_layer_has(tiny_gpt):
    """FlaxValueMap.value's ``|`` alternatives: a layer need have one of them (here the second), and value zeroing
    zeroes the output of the one that ran; a map none of whose alternatives a layer has is an error naming it."""
    from attnflow.adapters import FlaxValueMap, register_flax_value_map

    model, before, ids, valid, trace = tiny_gpt
    paths = dict(attention="attn", out="attn/out", residual="ln_1", block_output="ln_2", layout="pre_ln")
    try:
        register_flax_value_map("TinyGPT", FlaxValueMap(value="attn/nothing|attn/value", **paths), replace=True)
        with jax.enable_x64(True):
            either = attnflow.capture(model, ids, valid, values=True, value_zeroing=True)
        register_flax_value_map("TinyGPT", FlaxValueMap(value="attn/nothing|attn/none", **paths), replace=True)
        with pytest.raises(AdapterError, match=r"value_zeroing=True: layer 'h/0' has no value module the value map "
                                               r"names \('attn/nothing\|attn/none'\)"), jax.enable_x64(True):
            attnflow.capture(model, ids, valid, value_zeroing=True)
        # the other map errors name the keyword the capture was given, too
        register_flax_value_map("TinyGPT", FlaxValueMap(value="attn/value", **{**paths, "out": "attn/gone"}),
                                replace=True)
        with pytest.raises(AdapterError, match=r"^value_zeroing=True: layer 'h/0' has no module 'attn/gone'"):
            attnflow.capture(model, ids, valid, value_zeroing=True)
        register_flax_value_map("TinyGPT", FlaxValueMap(value="attn/value", **{**paths, "attention": "nowhere"}),
                                replace=True)
        with pytest.raises(AdapterError, match=r"^value_zeroing=True: no nnx.MultiHeadAttention"):
            attnflow.capture(model, ids, valid, value_zeroing=True)
    finally:
        register_flax_value_map("TinyGPT", FlaxValueMap(value="attn/value", **paths), replace=True)
    assert_unchanged(model, before)
    allowed = np.tril(np.ones((GT, GT), bool))[None] & valid[:, None, :].astype(bool) & valid[:, :, None].astype(bool)
    x = np.asarray(model.wte.embedding[...], np.float64)[ids]
    assert either.layer_names == trace.layer_names == ["h/0/attn", "h/1/attn"]
    for layer, plain, block in zip(either.layers, trace.layers, model.h):
        for name in ("value", "value_zeroing"):
            np.testing.assert_array_equal(layer.extras[name], plain.extras[name], err_msg=name)
        np.testing.assert_allclose(layer.extras["value_zeroing"], zeroing_reference(block, x, allowed, valid),
                                   atol=1e-12)
        x, _ = gpt_block_reference(block, x, allowed)


class _StackedValues(nnx.Module):
    """A value module whose output stacks two projections on its first axis (``value_index=1`` picks the values)."""

    def __init__(self, features: int, rngs: nnx.Rngs):
        self.lin = nnx.Linear(features, features, rngs=rngs)

    def __call__(self, h):
        v = self.lin(h)
        return jnp.stack([3.0 * v, v])


class _StackedBlock(nnx.Module):
    """Pre-LN block whose attention reads stacked[1] as values and adds stacked[0] to the residual, so that zeroing
    the wrong part of the stack, or all of it, changes the output differently from zeroing the values alone."""

    def __init__(self, features: int, heads: int, stacked: bool, rngs: nnx.Rngs):
        self.ln_1 = nnx.LayerNorm(features, rngs=rngs)
        self.kv = _StackedValues(features, rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=heads, in_features=features, decode=False, rngs=rngs)
        self.ln_2 = nnx.LayerNorm(features, rngs=rngs)
        self.stacked = stacked

    def __call__(self, x):
        h = self.ln_1(x)
        if self.stacked:
            both = self.kv(h)
            values, side = both[1], both[0]
        else:  # the twin: values from the value module itself, the side term past it (never zeroed)
            values, side = self.kv(h)[1], 3.0 * self.kv.lin(h)
        x = x + self.attn(h, h, values) + 0.1 * side
        return x + self.ln_2(x)


def test_value_index_zeroes_only_the_values_of_a_stacked_value_module():
    """FlaxValueMap.value_index on NNX: value zeroing multiplies only the stacked output's entry at the index (here
    1, the values; entry 0 feeds the residual), so it equals a twin whose side term never passes the value module;
    the ``|`` alternative that exists is taken. Sizes: batch 4, tokens 5, features 12, heads 2 (head size 6), 3
    layers."""
    from attnflow.adapters import FlaxValueMap, register_flax_value_map
    from attnflow.adapters._jax import _flax_methods

    def model(name: str, stacked: bool) -> nnx.Module:
        class Model(nnx.Module):
            def __init__(self, rngs: nnx.Rngs):
                self.h = nnx.List([_StackedBlock(12, 2, stacked, rngs) for _ in range(3)])

            def __call__(self, x):
                for block in self.h:
                    x = block(x)
                return x

        Model.__name__ = Model.__qualname__ = name
        return Model(nnx.Rngs(3))

    paths = dict(attention="attn", out="attn/out", residual="ln_1", block_output="ln_2", layout="pre_ln")
    saved = dict(_flax_methods.VALUE_MAPS)
    x = np.random.default_rng(4).normal(size=(4, 5, 12))
    try:
        register_flax_value_map("StackedValues", FlaxValueMap(value="nothing|kv", value_index=1, **paths))
        register_flax_value_map("TwinValues", FlaxValueMap(value="kv", value_index=1, **paths))
        with jax.enable_x64(True):
            stacked = attnflow.capture(model("StackedValues", True), x, value_zeroing=True)
            twin = attnflow.capture(model("TwinValues", False), x, value_zeroing=True)
    finally:
        _flax_methods.VALUE_MAPS.clear()
        _flax_methods.VALUE_MAPS.update(saved)
    assert stacked.layer_names == twin.layer_names == ["h/0/attn", "h/1/attn", "h/2/attn"]
    for a, b in zip(stacked.layers, twin.layers):
        assert a.extras["value_zeroing"].shape == (4, 5, 5)
        assert np.abs(b.extras["value_zeroing"]).max() > 1e-4  # zeroing the values moves the output
        np.testing.assert_allclose(a.extras["value_zeroing"], b.extras["value_zeroing"], rtol=1e-10, atol=1e-13)
