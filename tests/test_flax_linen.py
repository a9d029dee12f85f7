"""The flax_linen adapter on tiny linen models, checked against attention computed independently in numpy."""

from __future__ import annotations

import subprocess
import sys
import threading
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax.linen import module as linen_module

import attnflow
from attnflow import AdapterError, HiddenAttentionError

# A distinct size on every axis: batch 2, heads 3, seq 6, layers 4, features 24 (head dim 8),
# cross-attention queries 5 and keys 7.
BATCH, HEADS, SEQ, LAYERS, FEATURES, Q, K = 2, 3, 6, 4, 24, 5, 7
HEAD_DIM = FEATURES // HEADS


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, mask=None):
        return x + nn.MultiHeadDotProductAttention(num_heads=HEADS, name="attention")(x, mask=mask)


class Encoder(nn.Module):
    @nn.compact
    def __call__(self, x, mask=None):
        for i in range(LAYERS):
            x = Block(name=f"layer_{i}")(x, mask)
        return x


class Model(nn.Module):
    @nn.compact
    def __call__(self, x, mask=None):
        return Encoder(name="encoder")(x, mask)


def softmax(scores):
    scores = scores - scores.max(axis=-1, keepdims=True)
    e = np.exp(scores)
    return e / e.sum(axis=-1, keepdims=True)


def mha_reference(params, xq, xkv, mask=None):
    """Multi-head attention from the module's own parameters, in float64 numpy: (weights, output)."""
    p = {k: {n: np.asarray(v, dtype=np.float64) for n, v in d.items()} for k, d in params.items()}
    q = np.einsum("bqf,fhd->bqhd", xq, p["query"]["kernel"]) + p["query"]["bias"]
    k = np.einsum("bkf,fhd->bkhd", xkv, p["key"]["kernel"]) + p["key"]["bias"]
    v = np.einsum("bkf,fhd->bkhd", xkv, p["value"]["kernel"]) + p["value"]["bias"]
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    if mask is not None:
        scores = np.where(np.asarray(mask, bool), scores, np.finfo(np.float32).min)
    weights = softmax(scores)
    heads = np.einsum("bhqk,bkhd->bqhd", weights, v)
    return weights, np.einsum("bqhd,hdf->bqf", heads, p["out"]["kernel"]) + p["out"]["bias"]


def model_reference(variables, x, mask=None):
    x = np.asarray(x, dtype=np.float64)
    weights = []
    for i in range(LAYERS):
        w, out = mha_reference(variables["params"]["encoder"][f"layer_{i}"]["attention"], x, x, mask)
        weights.append(w)
        x = x + out
    return weights, x


@pytest.fixture(scope="module")
def setup():
    x = jax.random.normal(jax.random.key(1), (BATCH, SEQ, FEATURES))
    model = Model()
    variables = model.init(jax.random.key(0), x)
    valid = np.ones((BATCH, SEQ), dtype=bool)
    valid[1, 4:] = False  # item 1 has two padding tokens
    return model, variables, x, valid


def padding_mask(valid):
    return np.asarray(valid[:, None, None, :])  # (batch, 1, 1, k): every query may see the real keys


def test_capture_matches_numpy_reference(setup):
    model, variables, x, valid = setup
    mask = padding_mask(valid)
    trace = attnflow.capture(model, variables, x, mask=mask)
    expected, expected_out = model_reference(variables, x, mask)
    assert trace.layer_names == [f"encoder/layer_{i}/attention" for i in range(LAYERS)]
    assert trace.metadata["adapter"] == "flax_linen" and trace.model_name == "Model" and trace.framework == "jax"
    assert (trace.batch_size, trace.seq_len, trace.num_heads) == (BATCH, SEQ, (HEADS,) * LAYERS)
    for layer, reference in zip(trace.layers, expected):
        assert layer.weights.dtype == np.float32 and layer.source_dtype == "float32" and layer.kind == "self"
        np.testing.assert_allclose(layer.weights, reference, atol=1e-5)
    np.testing.assert_array_equal(trace.mask, valid)
    assert not trace.causal
    # the forward pass itself is untouched: same output as without attnflow, and as the reference
    np.testing.assert_allclose(np.asarray(model.apply(variables, x, mask=mask)), expected_out, atol=1e-4)


def test_causal_and_padding_masks_are_read(setup):
    model, variables, x, valid = setup
    mask = nn.combine_masks(nn.make_causal_mask(jnp.ones((BATCH, SEQ))), padding_mask(valid))
    trace = attnflow.capture(model, variables, x, mask=mask)
    expected, _ = model_reference(variables, x, np.asarray(mask))
    np.testing.assert_allclose(trace.layers[2].weights, expected[2], atol=1e-5)
    assert trace.causal
    np.testing.assert_array_equal(trace.mask, valid)


def test_attach_leaves_apply_as_written(setup):
    model, variables, x, _ = setup
    plain = model.apply(variables, x)
    with attnflow.attach(model) as rec:
        out = model.apply(variables, x)  # no mutable=[...]: returns the array, not (array, state)
        _, state = model.apply(variables, x, mutable=["intermediates"])
    assert not isinstance(out, tuple)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(plain))
    assert state == {}  # attnflow kept its sow out of the user's collections
    assert len(rec.traces) == 2


class SowingBlock(nn.Module):
    """A model that asks for its own attention weights (sow_weights=True) and sows something else too."""

    @nn.compact
    def __call__(self, x):
        self.sow("intermediates", "inputs", x)
        return nn.MultiHeadDotProductAttention(num_heads=HEADS, name="attention")(x, sow_weights=True)


def test_models_own_sowing_is_unchanged():
    x = jax.random.normal(jax.random.key(2), (BATCH, SEQ, FEATURES))
    model = SowingBlock()
    variables = model.init(jax.random.key(0), x)
    _, expected = model.apply(variables, x, mutable=["intermediates"])
    with attnflow.attach(model) as rec:
        _, state = model.apply(variables, x, mutable=["intermediates"])
    assert jax.tree.structure(state) == jax.tree.structure(expected)
    sown = state["intermediates"]["attention"]["attention_weights"][0]
    np.testing.assert_array_equal(np.asarray(sown), np.asarray(expected["intermediates"]["attention"]["attention_weights"][0]))
    np.testing.assert_array_equal(rec.trace.layers[0].weights, np.asarray(sown))


class Decoder(nn.Module):
    @nn.compact
    def __call__(self, y, memory):
        y = y + nn.MultiHeadDotProductAttention(num_heads=HEADS, name="self_attention")(y)
        return y + nn.MultiHeadDotProductAttention(num_heads=HEADS, name="cross_attention")(y, memory)


