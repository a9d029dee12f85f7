"""What the Flax adapters record beside the weights for attnflow's methods: attention gradients (``target=``)
and value-side tensors (``values=True``), in JAX.

Private to attnflow.adapters; jax is imported lazily.

Gradients: after the forward pass the adapter ran and recorded as usual, the same call runs once more under
``jax.grad``, with nothing recorded, as a function of one additive zero perturbation per recorded layer: the
output ``p`` of each attention layer's ``jax.nn.softmax`` becomes ``p + δ`` (δ = 0, so every value is the
model's own), and the gradient of the target score with respect to ``δ`` is the gradient with respect to the
attention probabilities, extra ``"attn_grad"`` ``(batch, heads, queries, keys)``, as the PyTorch adapters
record it. The target is read as they read it (:func:`target_score`).

Value-side tensors: a family of models names its submodules in a :class:`FlaxValueMap` (keyed in
:data:`VALUE_MAPS` by the model's class name), as the PyTorch side does per ``model_type``
(``attnflow.adapters._values``); the adapter keeps the inputs and outputs of those modules during the pass and
adds the same extras the PyTorch adapters add (``value``, ``out_weight``, ``out_bias``, ``residual``, and
post-LN ``norm_input``, ``norm_output``, ``norm_weight``, ``norm_bias``, ``norm_eps``; pre-LN
``block_output``) and ``values_layout`` to the trace's metadata.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, cast

import numpy as np

import attnflow


# -- the target score ---------------------------------------------------------------------------------------
def target_score(output: Any, request: Any, mask: np.ndarray | None, causal: bool | None) -> Any:
    """The scalar whose gradient is taken (a jax value): per item, ``target`` of the model's logits (at the
    target position for per-token logits), summed over the batch; a callable target's per-item scores summed.

    Logits are ``output.logits``, ``output["logits"]``, or the output itself when it is a 2-D or 3-D array.
    The position along the sequence is ``target_position``, else each item's last real token when the model
    is causal, else 0 (the classification token), as the PyTorch adapters read it.
    """
    jax = attnflow.import_optional("jax", "jax")
    jnp = attnflow.import_optional("jax.numpy", "jax")
    target = request.target
    if callable(target):
        return callable_score(target, output)
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if logits is None and isinstance(output, jax.Array) and output.ndim in (2, 3):
        logits = output
    if logits is None:
        raise attnflow.OptionError(
            f"The model's output ({type(output).__name__}) has no logits to take target={target!r} from; pass "
            "target=a callable that maps the output to per-item scores, e.g. lambda out: out[:, 0, 0]."
        )
    batch = logits.shape[0]
    if logits.ndim == 3:
        positions = _positions(request.target_position, mask, causal, batch, logits.shape[1])
        logits = logits[jnp.arange(batch), positions]
    if logits.ndim != 2:
        raise attnflow.OptionError(f"Cannot read a target from logits of shape {tuple(logits.shape)}; pass target=a callable.")
    return logit_score(logits, target)


def callable_score(target: Any, output: Any) -> Any:
    """``target(output)``'s per-item scores, summed (one backward pass for every item)."""
    jax = attnflow.import_optional("jax", "jax")
    score = target(output)
    if not isinstance(score, jax.Array):
        raise attnflow.OptionError(f"target(output) must return a jax array of per-item scores, got {type(score).__name__}.")
    return jax.numpy.sum(score)


def logit_score(logits: Any, target: int | None) -> Any:
    """The summed ``(batch, outputs)`` logit each item's target names: its argmax for None, else that index."""
    jax = attnflow.import_optional("jax", "jax")
    jnp = jax.numpy
    if target is None:
        index = jnp.argmax(jax.lax.stop_gradient(logits), axis=-1)
    else:
        if not isinstance(target, int) or isinstance(target, bool) or not -logits.shape[-1] <= target < logits.shape[-1]:
            raise attnflow.OptionError(
                f"target={target!r} is not an index of the model's {logits.shape[-1]} outputs (classes or vocabulary)."
            )
        index = jnp.full((logits.shape[0],), target % logits.shape[-1])
    return jnp.sum(jnp.take_along_axis(logits, index[:, None], axis=1))


def _positions(position: int | None, mask: np.ndarray | None, causal: bool | None, batch: int, length: int) -> np.ndarray:
    if position is not None:
        if not -length <= position < length:
            raise attnflow.OptionError(f"target_position={position} is outside the {length} positions of the logits.")
        return np.full(batch, position % length)
    if causal:
        if mask is None:
            return np.full(batch, length - 1)
        if tuple(np.shape(mask)) == (batch, length):
            return np.array([int(np.flatnonzero(np.asarray(row))[-1]) for row in mask])
    return np.zeros(batch, dtype=int)


