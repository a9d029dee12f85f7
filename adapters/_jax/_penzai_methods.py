"""What the penzai adapter records beside the weights for attnflow's methods: attention gradients
(``target=``), value-side tensors (``values=True``) and value-zeroing scores (``value_zeroing=True``).

Private to attnflow.adapters; jax and penzai are imported lazily.

penzai layers are immutable pytrees, so the extra computations run on *modified copies* of the model, built
with ``pz.select`` from a copy whose parameters are frozen (``pz.freeze_params``), compiled once with
``jax.jit`` and reused: nothing in the attached model changes, and a second capture of a model of the same
structure and shapes reuses the compiled code.

Gradients: after the forward pass was recorded, the same call (the model's argument and side inputs) runs
again under ``jax.grad``, with nothing recorded, on a copy in which each recorded attention layer's
``query_key_to_attn`` is followed by the addition of a zero named array ``δ`` of the probabilities' named
shape: every value is the model's own, and the gradient of the target score with respect to ``δ`` is the
gradient with respect to the attention probabilities, extra ``"attn_grad"`` ``(batch, heads, queries, keys)``
laid out as the weights (heads group-major). The target is read as the PyTorch adapters read it: an int is a
vocabulary logit (of the model's output ``{batch, seq, vocabulary}``) at each item's last real token for a
causal model (``target_position`` overrides), None each item's argmax there, a callable maps the model's
output to per-item scores.

Value-side tensors: a :class:`PenzaiValueMap` says where the layers of a family of penzai models keep their
attention branch; the adapter keeps, during the recorded pass, the output of each attention's
``input_to_value`` (the value vectors), the input of its branch (the residual stream: pre-LN, the branch
starts with the norm) and the branch's output, and adds the extras the PyTorch adapters add
(``attnflow.adapters._torch._values``): ``value`` ``(batch, heads, keys, d_head)`` (a grouped-query KV head repeated
for its query heads), ``out_weight`` ``(1, heads, d_head, d_model)`` and ``out_bias`` ``(1, d_model)`` from the
``Linear`` and ``AddBias`` of ``attn_value_to_output``, ``residual`` and ``block_output`` ``(batch, queries,
d_model)`` (``residual + branch output``: the residual stream after attention; for a model whose attention and
feed-forward run in parallel, as GPT-NeoX, the stream the attention alone gives), and ``values_layout``
``"pre_ln"`` in the trace's metadata. Where the branch ends with an RMSNorm after the attention (Gemma 2's
``post_attention_norm``: ``x + post_norm(attn(pre_norm(x)))``, :attr:`PenzaiValueMap.post_attention_norm`), the
extras of the core's "sandwich" norm (``attnflow.methods._decompose``) too: ``post_norm_input`` ``(batch, queries,
d_model)`` (the attention's output, kept as the norm's input), ``post_norm_weight`` ``(1, d_model)`` (the scale
the norm multiplies by: penzai's Gemma converter stores Gemma's ``1 + scale`` in it) and ``post_norm_eps`` ``(1,)``.

Value zeroing (Mohebbi et al., 2023): each block (the layer the map names: attention, feed-forward, norms) is
run again on its recorded input, for every item with each token's value vectors zeroed in turn (one batch of
``seq`` variants per item, compiled once per block structure and shape), and ``1 - cos(output_i, original
output_i)`` (float64, as ``‖â - b̂‖² / 2`` of the unit vectors) is entry ``[i, j]`` of extra
``"value_zeroing"`` ``(batch, queries, keys)``; 0 on padding and on a causal layer's future keys, as the
PyTorch adapters record it.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np

import attnflow
from attnflow.recording import CaptureUnavailableError

from .._maps import require_paths
from ._flax_methods import callable_score, logit_score

_HEAD_ORDER = ("head_groups", "query_heads", "heads")

# -- the quiet passes: nothing is recorded while one runs (the gradient pass, the value-zeroing re-runs) ------
_quiet = threading.local()


def quiet() -> bool:
    return getattr(_quiet, "depth", 0) > 0


@contextmanager
def quietly() -> Iterator[None]:
    """Run penzai layers unrecorded, with jax.jit enabled again (the attach disables it), in this thread."""
    jax = attnflow.import_optional("jax", "jax")
    _quiet.depth = getattr(_quiet, "depth", 0) + 1
    try:
        with jax.disable_jit(False):
            yield
    finally:
        _quiet.depth -= 1


def _pz() -> Any:
    return attnflow.import_optional("penzai.pz", "penzai")


def path_name(path: tuple) -> str:
    parts = []
    for key in path:
        for attribute in ("name", "idx", "key"):
            if hasattr(key, attribute):
                parts.append(str(getattr(key, attribute)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def layers_by_path(model: Any) -> dict[str, Any]:
    """Every ``pz.nn.Layer`` of ``model`` (itself included, as ``""``) by its path, in pytree order."""
    jax = attnflow.import_optional("jax", "jax")
    pz = _pz()
    found: dict[str, Any] = {}

    def walk(layer: Any, prefix: tuple) -> None:
        found[path_name(prefix)] = layer
        children, _ = jax.tree_util.tree_flatten_with_path(
            layer, is_leaf=lambda x: x is not layer and isinstance(x, pz.nn.Layer))
        for path, child in children:
            if isinstance(child, pz.nn.Layer):
                walk(child, prefix + tuple(path))

    walk(model, ())
    return found


def _join(*parts: str) -> str:
    return "/".join(part for part in parts if part)


# -- layers of the modified copies -----------------------------------------------------------------------------
@functools.cache
def _layer_classes() -> tuple[type, type]:
    pz = _pz()

    @pz.pytree_dataclass
    class AddZero(pz.nn.Layer):  # type: ignore[name-defined]
        """``x + delta``: the additive zero whose gradient is the gradient of ``x`` (attnflow's target=)."""

        delta: Any

        def __call__(self, x: Any, **side_inputs: Any) -> Any:
            return x + self.delta

    @pz.pytree_dataclass
    class Rescale(pz.nn.Layer):  # type: ignore[name-defined]
        """``x * keep``: ``keep`` is 0 at the token whose values are zeroed (attnflow's value_zeroing=)."""

        keep: Any

        def __call__(self, x: Any, **side_inputs: Any) -> Any:
            return x * self.keep.astype(x.dtype)

    return AddZero, Rescale


def frozen(model: Any) -> Any:
    """``model`` with its parameters frozen into pytree leaves (what jax.jit takes as an argument)."""
    pz = _pz()
    return pz.freeze_params(model)


def _replaced(model: Any, paths: Mapping[str, Any]) -> Any:
    """``model`` with the layer at each path (as :func:`layers_by_path` names them) replaced by
    ``make(layer)``."""
    pz = _pz()
    wanted = dict(paths)

    def replace(keypath: tuple, layer: Any) -> Any:
        make = wanted.get(path_name(keypath))
        return make(layer) if make is not None else layer

    return pz.select(model).at_subtrees_where(lambda keypath, x: path_name(keypath) in wanted,
                                              with_keypath=True).apply(replace, with_keypath=True)


# -- target= -----------------------------------------------------------------------------------------------------
def named_shape(array: Any) -> tuple[tuple[str, int], ...]:
    return tuple((str(name), int(size)) for name, size in array.named_shape.items())


def positional_logits(output: Any) -> Any:
    """The model's logits as a positional ``(batch, seq, vocab)`` (or ``(batch, vocab)``) array, or None."""
    names = list(getattr(output, "named_shape", ()))
    if not names or getattr(output, "positional_shape", None):
        return None
    rest = [name for name in names if name not in ("batch", "seq")]
    if "batch" not in names or len(rest) != 1:
        return None
    order = ["batch", *(["seq"] if "seq" in names else []), rest[0]]
    return output.untag(*order).unwrap()


def target_positions(position: int | None, mask: np.ndarray | None, causal: bool | None, batch: int,
                     length: int) -> np.ndarray:
    """Where along the sequence the target logit is read: ``target_position``, else each item's last real
    token when the model is causal, else 0 (as the PyTorch adapters read it)."""
    if position is not None:
        if not -length <= position < length:
            raise attnflow.OptionError(f"target_position={position} is outside the {length} positions of the logits.")
        return np.full(batch, position % length)
    if causal:
        if mask is not None and tuple(np.shape(mask)) == (batch, length):
            return np.array([int(np.flatnonzero(np.asarray(row))[-1]) if np.any(row) else length - 1 for row in mask])
        return np.full(batch, length - 1)
    return np.zeros(batch, dtype=int)


def _score(model: Any, deltas: dict[str, Any], argument: Any, side_inputs: dict[str, Any], positions: Any,
           target: Any) -> Any:
    """The target score of the model's output with ``deltas`` added to the probabilities of the attention
    layers at their paths (traced under jax.grad and jax.jit)."""
    jnp = attnflow.import_optional("jax.numpy", "jax")
    pz = _pz()
    add_zero, _ = _layer_classes()
    perturbed = _replaced(model, {
        path: (lambda attention, delta=delta: dataclasses.replace(
            attention, query_key_to_attn=pz.nn.Sequential([attention.query_key_to_attn, add_zero(delta)])))
        for path, delta in deltas.items()
    })
    output = perturbed(argument, **side_inputs)
    if callable(target):
        return callable_score(target, output)
    logits = positional_logits(output)
    if logits is None or logits.ndim not in (2, 3):
        raise attnflow.OptionError(
            f"The penzai model's output ({getattr(output, 'named_shape', type(output).__name__)}) is not logits "
            "{batch, seq, vocabulary} to take target=" + repr(target) + " from; pass target=a callable that maps "
            "the output to per-item scores."
        )
    if logits.ndim == 3:
        logits = logits[jnp.arange(logits.shape[0]), positions]
    return logit_score(logits, target)


@functools.cache
def _gradient_function() -> Any:
    jax = attnflow.import_optional("jax", "jax")
    return jax.jit(jax.grad(_score, argnums=1), static_argnames=("target",))


def gradients(model: Any, argument: Any, side_inputs: dict[str, Any], shapes: Mapping[str, tuple],
              dtypes: Mapping[str, str], positions: np.ndarray, target: Any) -> dict[str, Any]:
    """Path -> the gradient of the target score with respect to the probabilities of that attention layer
    (a named array of the probabilities' named shape)."""
    jnp = attnflow.import_optional("jax.numpy", "jax")
    pz = _pz()
    deltas = {
        path: pz.nx.wrap(jnp.zeros(tuple(size for _, size in shape), dtypes[path])).tag(*(name for name, _ in shape))
        for path, shape in shapes.items()
    }
    with quietly():
        return _gradient_function()(frozen(model), deltas, argument, side_inputs, jnp.asarray(positions),
                                    target=target)


# -- values=True ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PenzaiValueMap:
    """Where the blocks of one family of penzai models keep their attention branch, as ``/``-separated paths
    relative to a block (the path of the recorded ``pz.nn.Attention`` without ``attention``).

    Attributes:
        attention: the attention layer in a block.
        branch: the layer whose output the block adds to the residual stream, and whose input is that stream
            (pre-LN: the branch begins with the norm and ends with ``attention``, the branch's last sublayer).
        value: relative to ``attention``: the layer whose output holds the values (``input_to_value``).
        out: relative to ``attention``: the layer that holds the output projection, one ``pz.nn.Linear`` and
            at most one ``pz.nn.AddBias`` (``attn_value_to_output``).
        layout: ``"pre_ln"`` (penzai's transformer variants all normalise before attention).
        post_attention_norm: a "sandwich" norm on the attention's output before the residual add, where the
            branch has one (Gemma 2's): the branch's last sublayer, right after ``attention``, an RMSNorm
            (``pz.nn.RMSLayerNorm``: ``RMSStandardize``, then a ``Linear`` scale); decomposed with its denominator
            held constant (Kobayashi et al., 2021). None: the branch ends with ``attention``.
    """

    attention: str
    branch: str
    value: str = "input_to_value"
    out: str = "attn_value_to_output"
    layout: str = "pre_ln"
    post_attention_norm: str | None = None


#: penzai's GPT-NeoX (``gpt_neox.build_gpt_neox_transformer``): attention and feed-forward in parallel branches of
#: a ``BranchAndAddTogether`` whose first branch is the identity.
_GPT_NEOX = PenzaiValueMap(attention="sublayers/0/branches/1/sublayers/1", branch="sublayers/0/branches/1")
#: penzai's Llama, Mistral and Gemma (``llamalike_common.build_llamalike_transformer``): ``Residual`` blocks whose
#: ``delta`` is the norm and the attention.
_LLAMALIKE = PenzaiValueMap(attention="sublayers/0/delta/sublayers/1", branch="sublayers/0/delta")
#: penzai's Gemma 2 (``use_post_attn_norm=True``): the same blocks, whose ``delta`` ends with the post-attention norm.
_GEMMA2 = dataclasses.replace(_LLAMALIKE, post_attention_norm="sublayers/0/delta/sublayers/2")
#: Name -> where a family of penzai models keeps its attention branch; the first map that fits the model serves.
VALUE_MAPS: dict[str, PenzaiValueMap] = {"gpt_neox": _GPT_NEOX, "llama": _LLAMALIKE, "mistral": _LLAMALIKE,
                                         "gemma": _LLAMALIKE, "gemma2": _GEMMA2}


def register_penzai_value_map(name: str, value_map: PenzaiValueMap, *, replace: bool = False) -> None:
    """Tell the penzai adapter where the blocks of a family of penzai models keep their attention branch, so
    that ``values=True`` and ``value_zeroing=True`` work on it (see :class:`PenzaiValueMap`).

    Raises:
        attnflow.OptionError: the map is malformed (the message names the field), or ``name`` has one and
            ``replace`` is False.
    """
    if not isinstance(name, str) or not name:
        raise attnflow.OptionError(f"name must be a non-empty string, got {name!r}.")
    if not isinstance(value_map, PenzaiValueMap):
        raise attnflow.OptionError(f"value_map must be a PenzaiValueMap, got {type(value_map).__name__}.")
    require_paths(value_map, ("attention", "branch", "value", "out"), f"The penzai value map {name!r}", "a layer path")
    if value_map.layout != "pre_ln":
        raise attnflow.OptionError(f"The penzai value map {name!r}: layout must be 'pre_ln', got {value_map.layout!r}.")
    if not value_map.attention.startswith(value_map.branch + "/"):
        raise attnflow.OptionError(f"The penzai value map {name!r}: the attention ({value_map.attention!r}) must be "
                                   f"inside the branch ({value_map.branch!r}).")
    _check_post_attention_norm(name, value_map)
    if name in VALUE_MAPS and not replace:
        raise attnflow.OptionError(f"A penzai value map {name!r} is already registered; pass replace=True.")
    VALUE_MAPS[name] = value_map


def _check_post_attention_norm(name: str, value_map: PenzaiValueMap) -> None:
    norm = value_map.post_attention_norm
    if norm is None:
        return
    if not isinstance(norm, str) or not norm:
        raise attnflow.OptionError(f"The penzai value map {name!r}: post_attention_norm must be a layer path or None, "
                                   f"got {norm!r}.")
    if not norm.startswith(value_map.branch + "/") or norm == value_map.attention \
            or norm.startswith(value_map.attention + "/"):
        raise attnflow.OptionError(
            f"The penzai value map {name!r}: post_attention_norm ({norm!r}) must be a layer of the branch "
            f"({value_map.branch!r}) after the attention ({value_map.attention!r}), not the attention or inside it."
        )
    head, _, index = value_map.attention[len(value_map.branch) + 1:].rpartition("/")
    after = f"{value_map.branch}/{head}/{int(index) + 1}" if head == "sublayers" and index.isdigit() else None
    if norm != after:
        raise attnflow.OptionError(
            f"The penzai value map {name!r}: post_attention_norm ({norm!r}) must be the branch's sublayer right after "
            f"the attention ({after!r}: the branch ends with the attention, then the norm)."
        )


@dataclasses.dataclass(frozen=True)
class Block:
    """One block of the model a map fits: its path, and the paths of what the adapter keeps."""

    path: str
    attention: str
    branch: str
    value: str
    out: Any  # the output projection's layer (its Linear and AddBias are read from it)
    post_norm: str | None = None  # the path of the branch's post-attention norm, where it has one
    post_norm_layer: Any = None


def _ends_branch(branch: Any, inside: list[str]) -> bool:
    """Whether ``branch`` is a Sequential whose last sublayers are at the paths ``inside`` (relative to it), in order."""
    count = len(getattr(branch, "sublayers", ()))
    return inside == [f"sublayers/{i}" for i in range(count - len(inside), count)]


def _fits(value_map: PenzaiValueMap, layers: Mapping[str, Any], attentions: list[str], pz: Any) -> list[Block] | None:
    suffix = "/" + value_map.attention
    ends = [value_map.attention, *([value_map.post_attention_norm] if value_map.post_attention_norm else [])]
    inside = [path[len(value_map.branch) + 1:] for path in ends]
    blocks = []
    for name in attentions:
        if not name.endswith(suffix):
            return None
        block = name[: -len(suffix)]
        branch = _join(block, value_map.branch)
        # the branch ends with the attention, then its post-attention norm where the map has one
        sublayers = getattr(layers.get(branch), "sublayers", ())
        if not _ends_branch(layers.get(branch), inside) or sublayers[-len(inside)] is not layers[name]:
            return None
        value, out = _join(name, value_map.value), layers.get(_join(name, value_map.out))
        if value not in layers or out is None:
            return None
        norm = _join(block, ends[1]) if len(ends) > 1 else None
        blocks.append(Block(block, name, branch, value, out, norm, layers.get(norm) if norm else None))
    return blocks or None


def value_blocks(model: Any, attentions: list[str], kind: str = "values") -> tuple[str, list[Block]]:
    """The name of the first map that fits the model, and its blocks (one per attention layer)."""
    pz = _pz()
    layers = layers_by_path(model)
    for name, value_map in VALUE_MAPS.items():
        found = _fits(value_map, layers, attentions, pz)
        if found is not None:
            return name, found
    raise CaptureUnavailableError(
        f"{kind}=True needs to know where the blocks of this penzai model keep their attention branch (the "
        f"residual stream it is added to, its value vectors and output projection); no penzai value map fits it "
        f"(attnflow knows {sorted(VALUE_MAPS)}; its attention layers are at {attentions[:3]}...). A branch must end "
        "with the attention, or with the attention then an RMSNorm (post_attention_norm=..., as Gemma 2's). "
        "Describe it with attnflow.adapters.register_penzai_value_map(name, PenzaiValueMap(attention=..., "
        "branch=...)).",
        kind=kind,
    )


def _numpy(value: Any) -> np.ndarray:
    jax = attnflow.import_optional("jax", "jax")
    array = np.asarray(jax.device_get(value))
    return array.astype(np.float32) if array.dtype != np.float64 else array


def heads_of(names: list[str]) -> list[str]:
    return [name for name in _HEAD_ORDER if name in names]


def _model_axis(named: Any) -> str:
    rest = [name for name in named.named_shape if name not in ("batch", "seq")]
    if len(rest) != 1 or named.positional_shape or "batch" not in named.named_shape:
        raise attnflow.AdapterError(
            f"values=True: a residual stream with named axes {dict(named.named_shape)} (expected batch, seq and one "
            "model axis)."
        )
    return rest[0]


def _stream(named: Any) -> np.ndarray:
    return _numpy(named.untag("batch", "seq", _model_axis(named)).unwrap())


def value_extras(block: Block, kept: Mapping[str, Any], heads: int) -> dict[str, np.ndarray]:
    """The value extras of one block's call from what was kept (``value``, ``residual``, ``branch``, and
    ``post_norm_input`` where the branch has a post-attention norm)."""
    pz = _pz()
    slots = ("value", "residual", "branch", *(("post_norm_input",) if block.post_norm else ()))
    missing = [slot for slot in slots if kept.get(slot) is None]
    if missing:
        raise attnflow.AdapterError(
            f"values=True: {missing} of block {block.path!r} were not seen during the forward pass (they ran as JAX "
            "tracers: values= needs the model called eagerly, not under jax.vmap, jax.grad or a LayerStack's scan)."
        )
    value = kept["value"]
    names = list(value.named_shape)
    head_axes = heads_of(names)
    rest = [name for name in names if name not in ("batch", "seq", *head_axes)]
    if "batch" not in names or "seq" not in names or len(rest) != 1 or value.positional_shape:
        raise attnflow.AdapterError(f"values=True: value vectors with named axes {names} in {block.attention!r}; "
                                    "expected batch, seq, the heads and one head-dimension axis.")
    d_head = rest[0]
    array = _numpy(value.untag("batch", *head_axes, "seq", d_head).unwrap())
    array = array.reshape(array.shape[0], -1, *array.shape[-2:])  # (batch, kv heads, keys, d_head)
    if array.shape[1] != heads:
        array = np.repeat(array, heads // array.shape[1], axis=1)  # query head h reads KV head h // group
    linears = pz.select(block.out).at_instances_of(pz.nn.Linear).get_sequence()
    biases = pz.select(block.out).at_instances_of(pz.nn.AddBias).get_sequence()
    if len(linears) != 1 or len(biases) > 1:
        raise attnflow.AdapterError(f"values=True: the output projection of {block.attention!r} has {len(linears)} "
                                    f"Linear and {len(biases)} AddBias layers; expected one Linear, at most one AddBias.")
    weights = linears[0].weights.value
    out_heads = heads_of(list(weights.named_shape))
    width = [name for name in weights.named_shape if name not in (*out_heads, d_head)]
    if len(width) != 1:
        raise attnflow.AdapterError(f"values=True: an output projection with named axes {dict(weights.named_shape)}.")
    matrix = _numpy(weights.untag(*out_heads, d_head, width[0]).unwrap())
    matrix = matrix.reshape(heads, matrix.shape[-2], matrix.shape[-1])
    bias = _numpy(biases[0].bias.value.untag(width[0]).unwrap()) if biases else np.zeros(matrix.shape[-1], matrix.dtype)
    residual = _stream(kept["residual"])
    found = {
        "value": array,
        "out_weight": matrix[None],
        "out_bias": bias[None],
        "residual": residual,
        "block_output": residual + _stream(kept["branch"]),
    }
    if block.post_norm:
        found.update(_sandwich_extras(block, kept["post_norm_input"]))
    return found


def _sandwich_extras(block: Block, norm_input: Any) -> dict[str, np.ndarray]:
    """``post_norm_input`` ``(batch, queries, d_model)``, ``post_norm_weight`` ``(1, d_model)`` and
    ``post_norm_eps`` ``(1,)`` of a branch's post-attention RMSNorm, from its input during the pass."""
    stream = _stream(norm_input)
    epsilon, scale = _rms_norm(block, _model_axis(norm_input))
    return {
        "post_norm_input": stream,
        "post_norm_weight": (np.ones(stream.shape[-1]) if scale is None else scale).astype(stream.dtype)[None],
        "post_norm_eps": np.array([epsilon], np.float64),
    }


def _rms_norm(block: Block, axis: str) -> tuple[float, np.ndarray | None]:
    """``(epsilon, scale (d_model,) or None)`` of a block's post-attention norm, which must be an RMSNorm across
    the model axis ``axis``: ``RMSStandardize``, then at most one ``Linear`` whose weights are over that axis
    alone (``pz.nn.RMSLayerNorm``'s scale, which multiplies)."""
    sublayers = list(getattr(block.post_norm_layer, "sublayers", ()))
    if not _is_rms_norm(sublayers, axis):
        raise attnflow.AdapterError(
            f"values=True: the post-attention norm {block.post_norm!r} is a {type(block.post_norm_layer).__name__} of "
            f"{[type(layer).__name__ for layer in sublayers]}; norm-based methods decompose an RMSNorm there "
            f"(pz.nn.RMSLayerNorm: RMSStandardize across {axis!r}, then a Linear scale over it). Point the value map's "
            "post_attention_norm at such a layer, or capture without values=True (value_zeroing=True re-runs any "
            "block)."
        )
    epsilon = float(np.asarray(sublayers[0].epsilon))
    return epsilon, (_numpy(sublayers[1].weights.value.unwrap(axis)) if len(sublayers) == 2 else None)


def _is_rms_norm(sublayers: list[Any], axis: str) -> bool:
    """Whether ``sublayers`` are an ``RMSStandardize`` across ``axis`` and at most one ``Linear`` scale over it."""
    pz = _pz()
    if not 1 <= len(sublayers) <= 2 or not isinstance(sublayers[0], pz.nn.RMSStandardize):
        return False
    across = sublayers[0].across
    if ((across,) if isinstance(across, str) else tuple(across)) != (axis,):
        return False
    if len(sublayers) == 1:
        return True
    scale = getattr(getattr(sublayers[1], "weights", None), "value", None)
    return (isinstance(sublayers[1], pz.nn.Linear) and scale is not None and tuple(scale.named_shape) == (axis,)
            and not scale.positional_shape)


# -- value_zeroing=True -----------------------------------------------------------------------------------------
def _rerun(block: Any, x: Any, side_inputs: dict[str, Any], keep: Any, value_path: str) -> Any:
    pz = _pz()
    _, rescale = _layer_classes()
    zeroed = _replaced(block, {value_path: lambda layer: pz.nn.Sequential([layer, rescale(keep)])})
    return zeroed(x, **side_inputs)


@functools.cache
def _rerun_function() -> Any:
    jax = attnflow.import_optional("jax", "jax")
    return jax.jit(_rerun, static_argnames=("value_path",))


def _variants(value: Any, b: int, count: int) -> Any:
    """Item ``b`` of a named array with a ``batch`` axis, repeated ``count`` times along ``batch``."""
    jnp = attnflow.import_optional("jax.numpy", "jax")
    pz = _pz()
    names = getattr(value, "named_shape", None)
    if names is None or "batch" not in names or value.positional_shape:
        return value
    rest = [name for name in names if name != "batch"]
    array = value.untag("batch", *rest).unwrap()
    return pz.nx.wrap(jnp.broadcast_to(array[b : b + 1], (count, *array.shape[1:]))).tag("batch", *rest)


def value_zeroing(block: Any, x: Any, side_inputs: dict[str, Any], original: Any, value_path: str,
                  rows_mask: np.ndarray | None, causal: bool) -> np.ndarray:
    """``(batch, queries, keys)`` float64 cosine distances of the block's outputs with each real key token's
    values zeroed in its attention; 0 on padding and, when causal, on future keys."""
    jnp = attnflow.import_optional("jax.numpy", "jax")
    pz = _pz()
    reference_all = _stream(original).astype(np.float64)
    batch, length = reference_all.shape[:2]
    out = np.zeros((batch, length, length))
    frozen_block = frozen(block)
    keep = pz.nx.wrap(1.0 - jnp.eye(length)).tag("batch", "seq")  # variant j zeroes token j
    with quietly():
        for b in range(batch):
            real = np.arange(length) if rows_mask is None else np.flatnonzero(rows_mask[b])
            result = _rerun_function()(frozen_block, _variants(x, b, length),
                                       {k: _variants(v, b, length) for k, v in side_inputs.items()}, keep,
                                       value_path=value_path)
            hidden = _stream(result).astype(np.float64)  # (variants, queries, d)
            reference = reference_all[b]
            unit = hidden / np.linalg.norm(hidden, axis=-1, keepdims=True)
            ref = reference / np.linalg.norm(reference, axis=-1, keepdims=True)
            distance = 0.5 * ((unit - ref[None]) ** 2).sum(-1)  # (variants j, queries i)
            out[b][np.ix_(real, real)] = distance.T[np.ix_(real, real)]
            if causal:
                out[b] = np.tril(out[b])
    return out
