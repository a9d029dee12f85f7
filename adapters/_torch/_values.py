"""Value-side tensors for norm-based methods, read from each family's modules by a declarative path map.

Private to attnflow.adapters; torch is passed in. Per recorded attention layer it adds the extras:

=================  ===========================  =====================================================
``value``          (batch, heads, keys, d_head)  value vectors per query head (grouped-query: the KV
                                                 head ``h // (heads / kv_heads)``), bias included
``out_weight``     (1, heads, d_head, d_model)   the output projection per head, ``W_O^h``
``out_bias``       (1, d_model)                  its bias (0 where it has none)
``residual``       (batch, queries, d_model)     the residual stream the attention block adds to (for a
                                                 cross-attention layer: the query stream's, while the
                                                 values are the key stream's)
``norm_input``     (batch, queries, d_model)     post-LN only: the input of the norm after attention
``norm_output``    (batch, queries, d_model)     post-LN only: its output
``norm_weight``    (1, d_model), ``norm_bias``   post-LN only: its affine parameters, ``norm_eps`` (1,)
``block_output``   (batch, queries, d_model)     pre-LN only: the residual stream after attention (with a
                                                 parallel residual, GPT-NeoX's ``x + attn(ln1(x)) +
                                                 mlp(ln2(x))``: ``residual`` plus the attention block's
                                                 output, the feed-forward branch left out)
``post_norm_input``  (batch, queries, d_model)   sandwich pre-LN only (Gemma 2/3): the input of the norm
                                                 the attention output passes before the residual add;
                                                 ``post_norm_weight`` (1, d_model) its effective scale
                                                 (``offset + weight``), ``post_norm_eps`` (1,)
=================  ===========================  =====================================================

and ``values_layout`` (``"post_ln"`` or ``"pre_ln"``) to the trace's metadata. Cross-attention layers
(encoder-decoders: BART, Marian, mBART) get the same extras where the family's map has a ``cross`` part, and
so do SegFormer's spatial-reduction blocks, recorded as attention from the stage's patches to their pooled keys
(``value`` then holds the pooled keys' values, ``residual`` the patches' residual stream).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

import attnflow
from attnflow.recording import CaptureUnavailableError

from .._maps import require_paths
from . import _torch_common as common


@dataclasses.dataclass(frozen=True)
class ValueMap:
    """Where one family keeps what norm-based methods need, as paths relative to a layer's module.

    Attributes:
        attention: the recorded attention module (``"attention.self"``).
        value: the module whose output holds the values; ``value_part`` says which part: "all"; "qkv", the
            last third of a fused query-key-value projection laid out ``[q | k | v]`` (GPT-2); "qkv_heads", the
            last third of each head's slice of a fused projection laid out per head ``[q_h, k_h, v_h]``
            (GPT-NeoX's ``query_key_value``).
        out: the output projection; ``out_kind`` "linear" (``y = x W^T + b``) or "conv1d" (``y = x W + b``).
        residual: the module whose input is the residual stream the attention block adds to.
        norm: post-LN: the norm after attention. block_output: pre-LN: the module whose input is the residual
            stream after attention (the second norm).
        cross: the map of an encoder-decoder's cross-attention block (and of the reduced-key blocks that
            SegFormer records as attention to their pooled keys).
        parallel_residual: True where the block adds attention and feed-forward to the same residual stream,
            ``x + attn(ln1(x)) + mlp(ln2(x))`` (GPT-NeoX, GPT-J): the stream after attention is then the
            residual plus ``out``'s output, and ``block_output`` is not read; a string names the config flag
            that says so per model (``"use_parallel_residual"``), ``block_output`` serving where it is false.
        post_attention_norm: pre-LN "sandwich" blocks (Gemma 2 and 3): the RMSNorm the attention output passes
            before the residual add, ``y = x + rms_norm(attn(ln1(x)))`` (``"post_attention_layernorm"``); its
            scale is ``post_attention_norm_offset + weight`` (Gemma's convention ``1 + weight``: offset 1.0).
    """

    attention: str
    value: str
    out: str
    residual: str
    layout: str
    value_part: str = "all"
    out_kind: str = "linear"
    norm: str | None = None
    block_output: str | None = None
    cross: ValueMap | None = None
    parallel_residual: bool | str = False
    post_attention_norm: str | None = None
    post_attention_norm_offset: float = 0.0


_BERT = ValueMap(
    attention="attention.self", value="attention.self.value", out="attention.output.dense",
    residual="attention.self", norm="attention.output.LayerNorm", layout="post_ln",
)
_GPT2 = ValueMap(
    attention="attn", value="attn.c_attn", value_part="qkv", out="attn.c_proj", out_kind="conv1d",
    residual="ln_1", block_output="ln_2", layout="pre_ln",
)
_LLAMA = ValueMap(
    attention="self_attn", value="self_attn.v_proj", out="self_attn.o_proj", residual="input_layernorm",
    block_output="post_attention_layernorm", layout="pre_ln",
)
# BART and Marian: post-LN; q_proj's input is the residual (the query stream's hidden states, for cross-attention
# too), v_proj's output the values (the encoder's for cross-attention).
_BART = ValueMap(
    attention="self_attn", value="self_attn.v_proj", out="self_attn.out_proj", residual="self_attn.q_proj",
    norm="self_attn_layer_norm", layout="post_ln",
    cross=ValueMap(
        attention="encoder_attn", value="encoder_attn.v_proj", out="encoder_attn.out_proj",
        residual="encoder_attn.q_proj", norm="encoder_attn_layer_norm", layout="post_ln",
    ),
)
# mBART: pre-LN; the residual stream enters each block's norm and leaves into the next block's norm.
_MBART = ValueMap(
    attention="self_attn", value="self_attn.v_proj", out="self_attn.out_proj", residual="self_attn_layer_norm",
    block_output="encoder_attn_layer_norm|final_layer_norm", layout="pre_ln",
    cross=ValueMap(
        attention="encoder_attn", value="encoder_attn.v_proj", out="encoder_attn.out_proj",
        residual="encoder_attn_layer_norm", block_output="final_layer_norm", layout="pre_ln",
    ),
)
# GPT-NeoX (Pythia): one fused projection laid out per head as [q, k, v]; with config.use_parallel_residual the
# attention and the feed-forward both add to the layer's input, else the second norm reads the stream after attention.
_GPT_NEOX = ValueMap(
    attention="attention", value="attention.query_key_value", value_part="qkv_heads", out="attention.dense",
    residual="input_layernorm", block_output="post_attention_layernorm", parallel_residual="use_parallel_residual",
    layout="pre_ln",
)
# GPT-J: one norm feeds attention and feed-forward side by side, x + attn(ln_1(x)) + mlp(ln_1(x)); no biases.
_GPTJ = ValueMap(
    attention="attn", value="attn.v_proj", out="attn.out_proj", residual="ln_1", parallel_residual=True,
    layout="pre_ln",
)
# SegFormer: pre-LN; a block with sr > 1 is recorded as cross-attention from the patches to its pooled keys, whose
# values v_proj computes from the pooled (convolved, normalised) patches: the same paths serve both kinds.
_SEGFORMER_BLOCK = ValueMap(
    attention="attention", value="attention.v_proj", out="attention.o_proj", residual="layernorm_before",
    block_output="layernorm_after", layout="pre_ln",
)
_SEGFORMER = dataclasses.replace(_SEGFORMER_BLOCK, cross=_SEGFORMER_BLOCK)
# Gemma 2 and 3: pre-LN with a "sandwich" RMSNorm (x / rms(x) * (1 + weight)) on the attention output before the
# residual add; the stream after attention enters pre_feedforward_layernorm.
_GEMMA2 = ValueMap(
    attention="self_attn", value="self_attn.v_proj", out="self_attn.o_proj", residual="input_layernorm",
    block_output="pre_feedforward_layernorm", post_attention_norm="post_attention_layernorm",
    post_attention_norm_offset=1.0, layout="pre_ln",
)
#: ``config.model_type`` -> where its layers keep values, projections and norms (add one: register_value_map).
VALUE_MAPS: dict[str, ValueMap] = {
    "bert": _BERT, "roberta": _BERT, "xlm-roberta": _BERT, "electra": _BERT, "camembert": _BERT,
    "gpt2": _GPT2,
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA,
    "bart": _BART, "marian": _BART, "mbart": _MBART,
    "gpt_neox": _GPT_NEOX, "gptj": _GPTJ, "segformer": _SEGFORMER,
    "gemma2": _GEMMA2, "gemma3_text": _GEMMA2,
}


def value_map(model: Any, kind: str = "values") -> ValueMap:
    """The family's path map; ``kind``: the capture kind that needs it (named in the error)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in VALUE_MAPS:
        raise CaptureUnavailableError(
            f"{kind}=True needs to know where {type(model).__name__} keeps its value vectors, output projection "
            f"and norms; attnflow knows the families {sorted(VALUE_MAPS)} (model_type {model_type!r} is not one). "
            "Describe where its layers keep them with attnflow.adapters.register_value_map(model_type, "
            "attnflow.adapters.ValueMap(...)) (see docs/adapters.md, 'Value maps').", kind=kind,
        )
    return VALUE_MAPS[model_type]


def install(model: Any, targets: list[tuple[str, Any, str, int]], passes: common.TorchPass, torch: Any,
            handles: list[Any]) -> None:
    """Hooks that keep, per layer and call, what the value extras are made of; a finishing step adds them."""
    family = value_map(model)
    modules = dict(model.named_modules())
    config = model.config
    kv_heads_config = getattr(config, "num_key_value_heads", None)
    layers = []
    for path, attention, kind, _ in targets:
        layout = family if kind == "self" else family.cross
        if layout is None:
            if kind == "cross":
                raise CaptureUnavailableError(
                    f"values=True: {type(model).__name__} has cross-attention layers ({path!r}) but its family's path "
                    "map describes no cross-attention block: register one with a ValueMap(cross=...) through "
                    "attnflow.adapters.register_value_map(..., replace=True).",
                    kind="values",
                )
            continue
        if not path.endswith("." + layout.attention):
            continue
        layer = path[: -len(layout.attention) - 1]
        parallel = is_parallel(layout, config)
        parts = {name: _find(modules, layer, relative) for name, relative in (
            ("value", layout.value), ("out", layout.out), ("residual", layout.residual),
            ("norm", layout.norm), ("block_output", None if parallel else layout.block_output),
            ("post_norm", layout.post_attention_norm),
        ) if relative is not None}
        missing = [name for name, module in parts.items() if module is None]
        if missing:
            raise attnflow.AdapterError(f"values=True: layer {layer!r} has no {missing} where its family keeps them.")
        heads = heads_of(attention, config)
        kv_heads = int(kv_heads_config or heads)
        layers.append((path, f"{layer}:{kind}", layout, parts, heads, kv_heads))
    if not layers:
        raise CaptureUnavailableError(
            f"values=True: no self-attention layer of {type(model).__name__} matches its path map.", kind="values")

    def keep(layer: str, slot: str, take_input: bool) -> Any:
        def hook(module: Any, args: tuple, output: Any = None) -> None:
            if passes.active:
                value = args[0] if take_input else (output[0] if isinstance(output, tuple) else output)
                passes.state.values.setdefault(layer, {}).setdefault(slot, []).append(value.detach())

        return hook

    for _, layer, _, parts, _, _ in layers:
        common.register(handles, parts["value"].register_forward_hook, keep(layer, "value", False))
        common.register(handles, parts["residual"].register_forward_pre_hook, keep(layer, "residual", True))
        if "norm" in parts:
            common.register(handles, parts["norm"].register_forward_pre_hook, keep(layer, "norm_input", True))
            common.register(handles, parts["norm"].register_forward_hook, keep(layer, "norm_output", False))
        if "block_output" in parts:
            common.register(handles, parts["block_output"].register_forward_pre_hook, keep(layer, "block_output", True))
        elif "norm" not in parts:  # a parallel residual: the stream after attention is the residual plus this
            common.register(handles, parts["out"].register_forward_hook, keep(layer, "attention_output", False))
        if "post_norm" in parts:
            common.register(handles, parts["post_norm"].register_forward_pre_hook, keep(layer, "post_norm_input", True))

    def finish(p: common.TorchPass) -> None:
        kept = p.state.values
        indices = p.state.indices
        for path, layer, layout, parts, heads, kv_heads in layers:
            seen = kept.get(layer, {})
            for call, index in enumerate(indices.get(path, [])):
                p.recorder.add_extras(index, **_extras(layout, parts, seen, call, heads, kv_heads, layer))

    passes.finishers.append(finish)
    passes.values_layout = family.layout  # type: ignore[attr-defined]


def is_parallel(layout: ValueMap, config: Any) -> bool:
    """Whether ``layout``'s blocks add attention and feed-forward to one residual stream in this model."""
    flag = layout.parallel_residual
    return bool(getattr(config, flag, False)) if isinstance(flag, str) else bool(flag)


def heads_of(attention: Any, config: Any) -> int:
    """The query heads of one attention module: its own count (an encoder-decoder's encoder and decoder, or
    SegFormer's stages, may differ), else the config's."""
    for name in ("num_heads", "num_attention_heads"):
        count = getattr(attention, name, None)
        if isinstance(count, int) and not isinstance(count, bool) and count > 0:
            return count
    count = getattr(config, "num_attention_heads", None)
    if not isinstance(count, int):
        raise attnflow.AdapterError(
            f"values=True: {type(attention).__name__} does not say how many heads it has (num_heads or "
            f"num_attention_heads), and the config's num_attention_heads is {count!r}, not one number."
        )
    return count


def value_slice(value: Any, part: str, heads: int) -> Any:
    """The values in the output of a family's value module: ``(..., heads · d_head)``, each head's slice."""
    if part == "qkv":
        return value[..., 2 * value.shape[-1] // 3 :]
    if part == "qkv_heads":
        size = value.shape[-1] // (3 * heads)
        per_head = value.reshape(*value.shape[:-1], heads, 3 * size)[..., 2 * size :]
        return per_head.reshape(*value.shape[:-1], heads * size)
    return value


def _find(modules: Mapping[str, Any], layer: str, relative: str) -> Any:
    """The first of the ``|``-separated alternatives that ``layer`` has, or None."""
    for option in relative.split("|"):
        found = modules.get(f"{layer}.{option}")
        if found is not None:
            return found
    return None


def _extras(layout: ValueMap, parts: dict[str, Any], seen: dict[str, list[Any]], call: int, heads: int,
            kv_heads: int, layer: str) -> dict[str, np.ndarray]:
    def take(slot: str) -> Any:
        kept = seen.get(slot, [])
        if call >= len(kept):
            raise attnflow.AdapterError(
                f"values=True: the forward pass ran {layer!r} without its {slot!r} module (a cached key-value state, "
                "or a block the model skipped); capture a single forward pass without past_key_values."
            )
        return _wide(kept[call])

    value = value_slice(take("value"), layout.value_part, heads)
    batch, tokens, width = value.shape
    head_size = width // kv_heads
    value = value.reshape(batch, tokens, kv_heads, head_size).transpose(1, 2)
    if kv_heads != heads:
        value = value.repeat_interleave(heads // kv_heads, dim=1)  # query head h reads KV head h // group
    out = parts["out"]
    weight = _wide(out.weight.detach())
    matrix = weight.T if layout.out_kind == "linear" else weight  # (heads * head_size, d_model)
    bias = getattr(out, "bias", None)
    extras = {
        "value": value.cpu().numpy(),
        "out_weight": matrix.reshape(heads, head_size, matrix.shape[-1]).cpu().numpy()[None],
        "out_bias": (np.zeros(matrix.shape[-1], np.float32) if bias is None else _wide(bias.detach()).cpu().numpy())[None],
        "residual": take("residual").cpu().numpy(),
    }
    if layout.norm is not None:
        norm = parts["norm"]
        extras.update(
            norm_input=take("norm_input").cpu().numpy(), norm_output=take("norm_output").cpu().numpy(),
            norm_weight=_wide(norm.weight.detach()).cpu().numpy()[None],
            norm_bias=_wide(norm.bias.detach()).cpu().numpy()[None],
            norm_eps=np.array([float(norm.eps)], np.float64),
        )
    elif "block_output" in parts:
        extras["block_output"] = take("block_output").cpu().numpy()
    else:  # a parallel residual: x + attn(ln1(x)), the feed-forward branch left out
        extras["block_output"] = (take("residual") + take("attention_output")).cpu().numpy()
    if "post_norm" in parts:
        norm = parts["post_norm"]
        extras.update(
            post_norm_input=take("post_norm_input").cpu().numpy(),
            post_norm_weight=(layout.post_attention_norm_offset + _wide(norm.weight.detach()).cpu().numpy())[None],
            post_norm_eps=np.array([float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-6)))], np.float64),
        )
    return extras


