"""The gemma adapter on tiny random ``gm.nn.Transformer`` models of Google DeepMind's gemma library (3.3.0).

The models have grouped-query, multi-query or multi-head attention, a sliding-window layer and a global one,
soft-capped attention logits, query/key norms and a padded batch. The reference is independent of attnflow:
each ``Attention`` layer's probabilities re-derived in float64 numpy from the model's own parameters and the
inputs that layer received (read with a plain ``nn.intercept_methods``), following gemma's code path
(projections, RMS norms, RoPE, query scaling, grouped-query logits, soft cap, sliding window, mask, softmax).

What is stubbed, and why: gemma 3.3.0 cannot be installed with its dependencies next to this project's
pins (its dependency kauldron needs xmanager, which needs protobuf < 7), so ``make install`` installs it
with ``--no-deps`` and the light packages ``gemma.gm.nn`` imports, but not TensorFlow. kauldron imports
``tensorflow`` at module level only to name ``tf.Tensor`` in typing aliases: ``tests/gemma_import.py``
imports gemma with a stand-in ``tensorflow`` module present only during that import. The adapter itself
uses no stub (it only looks at classes of an already imported gemma).
"""

from __future__ import annotations

import functools

import gemma  # noqa: F401  (make install installs both; a missing one must fail, not skip)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import kauldron  # noqa: F401
import numpy as np
import pytest
from flax import linen as nn  # noqa: E402
from gemma_import import import_gemma  # noqa: E402

import attnflow  # noqa: E402
from attnflow.testing import AdapterConformance  # noqa: E402

gm = import_gemma()
from gemma.gm.nn import _modules  # noqa: E402

# distinct sizes: batch 3, tokens 7, query heads 6 (of head dim 10), embedding 36, hidden 44, vocabulary 67
BATCH, SEQ, HEADS, HEAD_DIM, EMBED, HIDDEN, VOCAB, WINDOW, SOFT_CAP = 3, 7, 6, 10, 36, 44, 67, 3, 5.0
LOCAL, GLOBAL = 10_000, 100_000


def config(kv_heads: int, post_norm: bool = True):
    return gm.nn.config.TransformerConfig(
        num_embed=VOCAB, embed_dim=EMBED, hidden_dim=HIDDEN, num_heads=HEADS, head_dim=HEAD_DIM,
        num_kv_heads=kv_heads, final_logit_softcap=30.0, use_post_attn_norm=post_norm, use_post_ffw_norm=post_norm,
        attention_types=(gm.nn.AttentionType.LOCAL_SLIDING, gm.nn.AttentionType.GLOBAL),
        attn_logits_soft_cap=SOFT_CAP, sliding_window_size=WINDOW, use_qk_norm=True,
        local_base_frequency=LOCAL, global_base_frequency=GLOBAL,
    )


def make_model(kv_heads: int = 2, post_norm: bool = True):
    return gm.nn.Transformer(config=config(kv_heads, post_norm), dtype=jnp.float32)  # float32: the default is bfloat16


def tokens() -> jax.Array:
    ids = np.random.default_rng(1).integers(1, VOCAB, (BATCH, SEQ))
    ids[1, -2:] = 0  # gemma's padding id
    ids[2, -4:] = 0
    return jnp.asarray(ids, jnp.int32)


@functools.cache
def params(kv_heads: int = 2, post_norm: bool = True):
    """Random parameters of the model's own shapes (norm scales too, which gemma initialises to zero), made
    once per configuration (gemma's own init compiles for half a minute on two cores)."""
    shapes = jax.eval_shape(make_model(kv_heads, post_norm).init, jax.random.key(0), tokens())["params"]
    rng = np.random.default_rng(kv_heads)
    return jax.tree.map(lambda leaf: jnp.asarray(0.3 * rng.standard_normal(leaf.shape), jnp.float32), shapes)


def rms(x, scale):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-6) * (1 + scale)


def rope(x, positions, base):
    half = x.shape[-1] // 2
    timescale = base ** (2.0 / x.shape[-1] * np.arange(half))
    angle = (positions[..., None] / timescale)[..., None, :]
    first, second = x[..., :half], x[..., half:]
    return np.concatenate([first * np.cos(angle) - second * np.sin(angle), second * np.cos(angle) + first * np.sin(angle)], -1)


