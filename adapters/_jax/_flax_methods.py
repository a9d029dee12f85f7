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
(``attnflow.adapters._torch._values``); the adapter keeps the inputs and outputs of those modules during the pass and
adds the same extras the PyTorch adapters add (``value``, ``out_weight``, ``out_bias``, ``residual``, and
post-LN ``norm_input``, ``norm_output``, ``norm_weight``, ``norm_bias``, ``norm_eps``; pre-LN
``block_output``, and with a sandwich norm ``post_norm_input``, ``post_norm_weight``, ``post_norm_eps``) and
``values_layout`` to the trace's metadata. The linen adapter keeps them from its method
interceptor (parameters from each module's ``params``), the NNX adapter from per-instance class swaps.

Value zeroing (``value_zeroing=True``, NNX and linen; Mohebbi et al., 2023): the layer module of each map (the
block: the attention, its norms and feed-forward) runs again on its recorded call, per item with each token's value
vectors zeroed in turn (:func:`value_zeroing`), as ``attnflow.adapters._torch._value_zeroing`` does for PyTorch. The
NNX adapter calls the block itself, the linen adapter ``apply``-s an unbound copy of it on its own variables.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

import attnflow

from .._maps import require_paths
from ._flax_common import perturbing_softmax


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


def perturbation(shape: tuple[int, ...], delta: Any, name: str, layout: Any = None) -> Any:
    """A ``perturb(output, axis)`` for :func:`attnflow.adapters._jax._flax_common.perturbing_softmax` that adds
    ``delta`` (laid out as the recorded ``(batch, heads, q, k)``) to the one softmax of a layer's call;
    ``layout``: the :class:`~attnflow.adapters._jax._flax_common.Layout` of a module selected with ``modules=`` (None:
    the softmax is laid out ``(batch, heads, q, k)`` already)."""
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
        arranged = delta.reshape(output.shape) if layout is None else layout.from_bhqk(delta, tuple(output.shape))
        return output + arranged.astype(output.dtype)

    perturb.seen = seen  # type: ignore[attr-defined]
    return perturb


def perturbed_call(run: Callable[[], Any], delta: Any, name: str, attention_fn: str, layout: Any = None) -> Any:
    """``run()``, one layer's call in the gradient pass, with ``delta`` added to its softmax (`perturbation`);
    a call that computed no ``jax.nn.softmax`` is refused, naming the attention function that does
    (``attention_fn``, e.g. ``"nn.dot_product_attention"``)."""
    perturb = perturbation(tuple(delta.shape), delta, name, layout)
    with perturbing_softmax(perturb):
        result = run()
    if not perturb.seen[0]:
        raise attnflow.AdapterError(
            f"target=: {name!r} computed its attention without jax.nn.softmax, so the gradient of its "
            f"probabilities cannot be read; use {attention_fn} (Flax's default attention_fn)."
        )
    return result


def attention_gradients(layers: Sequence[Any], request: Any, forward: Any, hint: str) -> None:
    """Add ``"attn_grad"`` to each recorded layer: the gradient (``jax.grad``) of the target score of
    ``forward(deltas)`` (the pass's call run again with ``deltas[i]``, zeros of the recorded ``(batch, heads, q,
    k)`` shape, added to layer ``i``'s probabilities) with respect to the deltas. ``hint``: what makes the model
    differentiable as called, for the error of a failed gradient pass."""
    jax = attnflow.import_optional("jax", "jax")
    jnp = jax.numpy
    mask, causal = pass_tokens(layers)
    dtypes = [layer.source_dtype if layer.source_dtype in ("float32", "float64", "bfloat16", "float16") else "float32"
              for layer in layers]
    zeros = [jnp.zeros(layer.weights.shape, dtype) for layer, dtype in zip(layers, dtypes)]
    raised: list[BaseException] = []  # what the model or the target raised goes to the caller unchanged

    def score(deltas: list) -> Any:
        try:
            return target_score(forward(deltas), request, mask, causal)
        except BaseException as exc:
            raised.append(exc)
            raise

    try:
        grads = jax.grad(score)(zeros)
    except Exception as exc:
        if exc in raised or type(exc).__module__.startswith("attnflow"):
            raise
        raise attnflow.AdapterError(
            f"target=: the gradient pass (the forward call again under jax.grad) failed: {type(exc).__name__}: "
            f"{exc}. The model must be differentiable as called ({hint})."
        ) from exc
    for layer, grad in zip(layers, grads):
        layer.extras["attn_grad"] = _array(grad)


# -- value-side tensors ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FlaxValueMap:
    """Where one family of Flax models keeps what norm-based methods need, as ``/``-separated paths relative to
    a layer (the path of the recorded attention module without ``attention``).

    Attributes:
        attention: the recorded attention module (``"attention"``, an ``nnx.MultiHeadAttention``).
        value: the module whose output holds the values, ``(batch, keys, kv_heads, d_head)`` (Flax's
            ``LinearGeneral``) or ``(batch, keys, kv_heads * d_head)``, bias included; ``|``-separated
            alternatives: the first that ran (gemma: ``kv_einsum`` or, with as many KV heads as query heads,
            ``qkv_einsum``).
        value_index: where the value module stacks several projections on its first axis (gemma's
            ``kv_einsum``: ``(2, batch, keys, kv_heads, d_head)``, keys then values; ``qkv_einsum``: 3), the
            index of the values there (``-1``: the last, both of gemma's); None: the output is the values.
        out: the output projection, a parameter ``out_parameter`` (``"kernel"``; gemma's ``Einsum``: ``"w"``)
            ``(heads, d_head, d_model)`` or ``(heads * d_head, d_model)`` (``y = x W + b``) and an optional ``bias``.
        residual: the module whose first input is the residual stream the attention block adds to.
        layout: ``"post_ln"`` (BERT) or ``"pre_ln"``.
        norm: the norm the attention output passes (parameter ``scale``, ``epsilon`` else 1e-6): post-LN, the
            ``LayerNorm`` after the residual add (``scale``, ``bias``, ``epsilon``); pre-LN, a "sandwich" RMSNorm
            before it, ``x + norm(attn(ln1(x)))`` (Gemma 2 and 3's ``post_attention_norm``), where the layer has
            one (Gemma 1's layers have none), its scale ``norm_scale_offset + scale`` (gemma: ``1 + scale``).
        block_output: pre-LN: the module whose first input is the residual stream after attention.
    """

    attention: str
    value: str
    out: str
    residual: str
    layout: str
    norm: str | None = None
    block_output: str | None = None
    value_index: int | None = None
    out_parameter: str = "kernel"
    norm_scale_offset: float = 0.0

    def value_taps(self) -> dict[str, str]:
        """slot -> relative path of each of :attr:`value`'s ``|`` alternatives, in map order."""
        return {_value_slot(i): path for i, path in enumerate(self.value.split("|"))}

    def taps(self) -> dict[str, tuple[str, str]]:
        """slot -> (relative module path, ``"input"`` or ``"output"``)."""
        taps = {slot: (path, "output") for slot, path in self.value_taps().items()}
        taps["residual"] = (self.residual, "input")
        if self.norm is not None:
            taps["norm_input"] = (self.norm, "input")
            taps["norm_output"] = (self.norm, "output")
        if self.block_output is not None:
            taps["block_output"] = (self.block_output, "input")
        return taps


#: value_zeroing=True: the slots where the NNX and linen adapters keep each layer block's call and output.
BLOCK_CALL, BLOCK_OUTPUT = "block_call", "block_result"


def _value_slot(alternative: int) -> str:
    return "value" if alternative == 0 else f"value#{alternative}"


#: The Flax NNX port of BERT in ``examples/flax_bert.py`` (``encoder/layer/{i}`` with ``attention``, an
#: ``nnx.MultiHeadAttention`` whose ``value``/``out`` are ``LinearGeneral``, and ``attention_norm``).
_FLAX_BERT_PORT = FlaxValueMap(
    attention="attention", value="attention/value", out="attention/out", residual="attention",
    norm="attention_norm", layout="post_ln",
)
#: Class name of the root model -> where its layers keep values, projections and norms.
VALUE_MAPS: dict[str, FlaxValueMap] = {"FlaxBert": _FLAX_BERT_PORT}


def value_map(class_name: str, kind: str = "values") -> FlaxValueMap:
    """The map registered for a root model class; ``kind``: the capture keyword that needs it (named in the error,
    a :class:`~attnflow.recording.CaptureUnavailableError` of that kind, so that ``methods="all"`` skips its
    methods)."""
    if class_name not in VALUE_MAPS:
        from attnflow.recording import CaptureUnavailableError

        raise CaptureUnavailableError(
            f"{kind}=True needs to know where {class_name} keeps its value vectors, output projection and norms; "
            f"for Flax models attnflow knows {sorted(VALUE_MAPS)} (the BERT port in examples/flax_bert.py). Describe "
            "where its layers keep them with attnflow.adapters.register_flax_value_map(class_name, "
            "attnflow.adapters.FlaxValueMap(...)) (see docs/adapters.md, 'Value maps').", kind=kind,
        )
    return VALUE_MAPS[class_name]


def register_flax_value_map(class_name: str, value_map: FlaxValueMap, *, replace: bool = False) -> None:
    """The Flax twin of :func:`attnflow.adapters.register_value_map`: where the layers of the Flax model class
    ``class_name`` (the root module's class name, NNX or linen) keep their value vectors, output projection and
    norms, so that ``values=True`` works on it through the ``flax_nnx`` and ``flax_linen`` adapters (and
    ``value_zeroing=True`` through both: the layer, the map's paths' common prefix, is the block re-run).

    Raises:
        attnflow.OptionError: the map is malformed (the message names the field), or ``class_name`` has one and
            ``replace`` is False.
    """
    if not isinstance(class_name, str) or not class_name:
        raise attnflow.OptionError(f"class_name must be the root model's class name, got {class_name!r}.")
    if not isinstance(value_map, FlaxValueMap):
        raise attnflow.OptionError(f"value_map must be an attnflow.adapters.FlaxValueMap, got {type(value_map).__name__}.")
    require_paths(value_map, ("attention", "value", "out", "residual"), f"The Flax value map for {class_name!r}",
                  "a module path")
    if value_map.value_index is not None and (not isinstance(value_map.value_index, int)
                                              or isinstance(value_map.value_index, bool)):
        raise attnflow.OptionError(f"The Flax value map for {class_name!r}: value_index must be an int (the values' "
                                   f"index on the value module's first axis) or None, got {value_map.value_index!r}.")
    if not isinstance(value_map.out_parameter, str) or not value_map.out_parameter:
        raise attnflow.OptionError(f"The Flax value map for {class_name!r}: out_parameter must name the output "
                                   f"projection's parameter ('kernel', 'w'), got {value_map.out_parameter!r}.")
    offset = value_map.norm_scale_offset
    if not isinstance(offset, (int, float)) or isinstance(offset, bool):
        raise attnflow.OptionError(f"The Flax value map for {class_name!r}: norm_scale_offset must be a number "
                                   f"(gemma's 1 + scale: 1.0), got {offset!r}.")
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


def mapped_layers(layers: Sequence[Any], layout: FlaxValueMap) -> Iterator[tuple[Any, str, int]]:
    """``(layer, layer path, call)`` for every recorded self-attention layer the map names, in call order; ``call``:
    which call of that layer in the pass it is (a layer called twice in one pass takes its second kept inputs)."""
    calls: dict[str, int] = {}
    for layer in layers:
        path = layer_of(layer.name, layout) if layer.kind == "self" else None
        if path is not None:
            calls[path] = calls.get(path, -1) + 1
            yield layer, path, calls[path]


def value_alternative(layout: FlaxValueMap, kept: Mapping[str, list[Any]], call: int, block: str, example: str) -> str:
    """The value module (path relative to the layer) of the map's ``|`` alternatives that call ``call`` of the layer
    block at ``block`` ran first in map order, from the arrays kept at its taps. None ran: an AdapterError, whose
    hint names ``example``, the module the framework's own attention keeps its values in."""
    ran = next((path for slot, path in layout.value_taps().items() if len(kept.get(slot, ())) > call), None)
    if ran is None:
        raise attnflow.AdapterError(
            f"value_zeroing=True: no value module the value map names ({layout.value!r}) ran in the block "
            f"{block!r}; FlaxValueMap.value must name the module, relative to the layer, whose output is the "
            f"values ({example})."
        )
    return ran


def _array(value: Any) -> np.ndarray:
    jax = attnflow.import_optional("jax", "jax")
    array = np.asarray(jax.device_get(value))
    return array.astype(np.float32) if array.dtype != np.float64 else array


def _parameter(module: Any, name: str) -> np.ndarray | None:
    """Parameter ``name`` of an NNX module (a ``Variable`` attribute) or of a linen module (its ``params`` as a
    mapping)."""
    variable = module.get(name) if isinstance(module, Mapping) else getattr(module, name, None)
    if variable is None:
        return None
    value = variable.get_value() if hasattr(variable, "get_value") else getattr(variable, "value", variable)
    return _array(value)


def require_eager(collector: Any) -> None:
    """target=, values= and value_zeroing= re-run or read the pass's own calls: its attention must have been
    concrete (a pass whose layers were sent out of traced code is refused)."""
    current = collector.current
    if current is not None and current.pending:
        raise attnflow.AdapterError(
            "target=, values= and value_zeroing= need the forward pass to run eagerly: this one ran its attention as "
            "JAX tracers (under jax.vmap, jax.grad, scan or remat). Capture the model called directly."
        )


def add_value_extras(layers: Sequence[Any], layout: FlaxValueMap, modules: Mapping[str, Any],
                     kept: Mapping[str, Mapping[str, list[Any]]]) -> None:
    """Add the value extras (:func:`extras`) to every recorded self-attention layer the map names (in call order:
    a layer called twice in one pass takes its second kept inputs the second time)."""
    matched = 0
    for layer, path, call in mapped_layers(layers, layout):
        layer.extras.update(extras(layout, modules, path, kept.get(path, {}), call, layer.weights.shape[1]))
        matched += 1
    if layers and not matched:
        raise unmapped_error("values", layers, layout)


def unmapped_error(kind: str, layers: Sequence[Any], layout: FlaxValueMap) -> Exception:
    """The error of a pass none of whose recorded self-attention layers is the map's attention module; ``kind``:
    the capture keyword (``"values"``, ``"value_zeroing"``)."""
    return attnflow.AdapterError(
        f"{kind}=True: no recorded self-attention layer ({layers[0].name!r}...) is the {layout.attention!r} module "
        "its path map names (FlaxValueMap.attention: the attention module's path relative to its layer)."
    )


def _epsilon(norm: Any) -> float:
    epsilon = norm.get("epsilon") if isinstance(norm, Mapping) else getattr(norm, "epsilon", None)
    return 1e-6 if epsilon is None else float(epsilon)


def extras(layout: FlaxValueMap, modules: Mapping[str, Any], layer: str, kept: Mapping[str, list[Any]], call: int,
           heads: int) -> dict[str, np.ndarray]:
    """The value extras of call ``call`` of ``layer`` (see the module docstring), from the kept module inputs
    and outputs and the modules' parameters; ``heads``: the recorded attention's query heads."""
    ran = [slot for slot in layout.taps() if len(kept.get(slot, ())) > call]
    missing = [slot for slot in layout.taps() if slot not in ran and not slot.startswith("value")
               and not (layout.layout == "pre_ln" and slot.startswith("norm_"))]  # a sandwich norm where there is one
    values = [slot for slot in ran if slot.startswith("value")]
    if not values:
        missing.insert(0, "value")
    if missing:
        raise attnflow.AdapterError(
            f"values=True: {missing} of layer {layer!r} were not seen during the forward pass: the modules its path "
            "map names did not run there (or ran as JAX tracers: values= needs the forward pass to run eagerly, "
            "not under jax.vmap, jax.grad or nnx.scan)."
        )
    value = _array(kept[values[0]][call])
    if layout.value_index is not None:
        value = value[layout.value_index]  # one of the projections stacked on the first axis
    batch, tokens = value.shape[:2]
    if value.ndim == 3:  # (batch, keys, heads * d_head): one KV head per query head
        value = value.reshape(batch, tokens, heads, -1)
    kv_heads = value.shape[2]
    value = value.transpose(0, 2, 1, 3)  # (batch, kv_heads, keys, d_head)
    if kv_heads != heads:
        value = np.repeat(value, heads // kv_heads, axis=1)  # query head h reads KV head h // group
    sandwich = layout.layout == "pre_ln" and layout.norm is not None and "norm_input" in ran
    norm_path = layout.norm if layout.layout == "post_ln" or sandwich else None
    absent = [path for path in (layout.out, norm_path) if path is not None and f"{layer}/{path}" not in modules]
    if absent:
        raise attnflow.AdapterError(f"values=True: layer {layer!r} has no module {absent[0]!r} that its value map names "
                                    "(or it did not run during the forward pass).")
    out = modules[f"{layer}/{layout.out}"]
    kernel = _parameter(out, layout.out_parameter)
    if kernel is None:
        raise attnflow.AdapterError(f"values=True: the output projection {layout.out!r} of layer {layer!r} has no "
                                    f"parameter {layout.out_parameter!r} (FlaxValueMap.out_parameter names it).")
    d_head = value.shape[-1]
    matrix = kernel.reshape(heads, d_head, kernel.shape[-1])
    bias = _parameter(out, "bias")
    found = {
        "value": value,
        "out_weight": matrix[None],
        "out_bias": (np.zeros(matrix.shape[-1], matrix.dtype) if bias is None else bias.reshape(-1))[None],
        "residual": _array(kept["residual"][call]),
    }
    if layout.layout == "pre_ln":
        found["block_output"] = _array(kept["block_output"][call])
        if sandwich:
            norm = modules[f"{layer}/{layout.norm}"]
            scale = _parameter(norm, "scale")
            width = matrix.shape[-1]
            found.update(
                post_norm_input=_array(kept["norm_input"][call]),
                post_norm_weight=(layout.norm_scale_offset + (np.zeros(width, matrix.dtype) if scale is None
                                                              else scale))[None],
                post_norm_eps=np.array([_epsilon(norm)], np.float64),
            )
    else:
        norm = modules[f"{layer}/{layout.norm}"]
        kind = norm.get("class", "") if isinstance(norm, Mapping) else type(norm).__name__
        if "RMS" in str(kind):
            raise attnflow.AdapterError(
                f"values=True: the value map puts {kind} {layout.norm!r} after the attention of layer {layer!r} "
                "(post_ln), but norm-based methods decompose a post-LN block through a LayerNorm (mean removed); "
                "an RMSNorm before attention is a 'pre_ln' map: FlaxValueMap(layout='pre_ln', block_output=...) "
                "naming the module whose input is the residual stream after attention (and norm=... for an RMSNorm "
                "on the attention output before the residual add, Gemma 2/3's sandwich post_attention_norm)."
            )
        scale, shift = _parameter(norm, "scale"), _parameter(norm, "bias")
        width = matrix.shape[-1]
        found.update(
            norm_input=_array(kept["norm_input"][call]), norm_output=_array(kept["norm_output"][call]),
            norm_weight=(np.ones(width, matrix.dtype) if scale is None else scale)[None],
            norm_bias=(np.zeros(width, matrix.dtype) if shift is None else shift)[None],
            norm_eps=np.array([_epsilon(norm)], np.float64),
        )
    return found


# -- value zeroing ---------------------------------------------------------------------------------------------
#: Zeroed variants of one item run through a layer at a time (bounds the memory of long inputs).
ZEROING_CHUNK = 64


def _first(output: Any) -> Any:
    return output[0] if isinstance(output, (tuple, list)) else output


def variants(value: Any, b: int, batch: int, count: int) -> Any:
    """Item ``b`` of every batch-first array in ``value`` (tuples, lists and dicts searched), repeated ``count``
    times along the batch axis; arrays every item shares (batch axis 1) are repeated too, 0-d and 1-d arrays
    (positions) and everything else are kept."""
    jnp = attnflow.import_optional("jax.numpy", "jax")
    shape = getattr(value, "shape", None)
    if shape is not None and getattr(value, "ndim", 0) >= 2:
        if shape[0] == batch and batch > 1:
            value = value[b : b + 1]
        return jnp.broadcast_to(value, (count, *value.shape[1:])) if value.shape[0] == 1 else value
    if isinstance(value, (tuple, list)):
        return type(value)(variants(item, b, batch, count) for item in value)
    if isinstance(value, Mapping):
        return {key: variants(item, b, batch, count) for key, item in value.items()}
    return value


def value_zeroing(rerun: Any, args: tuple, kwargs: dict, original: Any, keys: np.ndarray | None,
                  causal: bool | None) -> np.ndarray:
    """Value zeroing (Mohebbi et al., 2023) of one self-attention layer: ``(batch, queries, keys)`` float64
    cosine distances ``1 - cos(output_i, original output_i)`` (as ``‖â - b̂‖² / 2`` of the unit vectors) of the
    layer's outputs with each real key token's value vectors zeroed in turn; 0 on padding and, when ``causal``,
    on future keys.

    ``rerun(args, kwargs, keep)`` runs the layer (the block: attention, feed-forward, norms) on the given
    arguments, ``(count, keys)`` ``keep`` multiplying its value vectors (variant ``k`` zeroes one token);
    ``args``/``kwargs``: the layer's recorded call, ``original``: its recorded output; ``keys``: the real-token
    mask ``(batch, keys)`` (None: every token is real).
    """
    jax = attnflow.import_optional("jax", "jax")
    reference_all = np.asarray(jax.device_get(_first(original)), np.float64)
    batch, length = reference_all.shape[:2]
    out = np.zeros((batch, length, length))
    distances = np.zeros((length, length))  # [i, j]: every position zeroed, padding too (the same shapes each
    # time, so that the re-runs reuse what jax compiled for the first), then cropped to the real tokens
    for b in range(batch):
        real = np.arange(length) if keys is None else np.flatnonzero(np.asarray(keys[b]))
        reference = reference_all[b] / np.linalg.norm(reference_all[b], axis=-1, keepdims=True)
        for start in range(0, length, ZEROING_CHUNK):
            positions = np.arange(start, min(start + ZEROING_CHUNK, length))
            keep = np.ones((positions.size, length))
            keep[np.arange(positions.size), positions] = 0.0
            result = rerun(variants(args, b, batch, positions.size), variants(kwargs, b, batch, positions.size), keep)
            hidden = np.asarray(jax.device_get(_first(result)), np.float64)  # (variants, queries, d)
            unit = hidden / np.linalg.norm(hidden, axis=-1, keepdims=True)
            distances[:, positions] = 0.5 * ((unit - reference[None]) ** 2).sum(-1).T  # (queries i, variants j)
        out[b][np.ix_(real, real)] = distances[np.ix_(real, real)]
        if causal:
            out[b] = np.tril(out[b])  # j > i: a future token, which a causal layer cannot read
    return out


def zeroed(output: Any, keep: Any, index: int | None = None) -> Any:
    """A value module's output ``(variants, keys, ...)`` with ``keep`` ``(variants, keys)`` multiplied in;
    ``index`` (:attr:`FlaxValueMap.value_index`): the output stacks several projections on its first axis,
    ``(stack, variants, keys, ...)``, and only the values at ``index`` there are multiplied."""
    jnp = attnflow.import_optional("jax.numpy", "jax")
    if index is not None:
        return output.at[index].set(zeroed(output[index], keep))
    factor = jnp.asarray(keep, output.dtype)
    return output * factor.reshape(*factor.shape, *(1,) * (output.ndim - 2))
