"""target= (attention gradients) and values=True (value-side extras) through the flax_nnx adapter, on the Flax BERT
port of examples/flax_bert.py: against an independent JAX forward written here (gradients by jax.grad with
respect to probabilities computed by hand, values read off that forward) and against the transformers adapter
on the same tiny random BERT (batch 2, 3 heads, 7 tokens, head size 8, hidden 24, 4 layers: a distinct size
on every axis)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import flax.nnx  # noqa: E402,F401  (make install installs it; a missing one must fail, not skip)
import numpy as np
import pytest

import attnflow

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TOL = 1e-5


@pytest.fixture(scope="module")
def flax_bert():
    name = "flax_bert"  # the example is a plain file, not a package: load it by path
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / "flax_bert.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def models(tmp_path_factory, flax_bert, tiny_hf):
    directory = tmp_path_factory.mktemp("tiny-bert")
    torch_model = tiny_hf("bert", "eager")
    torch_model.save_pretrained(directory, safe_serialization=True)
    return torch_model, flax_bert.load_bert(directory)


def reference(port, ids, mask, select):
    """An independent forward of the port's parameters with a zero added to each layer's probabilities: per layer
    the probabilities' gradient (jax.grad) of the score ``Σ_b hidden[b, 0] · select[b]`` and the values the block
    computes with."""
    import jax
    import jax.numpy as jnp

    def value(variable):
        return jnp.asarray(variable.get_value(), jnp.float32)

    def norm(x, module):
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) / jnp.sqrt(var + module.epsilon) * value(module.scale) + value(module.bias)

    def forward(deltas):
        emb = port.embeddings
        x = value(emb.word.embedding)[ids] + value(emb.position.embedding)[: ids.shape[1]] \
            + value(emb.token_type.embedding)[0]
        x = norm(x, emb.norm)
        kept = []
        for layer, delta in zip(port.encoder.layer, deltas):
            a = layer.attention
            q, k, v = (jnp.einsum("bsd,dhe->bshe", x, value(p.kernel)) + value(p.bias) for p in (a.query, a.key, a.value))
            logits = jnp.einsum("bqhe,bkhe->bhqk", q, k) / np.sqrt(q.shape[-1])
            logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
            probabilities = jax.nn.softmax(logits, axis=-1) + delta
            moved = jnp.einsum("bhqk,bkhe,hed->bqd", probabilities, v, value(a.out.kernel)) + value(a.out.bias)
            z = x + moved
            y = norm(z, layer.attention_norm)
            kept.append({"value": v.transpose(0, 2, 1, 3), "residual": x, "norm_input": z, "norm_output": y})
            hidden = jax.nn.gelu(jnp.einsum("bsd,de->bse", y, value(layer.intermediate.kernel))
                                 + value(layer.intermediate.bias), approximate=False)
            x = norm(y + hidden @ value(layer.output.kernel) + value(layer.output.bias), layer.output_norm)
        return (x[:, 0] * select).sum(), kept

    heads = port.config.num_attention_heads
    zeros = [jnp.zeros((ids.shape[0], heads, ids.shape[1], ids.shape[1]))] * port.config.num_hidden_layers
    grads, kept = jax.jit(jax.grad(forward, has_aux=True))(zeros)  # compiled: faster than op by op
    return [np.asarray(g) for g in grads], [{k: np.asarray(v) for k, v in layer.items()} for layer in kept]


def test_gradients_and_values_equal_an_independent_jax_forward(models, hf_inputs, sizes):
    from flax import nnx

    from attnflow.methods._contributions import decomposition_identity

    _, port = models
    inputs = hf_inputs("right")
    ids, mask = inputs["input_ids"].numpy(), inputs["attention_mask"].numpy()
    before = nnx.state(port)
    types = [type(module) for _, module in nnx.iter_modules(port)]
    trace = attnflow.capture(port, ids, mask, target=5, values=True)
    assert [type(module) for _, module in nnx.iter_modules(port)] == types  # every class swap undone
    assert all(np.array_equal(x, y) for x, y in zip(jax_leaves(before), jax_leaves(nnx.state(port))))
    plain = attnflow.capture(port, ids, mask)
    assert trace.metadata["values_layout"] == "post_ln"

    # target=5: unit 5 of the output at position 0 (the port's output is its logits here); None: each argmax
    unit = np.zeros((sizes.batch, sizes.hidden), np.float32)
    unit[:, 5] = 1.0
    grads, kept = reference(port, ids, mask.astype(bool), unit)
    argmax = np.asarray(port(ids, mask))[:, 0].argmax(-1)
    by_argmax = attnflow.capture(port, ids, mask, target=None)
    assert len(set(argmax.tolist()) | {5}) > 1  # the argmax target is another one
    argmax_grads, _ = reference(port, ids, mask.astype(bool), np.eye(sizes.hidden, dtype=np.float32)[argmax])
    assert len(trace.layers) == sizes.layers["bert"]
    for li, layer in enumerate(trace.layers):
        np.testing.assert_array_equal(layer.weights, plain.layers[li].weights)  # weights as without target=/values=
        assert layer.extras["attn_grad"].shape == (sizes.batch, sizes.heads, sizes.seq, sizes.seq)
        np.testing.assert_allclose(layer.extras["attn_grad"], grads[li], atol=TOL, rtol=1e-4)
        np.testing.assert_allclose(by_argmax.layers[li].extras["attn_grad"], argmax_grads[li], atol=TOL, rtol=1e-4)
        assert layer.extras["value"].shape == (sizes.batch, sizes.heads, sizes.seq, sizes.hidden // sizes.heads)
        assert layer.extras["out_weight"].shape == (1, sizes.heads, sizes.hidden // sizes.heads, sizes.hidden)
        for name, expected in kept[li].items():
            np.testing.assert_allclose(layer.extras[name], expected, atol=TOL, err_msg=name)
        for b in range(sizes.batch):
            total, output = decomposition_identity(trace, li, b)
            np.testing.assert_allclose(total, output, atol=TOL)  # Σ_j T_i(x_j) + bias terms = the norm's output
    assert max(float(np.abs(g).max()) for g in grads) > 1e-3  # gradients that are not trivially 0


def jax_leaves(state):
    import jax

    return [np.asarray(leaf) for leaf in jax.tree.leaves(state)]


def test_extras_and_methods_equal_the_transformers_adapter(models, hf_inputs):
    torch_model, port = models
    inputs = hf_inputs("right")
    ids, mask = inputs["input_ids"].numpy(), inputs["attention_mask"].numpy()
    torch_trace = attnflow.capture(torch_model, target=lambda out: out.last_hidden_state[:, 0, :4].sum(-1),
                                   values=True, **inputs)
    jax_trace = attnflow.capture(port, ids, mask, target=lambda out: out[:, 0, :4].sum(-1), values=True)
    for a, b in zip(torch_trace.layers, jax_trace.layers, strict=True):
        assert sorted(a.extras) == sorted(b.extras)
        for name in a.extras:
            assert a.extras[name].shape == b.extras[name].shape, name
            np.testing.assert_allclose(b.extras[name], a.extras[name], atol=TOL, rtol=1e-4, err_msg=name)
    methods = ["grad_rollout", "norm", "norm_residual", "alti"]
    report = attnflow.compare(torch_trace, jax_trace, methods=methods)
    assert report.ok, str(report)
    assert set(report.methods) == set(methods) and max(report.methods.values()) < TOL


def test_errors_name_the_fix_and_undo_everything(models, hf_inputs):
    from flax import nnx

    _, port = models
    inputs = hf_inputs("right")
    ids, mask = inputs["input_ids"].numpy(), inputs["attention_mask"].numpy()
    types = [type(module) for _, module in nnx.iter_modules(port)]

    def fails(out):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        attnflow.capture(port, ids, mask, target=fails, values=True)
    assert [type(module) for _, module in nnx.iter_modules(port)] == types
    with pytest.raises(attnflow.OptionError, match="jax array of per-item scores"):
        attnflow.capture(port, ids, mask, target=lambda out: 1.0)
    with pytest.raises(attnflow.OptionError, match="leave out modules="):
        attnflow.capture(port, ids, mask, target=0, adapter_options={"modules": [nnx.MultiHeadAttention]})

    class Other(nnx.Module):
        def __init__(self):
            self.attention = nnx.MultiHeadAttention(2, 4, decode=False, rngs=nnx.Rngs(0))

        def __call__(self, x):
            return self.attention(x)

    with pytest.raises(attnflow.AdapterError, match=r"register_flax_value_map.*FlaxValueMap"):
        attnflow.capture(Other(), np.ones((1, 3, 4), np.float32), values=True)
    assert attnflow.capture(port, ids, mask).layers[0].extras == {}  # and the next capture is plain again
