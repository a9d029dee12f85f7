"""The penzai adapter on tiny penzai models.

References are independent of attnflow: penzai's conversions of tiny random Hugging Face models (GPT-NeoX,
multi-head; Llama, multi-query; Mistral, grouped-query with a sliding window; also as a LayerStack) are checked
against the Hugging Face model's own eager attention (``output_attentions=True``), and a Gemma-2-like model
built by penzai itself (grouped-query, a sliding-window and a global layer, soft-capped logits) against
penzai's own ``SaveIntermediate`` on a wrapped copy. penzai's converters need small shims under
transformers 5 (they are in ``examples/compare_hf_penzai.py``, which these tests import). Sizes are distinct
on every axis; head dimensions keep penzai's rotary dimensions even.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np
import penzai  # noqa: F401  (make install installs it; a missing one must fail, not skip)
import pytest
import torch  # noqa: E402
import transformers  # noqa: E402
from penzai import pz  # noqa: E402
from penzai.models.transformer.variants import gpt_neox, llamalike_common  # noqa: E402
from penzai.toolshed.save_intermediates import SaveIntermediate  # noqa: E402

import attnflow  # noqa: E402
from attnflow.testing import AdapterConformance  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from compare_hf_penzai import gpt_neox_from_hf, transformers4_view  # noqa: E402
from compare_hf_penzai import mistral_from_hf as llama_from_hf  # noqa: E402

BATCH, SEQ = 2, 7


def hf_gpt_neox(seed: int = 0) -> transformers.GPTNeoXForCausalLM:
    torch.manual_seed(seed)
    config = transformers.GPTNeoXConfig(
        vocab_size=97, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
        max_position_embeddings=32, rope_parameters={"rope_type": "default", "rope_theta": 5000.0,
                                                     "partial_rotary_factor": 0.5},
        attn_implementation="eager",
    )
    return transformers.GPTNeoXForCausalLM(config).eval()


def hf_llama(kv_heads: int, sliding_window: int | None = None) -> transformers.PreTrainedModel:
    """Llama (or Mistral with a sliding window): 6 query heads of 8 dims, ``kv_heads`` key/value heads."""
    torch.manual_seed(kv_heads)
    common = dict(vocab_size=101, hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
                  num_key_value_heads=kv_heads, intermediate_size=40, max_position_embeddings=32,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000.0}, attn_implementation="eager")
    if sliding_window is not None:
        return transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=sliding_window, **common)).eval()
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common)).eval()


def padded_batch(vocab: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, (BATCH, SEQ))
    real = np.ones((BATCH, SEQ), dtype=bool)
    real[1, -2:] = False  # two padding tokens
    return ids, real


def penzai_inputs(ids: np.ndarray, real: np.ndarray) -> tuple[tuple, dict]:
    """penzai's call convention: named tokens, and token positions that are negative for padding."""
    tokens = pz.nx.wrap(jnp.asarray(ids)).tag("batch", "seq")
    positions = pz.nx.wrap(jnp.asarray(np.where(real, np.arange(ids.shape[1]), -1))).tag("batch", "seq")
    return (tokens,), {"token_positions": positions}


def hf_attention(model: transformers.PreTrainedModel, ids: np.ndarray, real: np.ndarray) -> list[np.ndarray]:
    with torch.no_grad():
        out = model(torch.from_numpy(ids), attention_mask=torch.from_numpy(real.astype(np.int64)),
                    output_attentions=True)
    return [a.numpy() for a in out.attentions]


def real_pairs(real: np.ndarray) -> np.ndarray:
    return real[:, None, :, None] & real[:, None, None, :]