_LAYOUTS = ("post_ln", "pre_ln")
_PARTS = ("all", "qkv", "qkv_heads")


def _wide(tensor: Any) -> Any:
    """A float64 model's tensors stay float64 (value-side methods to 1e-9 against another float64 framework);
    others become float32."""
    return tensor.double() if str(tensor.dtype) == "torch.float64" else tensor.float()


def register_value_map(model_type: str, value_map: ValueMap, *, replace: bool = False) -> None:
    """Tell the transformers adapter where a family keeps its value vectors, output projection and norms, so
    that ``values=True`` (norm, norm_residual, alti, effective_attention) and ``value_zeroing=True`` work on it.

    Args:
        model_type: the family's ``config.model_type`` (``"distilbert"``).
        value_map: a :class:`ValueMap` of paths relative to one layer's module (its ``cross`` part for
            encoder-decoders' cross-attention blocks).
        replace: allow replacing a map already registered for ``model_type`` (attnflow's own included).

    Raises:
        attnflow.OptionError: the map is malformed (the message names the field), or ``model_type`` has one
            and ``replace`` is False.
    """
    if not isinstance(model_type, str) or not model_type:
        raise attnflow.OptionError(f"model_type must be a config.model_type string, got {model_type!r}.")
    _check_map(value_map, f"the value map for {model_type!r}")
    if model_type in VALUE_MAPS and not replace:
        raise attnflow.OptionError(
            f"A value map for {model_type!r} is already registered; pass replace=True to override it on purpose."
        )
    VALUE_MAPS[model_type] = value_map