def pass_tokens(layers: Sequence[Any]) -> tuple[np.ndarray | None, bool | None]:
    """``(key mask, causal)`` of the pass's first self-attention layer (what the target position needs)."""
    for layer in layers:
        if layer.kind == "self":
            return layer.keys, layer.causal
    return None, None


def perturbation(shape: tuple[int, ...], delta: Any, name: str) -> Any:
    """A ``perturb(output, axis)`` for :func:`attnflow.adapters._flax_common.perturbing_softmax` that adds
    ``delta`` (laid out as the recorded ``(batch, heads, q, k)``) to the one softmax of a layer's call."""
    seen = [0]

    def perturb(output: Any, axis: Any) -> Any:
        if seen[0]:
            raise attnflow.AdapterError(
                f"{name!r} computed more than one jax.nn.softmax in one call, so the gradient of its attention "
                "probabilities cannot be read by target=; capture without target= (weights alone)."
            )
        if int(np.prod(output.shape)) != int(np.prod(shape)):
            raise attnflow.AdapterError(
                f"{name!r} computed a softmax of shape {tuple(output.shape)} where its recorded attention has shape "
                f"{shape}; target= reads gradients of attention computed by jax.nn.softmax over the key axis."
            )
        seen[0] += 1
        return output + delta.reshape(output.shape).astype(output.dtype)

    perturb.seen = seen  # type: ignore[attr-defined]
    return perturb


# -- value-side tensors ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FlaxValueMap:
    """Where one family of Flax models keeps what norm-based methods need, as ``/``-separated paths relative to
    a layer (the path of the recorded attention module without ``attention``).

    Attributes:
        attention: the recorded attention module (``"attention"``, an ``nnx.MultiHeadAttention``).
        value: the module whose output holds the values, ``(batch, keys, kv_heads, d_head)`` (Flax's
            ``LinearGeneral``) or ``(batch, keys, kv_heads * d_head)``, bias included.
        out: the output projection, a ``kernel`` ``(heads, d_head, d_model)`` or ``(heads * d_head, d_model)``
            (``y = x W + b``) and an optional ``bias``.
        residual: the module whose first input is the residual stream the attention block adds to.
        layout: ``"post_ln"`` (BERT) or ``"pre_ln"``.
        norm: post-LN: the ``LayerNorm`` after attention (``scale``, ``bias``, ``epsilon``).
        block_output: pre-LN: the module whose first input is the residual stream after attention.
    """

    attention: str
    value: str
    out: str
    residual: str
    layout: str
    norm: str | None = None
    block_output: str | None = None

    def taps(self) -> dict[str, tuple[str, str]]:
        """slot -> (relative module path, ``"input"`` or ``"output"``)."""
        taps = {"value": (self.value, "output"), "residual": (self.residual, "input")}
        if self.norm is not None:
            taps["norm_input"] = (self.norm, "input")
            taps["norm_output"] = (self.norm, "output")
        if self.block_output is not None:
            taps["block_output"] = (self.block_output, "input")
        return taps


#: The Flax NNX port of BERT in ``examples/flax_bert.py`` (``encoder/layer/{i}`` with ``attention``, an
#: ``nnx.MultiHeadAttention`` whose ``value``/``out`` are ``LinearGeneral``, and ``attention_norm``).
_FLAX_BERT_PORT = FlaxValueMap(
    attention="attention", value="attention/value", out="attention/out", residual="attention",
    norm="attention_norm", layout="post_ln",
)
#: Class name of the root model -> where its layers keep values, projections and norms.
VALUE_MAPS: dict[str, FlaxValueMap] = {"FlaxBert": _FLAX_BERT_PORT}


def value_map(class_name: str) -> FlaxValueMap:
    if class_name not in VALUE_MAPS:
        raise attnflow.AdapterError(
            f"values=True needs to know where {class_name} keeps its value vectors, output projection and norms; "
            f"for Flax models attnflow knows {sorted(VALUE_MAPS)} (the BERT port in examples/flax_bert.py). Describe "
            "where its layers keep them with attnflow.adapters.register_flax_value_map(class_name, "
            "attnflow.adapters.FlaxValueMap(...)) (see docs/adapters.md, 'Value maps')."
        )
    return VALUE_MAPS[class_name]