class TestPenzaiAdapter(AdapterConformance):
    """The conformance kit on penzai's conversion of a Hugging Face GPT-NeoX; the reference is the Hugging Face
    model's own eager attention."""

    adapter = attnflow.get_adapter("penzai")

    def make_model(self):
        hf = hf_gpt_neox()
        model = gpt_neox_from_hf(hf)
        self.__dict__.setdefault("pairs", []).append((model, hf))
        return model

    def make_inputs(self, model):
        return penzai_inputs(*padded_batch(97))

    def reference(self, model, inputs):
        hf = next(h for m, h in self.pairs if m is model)
        tokens, positions = inputs[0][0], inputs[1]["token_positions"]
        ids = np.array(tokens.untag("batch", "seq").unwrap())
        real = np.asarray(positions.untag("batch", "seq").unwrap()) >= 0
        return hf_attention(hf, ids, real)


@pytest.mark.parametrize("kv_heads, window", [(1, None), (2, 4)],
                         ids=["llama-multi-query", "mistral-grouped-query-sliding-window"])  # multi-head: GPT-NeoX
def test_llama_and_mistral_conversions_match_the_hugging_face_attention(kv_heads, window):
    hf = hf_llama(kv_heads, window)
    model = llama_from_hf(hf)
    ids, real = padded_batch(101, seed=kv_heads)
    trace = attnflow.capture(model, *penzai_inputs(ids, real)[0], **penzai_inputs(ids, real)[1])
    assert trace.metadata["adapter"] == "penzai" and trace.framework == "jax"
    assert trace.num_heads == (6, 6) and trace.causal
    np.testing.assert_array_equal(trace.mask, real)
    assert trace.tokens[0] == [str(int(i)) for i in ids[0]]
    pairs = real_pairs(real)
    for layer, expected in zip(trace.layers, hf_attention(hf, ids, real), strict=True):
        assert layer.shape == expected.shape
        assert np.abs(np.where(pairs, layer.weights - expected, 0)).max() <= 1e-5
    if window is not None:  # nothing beyond the window (padding queries aside)
        q, k = np.indices((SEQ, SEQ))
        assert all(np.where(pairs, layer.weights, 0)[..., q - k >= window].max() == 0 for layer in trace.layers)


def test_gemma_like_penzai_model_with_sliding_window_and_soft_cap():
    """A Gemma-2-like model built by penzai (2 key/value heads x 3 query heads, a sliding-window layer and a
    global one, soft-capped attention logits), against penzai's own SaveIntermediate after the softmax."""
    config = llamalike_common.LlamalikeTransformerConfig(
        num_kv_heads=2, query_head_multiplier=3, embedding_dim=36, projection_dim=10, mlp_hidden_dim=44,
        num_decoder_blocks=2, vocab_size=67, mlp_variant="geglu_approx", tie_embedder_and_logits=True,
        attention_type=(llamalike_common.AttentionTypeSlidingWindowCausal(3), llamalike_common.AttentionTypeGlobalCausal()),
        use_post_attn_norm=True, use_post_ffw_norm=True, final_logit_softcap=30.0, attn_logits_soft_cap=5.0,
    )
    model = llamalike_common.build_llamalike_transformer(config, init_base_rng=jax.random.key(0))
    ids, real = padded_batch(67)
    args, kwargs = penzai_inputs(ids, real)
    trace = attnflow.capture(model, *args, **kwargs)

    wrapped = pz.select(model).at_instances_of(pz.nn.Softmax).apply(lambda s: pz.nn.Sequential([s, SaveIntermediate()]))
    with jax.disable_jit():  # eager, as attnflow ran it: every operation is compiled once already
        wrapped(*args, **kwargs)
    saved = [s.saved.value for s in pz.select(wrapped).at_instances_of(SaveIntermediate).get_sequence()]
    assert len(saved) == trace.num_layers == 2 and trace.num_heads == (6, 6) and trace.causal
    pairs = real_pairs(real)
    for layer, value in zip(trace.layers, saved):
        expected = np.asarray(value.untag("batch", "head_groups", "query_heads", "seq", "kv_seq").unwrap())
        expected = expected.reshape(BATCH, 6, SEQ, SEQ)  # head = group * 3 + query head
        np.testing.assert_allclose(np.where(pairs, layer.weights, 0), np.where(pairs, expected, 0), atol=1e-6)
    q, k = np.indices((SEQ, SEQ))
    assert np.where(pairs, trace.layers[0].weights, 0)[..., q - k >= 3].max() == 0  # the sliding window
    assert np.where(pairs, trace.layers[1].weights, 0)[..., q - k >= 3].max() > 0  # the global layer


