"""Faithfulness (the ``ablation`` and ``input_gradients`` probe) on the JAX library adapters: flaxmodels' GPT-2,
gemma's ``gm.nn.Transformer`` and penzai.

Each probe is checked against direct computations written here, independent of the probe: blank-out
importances against the model re-run with the token's input embedding replaced (zero, or another token's
row of the embedding table) by the library's own means (flaxmodels' ``input_embds=``, a plain
``nn.intercept_methods`` on gemma's ``Embedder.encode``, a penzai model whose embedding layer is swapped for a
constant), and input-gradient norms against ``jax.grad`` of the target logit with respect to the embedding
output. One tiny model per library (module-scoped), sizes distinct on every axis.
"""

from __future__ import annotations

import types

import flaxmodels  # noqa: F401  (make install installs it; a missing one must fail, not skip)
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flaxmodels.gpt2 import gpt2 as fm_gpt2
from flaxmodels.gpt2 import ops as fm_ops
from gemma_import import import_gemma
from test_flaxmodels import _JaxNumpyWithNewshape  # flaxmodels 0.1.3's newshape= under jax 0.10

import attnflow

TARGET = 5  # the vocabulary logit explained, at each item's last real token
pytestmark = pytest.mark.usefixtures("jax_quick_compile")  # compilation is most of these tests' time


def _replacing(kind, method, embeds, name=None):
    """A plain ``nn.intercept_methods`` interceptor: ``kind.method``'s output (of the module named ``name``) is
    ``embeds``."""
    def replace(next_fun, args, kwargs, context):
        module = context.module
        if isinstance(module, kind) and context.method_name == method and name in (None, module.name):
            return embeds
        return next_fun(*args, **kwargs)

    return replace