def test_cross_attention_layers():
    y = jax.random.normal(jax.random.key(3), (BATCH, Q, FEATURES))
    memory = jax.random.normal(jax.random.key(4), (BATCH, K, FEATURES))
    model = Decoder()
    variables = model.init(jax.random.key(0), y, memory)
    trace = attnflow.capture(model, variables, y, memory)
    assert [(layer.name, layer.kind, layer.shape) for layer in trace.layers] == [
        ("self_attention", "self", (BATCH, HEADS, Q, Q)), ("cross_attention", "cross", (BATCH, HEADS, Q, K)),
    ]
    params = variables["params"]
    w_self, out = mha_reference(params["self_attention"], np.asarray(y, np.float64), np.asarray(y, np.float64))
    w_cross, _ = mha_reference(params["cross_attention"], np.asarray(y, np.float64) + out, np.asarray(memory, np.float64))
    np.testing.assert_allclose(trace.layers[0].weights, w_self, atol=1e-5)
    np.testing.assert_allclose(trace.layers[1].weights, w_cross, atol=1e-5)
    # the cross option overrides the default
    with attnflow.attach(model, cross=["self_attention"]) as rec:
        model.apply(variables, y, y)
    assert [layer.kind for layer in rec.trace.layers] == ["cross", "cross"]


class DotProductModule(nn.Module):
    """Attention written by hand, passing module=self to nn.dot_product_attention."""

    @nn.compact
    def __call__(self, x):
        q = nn.DenseGeneral((HEADS, HEAD_DIM), name="q")(x)
        k = nn.DenseGeneral((HEADS, HEAD_DIM), name="k")(x)
        v = nn.DenseGeneral((HEADS, HEAD_DIM), name="v")(x)
        return nn.dot_product_attention(q, k, v, module=self).reshape(x.shape)


def test_module_passing_itself_to_dot_product_attention():
    x = jax.random.normal(jax.random.key(5), (BATCH, SEQ, FEATURES))
    model = DotProductModule()
    variables = model.init(jax.random.key(0), x)
    trace = attnflow.capture(model, variables, x)
    p = {n: {k: np.asarray(v, np.float64) for k, v in d.items()} for n, d in variables["params"].items()}
    xs = np.asarray(x, np.float64)
    q = np.einsum("bsf,fhd->bshd", xs, p["q"]["kernel"]) + p["q"]["bias"]
    k = np.einsum("bsf,fhd->bshd", xs, p["k"]["kernel"]) + p["k"]["bias"]
    expected = softmax(np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(HEAD_DIM))
    assert trace.layer_names == ["DotProductModule"]  # the root module: named by its class
    np.testing.assert_allclose(trace.layers[0].weights, expected, atol=1e-5)


