"""Public family maps (issue 22): register_value_map teaches the transformers adapter a family's value path map;
the decomposition it yields must reproduce the block's own output (a check independent of attnflow's methods)."""

from __future__ import annotations

import numpy as np
import pytest
from attnflow.adapters import (
    FlaxValueMap,
    ValueMap,
    _flax_methods,
    _values,
    register_flax_value_map,
    register_value_map,
)

import attnflow
from attnflow.methods._contributions import decomposition_identity

DISTILBERT = ValueMap(attention="attention", value="attention.v_lin", out="attention.out_lin",
                      residual="attention", norm="sa_layer_norm", layout="post_ln")


@pytest.fixture()
def distilbert():
    import torch
    from transformers import DistilBertConfig, DistilBertModel

    torch.manual_seed(3)
    model = DistilBertModel(DistilBertConfig(vocab_size=29, dim=18, n_layers=2, n_heads=3, hidden_dim=22,
                                             max_position_embeddings=16, attn_implementation="eager")).eval()
    inputs = {"input_ids": torch.tensor([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 0, 0, 0]]),
              "attention_mask": torch.tensor([[1] * 7, [1, 1, 1, 1, 0, 0, 0]])}
    saved = dict(_values.VALUE_MAPS)
    yield model, inputs
    _values.VALUE_MAPS.clear()
    _values.VALUE_MAPS.update(saved)


def test_a_registered_map_serves_the_value_methods(distilbert):
    model, inputs = distilbert
    with pytest.raises(attnflow.AdapterError, match=r"register_value_map\(model_type"):
        attnflow.capture(model, values=True, **inputs)
    register_value_map("distilbert", DISTILBERT)
    trace = attnflow.capture(model, methods=["alti", "norm"], **inputs)
    for index in range(trace.num_layers):
        for b in range(trace.batch_size):
            total, output = decomposition_identity(trace, index, b)
            np.testing.assert_allclose(total, output, atol=2e-5)  # the map reproduces the block's own output
    explanation = attnflow.explain(trace, ["alti", "norm"])
    np.testing.assert_allclose(explanation["alti"][1][:4].sum(-1), 1.0, atol=1e-9)
    with pytest.raises(attnflow.OptionError, match="already registered"):
        register_value_map("distilbert", DISTILBERT)
    register_value_map("distilbert", DISTILBERT, replace=True)


def gptj():
    """GPT-J: batch 3, tokens 7 (items with 7, 4, 6 real), heads 4 of size 5 (hidden 20, rotary 2), layers 2, ffn 9."""
    import torch
    import transformers
    from test_value_zeroing import right_padded

    torch.manual_seed(0)
    config = transformers.GPTJConfig(vocab_size=13, n_positions=16, n_embd=20, n_layer=2, n_head=4, rotary_dim=2,
                                     n_inner=9, initializer_range=0.2, bos_token_id=0, eos_token_id=0)
    return transformers.GPTJModel(config).double().eval(), right_padded(7, [7, 4, 6])


def _neox(parallel):
    from test_value_zeroing import gpt_neox, neox_values

    return gpt_neox(parallel), lambda m: m.layers, neox_values, lambda layer: layer.attention.dense


def _gptj():
    import torch.nn.functional as F
    from test_value_zeroing import layer_norm

    return gptj(), lambda m: m.h, lambda layer, x: F.linear(layer_norm(x, layer.ln_1), layer.attn.v_proj.weight), \
        lambda layer: layer.attn.out_proj


