"""target=, values=True and value_zeroing=True on penzai models, against recomputations written here.

The models are penzai's own conversions of tiny random Hugging Face models (``examples/compare_hf_penzai.py``:
GPT-NeoX, multi-head with parallel attention and feed-forward; Mistral, 6 query heads in 2 key/value groups
with a sliding window; distinct sizes on every axis, padded batches). The references are independent of
attnflow's penzai code: attention gradients by torch autograd of the Hugging Face model on the same weights
(``output_attentions`` tensors' ``.grad``), value tensors read from the Hugging Face modules with forward hooks,
value zeroing re-run on the Hugging Face model with a hook that zeroes one token's values, and the
decomposition identity (the blocks' own outputs). The cross-framework comparison of every method is the
example's, run here in float64 and float32. One model pair per dtype is captured once per module.

Gemma 2's post-attention ("sandwich") RMSNorm, which no Hugging Face conversion of penzai's reaches: a float64
Gemma-2-style model built by penzai itself (random parameters, grouped-query, a sliding-window and a global layer,
soft-capped logits), and the same without the post norms (Gemma 1's blocks), against a float64 numpy
recomputation of the whole model from its parameters written here (norm, norm_residual, ALTI and value zeroing from
the papers' formulas).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import penzai  # noqa: F401  (make install installs it; a missing one must fail, not skip)
import pytest
import torch
from penzai import pz
from penzai.models.transformer.variants import llamalike_common

import attnflow
from attnflow._errors import CaptureUnavailableError
from attnflow.methods._contributions import decomposition_identity

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import compare_hf_penzai as example  # noqa: E402
from test_methods import alti_rows  # noqa: E402

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


def _one_block_gemma2() -> pz.nn.Layer:
    """A float32 one-block Gemma-2-style model (multi-query), for the refusals."""
    config = llamalike_common.LlamalikeTransformerConfig(
        num_kv_heads=1, query_head_multiplier=2, embedding_dim=12, projection_dim=4, mlp_hidden_dim=10,
        num_decoder_blocks=1, vocab_size=11, mlp_variant="geglu_approx", tie_embedder_and_logits=True,
        use_post_attn_norm=True, use_post_ffw_norm=True,
    )
    return llamalike_common.build_llamalike_transformer(config, init_base_rng=jax.random.key(0))


def _attention_branches(model: pz.nn.Layer) -> pz.Selection:
    return pz.select(model).at_instances_of(pz.nn.Residual).where(
        lambda residual: any(isinstance(layer, pz.nn.Attention) for layer in residual.delta.sublayers)).at(
        lambda residual: residual.delta)


def test_values_refused_where_no_penzai_map_fits():
    """A branch that ends neither with the attention nor with the attention and then its post-attention norm (an
    extra layer after Gemma 2's post-attention norm): no map fits, and the error says how to describe one."""
    model = _attention_branches(_one_block_gemma2()).apply(
        lambda branch: pz.nn.Sequential([*branch.sublayers, pz.nn.Identity()]))
    args, kwargs = example.penzai_inputs(np.ones((1, 3), dtype=np.int64), np.ones((1, 3), dtype=bool))
    for kind in ("values", "value_zeroing"):
        with pytest.raises(CaptureUnavailableError, match=f"{kind}=True .*post_attention_norm.*register_penzai_value_map"):
            attnflow.capture(model, *args, **kwargs, **{kind: True})


def test_values_refused_where_the_post_attention_norm_is_not_an_rms_norm():
    """A LayerNorm (mean removed, a shift) where Gemma 2 has its post-attention RMSNorm: the built-in map fits the
    paths, but the core decomposes an RMSNorm there; values=True says so (value_zeroing=True re-runs it as it is)."""
    model = _attention_branches(_one_block_gemma2()).apply(lambda branch: pz.nn.Sequential([
        *branch.sublayers[:-1],
        pz.nn.LayerNorm.from_config(name="post", init_base_rng=jax.random.key(1), across_axes={"embedding": 12})]))
    args, kwargs = example.penzai_inputs(np.ones((1, 3), dtype=np.int64), np.ones((1, 3), dtype=bool))
    with pytest.raises(attnflow.AdapterError, match=r"post-attention norm .*sublayers/2.* is a LayerNorm .*RMSNorm"):
        attnflow.capture(model, *args, **kwargs, values=True)
    trace = attnflow.capture(model, *args, **kwargs, value_zeroing=True)
    assert trace.layers[0].extras["value_zeroing"].shape == (1, 3, 3)


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


# -- Gemma 2's post-attention ("sandwich") norm, against a float64 recomputation from the parameters ----------------
#: A Gemma-2-style penzai model (``llamalike_common``: post-attention and post-feed-forward RMSNorms, soft-capped
#: attention logits, a sliding-window layer then a global one), sizes distinct on every axis.
G_BATCH, G_KV_HEADS, G_GROUP, G_SEQ, G_D_HEAD, G_WIDTH, G_LAYERS, G_MLP, G_VOCAB = 3, 2, 3, 9, 10, 20, 4, 14, 31
G_HEADS, G_WINDOW, G_SOFT_CAP, G_EPS = G_KV_HEADS * G_GROUP, 4, 3.0, 1e-6


def _gemma_like(post_norm: bool) -> pz.nn.Layer:
    """The float64 model (call with jax's float64 enabled), every parameter random (the norms' scales too, about
    1, so that a scale taken as 1 or an offset added twice would show); ``post_norm`` False: Gemma 1's blocks."""
    config = llamalike_common.LlamalikeTransformerConfig(
        num_kv_heads=G_KV_HEADS, query_head_multiplier=G_GROUP, embedding_dim=G_WIDTH, projection_dim=G_D_HEAD,
        mlp_hidden_dim=G_MLP, num_decoder_blocks=G_LAYERS, vocab_size=G_VOCAB, mlp_variant="geglu_approx",
        tie_embedder_and_logits=True, rms_norm_eps=G_EPS, attn_logits_soft_cap=G_SOFT_CAP,
        attention_type=(llamalike_common.AttentionTypeSlidingWindowCausal(G_WINDOW),
                        llamalike_common.AttentionTypeGlobalCausal()),
        use_post_attn_norm=post_norm, use_post_ffw_norm=post_norm, parameter_dtype=jnp.float64,
        activation_dtype=jnp.float64,
    )
    model = llamalike_common.build_llamalike_transformer(config, init_base_rng=jax.random.key(3))
    rng, noises = np.random.default_rng(4), {}

    def shaken(parameter: pz.Parameter) -> pz.Parameter:  # by label: the tied embedding table is met twice
        value = parameter.value
        noise = noises.setdefault(parameter.label, rng.normal(0.0, 0.3, value.data_array.shape))
        return pz.Parameter(value=value + pz.nx.wrap(jnp.asarray(noise)).tag(*value.named_shape), label=parameter.label)

    return pz.select(model).at_instances_of(pz.Parameter).apply(shaken)


def _gemma_pair(post_norm: bool) -> dict:
    ids, real = example.padded_batch(G_VOCAB, G_BATCH, G_SEQ, seed=5)
    with jax.enable_x64(True):
        model = _gemma_like(post_norm)
        args, kwargs = example.penzai_inputs(ids, real)
        trace = attnflow.capture(model, *args, **kwargs, values=True, value_zeroing=True)
    parameters = {p.label.removeprefix("transformer/"): p.value
                  for p in pz.select(model).at_instances_of(pz.Parameter).get_sequence()}
    return {"trace": trace, "parameters": parameters, "ids": ids, "real": real, "post_norm": post_norm}


@pytest.fixture(scope="module")
def gemma2_64():
    return _gemma_pair(post_norm=True)


@pytest.fixture(scope="module")
def gemma1_64():
    return _gemma_pair(post_norm=False)


def _weights(parameters: dict, name: str, *axes: str) -> np.ndarray:
    return np.asarray(parameters[f"{name}.weights"].untag(*axes).unwrap(), np.float64)


def _rms_norm(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Zhang & Sennrich (2019), as penzai's RMSLayerNorm applies it: ``x / sqrt(mean(x²) + ε) ⊙ scale``."""
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + G_EPS) * scale


def _rope(x: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Su et al. (2021), halves rotated (penzai's ApplyRoPE, wavelength 10 000): ``x`` (batch, heads, seq, d)."""
    half = x.shape[-1] // 2
    angle = (positions[:, None, :, None] / 10_000.0 ** (2 * np.arange(half) / x.shape[-1]))
    first, second = x[..., :half], x[..., half:]
    return np.concatenate([first * np.cos(angle) - second * np.sin(angle),
                           second * np.cos(angle) + first * np.sin(angle)], -1)


def _gemma_block(parameters: dict, index: int, x: np.ndarray, positions: np.ndarray, post_norm: bool,
                 zeroed: int | None = None) -> dict[str, np.ndarray]:
    """Block ``index`` in float64 numpy (penzai's ``build_llamalike_block``): ``y = x + post_norm(attn(norm(x)))``
    (Gemma 1: ``x + attn(norm(x))``), then ``out = y + post_ffw_norm(geglu(norm(y)))``; ``zeroed``: the token whose
    value vectors are zeroed (Mohebbi et al., 2023). Returns x, the probabilities (batch, heads, q, k), v (batch,
    heads, keys, d_head), f^h(x_j) = v_j^h W_O^h (batch, heads, keys, d), a (the attention's output), g / rms(a)
    (batch, q, d), y and out."""
    p = functools.partial(_weights, parameters)
    name = f"block_{index}"
    h = _rms_norm(x, p(f"{name}/pre_attention_norm/scale", "embedding"))
    heads = ("head_groups", "query_heads", "projection", "embedding")
    q = np.einsum("bsd,gqpd->bgqsp", h, p(f"{name}/attention/query", *heads)).reshape(G_BATCH, G_HEADS, G_SEQ, -1)
    k = np.einsum("bsd,gpd->bgsp", h, p(f"{name}/attention/key", "head_groups", "projection", "embedding"))
    v = np.einsum("bsd,gpd->bgsp", h, p(f"{name}/attention/value", "head_groups", "projection", "embedding"))
    if zeroed is not None:
        v[:, :, zeroed] = 0.0
    k, v = np.repeat(k, G_GROUP, axis=1), np.repeat(v, G_GROUP, axis=1)  # query head h reads KV head h // group
    logits = np.einsum("bhsp,bhtp->bhst", _rope(q, positions) * G_D_HEAD**-0.5, _rope(k, positions))
    logits = G_SOFT_CAP * np.tanh(logits / G_SOFT_CAP)
    query, key = positions[:, :, None], positions[:, None, :]
    allowed = (query >= key) & (key >= 0) & ((query - key < G_WINDOW) if index % 2 == 0 else True)
    logits = np.where(allowed[:, None], logits, -1e30)  # a padding query (position -1) sees nothing: uniform
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    f = np.einsum("bhtp,hpd->bhtd", v, p(f"{name}/attention/output", *heads).reshape(G_HEADS, G_D_HEAD, G_WIDTH))
    a = np.einsum("bhst,bhtd->bsd", probs, f)
    scale = np.ones_like(a)
    if post_norm:
        scale = p(f"{name}/post_attention_norm/scale", "embedding") / np.sqrt((a * a).mean(-1, keepdims=True) + G_EPS)
    y = x + a * scale
    h = _rms_norm(y, p(f"{name}/pre_ffw_norm/scale", "embedding"))
    gate = h @ p(f"{name}/mlp/gating_linear", "embedding", "neurons")
    gate = 0.5 * gate * (1 + np.tanh(np.sqrt(2 / np.pi) * (gate + 0.044715 * gate**3)))  # GELU, tanh approximation
    mlp = (gate * (h @ p(f"{name}/mlp/value_linear", "embedding", "neurons"))) @ p(
        f"{name}/mlp/out_linear", "neurons", "embedding")
    if post_norm:
        mlp = _rms_norm(mlp, p(f"{name}/post_ffw_norm/scale", "embedding"))
    return {"x": x, "probs": probs, "v": v, "f": f, "a": a, "scale": scale, "y": y, "out": y + mlp}


def _gemma_reference(pair: dict) -> list[dict[str, np.ndarray]]:
    """Every block of the model in float64 numpy, from the token embeddings (scaled by sqrt(width), Gemma's)."""
    positions = np.where(pair["real"], np.arange(G_SEQ), -1).astype(np.float64)
    table = np.asarray(pair["parameters"]["embedder.embeddings"].untag("vocabulary", "embedding").unwrap())
    x = table[pair["ids"]] * np.sqrt(G_WIDTH)
    layers = []
    for index in range(G_LAYERS):
        layers.append(_gemma_block(pair["parameters"], index, x, positions, pair["post_norm"]))
        x = layers[-1]["out"]
    return layers


@pytest.mark.parametrize("name", ["gemma2_64", "gemma1_64"])
def test_gemma_values_give_norm_norm_residual_and_alti_through_the_post_attention_norm(name, request):
    """values=True on Gemma 2: norm (Kobayashi et al., 2020), norm_residual and ALTI (Ferrando et al., 2022) through
    the post-attention RMSNorm, its denominator a constant of the pass (Kobayashi et al., 2021): T_i(x_j) =
    Σ_h α^h_ij g ⊙ f^h(x_j) / rms(a_i) + δ_ij x_i, against the float64 recomputation; the recorded tensors equal
    it too. Gemma 1 (no post-attention norm) decomposes as a plain pre-LN block."""
    pair = request.getfixturevalue(name)
    trace, real, post_norm = pair["trace"], pair["real"], pair["post_norm"]
    assert trace.metadata["values_layout"] == "pre_ln"
    assert trace.metadata["penzai_value_map"] == ("gemma2" if post_norm else "llama")
    expected = _gemma_reference(pair)
    stream = real[..., None]
    for layer, reference in zip(trace.layers, expected, strict=True):
        e = layer.extras
        assert ("post_norm_input" in e) == post_norm
        found = {"value": e["value"] * real[:, None, :, None], "residual": e["residual"] * stream,
                 "block_output": e["block_output"] * stream}
        wanted = {"value": reference["v"] * real[:, None, :, None], "residual": reference["x"] * stream,
                  "block_output": reference["y"] * stream}
        if post_norm:
            found.update(post_norm_input=e["post_norm_input"] * stream)
            wanted.update(post_norm_input=reference["a"] * stream)
            rho = np.sqrt((reference["a"] ** 2).mean(-1, keepdims=True) + G_EPS)
            np.testing.assert_allclose(e["post_norm_weight"][0], (reference["scale"] * rho)[0, 0], rtol=1e-13)
            assert e["post_norm_eps"].tolist() == [G_EPS]
        for key, value in found.items():
            assert np.abs(value - wanted[key]).max() <= 1e-12 * np.abs(wanted[key]).max(), key
    e = attnflow.explain(trace, ["norm", "norm_residual", "alti"], all_layers=True)
    worst = {"norm": 0.0, "norm_residual": 0.0, "alti": 0.0}
    for b in range(G_BATCH):
        keep = np.flatnonzero(real[b])
        cell, joint = np.ix_(keep, keep), np.eye(keep.size)
        for index, layer in enumerate(expected):
            moved = np.einsum("hij,hjd->ijd", layer["probs"][b][:, keep][:, :, keep], layer["f"][b][:, keep])
            moved *= layer["scale"][b][keep][:, None]
            shares = moved.copy()
            shares[np.arange(keep.size), np.arange(keep.size)] += layer["x"][b][keep]
            joint = alti_rows(shares, layer["y"][b][keep]) @ joint
            for method, value in (("norm", np.linalg.norm(moved, axis=-1)),
                                  ("norm_residual", np.linalg.norm(shares, axis=-1)), ("alti", joint)):
                difference = np.abs(e.layers(method)[index, b][cell] - value).max() / np.abs(value).max()
                worst[method] = max(worst[method], float(difference))
    assert max(worst.values()) <= 1e-10, worst


@pytest.mark.parametrize("name", ["gemma2_64", "gemma1_64"])
def test_gemma_value_zeroing_equals_a_float64_rerun_of_the_block(name, request):
    """value_zeroing=True on Gemma 2 re-runs the whole block, the post-attention norm included (Mohebbi et al.,
    2023: 1 - cos(out_i, out_i with token j's values zeroed)), against the float64 recomputation."""
    pair = request.getfixturevalue(name)
    real = pair["real"]
    positions = np.where(real, np.arange(G_SEQ), -1).astype(np.float64)
    mask = real[:, :, None] & real[:, None, :] & np.tril(np.ones((G_SEQ, G_SEQ), dtype=bool))
    for index, (layer, reference) in enumerate(zip(pair["trace"].layers, _gemma_reference(pair), strict=True)):
        original = reference["out"]
        expected = np.zeros((G_BATCH, G_SEQ, G_SEQ))
        for j in range(G_SEQ):
            out = _gemma_block(pair["parameters"], index, reference["x"], positions, pair["post_norm"], zeroed=j)["out"]
            cosine = (out * original).sum(-1) / np.linalg.norm(out, axis=-1) / np.linalg.norm(original, axis=-1)
            expected[:, :, j] = 1.0 - cosine
        expected = np.where(mask, expected, 0.0)
        scores = layer.extras["value_zeroing"]
        assert scores.shape == expected.shape and scores.dtype == np.float64 and expected.max() > 1e-3
        assert np.abs(scores - expected).max() <= 1e-10 * expected.max(), index


@pytest.mark.parametrize("value, message", [
    ("", "post_attention_norm must be a layer path or None"),
    (2, "post_attention_norm must be a layer path or None"),
    ("sublayers/1/delta/sublayers/2", r"post_attention_norm \('sublayers/1/delta/sublayers/2'\) must be a layer of the branch"),
    ("sublayers/0/delta/sublayers/1", "post_attention_norm .* must be a layer of the branch .* not the attention"),
    ("sublayers/0/delta/sublayers/1/attn_value_to_output", "post_attention_norm .* not the attention or inside it"),
    ("sublayers/0/delta/sublayers/0", r"post_attention_norm .* must be the branch's sublayer right after the attention "
                                      r"\('sublayers/0/delta/sublayers/2'"),
    ("sublayers/0/delta/sublayers/2/scale", "post_attention_norm .* must be the branch's sublayer right after"),
])
def test_a_malformed_post_attention_norm_is_refused_naming_the_field(value, message):
    from attnflow.adapters import PenzaiValueMap, register_penzai_value_map
    from attnflow.adapters._jax import _penzai_methods

    malformed = PenzaiValueMap(attention="sublayers/0/delta/sublayers/1", branch="sublayers/0/delta",
                               post_attention_norm=value)
    with pytest.raises(attnflow.OptionError, match=f"The penzai value map 'broken': {message}"):
        register_penzai_value_map("broken", malformed)
    assert "broken" not in _penzai_methods.VALUE_MAPS