def test_self_attention_module_is_recorded_once():
    x = jax.random.normal(jax.random.key(6), (BATCH, SEQ, FEATURES))
    model = nn.SelfAttention(num_heads=HEADS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        variables = model.init(jax.random.key(0), x)
        trace = attnflow.capture(model, variables, x)
    assert trace.num_layers == 1
    expected, _ = mha_reference(variables["params"], np.asarray(x, np.float64), np.asarray(x, np.float64))
    np.testing.assert_allclose(trace.layers[0].weights, expected, atol=1e-5)


class ScaledAttention(nn.MultiHeadDotProductAttention):
    """A subclass whose own __call__ has no sow_weights parameter."""

    @nn.compact
    def __call__(self, x, mask=None):
        return 2.0 * super().__call__(x, mask=mask)


def test_attention_subclass_with_its_own_signature():
    x = jax.random.normal(jax.random.key(11), (BATCH, SEQ, FEATURES))
    model = ScaledAttention(num_heads=HEADS)
    variables = model.init(jax.random.key(0), x)
    valid = np.ones((BATCH, SEQ), dtype=bool)
    valid[0, 5] = False
    trace = attnflow.capture(model, variables, x, padding_mask(valid))
    expected, _ = mha_reference(variables["params"], np.asarray(x, np.float64), np.asarray(x, np.float64),
                                padding_mask(valid))
    assert trace.layer_names == ["ScaledAttention"]
    np.testing.assert_allclose(trace.layers[0].weights, expected, atol=1e-5)
    np.testing.assert_array_equal(trace.mask, valid)


def test_jitted_forward_is_recorded_and_jit_cache_untouched(setup):
    model, variables, x, valid = setup
    mask = padding_mask(valid)
    forward = jax.jit(lambda v, x, m: model.apply(v, x, mask=m))
    compiled_before = np.asarray(forward(variables, x, mask))
    with attnflow.attach(model) as rec:
        inside = np.asarray(forward(variables, x, mask))
        assert jax.config.jax_disable_jit
    assert not jax.config.jax_disable_jit
    expected, _ = model_reference(variables, x, mask)
    for layer, reference in zip(rec.trace.layers, expected):
        np.testing.assert_allclose(layer.weights, reference, atol=1e-5)
    np.testing.assert_allclose(inside, compiled_before, atol=1e-5)
    # a function first compiled while attached carries no recording: it runs compiled afterwards
    fresh = jax.jit(lambda v, x: model.apply(v, x) * 2)
    with attnflow.attach(model) as rec2:
        fresh(variables, x)
    count = len(rec2.traces)
    np.testing.assert_allclose(np.asarray(fresh(variables, x)), 2 * np.asarray(model.apply(variables, x)), atol=1e-5)
    assert len(rec2.traces) == count == 1
    assert fresh._cache_size() == 1  # compiled only after the block, once


def test_vmap_sends_the_weights_out_with_a_debug_callback(setup):
    """Under jax.vmap the weights are tracers: a debug callback hands them over once per example, and the
    examples are stacked again into one batch."""
    model, variables, x, _ = setup
    expected, _ = model_reference(variables, x)
    with attnflow.attach(model) as rec:
        jax.vmap(lambda item: model.apply(variables, item[None]))(x)
    assert len(rec.traces) == 1
    assert rec.trace.layer_names == [f"encoder/layer_{i}/attention" for i in range(LAYERS)]
    for layer, reference in zip(rec.trace.layers, expected):
        assert layer.shape == (BATCH, HEADS, SEQ, SEQ)
        np.testing.assert_allclose(layer.weights, reference, atol=1e-5)


def test_attach_inside_a_traced_function_raises_instead_of_leaking(setup):
    model, variables, x, _ = setup
    depth = len(linen_module._global_interceptor_stack)

    @jax.jit
    def attach_inside_jit(v, x):
        with attnflow.attach(model) as rec:
            y = model.apply(v, x)
        return y, rec

    with pytest.raises(AdapterError, match=r"tracer.*Enter attach\(\) outside the traced function"):
        attach_inside_jit(variables, x)
    assert len(linen_module._global_interceptor_stack) == depth
    assert not jax.config.jax_disable_jit


class RematModel(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.remat(Block)(name="block")(x)


def test_remat_is_recorded_through_a_callback():
    x = jax.random.normal(jax.random.key(7), (BATCH, SEQ, FEATURES))
    model = RematModel()
    variables = model.init(jax.random.key(0), x)
    trace = attnflow.capture(model, variables, x)
    expected, _ = mha_reference(variables["params"]["block"]["attention"], np.asarray(x, np.float64),
                                np.asarray(x, np.float64))
    assert trace.layer_names == ["block/attention"]
    np.testing.assert_allclose(trace.layers[0].weights, expected, atol=1e-5)

    # jax.checkpoint around the whole forward call: the pass ends when the traced computation reaches it;
    # under grad it is recomputed in the backward pass, and recorded once
    with attnflow.attach(model) as rec:
        jax.grad(jax.checkpoint(lambda v: model.apply(v, x).sum()))(variables)
    assert len(rec.traces) == 1 and rec.trace.layer_names == ["block/attention"]
    np.testing.assert_allclose(rec.trace.layers[0].weights, expected, atol=1e-5)

    # a long-lived checkpointed function traced while attached keeps no callback in jax's trace cache:
    # a later attach sees its layers again
    forward = jax.checkpoint(lambda v, x: model.apply(v, x))
    for _ in range(2):
        with attnflow.attach(model) as rec:
            forward(variables, x)
        assert rec.trace.layer_names == ["block/attention"]


class ScannedBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return x + nn.MultiHeadDotProductAttention(num_heads=HEADS, name="attention")(x), None


class ScannedModel(nn.Module):
    @nn.compact
    def __call__(self, x):
        layers = nn.scan(ScannedBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        return layers(name="layers")(x, None)[0]


def scanned_reference(stacked, x, layers=3):
    h, weights = np.asarray(x, np.float64), []
    for i in range(layers):
        expected, out = mha_reference(jax.tree.map(lambda a, i=i: a[i], stacked), h, h)
        weights.append(expected)
        h = h + out
    return weights


def test_scanned_layers_are_numbered():
    x = jax.random.normal(jax.random.key(8), (BATCH, SEQ, FEATURES))
    model = ScannedModel()
    variables = model.init(jax.random.key(0), x)
    trace = attnflow.capture(model, variables, x)
    # numbered by layer inside the scanned module, as an unrolled model's "layers_0/attention" would be
    assert trace.layer_names == ["layers/0/attention", "layers/1/attention", "layers/2/attention"]
    for layer, expected in zip(trace.layers, scanned_reference(variables["params"]["layers"]["attention"], x)):
        np.testing.assert_allclose(layer.weights, expected, atol=1e-5)


class NestedBlock(nn.Module):
    """A block whose attention sits one module deeper, remat'd: "layers/mixer/attention" inside the scan."""

    @nn.compact
    def __call__(self, x, _):
        return nn.remat(Block)(name="mixer")(x), None


class DeepScanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        body = nn.scan(nn.remat(NestedBlock), variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        return body(name="layers")(x, None)[0]


class DeepUnrolled(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(3):
            x = NestedBlock(name=f"layers_{i}")(x, None)[0]
        return x


def test_scanned_and_unrolled_twins_pair_by_name_also_under_grad_through_remat():
    """The index goes after the scanned module's path (not the attention's parent), so the scanned model
    pairs with its unrolled twin by name; under grad through remat each layer is recorded once."""
    x = jax.random.normal(jax.random.key(12), (BATCH, SEQ, FEATURES))
    scanned, unrolled = DeepScanned(), DeepUnrolled()
    variables = scanned.init(jax.random.key(0), x)
    stacked = variables["params"]["layers"]
    unrolled_variables = {"params": {f"layers_{i}": jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(3)}}
    np.testing.assert_allclose(np.asarray(scanned.apply(variables, x)),
                               np.asarray(unrolled.apply(unrolled_variables, x)), atol=1e-5)
    with attnflow.attach(scanned) as rec:
        jax.grad(lambda v: scanned.apply(v, x).sum())(variables)
    a = rec.trace
    assert len(rec.traces) == 1
    assert a.layer_names == [f"layers/{i}/mixer/attention" for i in range(3)]
    b = attnflow.capture(unrolled, unrolled_variables, x)
    assert b.layer_names == [f"layers_{i}/mixer/attention" for i in range(3)]
    report = attnflow.compare(a, b, align="names")
    assert report.ok and len(report.layers) == 3, report
    for layer, expected in zip(a.layers, scanned_reference(stacked["mixer"]["attention"], x)):
        np.testing.assert_allclose(layer.weights, expected, atol=1e-5)


class RaisingModel(nn.Module):
    @nn.compact
    def __call__(self, x):
        nn.MultiHeadDotProductAttention(num_heads=HEADS, name="attention")(x)
        raise RuntimeError("boom")


def test_nothing_left_behind_after_an_exception(setup):
    model, variables, x, _ = setup
    raising = RaisingModel()
    raising_vars = Model().init(jax.random.key(0), x)["params"]["encoder"]["layer_0"]
    depth = len(linen_module._global_interceptor_stack)
    with pytest.raises(RuntimeError, match="boom"):
        with attnflow.attach(raising):
            raising.apply({"params": raising_vars}, x)
    assert len(linen_module._global_interceptor_stack) == depth
    assert not jax.config.jax_disable_jit
    # Afterwards attention modules run exactly as the user wrote them: no forced sow_weights, no sow shadow.
    seen = []

    def spy(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.MultiHeadDotProductAttention):
            seen.append((dict(kwargs), "sow" in vars(context.module)))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(spy):
        model.apply(variables, x)
    assert seen and all("sow_weights" not in kwargs and not shadowed for kwargs, shadowed in seen)


def test_bfloat16_is_upcast():
    x = jax.random.normal(jax.random.key(9), (BATCH, SEQ, FEATURES))
    model = nn.MultiHeadDotProductAttention(num_heads=HEADS, dtype=jnp.bfloat16)
    variables = model.init(jax.random.key(0), x)
    trace = attnflow.capture(model, variables, x)
    layer = trace.layers[0]
    assert layer.weights.dtype == np.float32 and layer.source_dtype == "bfloat16"
    expected, _ = mha_reference(variables["params"], np.asarray(x, np.float64), np.asarray(x, np.float64))
    np.testing.assert_allclose(layer.weights, expected, atol=3e-2)


class TokenModel(nn.Module):
    @nn.compact
    def __call__(self, input_ids):
        x = nn.Embed(50, FEATURES, name="embed")(input_ids)
        return nn.MultiHeadDotProductAttention(num_heads=HEADS, name="attention")(x)


def test_init_is_not_recorded_and_token_ids_label_the_trace():
    ids = jnp.arange(BATCH * SEQ).reshape(BATCH, SEQ) % 50
    model = TokenModel()
    with attnflow.attach(model) as rec:
        variables = model.init(jax.random.key(0), ids)
        model.apply(variables, ids)
        model.apply(variables, ids[:, :4])
    assert [t.seq_len for t in rec.traces] == [SEQ, 4]
    assert rec.traces[0].tokens[1] == [str(int(i)) for i in np.asarray(ids[1])]
    labels = [[f"w{i}" for i in range(SEQ)]] * BATCH
    assert attnflow.capture(model, variables, ids, tokens=labels).tokens == labels


def test_bound_module_and_apply_partial_are_claimed(setup):
    model, variables, x, _ = setup
    reference = attnflow.capture(model, variables, x)
    bound = model.bind(variables)
    from functools import partial

    for target, args in ((bound, (x,)), (partial(model.apply, variables), (x,)), (model.apply, (variables, x))):
        assert attnflow.get_adapter("flax_linen").claims(target)
        trace = attnflow.capture(target, *args)
        np.testing.assert_array_equal(trace.layers[3].weights, reference.layers[3].weights)


def test_attention_fn_without_module_argument_is_hidden_attention():
    def no_module(query, key, value, mask=None):
        return jax.nn.dot_product_attention(query, key, value, mask=mask)

    x = jax.random.normal(jax.random.key(10), (BATCH, SEQ, FEATURES))
    model = nn.MultiHeadDotProductAttention(num_heads=HEADS, attention_fn=no_module)
    variables = model.init(jax.random.key(0), x)
    with pytest.raises(HiddenAttentionError, match="module="):
        attnflow.capture(model, variables, x)


def test_unknown_option_is_refused(setup):
    model, variables, x, _ = setup
    with pytest.raises(attnflow.OptionError, match="cross.*modules.*layout"):
        with attnflow.attach(model, heads=["x"]):
            pass
    with pytest.raises(attnflow.OptionError, match="layout='bhq'"):
        with attnflow.attach(model, modules=[nn.Dense], layout="bhq"):
            pass
    with pytest.raises(attnflow.OptionError, match="modules= takes"):
        with attnflow.attach(model, modules=[3]):
            pass


def test_import_attnflow_imports_no_framework():
    code = (
        "import sys, attnflow, attnflow.adapters._jax.flax_linen, attnflow.adapters._jax.flax_nnx, attnflow._compare, "
        "attnflow.cli._compare; bad = [m for m in ('jax', 'flax', 'torch', 'transformers') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


class SetupModel(nn.Module):
    """Submodules defined in setup(): a bound instance keeps the same submodule objects from call to call."""

    def setup(self):
        self.attention = nn.MultiHeadDotProductAttention(num_heads=HEADS)
        self.block = Block()

    def __call__(self, x, sow_weights=False):
        return self.block(x) + self.attention(x, sow_weights=sow_weights)


def test_bound_setup_module_keeps_no_sow_shadow_after_the_block():
    """attnflow shadows a module's ``sow`` only for the call it watches: left behind on a bound module's
    setup() submodule, the shadow would swallow the weights the user sows later."""
    x = jax.random.normal(jax.random.key(4), (BATCH, SEQ, FEATURES))
    model = SetupModel()
    variables = model.init(jax.random.key(0), x)
    bound = model.bind(variables, mutable=["intermediates"])
    submodules = [bound, bound.attention, bound.block]
    assert not any("sow" in vars(module) for module in submodules)
    with attnflow.attach(bound) as rec:
        bound(x)
        inside = [module for module in submodules if "sow" in vars(module)]
    assert rec.trace.num_layers == 2 and inside == []  # the shadow lives only during each call
    assert not any("sow" in vars(module) for module in submodules)

    # The user's own sow_weights=True reaches the bound module's collection, unswallowed.
    bound(x, sow_weights=True)
    sown = bound.variables["intermediates"]["attention"]["attention_weights"]
    weights, _ = mha_reference(variables["params"]["attention"], np.asarray(x, np.float64), np.asarray(x, np.float64))
    np.testing.assert_allclose(np.asarray(sown[0]), weights, atol=1e-5)


# -- attention written by hand: modules= and layout= --------------------------------------------------------
GROUPS, GROUP_HEADS = 2, 3  # grouped-query attention: 2 key/value heads, 3 query heads each


class HandAttention(nn.Module):
    """Grouped-query attention written by hand: jax.nn.softmax over (batch, query, group, head, key)."""

    @nn.compact
    def __call__(self, x, valid):
        q = nn.DenseGeneral((GROUPS, GROUP_HEADS, HEAD_DIM), name="q")(x)
        k = nn.DenseGeneral((GROUPS, HEAD_DIM), name="k")(x)
        v = nn.DenseGeneral((GROUPS, HEAD_DIM), name="v")(x)
        logits = jnp.einsum("btgnd,bsgd->btgns", q, k) / np.sqrt(HEAD_DIM)
        allowed = jnp.tril(jnp.ones((x.shape[1], x.shape[1]), bool))[None] & valid[:, None, :]  # (b, t, s)
        logits = jnp.where(allowed[:, :, None, None, :], logits, -1e9)
        probs = nn.softmax(logits, axis=-1)
        out = jnp.einsum("btgns,bsgd->btgnd", probs, v).reshape(*x.shape[:2], -1)
        return nn.Dense(FEATURES, name="out")(out)


class HandBlock(nn.Module):
    @nn.compact
    def __call__(self, x, valid):
        x = x + HandAttention(name="attn")(x, valid)
        return x + nn.Dense(FEATURES, name="mlp")(nn.gelu(x))


class HandModel(nn.Module):
    @nn.compact
    def __call__(self, x, valid):
        for i in range(2):
            x = HandBlock(name=f"layers_{i}")(x, valid)
        return x

    def features(self, x, valid):
        return self(x, valid)


def hand_reference(variables, x, valid):
    """Each HandAttention recomputed in float64 numpy; heads flattened group-major (head g * 3 + n)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    h, valid, weights = np.asarray(x, np.float64), np.asarray(valid), []
    seq = h.shape[1]
    allowed = np.tril(np.ones((seq, seq), bool))[None] & valid[:, None, :]
    for i in range(2):
        a = p[f"layers_{i}"]["attn"]
        q = np.einsum("btf,fgnd->btgnd", h, a["q"]["kernel"]) + a["q"]["bias"]
        k = np.einsum("bsf,fgd->bsgd", h, a["k"]["kernel"]) + a["k"]["bias"]
        v = np.einsum("bsf,fgd->bsgd", h, a["v"]["kernel"]) + a["v"]["bias"]
        logits = np.einsum("btgnd,bsgd->bgntS".replace("S", "s"), q, k) / np.sqrt(HEAD_DIM)
        probs = softmax(np.where(allowed[:, None, None], logits, -np.inf))  # (b, g, n, t, s)
        weights.append(probs.reshape(probs.shape[0], GROUPS * GROUP_HEADS, seq, seq))
        out = np.einsum("bgnts,bsgd->btgnd", probs, v).reshape(*h.shape[:2], -1)
        h = h + out @ a["out"]["kernel"] + a["out"]["bias"]
        mlp = p[f"layers_{i}"]["mlp"]
        h = h + np.asarray(nn.gelu(jnp.asarray(h, jnp.float32)), np.float64) @ mlp["kernel"] + mlp["bias"]
    return weights


@pytest.fixture(scope="module")
def hand():
    x = jax.random.normal(jax.random.key(13), (BATCH, SEQ, FEATURES))
    valid = np.ones((BATCH, SEQ), dtype=bool)
    valid[1, 4:] = False
    model = HandModel()
    return model, model.init(jax.random.key(0), x, valid), x, valid


def test_hand_written_attention_is_not_recognised_with_a_clear_error(hand):
    model, variables, x, valid = hand
    with pytest.raises(AdapterError, match=r"ran, but adapter 'flax_linen' recorded no attention") as caught:
        attnflow.capture(model, variables, x, valid)
    message = str(caught.value)
    assert "layers_0/attn (HandAttention)" in message and "modules=" in message
    assert "No forward pass ran" not in message
    with pytest.raises(AdapterError, match=r"ran, but adapter 'flax_linen' recorded no attention"):
        attnflow.capture(model, variables, x, valid, method=HandModel.features)  # another method than __call__


@pytest.mark.parametrize("selector", [HandAttention, "layers_*/attn", "layers_?.attn"])
def test_modules_option_records_the_softmax_of_hand_written_attention(hand, selector):
    model, variables, x, valid = hand
    softmax_before = jax._src.nn.functions._softmax
    trace = attnflow.capture(model, variables, x, valid, adapter_options={"modules": [selector], "layout": "btgns"})
    assert jax._src.nn.functions._softmax is softmax_before  # the hook is gone after the block
    assert trace.layer_names == ["layers_0/attn", "layers_1/attn"]
    assert trace.num_heads == (GROUPS * GROUP_HEADS,) * 2
    for layer, expected in zip(trace.layers, hand_reference(variables, x, valid)):
        np.testing.assert_allclose(layer.weights, expected, atol=1e-5)
    np.testing.assert_array_equal(trace.mask, valid)  # read from the probabilities: no query attends to padding
    assert trace.causal


def test_modules_option_errors(hand):
    model, variables, x, valid = hand
    with pytest.raises(HiddenAttentionError, match=r"computed no jax.nn.softmax over the key axis of layout='bhqk'"):
        attnflow.capture(model, variables, x, valid, adapter_options={"modules": [HandAttention]})
    with pytest.raises(AdapterError, match=r"No module that ran matches modules=\['decoder/\*'\]"):
        attnflow.capture(model, variables, x, valid, adapter_options={"modules": ["decoder/*"]})
    with pytest.raises(AdapterError, match="more than one attention"):
        attnflow.capture(model, variables, x, valid, adapter_options={"modules": [HandModel], "layout": "btgns"})


# -- target= and values= (issue 25): a Llama-style pre-LN RMSNorm decoder, float64 -------------------------------------
# Its own distinct sizes: batch 2, layers 3, heads 4, tokens 5, width 12 (head dim 3), vocabulary 7, MLP 16.
RB, RL, RH, RT, RDH, RV, RF = 2, 3, 4, 5, 3, 7, 16
RD = RH * RDH
RMS_MAP = dict(attention="attn", value="attn/value", out="attn/out", residual="attn_norm", block_output="mlp_norm")


def _f64(cls, **kwargs):
    return cls(param_dtype=jnp.float64, dtype=jnp.float64, **kwargs)


class RMSBlock(nn.Module):
    @nn.compact
    def __call__(self, x, mask):
        h = _f64(nn.RMSNorm, epsilon=1e-5, name="attn_norm")(x)
        x = x + _f64(nn.MultiHeadDotProductAttention, num_heads=RH, use_bias=False, name="attn")(h, mask=mask)
        h = _f64(nn.RMSNorm, epsilon=1e-5, name="mlp_norm")(x)
        return x + _f64(nn.Dense, features=RD, name="down")(nn.silu(_f64(nn.Dense, features=RF, name="up")(h)))


class RMSDecoder(nn.Module):
    @nn.compact
    def __call__(self, ids, valid):
        x = _f64(nn.Embed, num_embeddings=RV, features=RD, name="embed")(ids)
        mask = nn.combine_masks(nn.make_causal_mask(ids), nn.make_attention_mask(valid, valid))
        for i in range(RL):
            x = RMSBlock(name=f"layers_{i}")(x, mask)
        return _f64(nn.Dense, features=RV, name="lm_head")(_f64(nn.RMSNorm, epsilon=1e-5, name="final_norm")(x))


def causal_pairs(valid):
    """(batch, queries, keys): the pairs a causal layer reads, real tokens only."""
    t = valid.shape[1]
    return np.tril(np.ones((t, t), bool))[None] & valid[:, None, :].astype(bool) & valid[:, :, None].astype(bool)


def rms_norm(z, norm, xp):
    return z / xp.sqrt((z**2).mean(-1, keepdims=True) + 1e-5) * norm["scale"]


def rms_block(p, x, allowed, delta, xp, keep=None):
    """One RMSBlock written out (``xp``: numpy, or jax.numpy under jax.grad) with ``delta`` added to its
    probabilities and its value vectors multiplied by ``keep`` (batch, keys): its output and what values=True
    records."""

    def softmax(s):
        e = xp.exp(s - s.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    a = p["attn"]
    h = rms_norm(x, p["attn_norm"], xp)
    q, k, v = (xp.einsum("btd,dhe->bthe", h, a[n]["kernel"]) for n in ("query", "key", "value"))
    if keep is not None:
        v = v * keep[:, :, None, None]
    scores = xp.einsum("bqhe,bkhe->bhqk", q, k) / np.sqrt(RDH)
    probs = softmax(xp.where(allowed[:, None], scores, np.finfo(np.float64).min)) + delta
    moved = xp.einsum("bhqk,bkhe,hed->bqd", probs, v, a["out"]["kernel"])
    kept = {"value": v.transpose(0, 2, 1, 3), "out_weight": a["out"]["kernel"][None], "residual": x,
            "block_output": x + moved, "weights": probs}
    x = x + moved
    up = xp.einsum("btd,df->btf", rms_norm(x, p["mlp_norm"], xp), p["up"]["kernel"]) + p["up"]["bias"]
    silu = up / (1 + xp.exp(-up))
    return x + xp.einsum("btf,fd->btd", silu, p["down"]["kernel"]) + p["down"]["bias"], kept


def rms_reference(params, ids, valid, deltas, xp):
    """The decoder written out (``xp``: numpy, or jax.numpy under jax.grad) with ``deltas[l]`` added to layer
    ``l``'s probabilities: its logits and, per layer, what values=True records."""
    allowed = causal_pairs(valid)
    x = params["embed"]["embedding"][ids]
    kept = []
    for i in range(RL):
        x, found = rms_block(params[f"layers_{i}"], x, allowed, deltas[i], xp)
        kept.append(found)
    final = rms_norm(x, params["final_norm"], xp)
    logits = xp.einsum("btd,dv->btv", final, params["lm_head"]["kernel"]) + params["lm_head"]["bias"]
    return logits, kept


def zeroing_reference(run, valid):
    """Value zeroing (Mohebbi et al., 2023) of one block written out: ``[b, i, j]`` = 1 - cos(output_i, output_i
    with token j's value vectors zeroed), real tokens only, causal (j <= i); ``run(b, keep)``: the block's output on
    item ``b`` (1, tokens, width) with its value vectors multiplied by ``keep`` (1, tokens)."""
    batch, t = valid.shape
    out = np.zeros((batch, t, t))
    for b in range(batch):
        original = run(b, np.ones((1, t)))[0]
        real = np.flatnonzero(valid[b])
        for j in real:
            keep = np.ones((1, t))
            keep[0, j] = 0.0
            zeroed = run(b, keep)[0]
            cos = (zeroed * original).sum(-1) / np.linalg.norm(zeroed, axis=-1) / np.linalg.norm(original, axis=-1)
            out[b, real, j] = np.where(real >= j, 1.0 - cos[real], 0.0)
    return out


def pre_ln_blocks(kept, keep, b):
    """Per layer of item ``b`` over its real tokens ``keep``: ``(Σ_h α f moved (q, k, d), residual x, block output y)``
    from the written-out forward (Kobayashi et al., 2020; Ferrando et al., 2022, pre-LN)."""
    for layer in kept:
        a = layer["weights"][b][:, keep][:, :, keep]
        f = np.einsum("hke,hed->hkd", layer["value"][b][:, keep], layer["out_weight"][0])
        yield np.einsum("hqk,hkd->qkd", a, f), layer["residual"][b][keep], layer["block_output"][b][keep]


def check_pre_ln_methods(trace, kept, valid, atol):
    """norm, norm_residual and ALTI of a pre-LN trace against the papers' formulas on the written-out forward."""
    e = attnflow.explain(trace, ["norm", "norm_residual", "alti"], all_layers=True)
    for b in range(valid.shape[0]):
        keep = np.flatnonzero(valid[b])
        joint = np.eye(keep.size)
        for li, (moved, x, y) in enumerate(pre_ln_blocks(kept, keep, b)):
            shares = moved.copy()
            shares[np.arange(keep.size), np.arange(keep.size)] += x  # T_i(x_j) = Σ_h α f + δ_ij x_i
            c = np.maximum(0.0, np.abs(y).sum(-1)[:, None] - np.abs(y[:, None] - shares).sum(-1))
            total = c.sum(-1, keepdims=True)  # a row whose shares all clip to 0 stays 0
            joint = np.divide(c, total, out=np.zeros_like(c), where=total > 0) @ joint
            window = np.ix_(keep, keep)
            np.testing.assert_allclose(e.layers("norm")[li, b][window], np.linalg.norm(moved, axis=-1), atol=atol)
            np.testing.assert_allclose(e.layers("norm_residual")[li, b][window], np.linalg.norm(shares, axis=-1),
                                       atol=atol)
            np.testing.assert_allclose(e.layers("alti")[li, b][window], joint, atol=atol)


@pytest.fixture(scope="module")
def rms_decoder():
    from attnflow.adapters import FlaxValueMap
    from attnflow.adapters._jax import _flax_methods

    saved = dict(_flax_methods.VALUE_MAPS)
    attnflow.adapters.register_flax_value_map("RMSDecoder", FlaxValueMap(layout="pre_ln", **RMS_MAP))
    ids = np.array([[1, 3, 5, 2, 6], [4, 0, 2, 1, 0]])
    valid = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    with jax.enable_x64(True):
        model = RMSDecoder()
        rng = np.random.default_rng(3)  # random parameters of init's shapes (init itself runs op by op: slower)
        variables = jax.tree.map(lambda s: rng.normal(0.0, 0.5, s.shape),
                                 jax.eval_shape(model.init, jax.random.PRNGKey(3), ids, valid))
        trace = attnflow.capture(model, variables, ids, valid, target=3, values=True, value_zeroing=True)
        by_callable = attnflow.capture(model, variables, ids, valid, target=lambda out: out[:, 1, 2] - out[:, 0, 4])
        params = jax.tree.map(np.asarray, variables["params"])
        zeros = [np.zeros((RB, RH, RT, RT))] * RL

        def score(deltas, weights):
            logits, _ = rms_reference(params, ids, valid, deltas, jnp)
            return (logits * weights).sum()

        gradient = jax.jit(jax.grad(score))  # compiled once: faster than op by op
        last, chosen = np.zeros((RB, RT, RV)), np.zeros((RB, RT, RV))
        last[np.arange(RB), valid.sum(1) - 1, 3] = 1.0  # target=3: that logit at each item's last real token
        chosen[:, 1, 2], chosen[:, 0, 4] = 1.0, -1.0  # the callable below
        last, chosen = gradient(zeros, last), gradient(zeros, chosen)
    yield model, variables, ids, valid, trace, by_callable, [np.asarray(g) for g in last], [np.asarray(g) for g in chosen]
    _flax_methods.VALUE_MAPS.clear()
    _flax_methods.VALUE_MAPS.update(saved)


def test_linen_target_and_values_equal_a_float64_recomputation(rms_decoder):
    model, variables, ids, valid, trace, by_callable, last, chosen = rms_decoder
    params = jax.tree.map(np.asarray, variables["params"])
    _, kept = rms_reference(params, ids, valid, [0.0] * RL, np)
    assert trace.metadata["values_layout"] == "pre_ln" and [layer.name for layer in trace.layers] == [
        f"layers_{i}/attn" for i in range(RL)]
    for li, layer in enumerate(trace.layers):
        np.testing.assert_allclose(layer.weights, kept[li]["weights"], atol=1e-12)
        assert layer.extras["attn_grad"].dtype == np.float64 and layer.extras["attn_grad"].shape == (RB, RH, RT, RT)
        np.testing.assert_allclose(layer.extras["attn_grad"], last[li], atol=1e-10)  # int: vocabulary logit, causal
        np.testing.assert_allclose(by_callable.layers[li].extras["attn_grad"], chosen[li], atol=1e-10)
        for name in ("value", "out_weight", "residual", "block_output"):
            np.testing.assert_allclose(layer.extras[name], kept[li][name], atol=1e-12, err_msg=name)
        np.testing.assert_array_equal(layer.extras["out_bias"], np.zeros((1, RD)))  # the projection has no bias
    assert min(float(np.abs(g).max()) for g in last) > 1e-3 and "value" not in by_callable.layers[0].extras
    check_pre_ln_methods(trace, kept, valid, 1e-10)


def test_linen_values_errors_name_the_fix(rms_decoder, setup):
    from attnflow.adapters import FlaxValueMap, register_flax_value_map

    model, variables, ids, valid, *_ = rms_decoder
    other, other_variables, x, _ = setup
    with jax.enable_x64(True):
        register_flax_value_map("RMSDecoder", FlaxValueMap(layout="post_ln", norm="mlp_norm", **{
            k: v for k, v in RMS_MAP.items() if k != "block_output"}), replace=True)
        try:  # an RMSNorm after attention: norm-based methods decompose a post-LN block through a LayerNorm
            with pytest.raises(AdapterError, match=r"RMSNorm.*layout='pre_ln'"):
                attnflow.capture(model, variables, ids, valid, values=True)
        finally:
            register_flax_value_map("RMSDecoder", FlaxValueMap(layout="pre_ln", **RMS_MAP), replace=True)
        with pytest.raises(AdapterError, match=r"values=True needs to know where Model.*register_flax_value_map"):
            attnflow.capture(other, other_variables, x, values=True)
        with pytest.raises(attnflow.OptionError, match="not an index of the model's 7 outputs"):
            attnflow.capture(model, variables, ids, valid, target=7)
        assert attnflow.capture(model, variables, ids, valid).layers[0].extras == {}  # the next capture is plain


def test_linen_value_zeroing_equals_a_float64_recomputation(rms_decoder):
    """value_zeroing=True (beside target= and values=) on the causal, padded decoder (batch 2, heads 4, tokens 5,
    head dim 3, width 12): each layer's distances against its block written out in float64 numpy with token j's
    value vectors zeroed in turn, and the method's rows (normalised, rolled out) against the same."""
    model, variables, ids, valid, trace, *_ = rms_decoder
    params = jax.tree.map(np.asarray, variables["params"])
    _, kept = rms_reference(params, ids, valid, [0.0] * RL, np)
    allowed, future = causal_pairs(valid), np.triu_indices(RT, 1)
    rolled = attnflow.explain(trace, ["value_zeroing"], all_layers=True).layers("value_zeroing")
    joints = [np.eye(int(row.sum())) for row in valid]
    for li, layer in enumerate(trace.layers):
        def run(b, keep, p=params[f"layers_{li}"], x=kept[li]["residual"]):
            return rms_block(p, x[b : b + 1], allowed[b : b + 1], 0.0, np, keep)[0]

        expected, zeroing = zeroing_reference(run, valid), layer.extras["value_zeroing"]
        assert zeroing.dtype == np.float64 and zeroing.shape == (RB, RT, RT) and expected.max() > 1e-3
        np.testing.assert_allclose(zeroing, expected, atol=1e-10, rtol=0)
        assert not zeroing[:, future[0], future[1]].any()  # causal: token i's row only over j <= i
        assert not zeroing[1, 4].any() and not zeroing[1, :, 4].any() and zeroing[1, 3, :4].all()  # item 1's padding
        for b, joint in enumerate(joints):
            real = np.ix_(np.flatnonzero(valid[b]), np.flatnonzero(valid[b]))
            joints[b] = expected[b][real] / expected[b][real].sum(-1, keepdims=True) @ joint
            np.testing.assert_allclose(rolled[li, b][real], joints[b], atol=1e-10)


class OddBlock(nn.Module):
    """A layer value zeroing cannot run again: one in training mode (dropout needs rngs), or one run through another
    method than ``__call__``."""

    def setup(self):
        self.attn = nn.MultiHeadDotProductAttention(num_heads=2)
        self.drop = nn.Dropout(0.5, deterministic=False)

    def __call__(self, x, mask):
        return x + self.drop(self.attn(x, mask=mask))

    def step(self, x, mask):
        return x + self.attn(x, mask=mask)


class OddDecoder(nn.Module):
    method: str = "__call__"

    @nn.compact
    def __call__(self, x, valid):
        mask = nn.make_attention_mask(valid, valid)
        for i in range(2):
            x = getattr(OddBlock(name=f"layers_{i}"), self.method)(x, mask)
        return x


def test_linen_value_zeroing_alone_and_its_errors_name_the_fix(rms_decoder, setup):
    from attnflow.adapters import FlaxValueMap, register_flax_value_map
    from attnflow.adapters._jax import _flax_methods, flax_linen

    from attnflow.recording import CaptureUnavailableError

    model, variables, ids, valid, trace, *_ = rms_decoder
    other, other_variables, x, _ = setup
    with jax.enable_x64(True):
        alone = attnflow.capture(model, variables, ids, valid, value_zeroing=True)
        assert "values_layout" not in alone.metadata and sorted(alone.layers[0].extras) == ["value_zeroing"]
        np.testing.assert_array_equal(alone.layers[2].extras["value_zeroing"], trace.layers[2].extras["value_zeroing"])
        with pytest.raises(AdapterError, match="value_zeroing= need the forward pass to run eagerly"):
            with attnflow.attach(model, value_zeroing=True):
                jax.vmap(lambda i, v: model.apply(variables, i[None], v[None]))(ids, valid)
        for wrong, message in [(dict(value="attn/values"), r"no value module the value map names \('attn/values'\) "
                                                           r"ran in the block 'layers_0'; FlaxValueMap.value must"),
                               (dict(attention="attention"), r"value_zeroing=True: no recorded self-attention layer "
                                                             r"\('layers_0/attn'...\) is the 'attention' module")]:
            register_flax_value_map("RMSDecoder", FlaxValueMap(layout="pre_ln", **{**RMS_MAP, **wrong}), replace=True)
            try:
                with pytest.raises(AdapterError, match=message):
                    attnflow.capture(model, variables, ids, valid, value_zeroing=True)
            finally:
                register_flax_value_map("RMSDecoder", FlaxValueMap(layout="pre_ln", **RMS_MAP), replace=True)
    with pytest.raises(CaptureUnavailableError, match=r"value_zeroing=True needs to know where Model.*register_flax"):
        attnflow.capture(other, other_variables, x, value_zeroing=True)
    skipped = attnflow.capture(other, other_variables, x, methods="all").metadata["skipped_methods"]
    assert "value_zeroing=True needs to know where Model" in skipped["value_zeroing"]  # methods="all" goes on

    saved = dict(_flax_methods.VALUE_MAPS)
    register_flax_value_map("OddDecoder", FlaxValueMap(attention="attn", value="attn/value", out="attn/out",
                                                       residual="attn", block_output="attn", layout="pre_ln"))
    x, keep = x[:, :4, :8], valid[:, :4]
    odd = jax.eval_shape(OddDecoder().init, {"params": jax.random.key(0), "dropout": jax.random.key(1)}, x, keep)
    odd = jax.tree.map(lambda s: jnp.asarray(np.random.default_rng(6).normal(0.0, 0.5, s.shape), jnp.float32), odd)
    depth = len(linen_module._global_interceptor_stack)
    try:
        with pytest.raises(AdapterError, match=r"running the block 'layers_0' again alone .* failed: InvalidRngError.* "
                                               r"must be deterministic: dropout off \(deterministic=True\).*callable "
                                               r"again with the arguments it got; check also the value map's value"):
            attnflow.capture(OddDecoder(), odd, x, keep, rngs={"dropout": jax.random.key(2)}, value_zeroing=True)
        with pytest.raises(AdapterError, match=r"the block 'layers_0' of 'layers_0/attn' was not seen as one eager "
                                               r"__call__.*another method than __call__"):
            attnflow.capture(OddDecoder("step"), odd, x, keep, value_zeroing=True)
    finally:
        _flax_methods.VALUE_MAPS.clear()
        _flax_methods.VALUE_MAPS.update(saved)
    # nothing left behind by the failed re-runs: no interceptor, no re-run switched on, jit back on
    assert len(linen_module._global_interceptor_stack) == depth and not flax_linen._ACTIVE.get(threading.get_ident())
    assert flax_linen._injection() is None and not jax.config.jax_disable_jit
    assert attnflow.capture(OddDecoder("step"), odd, x, keep).layers[0].extras == {}


def test_target_through_modules_adds_its_zero_in_the_modules_own_layout(hand):
    """Grouped-query attention selected with modules= and layout='btgns': the gradient with respect to the recorded
    (batch, heads, q, k) probabilities, heads group-major, against jax.grad of the model written out in jax.numpy."""
    model, variables, x, valid = hand
    p = variables["params"]
    seq = x.shape[1]
    allowed = jnp.tril(jnp.ones((seq, seq), bool))[None] & valid[:, None, :]

    def score(deltas):  # deltas: (batch, groups, heads per group, q, k) per layer
        h = x
        for i, delta in enumerate(deltas):
            a = p[f"layers_{i}"]["attn"]
            q = jnp.einsum("btf,fgnd->btgnd", h, a["q"]["kernel"]) + a["q"]["bias"]
            k = jnp.einsum("bsf,fgd->bsgd", h, a["k"]["kernel"]) + a["k"]["bias"]
            v = jnp.einsum("bsf,fgd->bsgd", h, a["v"]["kernel"]) + a["v"]["bias"]
            logits = jnp.where(allowed[:, None, None], jnp.einsum("btgnd,bsgd->bgnts", q, k) / np.sqrt(HEAD_DIM), -1e9)
            probs = jax.nn.softmax(logits, axis=-1) + delta
            h = h + jnp.einsum("bgnts,bsgd->btgnd", probs, v).reshape(*h.shape[:2], -1) @ a["out"]["kernel"] \
                + a["out"]["bias"]
            mlp = p[f"layers_{i}"]["mlp"]
            h = h + nn.gelu(h) @ mlp["kernel"] + mlp["bias"]
        return h[np.arange(BATCH), valid.sum(1) - 1, 2].sum()  # target=2 at each item's last real token (causal)

    expected = jax.jit(jax.grad(score))([jnp.zeros((BATCH, GROUPS, GROUP_HEADS, seq, seq))] * 2)
    trace = attnflow.capture(model, variables, x, valid, target=2,
                             adapter_options={"modules": [HandAttention], "layout": "btgns"})
    for layer, grad in zip(trace.layers, expected, strict=True):
        reference = np.asarray(grad).reshape(BATCH, GROUPS * GROUP_HEADS, seq, seq)
        np.testing.assert_allclose(layer.extras["attn_grad"], reference, atol=1e-5, rtol=1e-4)
    assert max(float(np.abs(g).max()) for g in expected) > 1e-3


class PostLNBlock(nn.Module):
    """A BERT-style post-LN block (LayerNorm after the attention's residual sum)."""

    @nn.compact
    def __call__(self, x, mask):
        x = nn.LayerNorm(epsilon=1e-6, name="attention_norm")(x + nn.MultiHeadDotProductAttention(
            num_heads=4, name="attention")(x, mask=mask))
        return nn.LayerNorm(name="output_norm")(x + nn.Dense(8, name="mlp")(nn.gelu(x)))


class PostLN(nn.Module):
    @nn.compact
    def __call__(self, x, valid):
        mask = nn.make_attention_mask(valid, valid)
        for i in range(2):
            x = PostLNBlock(name=f"layer_{i}")(x, mask)
        return x


def test_linen_post_ln_values_equal_a_numpy_recomputation():
    """values=True through a post-LN map (batch 3, layers 2, heads 4, tokens 5, width 8): the norm's input, output
    and parameters read from linen's params, against the blocks written out in float64 numpy."""
    from attnflow.adapters import FlaxValueMap, register_flax_value_map
    from attnflow.adapters._jax import _flax_methods

    saved = dict(_flax_methods.VALUE_MAPS)
    register_flax_value_map("PostLN", FlaxValueMap(attention="attention", value="attention/value", out="attention/out",
                                                   residual="attention", norm="attention_norm", layout="post_ln"))
    x = np.random.default_rng(4).normal(size=(3, 5, 8)).astype(np.float32)
    valid = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    model = PostLN()
    rng = np.random.default_rng(5)
    variables = jax.tree.map(lambda s: rng.normal(0.0, 0.5, s.shape).astype(np.float32),
                             jax.eval_shape(model.init, jax.random.PRNGKey(0), x, valid))
    try:
        trace = attnflow.capture(model, variables, x, valid, values=True)
    finally:
        _flax_methods.VALUE_MAPS.clear()
        _flax_methods.VALUE_MAPS.update(saved)

    def layer_norm(z, p, eps):
        centred = z - z.mean(-1, keepdims=True)
        return centred / np.sqrt((centred**2).mean(-1, keepdims=True) + eps) * p["scale"] + p["bias"]

    h = x.astype(np.float64)
    mask = (valid[:, None, :, None] & valid[:, None, None, :]).astype(bool)
    assert trace.metadata["values_layout"] == "post_ln"
    for i, layer in enumerate(trace.layers):
        p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"][f"layer_{i}"])
        _, moved = mha_reference(p["attention"], h, h, mask)
        z = h + moved
        y = layer_norm(z, p["attention_norm"], 1e-6)
        v = np.einsum("bkf,fhd->bhkd", h, p["attention"]["value"]["kernel"]) + p["attention"]["value"]["bias"][:, None]
        expected = {"value": v, "out_weight": p["attention"]["out"]["kernel"][None], "residual": h, "norm_input": z,
                    "norm_output": y, "norm_weight": p["attention_norm"]["scale"][None],
                    "norm_bias": p["attention_norm"]["bias"][None], "out_bias": p["attention"]["out"]["bias"][None],
                    "norm_eps": np.array([1e-6])}
        for name, value in expected.items():
            np.testing.assert_allclose(layer.extras[name], value, atol=2e-5, rtol=1e-5, err_msg=name)
        gelu = np.asarray(nn.gelu(jnp.asarray(y, jnp.float32)), np.float64)
        h = layer_norm(y + gelu @ p["mlp"]["kernel"] + p["mlp"]["bias"], p["output_norm"], 1e-6)
