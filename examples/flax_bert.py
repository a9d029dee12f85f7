"""A compact Flax NNX port of the BERT encoder that loads a Hugging Face BERT directory.

transformers 5 ships no Flax models; this file is the JAX twin the comparison example needs. It reads
``config.json`` and ``model.safetensors`` (a ``BertModel`` or any ``Bert*`` head checkpoint: a
``bert.`` prefix is stripped) and uses Flax's own ``nnx.MultiHeadAttention``, so attnflow's
``flax_nnx`` adapter captures it unmodified::

    import flax_bert                      # this file
    model = flax_bert.load_bert("path/to/bert-dir")
    hidden = model(input_ids, attention_mask)                  # (batch, seq, hidden)
    trace = attnflow.capture(model, input_ids, attention_mask)  # attention layers encoder/layer/{i}/attention

The modules mirror Hugging Face's layout so the parameter mapping stays one line per tensor. It is an
example, not part of the attnflow library; dropout is left out (inference only).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_json(cls, path: str | Path) -> BertConfig:
        raw = json.loads(Path(path).read_text())
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("This port supports absolute position embeddings only.")
        if raw.get("hidden_act", "gelu") not in ACTIVATIONS:
            raise ValueError(f"Unsupported hidden_act {raw['hidden_act']!r}; known: {sorted(ACTIVATIONS)}.")
        return cls(**{f.name: raw[f.name] for f in dataclasses.fields(cls) if f.name in raw})


class Embeddings(nnx.Module):
    def __init__(self, c: BertConfig, rngs: nnx.Rngs):
        self.word = nnx.Embed(c.vocab_size, c.hidden_size, rngs=rngs)
        self.position = nnx.Embed(c.max_position_embeddings, c.hidden_size, rngs=rngs)
        self.token_type = nnx.Embed(c.type_vocab_size, c.hidden_size, rngs=rngs)
        self.norm = nnx.LayerNorm(c.hidden_size, epsilon=c.layer_norm_eps, use_fast_variance=False, rngs=rngs)

    def __call__(self, input_ids, token_type_ids):
        positions = jnp.arange(input_ids.shape[-1])[None, :]
        return self.norm(self.word(input_ids) + self.position(positions) + self.token_type(token_type_ids))


class Layer(nnx.Module):
    def __init__(self, c: BertConfig, rngs: nnx.Rngs):
        h = c.hidden_size
        self.attention = nnx.MultiHeadAttention(  # query/key/value/out projections, like HF's self + output.dense
            num_heads=c.num_attention_heads, in_features=h, qkv_features=h, out_features=h, decode=False, rngs=rngs
        )
        self.attention_norm = nnx.LayerNorm(h, epsilon=c.layer_norm_eps, use_fast_variance=False, rngs=rngs)
        self.intermediate = nnx.Linear(h, c.intermediate_size, rngs=rngs)
        self.output = nnx.Linear(c.intermediate_size, h, rngs=rngs)
        self.output_norm = nnx.LayerNorm(h, epsilon=c.layer_norm_eps, use_fast_variance=False, rngs=rngs)
        self.act = ACTIVATIONS[c.hidden_act]

    def __call__(self, x, mask):
        x = self.attention_norm(x + self.attention(x, mask=mask))
        return self.output_norm(x + self.output(self.act(self.intermediate(x))))


class Encoder(nnx.Module):
    def __init__(self, c: BertConfig, rngs: nnx.Rngs):
        self.layer = nnx.List([Layer(c, rngs) for _ in range(c.num_hidden_layers)])

    def __call__(self, x, mask):
        for layer in self.layer:
            x = layer(x, mask)
        return x


class FlaxBert(nnx.Module):
    """BERT encoder: ``model(input_ids, attention_mask=None, token_type_ids=None)`` -> last hidden state."""

    def __init__(self, config: BertConfig, rngs: nnx.Rngs):
        self.config = config
        self.embeddings = Embeddings(config, rngs)
        self.encoder = Encoder(config, rngs)

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None):
        input_ids = jnp.asarray(input_ids)
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        # Like Hugging Face: padding keys are masked for every query (padding queries still attend).
        mask = jnp.asarray(attention_mask, dtype=bool)[:, None, None, :]
        return self.encoder(self.embeddings(input_ids, jnp.asarray(token_type_ids)), mask)


def load_bert(directory: str | Path) -> FlaxBert:
    """Build a :class:`FlaxBert` from a Hugging Face BERT directory (``config.json`` + ``model.safetensors``)."""
    from safetensors.numpy import load_file

    directory = Path(directory)
    config = BertConfig.from_json(directory / "config.json")
    tensors = {k.removeprefix("bert."): v for k, v in load_file(str(directory / "model.safetensors")).items()}
    model = FlaxBert(config, nnx.Rngs(0))
    heads, hidden = config.num_attention_heads, config.hidden_size
    head_dim = hidden // heads

    def take(name: str) -> np.ndarray:
        for candidate in (name, name.replace(".weight", ".gamma"), name.replace(".bias", ".beta")):
            if candidate in tensors:
                return np.asarray(tensors.pop(candidate), dtype=np.float32)
        raise KeyError(f"{directory / 'model.safetensors'} has no tensor {name!r}")

    def put(variable: nnx.Variable, value: np.ndarray) -> None:
        if tuple(variable.shape) != value.shape:
            raise ValueError(f"shape {value.shape} does not fit parameter of shape {variable.shape}")
        variable.set_value(jnp.asarray(value))

    def norm(module: nnx.LayerNorm, prefix: str) -> None:
        put(module.scale, take(f"{prefix}.LayerNorm.weight"))
        put(module.bias, take(f"{prefix}.LayerNorm.bias"))

    def linear(module: nnx.Linear, prefix: str) -> None:  # torch stores (out, in); Flax (in, out)
        put(module.kernel, take(f"{prefix}.weight").T)
        put(module.bias, take(f"{prefix}.bias"))

    emb = model.embeddings
    put(emb.word.embedding, take("embeddings.word_embeddings.weight"))
    put(emb.position.embedding, take("embeddings.position_embeddings.weight"))
    put(emb.token_type.embedding, take("embeddings.token_type_embeddings.weight"))
    norm(emb.norm, "embeddings")
    for i, layer in enumerate(model.encoder.layer):
        p = f"encoder.layer.{i}"
        attention = layer.attention
        for name in ("query", "key", "value"):
            projection = getattr(attention, name)
            put(projection.kernel, take(f"{p}.attention.self.{name}.weight").T.reshape(hidden, heads, head_dim))
            put(projection.bias, take(f"{p}.attention.self.{name}.bias").reshape(heads, head_dim))
        put(attention.out.kernel, take(f"{p}.attention.output.dense.weight").T.reshape(heads, head_dim, hidden))
        put(attention.out.bias, take(f"{p}.attention.output.dense.bias"))
        norm(layer.attention_norm, f"{p}.attention.output")
        linear(layer.intermediate, f"{p}.intermediate.dense")
        linear(layer.output, f"{p}.output.dense")
        norm(layer.output_norm, f"{p}.output")
    return model
