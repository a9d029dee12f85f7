"""The transformers adapter searches a model's module tree once and keeps what it found per model (see
``hf_transformers._Shape``): a model whose tree changed between two captures, a second model of the same
architecture, and a model re-configured between captures are each captured as they are then (checked against the
model's own eager ``output_attentions``), and the kept search keeps no model alive."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch
import transformers

import attnflow

BATCH, TOKENS = 3, 7  # 4 layers, 2 heads, width 10 (below): a different size on every axis


def _gpt2(seed: int, layers: int = 4):
    config = transformers.GPT2Config(
        vocab_size=37, n_embd=10, n_layer=layers, n_head=2, n_inner=13, n_positions=16, initializer_range=0.3,
        bos_token_id=0, eos_token_id=0,
    )
    torch.manual_seed(seed)
    return transformers.GPT2Model(config).eval()  # SDPA, as a user's model loads


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 37, (BATCH, TOKENS), generator=torch.Generator().manual_seed(5))


def _reference(model, ids) -> list[np.ndarray]:
    """Each GPT-2 attention module's weights computed here from its input (Vaswani et al.: the softmax of
    ``q·kᵀ / √d`` over the causal keys), whichever modules the model runs now (transformers' own
    ``output_attentions`` misses a module put in after the model was built)."""
    seen: list[tuple] = []

    def keep(module, args, kwargs):
        seen.append((module, args[0] if args else kwargs["hidden_states"]))

    handles = [block.attn.register_forward_pre_hook(keep, with_kwargs=True) for block in model.h]
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    expected = []
    later = torch.triu(torch.ones(TOKENS, TOKENS, dtype=torch.bool), diagonal=1)
    for attn, hidden in seen:
        with torch.no_grad():
            q, k, _ = attn.c_attn(hidden).split(attn.embed_dim, dim=2)
        q, k = (x.view(BATCH, TOKENS, attn.num_heads, attn.head_dim).transpose(1, 2) for x in (q, k))
        scores = (q @ k.transpose(-1, -2) / attn.head_dim**0.5).masked_fill(later, float("-inf"))
        expected.append(torch.softmax(scores, dim=-1).numpy())
    return expected


def _assert_captured(model, ids) -> None:
    expected = _reference(model, ids)
    trace = attnflow.capture(model, input_ids=ids, use_cache=False)
    assert trace.num_layers == len(expected)
    for layer, weights in zip(trace.layers, expected):
        np.testing.assert_allclose(layer.weights, weights, atol=1e-5, rtol=0)


def test_a_module_tree_changed_between_captures_is_searched_again(ids):
    model = _gpt2(seed=1)
    _assert_captured(model, ids)
    model.h[0].probe = torch.nn.Identity()  # a module more, run by nothing: every later module moves one place on
    _assert_captured(model, ids)
    torch.manual_seed(2)
    model.h[2].attn = transformers.models.gpt2.modeling_gpt2.GPT2Attention(model.config, layer_idx=2).eval()
    _assert_captured(model, ids)  # the module that runs now, not the one replaced
    del model.h[0].probe
    _assert_captured(model, ids)


def test_two_models_of_one_class_each_get_their_own_search(ids):
    deep, shallow = _gpt2(seed=3), _gpt2(seed=4, layers=3)
    for model in (deep, shallow, deep, shallow):  # one kept search per model, never the other's
        _assert_captured(model, ids)


def test_a_model_reconfigured_between_captures_is_checked_again():
    model = transformers.BigBirdModel(transformers.BigBirdConfig(
        vocab_size=41, hidden_size=18, num_hidden_layers=2, num_attention_heads=3, intermediate_size=11,
        max_position_embeddings=64, attention_type="original_full", block_size=2, num_random_blocks=1,
        sep_token_id=3,
    )).eval()
    ids = torch.randint(4, 41, (2, 20), generator=torch.Generator().manual_seed(6))
    trace = attnflow.capture(model, input_ids=ids)
    np.testing.assert_allclose(trace.layers[1].weights.sum(-1), 1.0, atol=1e-5)
    model.set_attention_type("block_sparse")
    with pytest.raises(attnflow.AdapterError, match="runs block-sparse attention"):
        attnflow.capture(model, input_ids=ids)
    model.set_attention_type("original_full")
    assert attnflow.capture(model, input_ids=ids).num_layers == 2


def test_the_kept_search_keeps_no_model_alive(ids):
    model = _gpt2(seed=5, layers=2)
    attnflow.capture(model, input_ids=ids)
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None


def test_an_unchanged_model_is_searched_once(ids, monkeypatch):
    """The point of keeping the search: a second capture of the same, unchanged model does not search again; a
    changed tree does."""
    from attnflow.adapters._torch import hf_transformers

    calls = []
    search = hf_transformers._declared_attention_modules

    def counted(*args):
        calls.append(args[0])
        return search(*args)

    monkeypatch.setattr(hf_transformers, "_declared_attention_modules", counted)
    model = _gpt2(seed=6, layers=2)
    _assert_captured(model, ids)
    _assert_captured(model, ids)
    assert len(calls) == 1
    model.h[1].probe = torch.nn.Identity()
    _assert_captured(model, ids)
    assert len(calls) == 2
