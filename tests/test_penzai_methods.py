"""target=, values=True and value_zeroing=True on penzai models, against recomputations written here.

The models are penzai's own conversions of tiny random Hugging Face models (``examples/compare_hf_penzai.py``:
GPT-NeoX, multi-head with parallel attention and feed-forward; Mistral, 6 query heads in 2 key/value groups
with a sliding window; distinct sizes on every axis, padded batches). The references are independent of
attnflow's penzai code: attention gradients by torch autograd of the Hugging Face model on the same weights
(``output_attentions`` tensors' ``.grad``), value tensors read from the Hugging Face modules with forward hooks,
value zeroing re-run on the Hugging Face model with a hook that zeroes one token's values, and the
decomposition identity (the blocks' own outputs). The cross-framework comparison of every method is the
example's, run here in float64 and float32. One model pair per dtype is captured once per module.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import numpy as np
import penzai  # noqa: F401  (make install installs it; a missing one must fail, not skip)
import pytest
import torch
from penzai.models.transformer.variants import llamalike_common

import attnflow
from attnflow._errors import CaptureUnavailableError
from attnflow.methods._contributions import decomposition_identity

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import compare_hf_penzai as example  # noqa: E402

TARGET = example.TARGET


def _pair(make, convert, sizes, dtype):
    hf = make()
    hf.set_attn_implementation("eager")
    converted = convert(hf)
    if dtype == "float64":
        hf, converted = hf.double(), example.to_float64(converted, hf)
    ids, real = example.padded_batch(*sizes)
    torch_trace, jax_trace = example.capture_pair(hf, converted, ids, real)
    return {"hf": hf, "model": converted, "ids": ids, "real": real, "torch": torch_trace, "jax": jax_trace}


@pytest.fixture(scope="module")
def mistral64():
    with jax.enable_x64(True):  # the traces are numpy: nothing after the capture needs jax's float64
        return _pair(example.hf_mistral, example.mistral_from_hf,
                    (example.MISTRAL["vocab_size"], example.MISTRAL_BATCH, example.MISTRAL_SEQ), "float64")


@pytest.fixture(scope="module")
def mistral32():
    return _pair(example.hf_mistral, example.mistral_from_hf,
                 (example.MISTRAL["vocab_size"], example.MISTRAL_BATCH, example.MISTRAL_SEQ), "float32")


@pytest.fixture(scope="module")
def neox32():
    return _pair(example.hf_gpt_neox, example.gpt_neox_from_hf, (example.VOCAB, example.BATCH, example.SEQ), "float32")


def _pairs(real):
    return real[:, None, :, None] & real[:, None, None, :]


def torch_attention_gradients(pair, target: object = TARGET) -> list[np.ndarray]:
    """d logits[b, last real token of b, target] / d attention, by torch autograd of the Hugging Face model
    (``target``: a vocabulary index, or one per item)."""
    hf, ids, real = pair["hf"], pair["ids"], pair["real"]
    context = example.hf_in_float64(hf) if hf.dtype == torch.float64 else torch.enable_grad()
    with context:
        out = hf(torch.from_numpy(ids), attention_mask=torch.from_numpy(real.astype(np.int64)), output_attentions=True)
        for attention in out.attentions:
            attention.retain_grad()
        last = torch.from_numpy(real.sum(1) - 1)
        out.logits[torch.arange(len(ids)), last, torch.as_tensor(target)].sum().backward()
    hf.zero_grad()
    return [attention.grad.double().numpy() for attention in out.attentions]


def hf_value_tensors(pair) -> list[dict[str, np.ndarray]]:
    """Per layer, the value extras read from the Hugging Face modules with forward hooks."""
    hf, ids, real = pair["hf"], pair["ids"], pair["real"]
    neox = "neox" in type(hf).__name__.lower()
    layers = hf.gpt_neox.layers if neox else hf.model.layers
    config = hf.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    d_head = config.hidden_size // heads
    seen: list[dict[str, torch.Tensor]] = [{} for _ in layers]
    handles = []
    for i, layer in enumerate(layers):
        def keep(slot, index=i, output=True):
            def hook(module, args, result=None):
                value = result if output else args[0]
                seen[index][slot] = (value[0] if isinstance(value, tuple) else value).detach()
            return hook
        if neox:
            handles += [layer.attention.query_key_value.register_forward_hook(keep("qkv")),
                        layer.input_layernorm.register_forward_pre_hook(keep("residual", output=False)),
                        layer.attention.register_forward_hook(keep("attention"))]
        else:
            handles += [layer.self_attn.v_proj.register_forward_hook(keep("value")),
                        layer.input_layernorm.register_forward_pre_hook(keep("residual", output=False)),
                        layer.post_attention_layernorm.register_forward_pre_hook(keep("block_output", output=False))]
    context = example.hf_in_float64(hf) if hf.dtype == torch.float64 else torch.no_grad()
    try:
        with context, torch.no_grad():
            hf(torch.from_numpy(ids), attention_mask=torch.from_numpy(real.astype(np.int64)))
    finally:
        for handle in handles:
            handle.remove()
    found = []
    for layer, kept in zip(layers, seen):
        batch, seq = ids.shape
        if neox:
            value = kept["qkv"].view(batch, seq, heads, 3 * d_head)[..., 2 * d_head:].transpose(1, 2)
            out = layer.attention.dense
            block_output = kept["residual"] + kept["attention"]
        else:
            value = kept["value"].view(batch, seq, kv_heads, d_head).transpose(1, 2)
            value = value.repeat_interleave(heads // kv_heads, dim=1)
            out = layer.self_attn.o_proj
            block_output = kept["block_output"]
        bias = out.bias if out.bias is not None else torch.zeros(config.hidden_size, dtype=out.weight.dtype)
        found.append({
            "value": value.double().numpy(),
            "out_weight": out.weight.detach().T.reshape(heads, d_head, -1).double().numpy()[None],
            "out_bias": bias.detach().double().numpy()[None],
            "residual": kept["residual"].double().numpy(),
            "block_output": block_output.double().numpy(),
        })
    return found


def hf_value_zeroing(pair, layer_index: int) -> np.ndarray:
    """Layer ``layer_index``'s value zeroing re-run on the Hugging Face model: for each position ``j`` (all
    items at once), the whole model with ``j``'s values zeroed in that layer, and the cosine distance of the
    layer's outputs (the layers before it are untouched, so its input is the original)."""
    hf, ids, real = pair["hf"], pair["ids"], pair["real"]
    neox = "neox" in type(hf).__name__.lower()
    layer = (hf.gpt_neox.layers if neox else hf.model.layers)[layer_index]
    heads, hidden = hf.config.num_attention_heads, hf.config.hidden_size
    value_module = layer.attention.query_key_value if neox else layer.self_attn.v_proj
    outputs = []

    def keep(module, args, result):
        outputs.append((result[0] if isinstance(result, tuple) else result).detach().double())

    def zeroing(j):
        def hook(module, args, result):
            result = result.clone()
            if neox:  # per head [query, key, value]: the last third of each head's slice
                view = result.view(*result.shape[:2], heads, -1)
                view[:, j, :, 2 * (hidden // heads):] = 0
            else:
                result[:, j] = 0
            return result
        return hook

    batch, seq = ids.shape
    run = [None, *range(seq)]
    handle = layer.register_forward_hook(keep)
    try:
        for j in run:
            extra = value_module.register_forward_hook(zeroing(j)) if j is not None else None
            try:
                with torch.no_grad():
                    hf(torch.from_numpy(ids), attention_mask=torch.from_numpy(real.astype(np.int64)))
            finally:
                if extra is not None:
                    extra.remove()
    finally:
        handle.remove()
    original = torch.nn.functional.normalize(outputs[0], dim=-1)
    scores = np.zeros((batch, seq, seq))
    for j, hidden_states in enumerate(outputs[1:]):
        unit = torch.nn.functional.normalize(hidden_states, dim=-1)
        scores[:, :, j] = (0.5 * (unit - original).pow(2).sum(-1)).numpy()
    mask = real[:, :, None] & real[:, None, :] & np.tril(np.ones((seq, seq), dtype=bool))
    return np.where(mask, scores, 0.0)


# -- target= ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, atol", [("mistral64", 1e-12), ("neox32", 1e-6)])
def test_attention_gradients_equal_torch_autograd_of_the_hugging_face_model(name, atol, request):
    pair = request.getfixturevalue(name)
    trace = pair["jax"]
    expected = torch_attention_gradients(pair)
    pairs = _pairs(pair["real"])
    scale = max(np.abs(e).max() for e in expected)
    assert scale > 1e-3  # the gradients are not all zero
    for layer, reference in zip(trace.layers, expected, strict=True):
        grad = layer.extras["attn_grad"]
        assert grad.shape == reference.shape and grad.dtype == (np.float64 if name.endswith("64") else np.float32)
        assert np.abs(np.where(pairs, grad - reference, 0)).max() <= atol * max(1.0, scale)


def test_target_argmax_and_callable_agree_with_an_explicit_target(neox32):
    """None: each item's argmax at its last real token; a callable: any per-item score of the output (here the
    logit target=5 reads at the last real token, so it equals the fixture's target=5 capture)."""
    model, ids, real = neox32["model"], neox32["ids"], neox32["real"]
    args, kwargs = example.penzai_inputs(ids, real)
    last = real.sum(1) - 1

    def score(output):
        values = output.untag("batch", "seq", "vocabulary").unwrap()
        return values[jax.numpy.arange(len(ids)), last, TARGET]

    by_callable = attnflow.capture(model, *args, **kwargs, target=score)
    by_none = attnflow.capture(model, *args, **kwargs, target=None)
    logits = np.asarray(model(*args, **kwargs).untag("batch", "seq", "vocabulary").unwrap())
    top = logits[np.arange(len(ids)), last].argmax(-1)
    expected = torch_attention_gradients(neox32, target=top)
    for a, b, c, reference in zip(by_callable.layers, neox32["jax"].layers, by_none.layers, expected, strict=True):
        np.testing.assert_allclose(a.extras["attn_grad"], b.extras["attn_grad"], atol=1e-7)
        pairs = _pairs(real)
        assert np.abs(np.where(pairs, c.extras["attn_grad"] - reference, 0)).max() <= 1e-6


# -- values=True --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, atol", [("mistral64", 1e-12), ("neox32", 2e-6)])
def test_value_tensors_equal_the_hugging_face_modules_and_reproduce_each_block(name, atol, request):
    pair = request.getfixturevalue(name)
    trace = pair["jax"]
    assert trace.metadata["values_layout"] == "pre_ln"
    assert trace.metadata["penzai_value_map"] == ("gpt_neox" if name == "neox32" else "llama")
    real = pair["real"]
    for index, (layer, expected) in enumerate(zip(trace.layers, hf_value_tensors(pair), strict=True)):
        for key, reference in expected.items():
            found = layer.extras[key]
            assert found.shape == reference.shape, key
            if key == "value":  # padding keys aside
                found, reference = found * real[:, None, :, None], reference * real[:, None, :, None]
            elif key in ("residual", "block_output"):
                found, reference = found * real[..., None], reference * real[..., None]
            assert np.abs(found - reference).max() <= atol * max(1.0, np.abs(reference).max()), (index, key)
        for b in range(trace.batch_size):  # Σ_j T_i(x_j) + bias terms is the residual stream after attention
            total, output = decomposition_identity(trace, index, b)
            assert np.abs(total - output).max() <= (1e-12 if name == "mistral64" else 1e-5) * np.abs(output).max()


# -- value_zeroing=True -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, atol", [("mistral64", 1e-12), ("neox32", 1e-4)])
def test_value_zeroing_equals_a_rerun_of_the_hugging_face_model(name, atol, request):
    pair = request.getfixturevalue(name)
    hf = pair["hf"]
    with example.hf_in_float64(hf) if hf.dtype == torch.float64 else torch.no_grad():
        expected = [hf_value_zeroing(pair, i) for i in range(pair["jax"].num_layers)]
    for layer, reference in zip(pair["jax"].layers, expected, strict=True):
        scores = layer.extras["value_zeroing"]
        assert scores.shape == reference.shape and scores.dtype == np.float64
        assert reference.max() > 1e-4  # something to compare
        np.testing.assert_allclose(scores, reference, atol=atol, rtol=0)


# -- the cross-framework comparison (examples/compare_hf_penzai.py) --------------------------------------------------
@pytest.mark.parametrize("name, dtype", [("mistral64", "float64"), ("mistral32", "float32"), ("neox32", "float32")])
def test_every_method_agrees_between_hugging_face_and_penzai(name, dtype, request):
    pair = request.getfixturevalue(name)
    report = attnflow.compare(pair["torch"], pair["jax"])
    assert report.ok, report
    found = example.method_differences(pair["torch"], pair["jax"])
    assert set(found) == set(example.METHODS)  # GPT-NeoX too, through the transformers adapter's value map
    for method, difference in found.items():
        assert difference <= example.tolerance(method, dtype), (method, difference)
    if dtype == "float64":  # value extras kept in float64 on both sides
        assert all(difference <= 1e-12 for difference in found.values()), found


def test_values_refused_where_no_penzai_map_fits():
    """Gemma 2's post-attention norm: the attention branch does not end with the attention."""
    config = llamalike_common.LlamalikeTransformerConfig(
        num_kv_heads=1, query_head_multiplier=2, embedding_dim=12, projection_dim=4, mlp_hidden_dim=10,
        num_decoder_blocks=1, vocab_size=11, mlp_variant="geglu_approx", tie_embedder_and_logits=True,
        use_post_attn_norm=True, use_post_ffw_norm=True,
    )
    model = llamalike_common.build_llamalike_transformer(config, init_base_rng=jax.random.key(0))
    args, kwargs = example.penzai_inputs(np.ones((1, 3), dtype=np.int64), np.ones((1, 3), dtype=bool))
    with pytest.raises(CaptureUnavailableError, match="register_penzai_value_map"):
        attnflow.capture(model, *args, **kwargs, values=True)


def test_penzai_value_maps_are_registered_through_the_public_api():
    """attnflow.adapters.register_penzai_value_map is the adapter's registry: a new name is kept, a taken name
    needs replace=True, a map whose attention is outside its branch is refused with the field named."""
    from attnflow.adapters import PenzaiValueMap, register_penzai_value_map
    from attnflow.adapters._jax import _penzai_methods

    custom = PenzaiValueMap(attention="sublayers/0/delta/sublayers/1", branch="sublayers/0/delta")
    try:
        register_penzai_value_map("test_custom", custom)
        assert _penzai_methods.VALUE_MAPS["test_custom"] is custom
        with pytest.raises(attnflow.OptionError, match="already registered; pass replace=True"):
            register_penzai_value_map("test_custom", custom)
        register_penzai_value_map("test_custom", custom, replace=True)
        with pytest.raises(attnflow.OptionError, match="must be inside the branch"):
            register_penzai_value_map("test_other", PenzaiValueMap(attention="a/b", branch="c"))
    finally:
        _penzai_methods.VALUE_MAPS.pop("test_custom", None)
    assert "test_other" not in _penzai_methods.VALUE_MAPS
