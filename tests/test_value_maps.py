"""Public family maps (issue 22): register_value_map teaches the transformers adapter a family's value path map;
the decomposition it yields must reproduce the block's own output (a check independent of attnflow's methods)."""

from __future__ import annotations

import numpy as np
import pytest
from attnflow.adapters import (
    FlaxValueMap,
    ValueMap,
    register_flax_value_map,
    register_value_map,
)
from attnflow.adapters._jax import _flax_methods
from attnflow.adapters._torch import _values

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
    (ValueMap(attention="a", value="v", out="o", residual="r", layout="post_ln", norm="n", post_attention_norm="p"),
     "post_attention_norm describes a sandwich pre-LN block"),
    (ValueMap(attention="a", value="v", out="o", residual="r", layout="pre_ln", block_output="b",
              post_attention_norm="p", post_attention_norm_offset="1"), "post_attention_norm_offset must be a number"),
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


def _gemma(family="gemma2"):
    """A tiny Gemma 2 (or Gemma 3's text model) in float64: batch 2 (7 and 5 real tokens, right-padded), 3 layers
    (sliding and global), 4 query heads over 2 KV heads of size 6, hidden 20, feed-forward 11; soft-capping (Gemma 2)
    and query/key norms (Gemma 3) at their defaults."""
    import torch
    import transformers

    torch.manual_seed(5)
    sizes = dict(vocab_size=31, hidden_size=20, intermediate_size=11, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=6, max_position_embeddings=16, sliding_window=3, pad_token_id=0,
                 initializer_range=0.3, attn_implementation="eager")
    if family == "gemma2":
        model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**sizes))
    else:
        model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**sizes))
    model = model.double().eval()
    with torch.no_grad():  # Gemma's norms scale by (1 + weight): weights away from 0, so the offset matters
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.uniform_(-0.5, 0.5)
    kwargs = {"input_ids": torch.tensor([[3, 9, 4, 17, 22, 8, 5], [6, 11, 27, 2, 14, 0, 0]]),
              "attention_mask": torch.tensor([[1] * 7, [1] * 5 + [0] * 2])}
    return model, kwargs


@pytest.fixture(scope="module")
def gemma2():
    return _gemma("gemma2")