@pytest.mark.parametrize("family", ["gpt_neox-parallel", "gpt_neox-sequential", "gptj"])
def test_parallel_and_fused_per_head_values_follow_the_papers(family):
    """GPT-NeoX (``query_key_value`` laid out per head as [q_h | k_h | v_h]; with use_parallel_residual the
    attention block's output is ``x + attn(ln1(x))`` beside the feed-forward, else the second norm's input) and
    GPT-J (``x + attn(ln_1(x)) + mlp(ln_1(x))``, no biases): norm (Kobayashi et al., 2020), norm_residual and
    ALTI (Ferrando et al., 2022) against a float64 reimplementation from the model's own eager attention and
    hidden states."""
    import torch
    from test_methods import alti_rows
    from test_value_zeroing import run_eager

    builders = {"gpt_neox-parallel": lambda: _neox(True), "gpt_neox-sequential": lambda: _neox(False), "gptj": _gptj}
    (model, kwargs), layers, values_of, out_of = builders[family]()
    trace = attnflow.capture(model, values=True, **kwargs)
    assert trace.metadata["values_layout"] == "pre_ln"
    e = attnflow.explain(trace, ["norm", "norm_residual", "alti"], all_layers=True)
    reference, out = run_eager(model, kwargs)
    heads = model.config.num_attention_heads
    with torch.no_grad():
        for b in range(kwargs["input_ids"].shape[0]):
            keep = np.flatnonzero(kwargs["attention_mask"][b].numpy())
            joint = np.eye(keep.size)
            for li, layer in enumerate(layers(reference)):
                x = out.hidden_states[li][b][keep]
                a = out.attentions[li][b][:, keep][:, :, keep].numpy()
                v = values_of(layer, x).numpy()
                size = v.shape[-1] // heads
                dense = out_of(layer)
                w_o = dense.weight.numpy().T  # rows: heads x head size
                f = np.stack([v[:, h * size:(h + 1) * size] @ w_o[h * size:(h + 1) * size] for h in range(heads)])
                moved = np.einsum("hij,hjd->ijd", a, f)
                shares = moved.copy()
                shares[np.arange(keep.size), np.arange(keep.size)] += x.numpy()
                bias = 0.0 if dense.bias is None else dense.bias.numpy()
                y = x.numpy() + moved.sum(1) + bias  # the stream after attention
                cell = np.ix_(keep, keep)
                np.testing.assert_allclose(e.layers("norm")[li, b][cell], np.linalg.norm(moved, axis=-1), atol=1e-9)
                np.testing.assert_allclose(e.layers("norm_residual")[li, b][cell], np.linalg.norm(shares, axis=-1),
                                           atol=1e-9)
                joint = alti_rows(shares, y) @ joint
                np.testing.assert_allclose(e.layers("alti")[li, b][cell], joint, atol=1e-9)
                np.testing.assert_allclose(trace.layers[li].extras["block_output"][b][keep], y, atol=1e-9)


@pytest.mark.parametrize(("value_map", "message"), [
    ("attention", "must be an attnflow.adapters.ValueMap"),
    (ValueMap(attention="", value="v", out="o", residual="r", layout="post_ln", norm="n"), "attention must be"),
    (ValueMap(attention="a", value="v", out="o", residual="r", layout="middle", norm="n"), "layout must be one of"),
    (ValueMap(attention="a", value="v", out="o", residual="r", layout="post_ln"), "needs norm"),
    (ValueMap(attention="a", value="v", out="o", residual="r", layout="pre_ln"), "needs block_output"),
    (ValueMap(attention="a", value="v", out="o", residual="r", layout="post_ln", norm="n", value_part="kv"),
     "value_part"),
    (ValueMap(attention="a", value="v", out="o", residual="r", layout="post_ln", norm="n",
              cross=ValueMap(attention="c", value="v", out="o", residual="r", layout="pre_ln")), "cross part"),
    (ValueMap(attention="a", value="v", out="o", residual="r", layout="pre_ln", parallel_residual=1),
     "parallel_residual must be True, False or the name of the config flag"),
    (ValueMap(attention="a", value="v", out="o", residual="r", layout="post_ln", norm="n", parallel_residual=True),
     "parallel_residual describes a pre-LN block"),
    (ValueMap(attention="a", value="v", out="o", residual="r", layout="pre_ln", parallel_residual="use_parallel"),
     "needs block_output .*for the models whose parallel_residual flag is false"),
])
def test_malformed_maps_are_refused_naming_the_field(value_map, message):
    with pytest.raises(attnflow.OptionError, match=message):
        register_value_map("tiny-family", value_map)
    assert "tiny-family" not in _values.VALUE_MAPS


def test_a_parallel_residual_map_needs_no_second_norm():
    parallel = ValueMap(attention="a", value="a.qkv", value_part="qkv_heads", out="a.o", residual="ln_1",
                        layout="pre_ln", parallel_residual=True)
    try:
        register_value_map("tiny-parallel", parallel)
        assert _values.VALUE_MAPS["tiny-parallel"] is parallel
    finally:
        _values.VALUE_MAPS.pop("tiny-parallel", None)


def test_flax_twin_validates_and_registers():
    saved = dict(_flax_methods.VALUE_MAPS)
    try:
        with pytest.raises(attnflow.OptionError, match="layout must be"):
            register_flax_value_map("Mine", FlaxValueMap(attention="a", value="v", out="o", residual="r", layout="pre_ln"))
        good = FlaxValueMap(attention="a", value="a/value", out="a/out", residual="a", layout="post_ln", norm="n")
        register_flax_value_map("Mine", good)
        assert _flax_methods.value_map("Mine") is good
        with pytest.raises(attnflow.OptionError, match="already registered"):
            register_flax_value_map("FlaxBert", good)
    finally:
        _flax_methods.VALUE_MAPS.clear()
        _flax_methods.VALUE_MAPS.update(saved)