def test_model_and_classes_are_left_exactly_as_they_were():
    hf = hf_gpt_neox(3)
    model = gpt_neox_from_hf(hf)
    args, kwargs = penzai_inputs(*padded_batch(97))
    leaves = jax.tree.leaves(model)
    before = np.asarray(model(*args, **kwargs).untag("batch", "seq", "vocabulary").unwrap())
    classes = (type(model), pz.nn.Attention, pz.nn.KVCachingAttention, pz.nn.Sequential)
    calls = [vars(cls).get("__call__") for cls in classes]
    with attnflow.attach(model) as rec:
        inside = np.asarray(model(*args, **kwargs).untag("batch", "seq", "vocabulary").unwrap())
        assert pz.nn.Attention.__call__ is not calls[1]
    assert [vars(cls).get("__call__") for cls in classes] == calls
    assert all(a is b for a, b in zip(jax.tree.leaves(model), leaves, strict=True))
    np.testing.assert_allclose(inside, before, atol=1e-6)
    after = np.asarray(model(*args, **kwargs).untag("batch", "seq", "vocabulary").unwrap())
    np.testing.assert_array_equal(after, before)
    assert rec.trace.num_layers == 2
    # another penzai model running while attached (not attached itself) is not recorded
    other = gpt_neox_from_hf(hf_gpt_neox(4))
    with attnflow.attach(model) as rec:
        other(*args, **kwargs)
        model(*args, **kwargs)
    assert len(rec.traces) == 1


def test_claims_and_vmap():
    model = gpt_neox_from_hf(hf_gpt_neox(5))
    adapter = attnflow.get_adapter("penzai")
    assert adapter.claims(model) and attnflow.capture  # found without adapter=
    assert not adapter.claims(pz.nn.Softmax("kv_seq")) and not adapter.claims(object())
    ids, real = padded_batch(97)
    reference = attnflow.capture(model, *penzai_inputs(ids, real)[0])
    with attnflow.attach(model) as rec:  # per example under vmap: sent out by debug callbacks, restacked
        jax.vmap(lambda row: model(pz.nx.wrap(row).tag("seq")).unwrap("seq", "vocabulary"))(jnp.asarray(ids))
    assert rec.trace.layer_names == reference.layer_names
    for a, b in zip(rec.trace.layers, reference.layers):
        np.testing.assert_allclose(a.weights, b.weights, atol=1e-6)


def test_layer_stack_layers_are_numbered_after_the_stack():
    """With use_layer_stack=True the blocks run under a scan that rebuilds them for every layer: each is
    recorded under the stack's attention path, numbered after the stack's path (the recorder's rule)."""
    hf = hf_gpt_neox(6)
    rope = hf.config.rope_parameters
    with transformers4_view(hf, {"rotary_emb_base": rope["rope_theta"], "rotary_pct": 0.5},
                            {"lm_head.weight": "embed_out.weight"}):
        model = gpt_neox.gpt_neox_from_huggingface_model(hf, use_layer_stack=True)
    ids, real = padded_batch(97)
    args, kwargs = penzai_inputs(ids, real)
    trace = attnflow.capture(model, *args, **kwargs)
    inner = "stacked_sublayers/sublayers/0/branches/1/sublayers/1"
    assert trace.layer_names == [f"body/sublayers/1/{i}/{inner}" for i in range(2)]
    pairs = real_pairs(real)
    for layer, expected in zip(trace.layers, hf_attention(hf, ids, real), strict=True):
        assert np.abs(np.where(pairs, layer.weights - expected, 0)).max() <= 1e-5