def _rms(x, scale, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * scale


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_gemma_sandwich_norm_follows_the_papers(gemma2, family):
    """Gemma 2 and 3: pre-LN with the attention output through an RMSNorm (scale 1 + weight) before the residual add,
    y_i = x_i + g ⊙ a_i / rms(a_i); the norm's denominator a constant of the pass (Kobayashi et al., 2021), so
    T_i(x_j) = Σ_h α^h_ij g ⊙ f^h(x_j) / rms(a_i) + δ_ij x_i. norm, norm_residual and ALTI against a float64
    reimplementation from the model's own eager attention and hidden states, grouped-query heads."""
    import torch
    from test_methods import alti_rows

    model, kwargs = gemma2 if family == "gemma2" else _gemma(family)
    assert model.config.model_type == family
    trace = attnflow.capture(model, values=True, **kwargs)
    assert trace.metadata["values_layout"] == "pre_ln"
    e = attnflow.explain(trace, ["norm", "norm_residual", "alti"], all_layers=True)
    with torch.no_grad():
        out = model(**kwargs, output_attentions=True, output_hidden_states=True)
    config, tol = model.config, 2e-6  # Gemma's norms and softmax compute in float32 inside the float64 model
    heads, kv_heads, size = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    for b in range(2):
        keep = np.flatnonzero(kwargs["attention_mask"][b].numpy())
        joint = np.eye(keep.size)
        for li, layer in enumerate(model.model.layers):
            p = {name: t.detach().numpy() for name, t in layer.named_parameters()}
            x = out.hidden_states[li][b][keep].numpy()
            a = out.attentions[li][b][:, keep][:, :, keep].numpy()
            h = _rms(x, 1 + p["input_layernorm.weight"], config.rms_norm_eps)
            v = (h @ p["self_attn.v_proj.weight"].T).reshape(-1, kv_heads, size)
            w_o = p["self_attn.o_proj.weight"].T.reshape(heads, size, -1)
            f = np.stack([v[:, q // (heads // kv_heads)] @ w_o[q] for q in range(heads)])  # (H, keys, d)
            attention_output = np.einsum("hij,hjd->id", a, f)
            rho = np.sqrt((attention_output ** 2).mean(-1) + config.rms_norm_eps)
            g = 1 + p["post_attention_layernorm.weight"]
            moved = np.einsum("hij,hjd->ijd", a, f) * g / rho[:, None, None]
            shares = moved.copy()
            shares[np.arange(keep.size), np.arange(keep.size)] += x
            y = x + attention_output * g / rho[:, None]  # the stream after attention
            cell = np.ix_(keep, keep)
            np.testing.assert_allclose(e.layers("norm")[li, b][cell], np.linalg.norm(moved, axis=-1), atol=tol)
            np.testing.assert_allclose(e.layers("norm_residual")[li, b][cell], np.linalg.norm(shares, axis=-1),
                                       atol=tol)
            joint = alti_rows(shares, y) @ joint
            np.testing.assert_allclose(e.layers("alti")[li, b][cell], joint, atol=tol)
            total, output = decomposition_identity(trace, li, b)
            np.testing.assert_allclose(total, output, atol=tol)  # Σ_j T_i(x_j) = the recorded stream after attention
            np.testing.assert_allclose(output, y, atol=tol)


def test_gemma2_value_zeroing_equals_zeroing_each_token_in_the_model(gemma2):
    """value_zeroing (Mohebbi et al., 2023) on Gemma 2: each layer's output with token j's value vectors zeroed
    (a hook on v_proj in the test), as 1 - cosine to the original output."""
    import torch

    model, kwargs = gemma2
    trace = attnflow.capture(model, value_zeroing=True, **kwargs)
    tokens = kwargs["input_ids"].shape[1]

    def layer_outputs(li, zero=None):
        layer, seen = model.model.layers[li], []
        hooks = [layer.register_forward_hook(lambda m, args, output: seen.append(output[0] if isinstance(
            output, tuple) else output))]
        if zero is not None:
            def zeroing(module, args, output):
                output = output.clone()
                output[:, zero] = 0.0
                return output
            hooks.append(layer.self_attn.v_proj.register_forward_hook(zeroing))
        try:
            with torch.no_grad():
                model(**kwargs)
        finally:
            for hook in hooks:
                hook.remove()
        return seen[0].numpy()

    for li in range(model.config.num_hidden_layers):
        original = layer_outputs(li)
        zeroed = np.stack([layer_outputs(li, j) for j in range(tokens)], axis=-2)  # (batch, queries, zeroed j, d)
        with np.errstate(invalid="ignore", divide="ignore"):  # padded rows may be zero: cropped below
            cosine = (zeroed * original[:, :, None]).sum(-1) / np.linalg.norm(zeroed, axis=-1) / np.linalg.norm(
                original, axis=-1)[..., None]
        for b in range(2):
            keep = np.flatnonzero(kwargs["attention_mask"][b].numpy())
            expected = np.tril(np.maximum(1 - cosine[b], 0))[np.ix_(keep, keep)]
            np.testing.assert_allclose(trace.layers[li].extras["value_zeroing"][b][np.ix_(keep, keep)], expected,
                                       atol=1e-6)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("value_index", "1", "value_index must be an int"),
    ("out_parameter", "", "out_parameter must name"),
    ("norm_scale_offset", True, "norm_scale_offset must be a number"),
])
def test_flax_map_fields_for_stacked_projections_and_sandwich_norms_are_checked(field, value, message):
    import dataclasses

    good = FlaxValueMap(attention="attn", value="attn/kv|attn/qkv", value_index=-1, out="attn/o", out_parameter="w",
                        residual="ln1", block_output="ln2", norm="post_norm", norm_scale_offset=1.0, layout="pre_ln")
    with pytest.raises(attnflow.OptionError, match=message):
        register_flax_value_map("Stacked", dataclasses.replace(good, **{field: value}))
    assert "Stacked" not in _flax_methods.VALUE_MAPS
    assert good.taps()["value#1"] == ("attn/qkv", "output")  # each alternative a tap of its own