def _check_map(value_map: Any, where: str) -> None:
    if not isinstance(value_map, ValueMap):
        raise attnflow.OptionError(f"{where} must be an attnflow.adapters.ValueMap, got {type(value_map).__name__}.")
    require_paths(value_map, ("attention", "value", "out", "residual"), where, "a module path relative to the layer")
    if value_map.layout not in _LAYOUTS:
        raise attnflow.OptionError(f"{where}: layout must be one of {list(_LAYOUTS)}, got {value_map.layout!r}.")
    parallel = value_map.parallel_residual
    if not isinstance(parallel, (bool, str)) or parallel == "":
        raise attnflow.OptionError(
            f"{where}: parallel_residual must be True, False or the name of the config flag that says so "
            f"(\"use_parallel_residual\"), got {parallel!r}."
        )
    if parallel and value_map.layout == "post_ln":
        raise attnflow.OptionError(
            f"{where}: parallel_residual describes a pre-LN block (x + attn(ln1(x)) + mlp(ln2(x))); use "
            "layout='pre_ln', or leave parallel_residual False for a post-LN block."
        )
    needed = "norm" if value_map.layout == "post_ln" else "block_output"
    if not getattr(value_map, needed) and parallel is not True:
        raise attnflow.OptionError(
            f"{where}: a {value_map.layout} map needs {needed} (see ValueMap's docstring)"
            + (" for the models whose parallel_residual flag is false." if parallel else ".")
        )
    if value_map.post_attention_norm is not None and (value_map.layout != "pre_ln" or parallel):
        raise attnflow.OptionError(
            f"{where}: post_attention_norm describes a sandwich pre-LN block, x + norm(attn(ln1(x))) (Gemma 2/3); "
            "use layout='pre_ln' without parallel_residual, or leave post_attention_norm None."
        )
    if value_map.post_attention_norm is not None and not isinstance(value_map.post_attention_norm, str):
        raise attnflow.OptionError(f"{where}: post_attention_norm must be a module path relative to the layer, got "
                                   f"{value_map.post_attention_norm!r}.")
    if not isinstance(value_map.post_attention_norm_offset, (int, float)) or isinstance(
            value_map.post_attention_norm_offset, bool):
        raise attnflow.OptionError(f"{where}: post_attention_norm_offset must be a number (Gemma's 1 + weight: 1.0), "
                                   f"got {value_map.post_attention_norm_offset!r}.")
    if value_map.value_part not in _PARTS:
        raise attnflow.OptionError(f"{where}: value_part must be one of {list(_PARTS)}, got {value_map.value_part!r}.")
    if value_map.out_kind not in ("linear", "conv1d"):
        raise attnflow.OptionError(f"{where}: out_kind must be 'linear' or 'conv1d', got {value_map.out_kind!r}.")
    if value_map.cross is not None:
        _check_map(value_map.cross, f"{where} (its cross part)")
