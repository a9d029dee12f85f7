"""The flaxmodels adapter on a tiny random ``flaxmodels.gpt2`` GPT-2 (flaxmodels 0.1.3).

The reference is independent of attnflow: a Hugging Face ``GPT2Model`` loaded with the same weights
(flaxmodels' kernels have the layout of Hugging Face's Conv1D weights), run eagerly with
``output_attentions=True``, on a padded batch.

flaxmodels 0.1.3 calls ``jnp.reshape(x, newshape=...)``, a keyword jax 0.10 removed (and flax 0.12 needs jax
0.10). A test-local shim gives flaxmodels' two GPT-2 modules, for the duration of this test module only, a
``jnp`` whose ``reshape`` also takes ``newshape=``; jax.numpy itself is untouched, and so is the adapter
(it only looks at flaxmodels' classes and the softmax).
"""

from __future__ import annotations

import types

import flaxmodels  # noqa: F401  (make install installs it; a missing one must fail, not skip)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np
import pytest
import torch  # noqa: E402
import transformers  # noqa: E402
from flaxmodels.gpt2 import gpt2 as fm_gpt2  # noqa: E402
from flaxmodels.gpt2 import ops as fm_ops  # noqa: E402

import attnflow  # noqa: E402
from attnflow.testing import AdapterConformance  # noqa: E402

# distinct sizes: batch 2, layers 3, heads 4 (head dim 10), tokens 6, embedding 40, vocabulary 89
BATCH, LAYERS, HEADS, SEQ, EMBED, VOCAB = 2, 3, 4, 6, 40, 89
CONFIG = types.SimpleNamespace(
    vocab_size=VOCAB, n_positions=16, n_embd=EMBED, n_head=HEADS, n_layer=LAYERS, n_inner=None, embd_pdrop=0.0,
    attn_pdrop=0.0, resid_pdrop=0.0, layer_norm_epsilon=1e-5, activation_function="gelu_new",
    scale_attn_weights=True,
)


class _JaxNumpyWithNewshape(types.ModuleType):
    """jax.numpy, but ``reshape`` also accepts the ``newshape=`` keyword flaxmodels passes."""

    def __init__(self) -> None:
        super().__init__("jax.numpy (flaxmodels test shim)")

    def __getattr__(self, name):
        return getattr(jnp, name)

    @staticmethod
    def reshape(a, shape=None, *args, newshape=None, **kwargs):
        return jnp.reshape(a, newshape if shape is None else shape, *args, **kwargs)


@pytest.fixture(autouse=True, scope="module")
def newshape_shim():
    modules = (fm_gpt2, fm_ops)
    saved = [module.jnp for module in modules]
    for module in modules:
        module.jnp = _JaxNumpyWithNewshape()
    yield
    for module, original in zip(modules, saved):
        module.jnp = original


def inputs() -> tuple[jax.Array, jax.Array]:
    ids = jnp.asarray(np.random.default_rng(1).integers(0, VOCAB, (BATCH, SEQ)))
    real = np.ones((BATCH, SEQ), dtype=np.float32)
    real[1, -2:] = 0
    return ids, jnp.asarray(real)


_VARIABLES: dict = {}


def variables(model):
    """Random parameters of the model's own shapes, made once (an eager init compiles every operation)."""
    if "params" not in _VARIABLES:
        shapes = jax.eval_shape(model.init, jax.random.key(0), input_ids=inputs()[0])
        rng = np.random.default_rng(0)
        _VARIABLES.update(jax.tree_util.tree_map_with_path(
            lambda path, leaf: jnp.asarray((path[-1].key == "scale") + 0.3 * rng.standard_normal(leaf.shape),
                                           jnp.float32), shapes))
    return _VARIABLES


