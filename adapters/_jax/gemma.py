"""The ``gemma`` adapter: Google DeepMind's JAX Gemma library (``gemma.gm.nn``, Flax linen), with no options.

Usage (the library's own call convention)::

    model = gm.nn.Gemma3_1B()                              # or gm.nn.Transformer(config=...)
    trace = attnflow.capture(model, {"params": params}, ids)   # runs model.apply({"params": params}, ids)
    trace = attnflow.capture(model, {"params": params}, ids, tokens=gm.text.Gemma3Tokenizer())  # labelled

    with attnflow.attach(model) as rec:
        out = model.apply({"params": params}, ids)         # nn.jit-compiled __call__ runs eagerly inside
    trace = rec.trace

What is recorded: each ``gemma.gm.nn._modules.Attention`` layer (``layer_0/attn``, ``layer_1/attn``...),
taken where the library hands its probabilities to the identity layer ``attention_weights``
(``probs = jax.nn.softmax(padded_logits)`` laid out ``(batch, query, heads, keys)``, "BTNS"): after the
soft cap (``attn_logits_soft_cap``), the sliding window of ``LOCAL_SLIDING`` layers and the mask. Grouped-
and multi-query heads are already flattened by Gemma with the key/value head as the major index (query
head ``n`` uses key/value head ``n // (num_heads // num_kv_heads)``), as attnflow orders them. Attention
modules of older gemma releases without that identity layer (``gemma.modules.Attention``, gemma <= 3.0) are
taken at their ``jax.nn.softmax`` (not tested here: that module cannot be installed beside gemma 3.3).

Masks and causality come from the model's own inputs: each layer's ``attn_mask`` argument (Gemma builds
it from ``tokens != 0`` and a causal triangle, or takes the ``attention_mask=`` you pass), so padding keys
are masked and the trace is causal. Token ids are the model's ``tokens`` argument; ``tokens=`` a gemma tokenizer
(``gm.text.Gemma3Tokenizer()``...) labels them with its ``decode``. The vision encoder of the
multimodal models is not recorded (text layers only).

jit: ``Transformer.__call__`` is wrapped in ``nn.jit``; while attached jit is disabled, so the forward runs
eagerly and the interception sees every layer (a cached compiled call would run no Python). The first
eager call compiles each operation once (seconds); later calls are fast.

``target=`` (an int: that vocabulary logit at each item's last real token, or a callable of the output, as for
every adapter): the forward runs once more under ``jax.grad`` with a zero added to each layer's
``attention_weights`` output, and each layer's gradient is its ``attn_grad`` extra ``(batch, heads, query, key)``,
for ``grad_rollout`` and ``attn_grad``.

``values=True`` (norm, norm_residual, alti, effective_attention): the linen family's value capture through the
Flax value map :data:`GEMMA_VALUE_MAP` (values at index 1 of ``kv_einsum``'s stacked ``(k, v)`` output, or 2
of ``qkv_einsum``'s with as many KV heads as query heads; the output projection ``attn_vec_einsum``'s ``w``
``(heads, d_head, d_model)``; the residual stream entering ``pre_attention_norm`` and, after attention,
``pre_ffw_norm``). Gemma 2 and 3 pass the attention output through ``post_attention_norm``, an RMSNorm scaled
by ``1 + scale``, before the residual add: recorded as the sandwich norm the decomposition applies (its
denominator a constant of the pass, as Kobayashi et al., 2021 treat LayerNorm's); layers without one (Gemma 1)
decompose as plain pre-LN blocks. The map serves every root class of ``gm.nn`` (``Transformer``,
``Gemma3_1B``...) unless one of that name is registered with ``register_flax_value_map``.

``value_zeroing=True`` (value_zeroing, Mohebbi et al., 2023): the linen family's re-runs through the same map: each
``Block`` (``layer_{i}``: norms, attention, feed-forward) runs again alone on its recorded call, per item once per
token with that token's values (index 1 of ``kv_einsum``'s output, 2 of ``qkv_einsum``'s) zeroed; the distances
compare the hidden states of the ``(cache, x)`` it returns.

Generation: ``gm.text.Sampler(model=model, ...).sample(prompts, ...)`` inside ``attnflow.attach(model)`` gives one
causal trace over the prompt (laid out left-padded) and the generated tokens (``docs/generation.md``).

Faithfulness (``attnflow.faithfulness(model, explanation, {"params": params}, ids, ...)`` / ``attnflow
evaluate``): the Flax probe, blanking and differentiating the output of ``Embedder.encode`` (the token
embedding times ``sqrt(embed_dim)``, before any multimodal merge). Blanking by id 0 would make the token
padding, so ``blank="zero"`` or another token id is the usual choice.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from functools import partial
from typing import Any, cast

from attnflow import Adapter, Recorder, import_optional
from attnflow.recording import switch

from . import _flax_methods
from ._flax_common import UNKNOWN
from ._generation_jax import gemma_sampling
from .flax_linen import LinenFamilyAdapter, root_module

#: Where gemma's ``gm.nn`` Block (``layer_{i}``) keeps what value-side methods need (module docstring).
GEMMA_VALUE_MAP = _flax_methods.FlaxValueMap(
    attention="attn", value="attn/kv_einsum|attn/qkv_einsum", value_index=-1, out="attn/attn_vec_einsum",
    out_parameter="w", residual="pre_attention_norm", block_output="pre_ffw_norm", norm="post_attention_norm",
    norm_scale_offset=1.0, layout="pre_ln",
)


class GemmaAdapter(LinenFamilyAdapter):
    """Captures ``gemma.gm.nn`` Transformers (Gemma 2 and 3, grouped- and multi-query attention, sliding-
    window layers, soft-capping); see the module docstring."""

    name = "gemma"
    framework = "gemma"
    extra = "gemma"
    package = "gemma"
    #: The current Attention (with its attention_weights identity layer) and the legacy one of gemma 3.0.
    attention = {"gemma.gm.nn._modules:Attention": "attention_weights", "gemma.modules:Attention": None}
    layout = "btns"
    ids = ("tokens",)
    #: target= through the linen gradient pass (an additive zero on each attention_weights output, jax.grad);
    #: values= and value_zeroing= through the linen family's capture and gemma's value map
    captures = Adapter.captures | {"input_gradients", "ablation", "attn_grad", "values", "value_zeroing"}

    def probe(self, model: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        """The Flax probe on the output of ``Embedder.encode`` (the embedding already scaled by
        ``sqrt(embed_dim)``), with the model's ``nn.jit`` off inside the probe's own compiled pass."""
        import sys

        from ._faithfulness_flax import probe

        embedder = getattr(sys.modules.get("gemma.gm.nn._modules"), "Embedder", None)
        if embedder is None:
            embedder = getattr(sys.modules.get("gemma.modules"), "Embedder", None)
        return probe(model, request, args, kwargs, embedding_method=(embedder, "encode") if embedder else None,
                     no_inner_jit=True)

    @contextmanager
    def hooks(self, model: Any, recorder: Recorder, **options: Any) -> Iterator[None]:
        """The linen family's hooks, recording through the sampler's step recorder: ``gm.text.Sampler.sample``
        on the attached model inside the block gives one stitched trace (``adapters/_jax/_generation_jax.py``)."""
        root = root_module(model, import_optional("flax.linen", "flax").Module)
        name = type(root if root is not None else model).__name__
        with ExitStack() as stack:
            if recorder.request.values or recorder.request.value_zeroing:  # gm.nn's map, unless one is registered
                stack.enter_context(switch(("gemma value map", name), partial(_lend_map, name), partial(_take_back, name)))
            stepped = stack.enter_context(gemma_sampling(recorder, root if root is not None else model))
            stack.enter_context(super().hooks(model, cast(Recorder, stepped), **options))
            yield

    @staticmethod
    def call_mask(args: tuple, kwargs: dict) -> tuple[Any, bool]:
        """``Attention.__call__(x, segment_pos, cache, attn_mask)``: ``attn_mask`` is ``(batch, query, keys)``,
        True where a query may attend (padding and causality; the sliding window is applied inside)."""
        mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
        if mask is None:
            return UNKNOWN, False
        return mask[:, None], False


def _lend_map(name: str) -> bool:
    """Register gemma's value map under the model's class name unless a map is registered there already."""
    if name in _flax_methods.VALUE_MAPS:
        return False
    _flax_methods.VALUE_MAPS[name] = GEMMA_VALUE_MAP
    return True


def _take_back(name: str, lent: bool) -> None:
    """Remove the lent map, not one registered under the name meanwhile."""
    if lent and _flax_methods.VALUE_MAPS.get(name) is GEMMA_VALUE_MAP:
        del _flax_methods.VALUE_MAPS[name]
