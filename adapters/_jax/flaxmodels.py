"""The ``flaxmodels`` adapter: GPT-2 of the ``flaxmodels`` package (Flax linen), with no options.

Usage (the library's own call convention)::

    model = flaxmodels.gpt2.GPT2LMHeadModel(pretrained="gpt2")     # or GPT2Model(config=...)
    trace = attnflow.capture(model, variables, input_ids=ids, attn_mask=mask, tokens=tokenizer)

What is recorded: each ``GPT2SelfAttention`` (``GPT2Block_0/GPT2SelfAttention_0``...). Its ``__call__``
computes the probabilities in ``flaxmodels.gpt2.ops.attention`` with ``nn.softmax`` (that is
``jax.nn.softmax``) laid out ``(batch, heads, query, key)`` and throws them away; attnflow takes them at the
softmax, for the duration of each attention call only. Causal (GPT-2 always applies its causal mask);
padding from the ``attn_mask=`` the model takes (``(batch, seq)``, 0 for padding), token ids from
``input_ids=``, labels from the Hugging Face GPT-2 tokenizer passed as ``tokens=``.

Faithfulness (``attnflow.faithfulness`` / ``attnflow evaluate``): the Flax probe, on the output of the
token ``nn.Embed`` (the one GPT-2 calls on ``input_ids``; not the position embedding). GPT-2 has no mask or
unknown token: pass ``blank="zero"`` or a token id.
"""

from __future__ import annotations

from typing import Any

from attnflow import Adapter

from .flax_linen import LinenFamilyAdapter


class FlaxmodelsAdapter(LinenFamilyAdapter):
    """Captures ``flaxmodels.gpt2`` models (``GPT2Model``, ``GPT2LMHeadModel``); see the module docstring."""

    name = "flaxmodels"
    framework = "flaxmodels"
    extra = "flaxmodels"
    package = "flaxmodels.gpt2"
    attention = {"flaxmodels.gpt2.gpt2:GPT2SelfAttention": None}  # taken at its softmax
    layout = "bhqk"
    # faithfulness: the token embedding is the nn.Embed GPT-2 calls on input_ids (the position one is not)
    captures = Adapter.captures | {"input_gradients", "ablation"}

    @staticmethod
    def call_mask(args: tuple, kwargs: dict) -> tuple[Any, bool]:
        """``GPT2SelfAttention.__call__(x, layer_past, attn_mask, ...)``: ``attn_mask`` is additive,
        ``(batch, 1, 1, keys)``, 0 for real tokens and -10000 for padding; GPT-2 is always causal."""
        mask = kwargs.get("attn_mask", args[2] if len(args) > 2 else None)
        return (None if mask is None else mask > -1.0), True