def hugging_face_twin(params) -> transformers.GPT2Model:
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=16, n_embd=EMBED, n_layer=LAYERS, n_head=HEADS, activation_function="gelu_new",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5, attn_implementation="eager",
    )
    model = transformers.GPT2Model(config).eval()
    p = jax.tree.map(lambda a: torch.tensor(np.asarray(a)), params)
    state = {"wte.weight": p["Embed_0"]["embedding"], "wpe.weight": p["Embed_1"]["embedding"],
             "ln_f.weight": p["LayerNorm_0"]["scale"], "ln_f.bias": p["LayerNorm_0"]["bias"]}
    for i in range(LAYERS):
        block = p[f"GPT2Block_{i}"]
        for hf_name, name in (("ln_1", "LayerNorm_0"), ("ln_2", "LayerNorm_1")):
            state[f"h.{i}.{hf_name}.weight"], state[f"h.{i}.{hf_name}.bias"] = block[name]["scale"], block[name]["bias"]
        attention, mlp = block["GPT2SelfAttention_0"], block["GPT2MLP_0"]
        for hf_name, dense in (("attn.c_attn", attention["Dense_0"]), ("attn.c_proj", attention["Dense_1"]),
                               ("mlp.c_fc", mlp["Dense_0"]), ("mlp.c_proj", mlp["Dense_1"])):
            state[f"h.{i}.{hf_name}.weight"], state[f"h.{i}.{hf_name}.bias"] = dense["kernel"], dense["bias"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(".attn.bias" in name or ".attn.masked_bias" in name for name in missing)
    return model


def reference(model, inputs):
    (params,), kwargs = inputs
    twin = hugging_face_twin(params["params"])
    with torch.no_grad():
        out = twin(torch.from_numpy(np.array(kwargs["input_ids"])),
                   attention_mask=torch.from_numpy(np.array(kwargs["attn_mask"])), output_attentions=True)
    return [a.numpy() for a in out.attentions]


class TestFlaxmodelsAdapter(AdapterConformance):
    adapter = attnflow.get_adapter("flaxmodels")

    def make_model(self):
        return fm_gpt2.GPT2Model(config=CONFIG)

    def make_inputs(self, model):
        ids, real = inputs()
        return (variables(model),), {"input_ids": ids, "attn_mask": real}

    def reference(self, model, inputs):
        return reference(model, inputs)


def test_names_mask_causality_and_labels():
    model = fm_gpt2.GPT2Model(config=CONFIG)
    ids, real = inputs()
    tokenizer_like = types.SimpleNamespace(convert_ids_to_tokens=lambda row: [f"t{i}" for i in row])
    trace = attnflow.capture(model, variables(model), input_ids=ids, attn_mask=real, tokens=tokenizer_like)
    assert trace.metadata["adapter"] == "flaxmodels"  # claimed without adapter= or options
    assert trace.layer_names == [f"GPT2Block_{i}/GPT2SelfAttention_0" for i in range(LAYERS)]
    assert trace.causal and trace.num_heads == (HEADS,) * LAYERS
    np.testing.assert_array_equal(trace.mask, np.asarray(real, bool))
    assert trace.tokens[0] == [f"t{i}" for i in np.asarray(ids)[0]]
    unpadded = attnflow.capture(model, variables(model), input_ids=ids)
    assert unpadded.mask.all() and unpadded.causal
    expected = reference(model, ((variables(model),), {"input_ids": ids, "attn_mask": jnp.ones((BATCH, SEQ))}))
    for layer, want in zip(unpadded.layers, expected, strict=True):
        np.testing.assert_allclose(layer.weights, want, atol=1e-5)


def test_says_which_adapters_capture_what_it_cannot():
    model = fm_gpt2.GPT2Model(config=CONFIG)
    ids, real = inputs()
    with pytest.raises(attnflow.AdapterError,
                       match=r"'flaxmodels' cannot capture \['value_zeroing'\].*flax_linen, flax_nnx"):
        attnflow.capture(model, variables(model), input_ids=ids, attn_mask=real, value_zeroing=True)