def _check(report, mask, score, embedded):
    """``score(b, e_b)``: the target of item ``b`` with its embedding output ``e_b`` ``(tokens, width)`` (a jax
    function, computed directly); ``embedded``: ``(batch, tokens, width)`` the unablated embedding outputs.
    Returns the largest differences (blank-out, gradient norm)."""
    worst = [0.0, 0.0]

    def direct(b, e):
        return float(score(b, e))

    gradient = jax.jit(jax.grad(score, argnums=1))  # compiled once for every item (b is traced, as in score)
    for b in range(mask.shape[0]):
        n = int(mask[b].sum())
        e = embedded[b]
        grad = gradient(b, e)
        base = direct(b, e)
        assert report.base[b] == pytest.approx(base, rel=1e-5, abs=1e-5)
        for j in range(n):
            expected = base - direct(b, e.at[j].set(0.0))
            got = report.importances["blankout"][b, j]
            assert got == pytest.approx(expected, rel=1e-4, abs=1e-4)
            worst[0] = max(worst[0], abs(got - expected))
        norms = np.linalg.norm(np.asarray(grad, np.float64), axis=-1)[:n]
        np.testing.assert_allclose(report.importances["grad_norm"][b, :n], norms, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(report.importances["grad_x_input"][b, :n],
                                   (np.asarray(grad, np.float64) * np.asarray(e, np.float64)).sum(-1)[:n],
                                   rtol=1e-3, atol=1e-5)
        worst[1] = max(worst[1], float(np.abs(report.importances["grad_norm"][b, :n] - norms).max()))
    assert all(np.isfinite(report.correlations[m]["blankout"]).all() for m in ("raw", "rollout"))
    assert all(np.isfinite(report.correlations[m]["grad_norm"]).all() for m in ("raw", "rollout"))
    return worst


# -- flaxmodels ------------------------------------------------------------------------------------------------
# batch 2, layers 2, heads 4 (head dim 9), tokens 5, embedding 36, vocabulary 43
FM = dict(batch=2, seq=5, vocab=43)
FM_CONFIG = types.SimpleNamespace(
    vocab_size=43, n_positions=11, n_embd=36, n_head=4, n_layer=2, n_inner=None, embd_pdrop=0.0, attn_pdrop=0.0,
    resid_pdrop=0.0, layer_norm_epsilon=1e-5, activation_function="gelu_new", scale_attn_weights=True,
)


@pytest.fixture(scope="module")
def flaxmodels_gpt2():
    modules = (fm_gpt2, fm_ops)
    saved = [module.jnp for module in modules]
    for module in modules:
        module.jnp = _JaxNumpyWithNewshape()
    try:
        model = fm_gpt2.GPT2Model(config=FM_CONFIG)  # (GPT2LMHeadModel needs pretrained weights in 0.1.3)
        ids = jnp.asarray(np.random.default_rng(2).integers(0, FM["vocab"], (FM["batch"], FM["seq"])))
        real = np.ones((FM["batch"], FM["seq"]), np.float32)
        real[1, -2:] = 0
        shapes = jax.eval_shape(model.init, jax.random.key(0), input_ids=ids)
        rng = np.random.default_rng(3)
        variables = jax.tree_util.tree_map_with_path(
            lambda path, leaf: jnp.asarray((path[-1].key == "scale") + 0.3 * rng.standard_normal(leaf.shape),
                                           jnp.float32), shapes)
        yield model, variables, ids, jnp.asarray(real)
    finally:
        for module, original in zip(modules, saved):
            module.jnp = original


def test_flaxmodels_probe_matches_direct_computations(flaxmodels_gpt2):
    model, variables, ids, real = flaxmodels_gpt2
    mask = np.asarray(real, bool)
    last = np.array([int(np.flatnonzero(m)[-1]) for m in mask])

    def target(output, items):  # GPT2Model has no head: one feature of the last real token's hidden state
        return output["last_hidden_state"][np.arange(len(items)), last[items], TARGET]

    trace = attnflow.capture(model, variables, input_ids=ids, attn_mask=real)
    explanation = attnflow.explain(trace, ["raw", "rollout"], all_layers=True)
    report = attnflow.faithfulness(model, explanation, variables, input_ids=ids, attn_mask=real, target=target,
                                   blank="zero", source="mean", curves=False)
    table = variables["params"]["Embed_0"]["embedding"]

    def hidden_with(embeds):  # the token Embed's output replaced (input_embds= would rename the position Embed)
        with nn.intercept_methods(_replacing(nn.Embed, "__call__", embeds, "Embed_0")):
            return model.apply(variables, input_ids=ids, attn_mask=real)["last_hidden_state"]

    score = jax.jit(lambda b, e: hidden_with(table[ids].at[b].set(e))[b, jnp.asarray(last)[b], TARGET])

    worst = _check(report, mask, score, table[ids])
    print("flaxmodels: blank-out, gradient norm max |difference|", worst)
    # a token id as the blank: the token's row of the table in place of its own
    by_id = attnflow.faithfulness(model, explanation, variables, input_ids=ids, attn_mask=real, target=target,
                                  blank=3, source="mean", references=["blankout"], curves=False)
    for b in range(mask.shape[0]):
        e = table[ids[b]]
        for j in range(int(mask[b].sum())):
            expected = float(score(b, e) - score(b, e.at[j].set(table[3])))
            assert by_id.importances["blankout"][b, j] == pytest.approx(expected, rel=1e-4, abs=1e-4)


# -- gemma ------------------------------------------------------------------------------------------------------
# batch 3, tokens 6, query heads 4 (head dim 8), key/value heads 2, embedding 20, hidden 28, vocabulary 37
GM = dict(batch=3, seq=6, vocab=37)


@pytest.fixture(scope="module")
def gemma_model():
    gm = import_gemma()
    config = gm.nn.config.TransformerConfig(
        num_embed=GM["vocab"], embed_dim=20, hidden_dim=28, num_heads=4, head_dim=8, num_kv_heads=2,
        final_logit_softcap=30.0, use_post_attn_norm=True, use_post_ffw_norm=True,
        attention_types=(gm.nn.AttentionType.LOCAL_SLIDING, gm.nn.AttentionType.GLOBAL), attn_logits_soft_cap=5.0,
        sliding_window_size=3, use_qk_norm=True, local_base_frequency=10_000, global_base_frequency=100_000,
    )
    model = gm.nn.Transformer(config=config, dtype=jnp.float32)
    ids = np.random.default_rng(4).integers(1, GM["vocab"], (GM["batch"], GM["seq"]))
    ids[1, -2:] = 0  # gemma's padding id
    ids = jnp.asarray(ids, jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), ids)["params"]
    rng = np.random.default_rng(5)
    params = jax.tree.map(lambda leaf: jnp.asarray(0.3 * rng.standard_normal(leaf.shape), jnp.float32), shapes)
    return model, {"params": params}, ids