def attention_reference(p, x, positions, mask, sliding, kv_heads):
    """One gemma Attention layer's probabilities, (batch, heads, query, key), in float64 numpy."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    x = np.asarray(x, np.float64)
    if "qkv_einsum" in p:
        q, k, _ = np.einsum("btd,sndh->sbtnh", x, p["qkv_einsum"]["w"])
    else:
        q = np.einsum("btd,ndh->btnh", x, p["q_einsum"]["w"])
        k, _ = np.einsum("bsd,ckdh->cbskh", x, p["kv_einsum"]["w"])
    q, k = rms(q, p["_query_norm"]["scale"]), rms(k, p["_key_norm"]["scale"])
    base = LOCAL if sliding else GLOBAL
    q, k = rope(q, positions, base) * HEAD_DIM**-0.5, rope(k, positions, base)
    group = HEADS // kv_heads  # query head n uses key/value head n // group
    logits = np.einsum("btnh,bsnh->bnts", q, np.repeat(k, group, axis=2))
    logits = np.tanh(logits / SOFT_CAP) * SOFT_CAP
    allowed = np.asarray(mask, bool)
    if sliding:
        allowed = allowed & (np.abs(positions[:, :, None] - positions[:, None, :]) < WINDOW)
    logits = np.where(allowed[:, None], logits, -np.inf)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def reference(model, inputs):
    """Each Attention layer's inputs, read with a plain flax interceptor (eagerly, as gemma's __call__ is
    nn.jit-compiled), and its probabilities re-derived from them in numpy."""
    (variables, ids), _ = inputs
    seen = []

    def spy(next_fun, args, kwargs, context):
        if isinstance(context.module, _modules.Attention) and context.method_name == "__call__":
            x, positions, _, mask = args
            seen.append((context.module.path[0], np.asarray(x), np.asarray(positions), np.asarray(mask)))
        return next_fun(*args, **kwargs)

    with jax.disable_jit(), nn.intercept_methods(spy):
        model.apply(variables, ids)
    kv = model.config.num_kv_heads
    return [attention_reference(variables["params"][layer]["attn"], x, pos, mask, i == 0, kv)
            for i, (layer, x, pos, mask) in enumerate(seen)]


class TestGemmaAdapter(AdapterConformance):
    """The conformance kit on a grouped-query gemma Transformer (6 query heads sharing 2 key/value heads)."""

    adapter = attnflow.get_adapter("gemma")

    def make_model(self):
        return make_model(2)

    def make_inputs(self, model):
        return ({"params": params(2)}, tokens()), {}

    def reference(self, model, inputs):
        return reference(model, inputs)


@pytest.mark.parametrize("kv_heads", [1, 6], ids=["multi-query", "multi-head"])
def test_multi_query_and_multi_head_attention(kv_heads):
    model, ids = make_model(kv_heads), tokens()
    trace = attnflow.capture(model, {"params": params(kv_heads)}, ids)  # found without adapter=: gemma claims it
    assert trace.metadata["adapter"] == "gemma"
    real = np.asarray(ids) != 0
    pairs = real[:, None, :, None] & real[:, None, None, :]
    for layer, expected in zip(trace.layers, reference(model, (({"params": params(kv_heads)}, ids), {})), strict=True):
        assert layer.shape == (BATCH, HEADS, SEQ, SEQ)
        assert np.abs(np.where(pairs, layer.weights - expected, 0)).max() <= 1e-5


def test_layers_masks_window_and_labels():
    model, ids = make_model(2), tokens()
    trace = attnflow.capture(model, {"params": params(2)}, ids)
    assert trace.layer_names == ["layer_0/attn", "layer_1/attn"]
    assert trace.causal and trace.framework == "jax" and trace.model_name == "Transformer"
    np.testing.assert_array_equal(trace.mask, np.asarray(ids) != 0)  # from gemma's own attention mask
    assert trace.tokens[1][:2] == [str(int(i)) for i in np.asarray(ids)[1, :2]]
    real = trace.mask[:, None, :, None] & trace.mask[:, None, None, :]
    q, k = np.indices((SEQ, SEQ))
    local, global_ = (np.where(real, layer.weights, 0) for layer in trace.layers)
    assert local[..., q - k >= WINDOW].max() == 0 and global_[..., q - k >= WINDOW].max() > 0
    assert np.where(real, local, 0)[..., k > q].max() == 0  # causal


def test_labels_from_gemmas_own_tokenizer(tmp_path):
    """``tokens=`` a gemma tokenizer (``gm.text``, SentencePiece) labels each token by its text. The vocabulary
    is a tiny SentencePiece model trained here (gemma's own needs a download)."""
    import io

    import sentencepiece

    model_file = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(["the keys to the cabinet are on the table", "a cat sat on the mat by the door"] * 20),
        model_writer=model_file, vocab_size=40, model_type="bpe", minloglevel=2, pad_id=0, eos_id=1, bos_id=2,
        unk_id=3,
    )
    (tmp_path / "tiny.model").write_bytes(model_file.getvalue())
    tokenizer = gm.text.Gemma3Tokenizer(path=str(tmp_path / "tiny.model"))
    rows = [tokenizer.encode(text)[:SEQ] for text in ("the keys to the cabinet", "a cat sat", "on the mat")]
    ids = jnp.asarray([row + [0] * (SEQ - len(row)) for row in rows], jnp.int32)  # 0: gemma's padding id
    trace = attnflow.capture(make_model(2), {"params": params(2)}, ids, tokens=tokenizer)
    np.testing.assert_array_equal(trace.mask, np.asarray(ids) != 0)
    for labels, row in zip(trace.tokens, rows, strict=True):
        # the token texts, whitespace-only tokens (the tokenizer decodes them to nothing) labelled by id
        texts = [label for label in labels[: len(row)] if not label.startswith("<")]
        assert "".join(texts) == tokenizer.decode(row).replace(" ", "")
        assert all(label == f"<{token}>" for label, token in zip(labels, row) if label.startswith("<"))
    assert trace.tokens[1][:3] == ["a", "c", "at"]


