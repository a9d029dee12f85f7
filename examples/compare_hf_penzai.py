"""PyTorch against JAX on code nobody here wrote: a Hugging Face GPT-NeoX and penzai's conversion of it.

A tiny random ``GPTNeoXForCausalLM`` (transformers, PyTorch) is converted to JAX by penzai's own converter
(``penzai.models.transformer.variants.gpt_neox.gpt_neox_from_huggingface_model``); attnflow captures both
(the ``transformers`` adapter on one side, the ``penzai`` adapter on the other) on the same padded batch and
``attnflow.compare`` checks every layer and head, the rollout and the flow. Without a tokenizer both traces
label tokens by id, so the default ``align="index"`` pairs them. Run it: ``python examples/compare_hf_penzai.py``
(exit status 0 when they agree to 1e-5, float32).

penzai 0.2.5 was written for transformers 4; under transformers 5 its converter needs the small shims below
(they change the Hugging Face model instance only while it is converted, and put everything back):

- the RoPE settings moved into ``config.rope_parameters`` (``rope_theta``, ``partial_rotary_factor``): the
  converter reads ``config.rotary_emb_base`` and ``config.rotary_pct``, and refuses ``rope_parameters`` (and
  ``dtype``) as configuration attributes it does not know;
- the output embedding is ``lm_head.weight`` in the state dict, the converter reads ``embed_out.weight``;
- the converter builds the final LayerNorm with epsilon 1e-6 whatever ``layer_norm_eps`` says: the shim
  sets the converted model's final norm to the configured epsilon.

The sizes are distinct on every axis, and the head dimension (48 / 4 = 12, half of it rotary) keeps the
number of rotary dimensions even, as penzai's RoPE needs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded

import jax.numpy as jnp
import numpy as np
import torch
import transformers
from penzai import pz
from penzai.models.transformer.variants import gpt_neox

import attnflow

VOCAB, HIDDEN, LAYERS, HEADS, INTERMEDIATE, BATCH, SEQ = 97, 48, 2, 4, 40, 2, 7
_UNKNOWN_TO_PENZAI = ("rope_parameters", "dtype", "to_dict")  # transformers-5 config keys the converter refuses


@contextlib.contextmanager
def transformers4_view(model: torch.nn.Module, config_attributes: dict, state_dict_aliases: dict):
    """While converting: ``model.config`` has the transformers-4 attributes the converter reads and hides the
    transformers-5 ones it refuses; ``model.state_dict()`` also has the transformers-4 key names."""
    config = model.config
    added = [name for name in config_attributes if name not in vars(config)]
    to_dict, state_dict = config.to_dict, model.state_dict
    vars(config).update(config_attributes)

    def old_to_dict() -> dict:
        found = to_dict()
        for name in (*_UNKNOWN_TO_PENZAI, *config_attributes):
            found.pop(name, None)
        return found

    def old_state_dict(*args, **kwargs) -> dict:
        found = state_dict(*args, **kwargs)
        for new, old in state_dict_aliases.items():
            found.setdefault(old, found[new])
        return found

    vars(config)["to_dict"], vars(model)["state_dict"] = old_to_dict, old_state_dict
    try:
        yield model
    finally:
        del vars(config)["to_dict"], vars(model)["state_dict"]
        for name in added:
            del vars(config)[name]


def gpt_neox_from_hf(model: transformers.GPTNeoXForCausalLM) -> pz.nn.Layer:
    """penzai's GPT-NeoX converter, under transformers 5."""
    rope = model.config.rope_parameters
    if rope.get("rope_type", "default") != "default":
        raise NotImplementedError(f"penzai's converter only does default RoPE, not {rope}")
    old = {"rotary_emb_base": rope["rope_theta"], "rotary_pct": rope.get("partial_rotary_factor", 1.0)}
    with transformers4_view(model, old, {"lm_head.weight": "embed_out.weight"}):
        converted = gpt_neox.gpt_neox_from_huggingface_model(model)
    epsilon = model.config.layer_norm_eps  # the final norm sits before the output projection
    return (pz.select(converted).at(lambda m: m.body.sublayers[-2]).at_instances_of(pz.nn.Standardize)
            .apply(lambda standardize: dataclasses.replace(standardize, epsilon=epsilon)))


def main() -> int:
    torch.manual_seed(0)
    config = transformers.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=INTERMEDIATE, max_position_embeddings=32, layer_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0, "partial_rotary_factor": 0.5},
    )
    hf_model = transformers.GPTNeoXForCausalLM(config).eval()  # default sdpa: the adapter switches to eager
    with torch.no_grad():  # random norms, so that a wrong epsilon or bias would show
        for name, parameter in hf_model.named_parameters():
            if "norm" in name:
                parameter.add_(0.3 * torch.randn_like(parameter))
    penzai_model = gpt_neox_from_hf(hf_model)  # after every edit: penzai shares the torch weights' memory

    ids = torch.randint(1, VOCAB, (BATCH, SEQ))
    real = torch.ones(BATCH, SEQ, dtype=torch.long)
    real[1, -2:] = 0  # the second item has two padding tokens at the end
    torch_trace = attnflow.capture(hf_model, input_ids=ids, attention_mask=real)

    tokens = pz.nx.wrap(jnp.asarray(ids.numpy())).tag("batch", "seq")
    positions = np.where(real.numpy() == 1, np.arange(SEQ), -1)  # penzai masks keys at negative positions
    jax_trace = attnflow.capture(penzai_model, tokens, token_positions=pz.nx.wrap(jnp.asarray(positions)).tag(
        "batch", "seq"))

    report = attnflow.compare(torch_trace, jax_trace)  # float32 defaults: 1e-5
    print(f"PyTorch {torch_trace}\nJAX     {jax_trace}\n\n{report}\n")
    print("max |attention difference| per layer:", ", ".join(f"{layer.max_abs:.1e}" for layer in report.layers))
    print(f"rollout {report.rollout_max_abs:.1e}, flow {report.flow_max_abs:.1e}")
    return 0 if report.ok and np.array_equal(torch_trace.mask, jax_trace.mask) else 1


if __name__ == "__main__":
    sys.exit(main())
