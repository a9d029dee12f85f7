"""The ``penzai`` adapter: models built from penzai's ``pz.nn`` layers (immutable pytree dataclasses with
named axes), including its Transformer variants and the models its Hugging Face converters produce.

Usage (penzai's own call convention)::

    model = gpt_neox.gpt_neox_from_huggingface_model(hf_model)     # or llama/mistral/gemma variants
    tokens = pz.nx.wrap(ids).tag("batch", "seq")
    trace = attnflow.capture(model, tokens)                        # runs model(tokens)

    with attnflow.attach(model) as rec:
        logits = model(tokens)
    trace = rec.trace

What is recorded: each ``pz.nn.Attention`` (and ``pz.nn.KVCachingAttention``) layer of the model, taken as
the output of its ``query_key_to_attn`` sublayer: penzai's attention probabilities (after the mask, the
soft cap where the model has one, and ``pz.nn.Softmax("kv_seq")``). Named axes become positions:
``batch``, the heads, ``seq`` (queries), ``kv_seq`` (keys). Heads are ``heads`` (multi-head),
``query_heads`` (multi-query) or ``head_groups`` x ``query_heads`` (grouped-query), flattened with the
key/value group as the major index, as Hugging Face's ``repeat_kv`` orders them. Layers are named by their
path in the model's pytree (``"body/sublayers/1/sublayers/0/branches/1/sublayers/1"``).

Masks and causality come from the model's inputs, read the way the attention's own mask layer reads them:
``ApplyCausalAttentionMask`` and ``ApplyCausalSlidingWindowAttentionMask`` (causal; a key is real when its
``token_positions`` side input is >= 0), ``ApplyExplicitAttentionMask`` (its side-input mask). Token ids are
the model's first argument (a ``batch`` x ``seq`` named array).

How, for the duration of the block only: the model object is left exactly as it is (penzai layers are
immutable). The ``__call__`` of the classes involved (the model's own class, the attention classes and
the classes of their ``query_key_to_attn`` sublayers) is replaced by a wrapper that recognises the
attached model's layers by identity and otherwise calls the original; the originals are put back when
the last attach leaves. jax.jit is disabled while attached (so a jitted call runs the attached objects
eagerly); traced attention (``jax.vmap``, ``jax.grad``) is sent out with ``jax.debug.callback``. The layers
of a ``pz.nn.LayerStack`` are rebuilt for every scanned layer: each is recorded under the path of the
stack's attention layer, numbered after the stack's path by the recorder's naming rule
(``"body/sublayers/1/0/stacked_sublayers/..."``, ``"body/sublayers/1/1/..."``).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from attnflow import Adapter, AdapterError, Recorder, import_optional
from attnflow.recording import deferred_interrupts

from . import _generation_jax as generation
from . import _penzai_methods as methods
from ._flax_common import (
    UNKNOWN,
    PassCollector,
    is_tracer,
    jit_disabled,
    module_listing,
    patched_attribute,
    undoing,
)

_ATTENTION_CLASSES = ("Attention", "KVCachingAttention")
_HEAD_ORDER = ("head_groups", "query_heads", "heads")


def _pz() -> Any:
    return import_optional("penzai.pz", "penzai")


def _attention_types(pz: Any) -> tuple[type[Any], ...]:
    return tuple(getattr(pz.nn, name) for name in _ATTENTION_CLASSES if hasattr(pz.nn, name))


def _attention_layers(model: Any, pz: Any) -> dict[str, Any]:
    """Path -> attention layer, in pytree order (the order they run in a Sequential model)."""
    found = pz.select(model).at_instances_of(_attention_types(pz)).selected_by_path
    return {_path_name(path) or type(layer).__name__: layer for path, layer in found.items()}


_path_name = methods.path_name


def _defining_class(cls: type, attribute: str = "__call__") -> type:
    return next(klass for klass in cls.__mro__ if attribute in vars(klass))


def positional(named: Any, seq: str = "seq", kv_seq: str = "kv_seq") -> Any:
    """Penzai attention probabilities as a positional ``(batch, heads, query, key)`` jax array: ``batch``
    (added when absent), the head axes (``head_groups`` major), then ``seq`` and ``kv_seq``."""
    names = list(named.named_shape)
    if named.positional_shape or seq not in names or kv_seq not in names:
        raise AdapterError(
            f"penzai attention probabilities with named axes {names} and positional axes {named.positional_shape}: "
            f"expected named axes {seq!r} (queries), {kv_seq!r} (keys), the heads and maybe 'batch'."
        )
    heads = [name for name in _HEAD_ORDER if name in names]
    heads += [name for name in names if name not in (*heads, "batch", seq, kv_seq)]
    batch = ["batch"] if "batch" in names else []
    array = named.untag(*batch, *heads, seq, kv_seq).unwrap()
    if not batch:
        array = array[None]
    return array.reshape(array.shape[0], -1, *array.shape[-2:])


def _batch_seq(named: Any, seq: str = "seq") -> Any:
    """A ``{batch?, seq}`` named array as a positional ``(batch, seq)`` array (batch 1 when absent), or None."""
    if named is None or not hasattr(named, "named_shape"):
        return None
    names = list(named.named_shape)
    if seq not in names or named.positional_shape or set(names) - {"batch", seq}:
        return None
    array = named.untag(*(["batch"] if "batch" in names else []), seq).unwrap()
    return array if "batch" in names else array[None]


def _mask_of(attention: Any, side_inputs: dict[str, Any], pz: Any) -> tuple[Any, bool]:
    """``(mask, is_causal)`` for an attention call, read as its own mask layer reads its side inputs:
    ``mask`` broadcastable to ``(batch, heads, query, key)`` (False where masked), or UNKNOWN."""
    qk = attention.query_key_to_attn
    layers = list(getattr(qk, "sublayers", ())) or [qk]
    for layer in layers:
        if isinstance(layer, (pz.nn.ApplyCausalAttentionMask, pz.nn.ApplyCausalSlidingWindowAttentionMask)):
            positions = _batch_seq(side_inputs.get(layer.kv_positions_input_name), layer.seq_axis)
            if positions is None:
                return None, True
            return (positions >= 0)[:, None, None, :], True
        if isinstance(layer, pz.nn.ApplyExplicitAttentionMask):
            mask: Any = side_inputs.get(layer.mask_input_name)
            names = list(getattr(mask, "named_shape", ()))
            if "seq" in names and "kv_seq" in names and not set(names) - {"batch", "seq", "kv_seq"}:
                array = mask.untag(*(["batch"] if "batch" in names else []), "seq", "kv_seq").unwrap()
                array = array if "batch" in names else array[None]
                return array[:, None], False
            return UNKNOWN, False
    return UNKNOWN, False


class _Frame:
    __slots__ = ("capture", "name", "qk", "mask", "is_causal", "seen")

    def __init__(self, capture, name, qk, mask, is_causal):
        self.capture, self.name, self.qk = capture, name, qk
        self.mask, self.is_causal, self.seen = mask, is_causal, False


class _PenzaiCapture:
    def __init__(self, recorder: Recorder, root: Any, pz: Any):
        self.root = root
        self.pz = pz
        self.request = recorder.request
        self.layers = _attention_layers(root, pz)
        self.names = {id(layer): name for name, layer in self.layers.items()}
        # LayerStacks rebuild their layers for every scanned layer: their attention is known by the stack
        found = pz.select(root).at_instances_of(pz.nn.LayerStack).selected_by_path if hasattr(pz.nn, "LayerStack") \
            else {}
        self.stacks = {id(stack): _path_name(path) for path, stack in found.items()}
        self.stacked: dict[str, str | None] = {}  # stack path -> the path of its one attention layer
        for stack_path in self.stacks.values():
            inside = [name for name in self.layers if name.startswith(stack_path + "/")]
            self.stacked[stack_path] = inside[0] if len(inside) == 1 else None
        self.running: list[str] = []  # the stacks running now
        # values= / value_zeroing=: the blocks a penzai value map finds, and the layers whose inputs and outputs
        # are kept during the pass: id -> [(block path, slot of the input, slot of the output)]
        self.map_name: str | None = None
        self.blocks: dict[str, methods.Block] = {}
        self.taps: dict[int, list[tuple[str, str | None, str | None]]] = {}
        request = self.request
        if request.values or request.value_zeroing:
            kind = "values" if request.values else "value_zeroing"
            self.map_name, blocks = methods.value_blocks(root, list(self.layers), kind)
            everything = methods.layers_by_path(root)
            for block in blocks:
                self.blocks[block.attention] = block
                wanted: list[tuple[Any, str | None, str | None]] = []
                if request.values:
                    wanted += [(everything[block.value], None, "value"), (everything[block.branch], "residual", "branch")]
                    if block.post_norm:  # a sandwich norm: its input is the attention's output
                        wanted.append((block.post_norm_layer, "post_norm_input", None))
                if request.value_zeroing:
                    wanted.append((everything[block.path], "block_input", "block_output"))
                for layer, before, after in wanted:
                    self.taps.setdefault(id(layer), []).append((block.attention, before, after))
        self.kept: dict[str, dict[str, list[Any]]] = {}  # attention path -> slot -> values, this pass
        self.shapes: dict[str, list[tuple[tuple[tuple[str, int], ...], str]]] = {}  # named shapes of the probabilities
        self.call_of_pass: tuple[Any, dict[str, Any]] | None = None  # the root call's argument and side inputs
        extra = request.gradients or request.values or request.value_zeroing
        self.collector = PassCollector(recorder, api="penzai", metadata_key="jax_library",
                                       repeat_prefix=self._repeat_prefix, no_attention=self._no_attention,
                                       after_pass=self._after_pass if extra else None,
                                       metadata={"values_layout": "pre_ln", "penzai_value_map": self.map_name}
                                       if request.values else None)
        # a KV-caching sampler: its calls are the steps of one generation (see adapters/_jax/_generation_jax.py)
        self.sampling: generation.PenzaiSampling | None = None
        self.closed = False

    def tapped_classes(self) -> set[type]:
        everything = methods.layers_by_path(self.root)
        return {type(layer) for layer in everything.values() if id(layer) in self.taps}

    def _keep(self, layer: Any, argument: Any, result: Any, side_inputs: dict) -> None:
        if not self.collector.active:
            return
        for attention, before, after in self.taps.get(id(layer), ()):
            slots = self.kept.setdefault(attention, {})
            for slot, value in ((before, argument), (after, result)):
                if slot is not None:
                    slots.setdefault(slot, []).append(None if is_tracer(getattr(value, "data_array", value)) else value)
            if before == "block_input":
                slots.setdefault("side_inputs", []).append(dict(side_inputs))

    # -- what the methods need beside the weights (target=, values=, value_zeroing=) ---------------------------
    def _after_pass(self, layers: list) -> None:
        try:
            current = self.collector.current
            if current is not None and current.pending:
                raise AdapterError(
                    "target=, values= and value_zeroing= need the penzai model called eagerly: this pass ran its "
                    "attention as JAX tracers (under jax.vmap, jax.grad, or a pz.nn.LayerStack's scan). Capture the "
                    "model called directly (a LayerStack model: convert it with use_layer_stack=False)."
                )
            calls: dict[str, int] = {}
            for layer in layers:
                call = calls[layer.name] = calls.get(layer.name, -1) + 1
                block = self.blocks.get(layer.name)
                if block is None or layer.kind != "self":
                    continue
                kept = {slot: values[call] if call < len(values) else None
                        for slot, values in self.kept.get(layer.name, {}).items()}
                if self.request.values:
                    layer.extras.update(methods.value_extras(block, kept, layer.weights.shape[1]))
                if self.request.value_zeroing:
                    self._value_zeroing(block, layer, kept)
            if (self.request.values or self.request.value_zeroing) and not any(
                    layer.name in self.blocks for layer in layers):
                raise AdapterError("values=/value_zeroing=: no recorded attention layer is one its penzai value map "
                                   "describes.")
            if self.request.gradients and layers:
                self._gradients(layers)
        finally:
            self.kept, self.shapes = {}, {}

    def _value_zeroing(self, block: methods.Block, layer: Any, kept: dict[str, Any]) -> None:
        if kept.get("block_input") is None or kept.get("block_output") is None:
            raise AdapterError(
                f"value_zeroing=True: block {block.path!r} was not seen running eagerly during the forward pass "
                "(under jax.vmap, jax.grad or a LayerStack's scan); capture the model called directly."
            )
        everything = methods.layers_by_path(self.root)
        value_path = block.value[len(block.path) + 1:] if block.path else block.value
        layer.extras["value_zeroing"] = methods.value_zeroing(
            everything[block.path], kept["block_input"], kept.get("side_inputs") or {}, kept["block_output"],
            value_path, layer.keys, bool(layer.causal))

    def _gradients(self, layers: list) -> None:
        """The forward call once more under ``jax.grad`` (compiled), nothing recorded, with a zero added to each
        recorded layer's probabilities (see ``adapters/_jax/_penzai_methods.py``)."""
        if self.call_of_pass is None:
            raise AdapterError("target=: the forward call of the pass is unknown; call the model itself inside the "
                               "block.")
        names = [layer.name for layer in layers]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise AdapterError(f"target=: the attention layers {repeated} ran more than once in one pass, so the "
                               "gradient of each call's probabilities cannot be told apart; capture without target=.")
        unknown = [name for name in names if name not in self.layers]
        if unknown:
            raise AdapterError(f"target=: the attention layers {unknown} are not layers of the captured model "
                               "(rebuilt by a LayerStack); convert it with use_layer_stack=False.")
        argument, side_inputs = self.call_of_pass
        mask, causal = _pass_tokens(layers)
        first = layers[0].weights
        length = first.shape[-2]
        positions = methods.target_positions(self.request.target_position, mask, causal, first.shape[0], length)
        shapes = {name: self.shapes[name][0][0] for name in names}
        dtypes = {name: self.shapes[name][0][1] for name in names}
        try:
            grads = methods.gradients(self.root, argument, side_inputs, shapes, dtypes, positions, self.request.target)
        except Exception as exc:
            if type(exc).__module__.startswith("attnflow"):
                raise
            raise AdapterError(f"target=: the gradient pass (the forward call again under jax.grad) failed: "
                               f"{type(exc).__name__}: {exc}") from exc
        for layer in layers:
            array = np.asarray(positional(grads[layer.name]))
            layer.extras["attn_grad"] = array.astype(np.float32) if array.dtype != np.float64 else array

    def _repeat_prefix(self, name: str, count: int) -> str | None:
        return max((path for path in self.stacks.values() if name.startswith(path + "/")), key=len, default=None)

    def call(self, original: Any, layer: Any, argument: Any, side_inputs: dict, frames: list[_Frame],
             inner: Any) -> Any:
        """One call of a patched ``__call__``: pass boundaries for the root, a frame for an attention layer,
        the probabilities for the ``query_key_to_attn`` of the innermost frame."""
        if layer is self.root:
            ids = _batch_seq(argument)
            ids = np.asarray(ids) if ids is not None and not is_tracer(ids) and np.issubdtype(ids.dtype, np.integer) \
                else None
            if self.collector.depth:
                return self.collector.outermost(lambda: inner(argument, side_inputs), ids)
            self.call_of_pass, self.kept, self.shapes = (argument, dict(side_inputs)), {}, {}
            if self.sampling is None:
                return self.collector.outermost(lambda: inner(argument, side_inputs), ids)
            request = self.request
            refused = [k for k, on in (("target=", request.gradients), ("values=True", request.values),
                                       ("value_zeroing=True", request.value_zeroing)) if on]
            self.sampling.before_call(ids, " and ".join(refused))
            try:
                return self.collector.outermost(lambda: inner(argument, side_inputs), ids)
            except BaseException:
                self.sampling.abort()  # a step missing from the middle would shift every later one
                raise
        if id(layer) in self.taps:
            result = self._call(original, layer, argument, side_inputs, frames, inner)
            self._keep(layer, argument, result, side_inputs)
            return result
        return self._call(original, layer, argument, side_inputs, frames, inner)

    def _call(self, original: Any, layer: Any, argument: Any, side_inputs: dict, frames: list[_Frame],
              inner: Any) -> Any:
        if id(layer) in self.stacks:
            self.running.append(self.stacks[id(layer)])
            try:
                return inner(argument, side_inputs)
            finally:
                self.running.pop()
        if isinstance(layer, _attention_types(self.pz)) and (id(layer) in self.names or self.collector.depth):
            name = self.names.get(id(layer))
            if name is None:  # a copy made by a LayerStack for one of its layers (or an unknown one: by class)
                name = (self.stacked.get(self.running[-1]) if self.running else None) or type(layer).__name__
            mask, is_causal = _mask_of(layer, side_inputs, self.pz)
            frame = _Frame(self, name, layer.query_key_to_attn, mask, is_causal)
            frames.append(frame)
            try:
                result = inner(argument, side_inputs)
            finally:
                frames.remove(frame)
            if not frame.seen:
                raise AdapterError(f"penzai attention layer {name!r} ran, but its query_key_to_attn did not.")
            return result
        mine = [frame for frame in frames if frame.capture is self]
        if mine and layer is mine[-1].qk:
            frame = mine[-1]
            result = inner(argument, side_inputs)
            frame.seen = True
            if self.collector.active and hasattr(result, "named_shape"):
                self.shapes.setdefault(frame.name, []).append((methods.named_shape(result), str(result.dtype)))
            self.collector.add(frame.name, positional(result), kind="self", mask=frame.mask,
                               is_causal=frame.is_causal)
            return result
        return inner(argument, side_inputs)

    def _no_attention(self) -> str:
        return ("attnflow records penzai's pz.nn.Attention and pz.nn.KVCachingAttention layers; "
                f"the model has: {module_listing(list(self.layers.items()))}.")

    def close(self) -> None:
        self.closed = True
        self.collector.close()