def test_jit_cache_and_apply_are_untouched():
    """gemma's __call__ is nn.jit-compiled: while attached it runs eagerly (the interception sees every layer);
    after the block the compiled function runs again and records nothing."""
    model, ids = make_model(2), tokens()
    variables = {"params": params(2)}
    compiled = model.apply(variables, ids).logits
    with attnflow.attach(model) as rec:
        inside = model.apply(variables, ids).logits
        assert jax.config.jax_disable_jit
    assert not jax.config.jax_disable_jit and len(rec.traces) == 1
    np.testing.assert_allclose(np.asarray(inside), np.asarray(compiled), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(model.apply(variables, ids).logits), np.asarray(compiled))
    assert len(rec.traces) == 1


def test_the_adapter_takes_no_options():
    model = make_model(2)
    with pytest.raises(attnflow.OptionError, match="gemma"):
        with attnflow.attach(model, modules=["layer_*/attn"]):
            pass


def attention_gradients_reference(kv_heads: int, ids: jax.Array, target: int) -> list[np.ndarray]:
    """d(logit ``target`` at each item's last real token, summed over items) / d(each layer's probabilities), in
    float64: gemma's own model with float64 parameters, a zero added (here, by a plain ``nn.intercept_methods``)
    to the output of each Attention's ``attention_weights`` identity layer, differentiated by ``jax.grad``."""
    ids_np = np.asarray(ids)
    last = (ids_np != 0).sum(axis=1) - 1
    with jax.enable_x64(True):
        model = gm.nn.Transformer(config=config(kv_heads), dtype=jnp.float64)
        variables = {"params": jax.tree.map(lambda a: jnp.asarray(np.asarray(a), jnp.float64), params(kv_heads))}
        shape = (ids_np.shape[0], ids_np.shape[1], HEADS, ids_np.shape[1])  # gemma's BTNS

        def score(deltas):
            def add(next_fun, args, kwargs, context):
                out = next_fun(*args, **kwargs)
                path = context.module.path
                if path and path[-1] == "attention_weights":
                    return out + deltas[path[0]]
                return out

            with nn.intercept_methods(add):
                logits = model.apply(variables, ids).logits
            return logits[np.arange(len(last)), last, target].sum()

        # compiled: the interceptor runs while jax traces score (gemma's own nn.jit traces inside it)
        grads = jax.jit(jax.grad(score))({f"layer_{i}": jnp.zeros(shape, jnp.float64) for i in range(2)})
        return [np.asarray(grads[f"layer_{i}"]).transpose(0, 2, 1, 3) for i in range(2)]