def register_flax_value_map(class_name: str, value_map: FlaxValueMap, *, replace: bool = False) -> None:
    """The Flax twin of :func:`attnflow.adapters.register_value_map`: where the layers of the Flax NNX model class
    ``class_name`` (the root module's class name) keep their value vectors, output projection and norms, so that
    ``values=True`` works on it through the ``flax_nnx`` adapter.

    Raises:
        attnflow.OptionError: the map is malformed (the message names the field), or ``class_name`` has one and
            ``replace`` is False.
    """
    if not isinstance(class_name, str) or not class_name:
        raise attnflow.OptionError(f"class_name must be the root model's class name, got {class_name!r}.")
    if not isinstance(value_map, FlaxValueMap):
        raise attnflow.OptionError(f"value_map must be an attnflow.adapters.FlaxValueMap, got {type(value_map).__name__}.")
    for field in ("attention", "value", "out", "residual"):
        if not isinstance(getattr(value_map, field), str) or not getattr(value_map, field):
            raise attnflow.OptionError(f"The Flax value map for {class_name!r}: {field} must be a module path, got "
                                       f"{getattr(value_map, field)!r}.")
    needed = {"post_ln": "norm", "pre_ln": "block_output"}.get(value_map.layout)
    if needed is None or not getattr(value_map, needed):
        raise attnflow.OptionError(f"The Flax value map for {class_name!r}: layout must be 'post_ln' (with norm) or "
                                   f"'pre_ln' (with block_output), got {value_map.layout!r}.")
    if class_name in VALUE_MAPS and not replace:
        raise attnflow.OptionError(f"A Flax value map for {class_name!r} is already registered; pass replace=True.")
    VALUE_MAPS[class_name] = value_map


def layer_of(name: str, layout: FlaxValueMap) -> str | None:
    """The layer path of a recorded attention module's path (None: not the map's attention module)."""
    suffix = "/" + layout.attention
    return name[: -len(suffix)] if name.endswith(suffix) else None


def _array(value: Any) -> np.ndarray:
    jax = attnflow.import_optional("jax", "jax")
    array = np.asarray(jax.device_get(value))
    return array.astype(np.float32) if array.dtype != np.float64 else array


def _parameter(module: Any, name: str) -> np.ndarray | None:
    variable = getattr(module, name, None)
    if variable is None:
        return None
    value = variable.get_value() if hasattr(variable, "get_value") else getattr(variable, "value", variable)
    return _array(value)


def extras(layout: FlaxValueMap, modules: Mapping[str, Any], layer: str, kept: Mapping[str, list[Any]], call: int,
           heads: int) -> dict[str, np.ndarray]:
    """The value extras of call ``call`` of ``layer`` (see the module docstring), from the kept module inputs
    and outputs and the modules' parameters; ``heads``: the recorded attention's query heads."""
    missing = [slot for slot in layout.taps() if len(kept.get(slot, ())) <= call]
    if missing:
        raise attnflow.AdapterError(
            f"values=True: {missing} of layer {layer!r} were not seen during the forward pass: the modules its path "
            "map names did not run there (or ran as JAX tracers: values= needs the forward pass to run eagerly, "
            "not under jax.vmap, jax.grad or nnx.scan)."
        )
    value = _array(kept["value"][call])
    batch, tokens = value.shape[:2]
    if value.ndim == 3:  # (batch, keys, heads * d_head): one KV head per query head
        value = value.reshape(batch, tokens, heads, -1)
    kv_heads = value.shape[2]
    value = value.transpose(0, 2, 1, 3)  # (batch, kv_heads, keys, d_head)
    if kv_heads != heads:
        value = np.repeat(value, heads // kv_heads, axis=1)  # query head h reads KV head h // group
    out = modules[f"{layer}/{layout.out}"]
    kernel = cast(np.ndarray, _parameter(out, "kernel"))  # an output projection has a kernel
    d_head = value.shape[-1]
    matrix = kernel.reshape(heads, d_head, kernel.shape[-1])
    bias = _parameter(out, "bias")
    found = {
        "value": value,
        "out_weight": matrix[None],
        "out_bias": (np.zeros(matrix.shape[-1], np.float32) if bias is None else bias.reshape(-1))[None],
        "residual": _array(kept["residual"][call]),
    }
    if layout.norm is not None:
        norm = modules[f"{layer}/{layout.norm}"]
        scale, shift = _parameter(norm, "scale"), _parameter(norm, "bias")
        width = matrix.shape[-1]
        found.update(
            norm_input=_array(kept["norm_input"][call]), norm_output=_array(kept["norm_output"][call]),
            norm_weight=(np.ones(width, np.float32) if scale is None else scale)[None],
            norm_bias=(np.zeros(width, np.float32) if shift is None else shift)[None],
            norm_eps=np.array([float(getattr(norm, "epsilon", 1e-6))], np.float64),
        )
    else:
        found["block_output"] = _array(kept["block_output"][call])
    return found