#: The captures attached in each thread, in the order they were attached.
_ACTIVE: dict[int, list[_PenzaiCapture]] = {}
_frames = threading.local()


def _wrapped_call(original: Any) -> Any:
    def __call__(self: Any, argument: Any, /, **side_inputs: Any) -> Any:
        captures = tuple(_ACTIVE.get(threading.get_ident(), ()))
        if not captures or methods.quiet():  # a gradient or value-zeroing pass of attnflow's: not recorded
            return original(self, argument, **side_inputs)
        frames = getattr(_frames, "stack", None)
        if frames is None:
            frames = _frames.stack = []

        def step(index: int, argument: Any, side_inputs: dict) -> Any:
            if index == len(captures):
                return original(self, argument, **side_inputs)
            return captures[index].call(original, self, argument, side_inputs, frames,
                                        lambda a, s: step(index + 1, a, s))

        return step(0, argument, side_inputs)

    __call__.__attnflow_original__ = original  # type: ignore[attr-defined]
    return __call__


def _pass_tokens(layers: list) -> tuple[Any, Any]:
    """``(key mask, causal)`` of the pass's first self-attention layer (what the target position needs)."""
    for layer in layers:
        if layer.kind == "self":
            return layer.keys, layer.causal
    return None, None


class PenzaiAdapter(Adapter):
    """Captures penzai models (``pz.nn`` layers with ``pz.nn.Attention``); see the module docstring."""

    name = "penzai"
    framework = "penzai"
    array_library = "jax"
    extra = "penzai"
    priority = 10
    options = ()
    captures = Adapter.captures | {"attn_grad", "values", "value_zeroing", "input_gradients", "ablation"}

    def probe(self, model: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        """Faithfulness: blank-out and input gradients on the output of the model's ``pz.nn.EmbeddingLookup``
        (``faithfulness(model, explanation, tokens, token_positions=...)``, penzai's call convention)."""
        from ._faithfulness_flax import penzai_probe

        return penzai_probe(model, request, args, kwargs)

    def claims(self, model: Any) -> bool:
        layer = sys.modules.get("penzai.nn.layer")
        if layer is None or not isinstance(model, layer.Layer):
            return False
        return bool(_attention_layers(model, _pz()))

    @contextmanager
    def hooks(self, model: Any, recorder: Recorder, **options: Any) -> Iterator[None]:
        pz = _pz()
        jax = import_optional("jax", "jax")
        if not isinstance(model, pz.nn.Layer):
            raise AdapterError(f"The penzai adapter needs a pz.nn.Layer model, got {type(model).__name__}.")
        capture = _PenzaiCapture(recorder, model, pz)
        classes = {type(model)} | set(_attention_types(pz)) | {type(stack) for stack in
                                                                pz.select(model).at_instances_of(pz.nn.LayerStack).get_sequence()}
        classes |= {type(layer.query_key_to_attn) for layer in capture.layers.values()}
        classes |= capture.tapped_classes()
        owners = sorted({_defining_class(cls) for cls in classes}, key=lambda cls: cls.__qualname__)
        with undoing() as undo:
            with deferred_interrupts():
                undo.enter_context(jit_disabled(jax))
                for owner in owners:  # shared by every attach, in any thread; the last to leave restores
                    undo.enter_context(patched_attribute(owner, "__call__", _wrapped_call))
                captures = _ACTIVE.setdefault(threading.get_ident(), [])
                captures.append(capture)
                undo.callback(captures.remove, capture)
                if generation.is_penzai_sampler(model):
                    causal = all(_mask_of(layer, {}, pz)[1] for layer in capture.layers.values()) or None
                    capture.sampling = undo.enter_context(generation.penzai_sampling(recorder, model, causal))
            yield
        capture.close()