def test_target_gives_attention_gradients_equal_to_a_float64_recomputation():
    """target=5 (the vocabulary logit at each item's last real token) on the grouped-query model: each layer's
    attn_grad equals the float64 gradient computed here, and grad_rollout runs on it."""
    model, ids = make_model(2), tokens()
    trace = attnflow.capture(model, {"params": params(2)}, ids, target=5)
    expected = attention_gradients_reference(2, ids, 5)
    real = np.asarray(ids) != 0
    pairs = real[:, None, :, None] & real[:, None, None, :]
    for layer, reference_grad in zip(trace.layers, expected, strict=True):
        grad = layer.extras["attn_grad"]
        assert grad.shape == (BATCH, HEADS, SEQ, SEQ)
        scale = np.abs(reference_grad).max()
        assert scale > 0
        assert np.abs(np.where(pairs, grad - reference_grad, 0)).max() <= 1e-5 * scale
    assert np.isfinite(np.asarray(attnflow.explain(trace, ["grad_rollout"])["grad_rollout"])).all()


def block_inputs(kv_heads: int, ids: jax.Array, post_norm: bool = True) -> list[tuple]:
    """Per layer, its parameters and each Block's input (read with a plain ``nn.intercept_methods``), in float64:
    ``(params, x, positions, mask)``."""
    model, variables = make_model(kv_heads, post_norm), {"params": params(kv_heads, post_norm)}
    seen = []

    def spy(next_fun, args, kwargs, context):
        if isinstance(context.module, _modules.Block) and context.method_name == "__call__":
            x, positions, _, mask = args
            seen.append((context.module.path[0], np.asarray(x, np.float64), np.asarray(positions), np.asarray(mask)))
        return next_fun(*args, **kwargs)

    with jax.disable_jit(), nn.intercept_methods(spy):
        model.apply(variables, ids)
    return [(jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"][name]), x, positions, mask)
            for name, x, positions, mask in seen]


def block_reference(p, x, positions, mask, sliding: bool, kv_heads: int, post_norm: bool = True, keep=None):
    """One gemma Block in float64 numpy, its value vectors multiplied by ``keep`` (batch, keys): its output and, for
    values=True, x, the probabilities, f^h(x_j) = v_j^h W_O^h (batch, heads, keys, d), the sandwich norm's
    g / rms(a_i) (batch, queries, d) and the stream after attention y = x + post_attention_norm(attn(
    pre_attention_norm(x))) (without post_norm, Gemma 1's block: y = x + attn(pre_attention_norm(x)))."""
    attn = p["attn"]
    h = rms(x, p["pre_attention_norm"]["scale"])
    probs = attention_reference(attn, h, positions, mask, sliding, kv_heads)
    if "qkv_einsum" in attn:
        v = np.einsum("btd,sndh->sbtnh", h, attn["qkv_einsum"]["w"])[2]
    else:
        v = np.einsum("bsd,ckdh->cbskh", h, attn["kv_einsum"]["w"])[1]
    if keep is not None:
        v = v * keep[:, :, None, None]
    v = np.repeat(v, HEADS // kv_heads, axis=2)  # query head n reads KV head n // group
    f = np.einsum("bsnh,nhd->bnsd", v, attn["attn_vec_einsum"]["w"])
    a = np.einsum("bnts,bnsd->btd", probs, f)
    scale = np.ones_like(a)
    if post_norm:
        scale = (1 + p["post_attention_norm"]["scale"]) / np.sqrt((a * a).mean(-1, keepdims=True) + 1e-6)
    y = x + a * scale
    gate = np.einsum("btf,nfh->btnh", rms(y, p["pre_ffw_norm"]["scale"]), p["mlp"]["gating_einsum"])
    gelu = 0.5 * gate[..., 0, :] * (1 + np.tanh(np.sqrt(2 / np.pi) * (gate[..., 0, :] + 0.044715 * gate[..., 0, :] ** 3)))
    out = (gelu * gate[..., 1, :]) @ p["mlp"]["linear"]  # nn.gelu: the tanh approximation
    if post_norm:
        out = rms(out, p["post_ffw_norm"]["scale"])
    return y + out, {"x": x, "probs": probs, "f": f, "scale": scale, "y": y}


def value_reference(kv_heads: int, ids: jax.Array, post_norm: bool = True) -> list[dict[str, np.ndarray]]:
    """Per layer, what values=True records, from :func:`block_reference` on each Block's input."""
    return [block_reference(p, x, positions, mask, i == 0, kv_heads, post_norm)[1]
            for i, (p, x, positions, mask) in enumerate(block_inputs(kv_heads, ids, post_norm))]


@pytest.mark.parametrize(("kv_heads", "post_norm"), [(2, True), (6, True), (1, False)],
                         ids=["grouped-query-kv_einsum", "multi-head-qkv_einsum", "multi-query-no-sandwich"])
def test_values_give_norm_and_alti_through_the_sandwich_norm(kv_heads, post_norm):
    """values=True: norm (Kobayashi et al., 2020), norm_residual and ALTI (Ferrando et al., 2022) through gemma's
    post_attention_norm (T_i(x_j) = Σ_h α^h_ij g ⊙ f^h(x_j) / rms(a_i) + δ_ij x_i, the norm's denominator a
    constant of the pass) against the float64 recomputation; the terms sum to the stream after attention. A
    model without post_attention_norm (Gemma 1's blocks) decomposes as a plain pre-LN block."""
    from test_methods import alti_rows

    from attnflow.methods._contributions import decomposition_identity

    model, ids = make_model(kv_heads, post_norm), tokens()
    trace = attnflow.capture(model, {"params": params(kv_heads, post_norm)}, ids, values=True)
    assert trace.metadata["values_layout"] == "pre_ln"
    assert ("post_norm_input" in trace.layers[0].extras) == post_norm
    assert "Transformer" not in attnflow.adapters._jax._flax_methods.VALUE_MAPS  # lent for the capture only
    e = attnflow.explain(trace, ["norm", "norm_residual", "alti"], all_layers=True)
    expected = value_reference(kv_heads, ids, post_norm)
    real = np.asarray(ids) != 0
    for b in range(BATCH):
        keep = np.flatnonzero(real[b])
        cell, joint = np.ix_(keep, keep), np.eye(keep.size)
        for li, layer in enumerate(expected):
            x = layer["x"][b][keep]
            moved = np.einsum("nij,njd->ijd", layer["probs"][b][:, keep][:, :, keep], layer["f"][b][:, keep])
            moved *= layer["scale"][b][keep][:, None]
            shares = moved.copy()
            shares[np.arange(keep.size), np.arange(keep.size)] += x
            y = layer["y"][b][keep]
            norms = np.linalg.norm(moved, axis=-1)
            np.testing.assert_allclose(e.layers("norm")[li, b][cell], norms, atol=2e-5 * norms.max())
            norms = np.linalg.norm(shares, axis=-1)
            np.testing.assert_allclose(e.layers("norm_residual")[li, b][cell], norms, atol=2e-5 * norms.max())
            joint = alti_rows(shares, y) @ joint
            np.testing.assert_allclose(e.layers("alti")[li, b][cell], joint, atol=2e-5)
            total, output = decomposition_identity(trace, li, b)
            np.testing.assert_allclose(output, y, atol=2e-5 * np.abs(y).max())
            np.testing.assert_allclose(total, output, atol=2e-5 * np.abs(y).max())


@pytest.mark.parametrize("kv_heads", [2, 6], ids=["grouped-query-kv_einsum", "multi-head-qkv_einsum"])
def test_value_zeroing_equals_a_float64_recomputation(kv_heads):
    """value_zeroing=True (Mohebbi et al., 2023) through gemma's map: each Block run again alone with one token's
    values (index 1 of kv_einsum's stacked output, 2 of qkv_einsum's) zeroed at a time, against the Block (norms,
    attention, sandwich norm, gated feed-forward) written out in float64 numpy: causal, padded, and 0 outside the
    sliding window of the local layer."""
    from test_flax_linen import zeroing_reference

    model, ids = make_model(kv_heads), tokens()
    trace = attnflow.capture(model, {"params": params(kv_heads)}, ids, value_zeroing=True)
    assert "Transformer" not in attnflow.adapters._jax._flax_methods.VALUE_MAPS  # lent for the capture only
    real = np.asarray(ids) != 0
    for i, (layer, inputs) in enumerate(zip(trace.layers, block_inputs(kv_heads, ids), strict=True)):
        def run(b, keep, p=inputs[0], x=inputs[1], positions=inputs[2], mask=inputs[3], sliding=i == 0):
            return block_reference(p, x[b : b + 1], positions[b : b + 1], mask[b : b + 1], sliding, kv_heads,
                                   keep=keep)[0]

        expected, zeroing = zeroing_reference(run, real), layer.extras["value_zeroing"]
        assert zeroing.shape == (BATCH, SEQ, SEQ) and expected.max() > 1e-3
        np.testing.assert_allclose(zeroing, expected, atol=1e-6, rtol=0)
    q, k = np.indices((SEQ, SEQ))
    outside = q - k >= WINDOW  # beyond the local layer's window: float32 rounding alone (of variants run batched)
    assert trace.layers[0].extras["value_zeroing"][:, outside].max() < 1e-10
    assert trace.layers[1].extras["value_zeroing"][0, outside].min() > 1e-5