def test_gemma_probe_matches_direct_computations(gemma_model):
    from gemma.gm.nn import _modules

    model, variables, ids = gemma_model
    trace = attnflow.capture(model, variables, ids)
    explanation = attnflow.explain(trace, ["raw", "rollout"], all_layers=True)
    report = attnflow.faithfulness(model, explanation, variables, ids, target=TARGET, blank="zero", curves=False)
    mask = np.asarray(ids) != 0
    last = [int(np.flatnonzero(m)[-1]) for m in mask]
    table = variables["params"]["embedder"]["input_embedding"]
    embedded = table[ids] * jnp.sqrt(20.0)  # Embedder.encode: the table's rows times sqrt(embed_dim)

    def logits_with(embeds):
        with jax.disable_jit(), nn.intercept_methods(_replacing(_modules.Embedder, "encode", embeds)):
            return model.apply(variables, ids).logits

    score_fn = jax.jit(lambda b, e: logits_with(embedded.at[b].set(e))[b, jnp.asarray(last)[b], TARGET])

    worst = _check(report, mask, score_fn, embedded)
    print("gemma: blank-out, gradient norm max |difference|", worst)


# -- penzai -----------------------------------------------------------------------------------------------------
# penzai's conversion of a tiny random Hugging Face GPT-NeoX: batch 2, tokens 7, layers 2, heads 4 (head dim 12),
# embedding 48, hidden 40, vocabulary 97 (test_penzai's model)
PZ = dict(batch=2, seq=7, vocab=97)


@pytest.fixture(scope="module")
def penzai_model():
    import sys
    from pathlib import Path

    from penzai import pz

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    from compare_hf_penzai import gpt_neox_from_hf
    from test_penzai import hf_gpt_neox

    model = gpt_neox_from_hf(hf_gpt_neox())
    ids = np.random.default_rng(6).integers(1, PZ["vocab"], (PZ["batch"], PZ["seq"]))
    real = np.ones(ids.shape, bool)
    real[1, -3:] = False
    tokens = pz.nx.wrap(jnp.asarray(ids)).tag("batch", "seq")
    positions = pz.nx.wrap(jnp.asarray(np.where(real, np.arange(ids.shape[1]), -1))).tag("batch", "seq")
    return model, tokens, positions, ids, real


def test_penzai_probe_matches_direct_computations(penzai_model):
    from penzai import pz

    model, tokens, positions, ids, real = penzai_model
    trace = attnflow.capture(model, tokens, token_positions=positions)
    explanation = attnflow.explain(trace, ["raw", "rollout"], all_layers=True)
    report = attnflow.faithfulness(model, explanation, tokens, token_positions=positions, target=TARGET,
                                   blank="zero", curves=False)
    lookup = pz.select(model).at_instances_of(pz.nn.EmbeddingLookup).get()
    embedded = lookup(tokens).untag("batch", "seq", "embedding").unwrap()
    last = np.array([int(np.flatnonzero(m)[-1]) for m in real])

    @pz.pytree_dataclass
    class Constant(pz.nn.Layer):  # the embedding lookup replaced by a given output
        value: pz.nx.NamedArray

        def __call__(self, argument, **side_inputs):
            return self.value

    def logits_with(embeds):
        fixed = pz.select(model).at_instances_of(pz.nn.EmbeddingLookup).apply(
            lambda _: Constant(pz.nx.wrap(embeds).tag("batch", "seq", "embedding")))
        return fixed(tokens, token_positions=positions).untag("batch", "seq", "vocabulary").unwrap()

    score = jax.jit(lambda b, e: logits_with(embedded.at[b].set(e))[b, jnp.asarray(last)[b], TARGET])

    worst = _check(report, real, score, embedded)
    print("penzai: blank-out, gradient norm max |difference|", worst)
