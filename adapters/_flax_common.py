"""What the linen and NNX adapters share: turning sown attention into numpy, reading masks, and
collecting the layers of one forward pass before handing them to the :class:`attnflow.Recorder`.

Nothing here imports jax at module level; the adapters import it lazily.

How recording avoids leaking tracers: while an adapter is attached it enters ``jax.disable_jit()``,
so a forward pass wrapped in ``jax.jit`` / ``nnx.jit`` runs op by op and the attention weights the
model sows are concrete arrays, copied to numpy at once. No compiled function is traced while
recording, so nothing recorded is baked into a jit cache. Weights that still arrive as tracers (the
pass runs under ``jax.vmap``, ``jax.grad``, ``jax.checkpoint``/``remat``, a ``lax.cond``, or
``attach`` was entered inside a function being traced) are never stored: when a layer was seen only
as a tracer in a pass, the pass ends with an :class:`attnflow.AdapterError` saying so. (``nn.scan``
traces its body once before running it; the layers it then runs concretely are recorded.)
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from typing import Any

import numpy as np

from attnflow import AdapterError, AdapterOption, OptionError, Recorder
from attnflow._switches import deferred_interrupts, switch

from ._hf_families import pick_key_stream, plan_streams

#: Marks "this attention call gave no mask information" (unlike ``None``: "called without a mask").
UNKNOWN = object()

#: Adapter options both Flax adapters accept (checked centrally by attnflow before the adapter runs).
OPTIONS = (
    AdapterOption("cross", None, None, "layer names (or a predicate) to treat as cross-attention"),
)


def check_options(adapter: str, options: Mapping[str, Any]) -> Callable[[str], bool] | None:
    """Validate adapter options; returns the ``cross`` predicate (or None)."""
    cross = options.get("cross")
    if cross is None or callable(cross):
        return cross
    if isinstance(cross, str) or not isinstance(cross, Collection):
        raise OptionError(
            "cross must be a callable name -> bool or a collection of layer names (e.g. "
            f"['decoder/layer_0/cross_attention']); got {cross!r}."
        )
    names = {str(name) for name in cross}
    return names.__contains__


@contextmanager
def undoing() -> Iterator[ExitStack]:
    """An ExitStack for what an adapter changes while attached, entered and undone with Ctrl-C deferred.

    Make the changes inside a ``with deferred_interrupts():`` block within it, so that each change is
    registered on ``undo`` before an interrupt can end the block; the undo itself runs with interrupts
    held back too.
    """
    undo = ExitStack()
    try:
        yield undo
    finally:
        with deferred_interrupts():
            undo.close()


def jit_disabled(jax: Any) -> Any:
    """``jax.disable_jit()`` for this thread, shared by overlapping attaches: it is entered by the first and
    left by the last, whatever order they leave in (a context manager left out of order would restore the
    wrong value)."""
    return switch(("jax.disable_jit", threading.get_ident()), lambda: entered(jax.disable_jit()), left)


def entered(manager: Any) -> Any:
    """``manager`` entered (for a switch's turn_on); :func:`left` exits it."""
    manager.__enter__()
    return manager


def left(manager: Any) -> None:
    manager.__exit__(None, None, None)


def is_tracer(value: Any) -> bool:
    jax = sys.modules.get("jax")
    return jax is not None and isinstance(value, jax.core.Tracer)


def to_numpy(weights: Any) -> tuple[np.ndarray, str]:
    """Concrete attention weights as ``(batch, heads, q, k)`` numpy, and the dtype the model used.

    bfloat16 is upcast to float32 (numpy has no bfloat16 arithmetic); the source dtype says so.
    Extra leading batch axes are flattened into one; a missing batch axis becomes batch 1.
    """
    import jax

    source_dtype = str(weights.dtype)
    array = np.asarray(jax.device_get(weights))
    if source_dtype == "bfloat16" or not np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32)
    if array.ndim == 3:
        array = array[None]
    elif array.ndim > 4:
        array = array.reshape((-1, *array.shape[-3:]))
    elif array.ndim < 3:
        raise AdapterError(
            f"Sown attention weights have shape {array.shape}; expected (batch..., heads, query, key)."
        )
    return array, source_dtype


def mask_info(mask: Any, is_causal: bool, shape: tuple[int, ...]) -> tuple[np.ndarray | None, bool | None]:
    """Key validity ``(batch, k)`` and causality from an attention call's mask.

    ``mask`` is what Flax attention takes: boolean, broadcastable to ``(batch..., heads, q, k)``, False
    where attention is masked out. A key is valid when any query (of any head) may attend to it. The
    call is causal when ``is_causal`` is set or the mask allows nothing above the diagonal.
    Returns ``(None, None)`` for ``UNKNOWN`` and ``(None, is_causal)`` for no mask.
    """
    if mask is UNKNOWN:
        return None, (True if is_causal else None)
    batch, _, q, k = shape
    if mask is None:
        return None, bool(is_causal) if q == k else False
    if is_tracer(mask):
        return None, None
    m = np.asarray(mask).astype(bool)
    if m.ndim < 4:
        m = m.reshape((1,) * (4 - m.ndim) + m.shape)
    elif m.ndim > 4:
        lead = m.shape[:-3]
        m = np.broadcast_to(m, (*lead, *m.shape[-3:])).reshape((-1, *m.shape[-3:]))
    try:
        m = np.broadcast_to(m, (batch, m.shape[1], q, k))
    except ValueError:
        return None, None
    if is_causal and q == k:
        m = m & np.tril(np.ones((q, k), dtype=bool))
    keys = m.any(axis=(1, 2))
    causal = q == k and q >= 2 and not np.triu(m, k=1).any()
    return keys, bool(causal) if q == k else False


def find_input_ids(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
    """The token ids of a forward call, if it looks like it takes them: ``input_ids=`` or a first
    positional 2-D integer array."""
    candidate = kwargs.get("input_ids")
    if candidate is None and args:
        candidate = args[0]
    dtype = getattr(candidate, "dtype", None)
    if dtype is None or is_tracer(candidate) or getattr(candidate, "ndim", 0) != 2:
        return None
    try:
        integer = np.issubdtype(np.dtype(dtype), np.integer)
    except TypeError:  # a dtype numpy does not know
        return None
    return np.asarray(candidate) if integer else None


class _Layer:
    __slots__ = ("name", "weights", "kind", "source_dtype", "keys", "causal")

    def __init__(self, name, weights, kind, source_dtype, keys, causal):
        self.name, self.weights, self.kind = name, weights, kind
        self.source_dtype, self.keys, self.causal = source_dtype, keys, causal


class PassCollector:
    """The attention layers of one forward pass, in the order they ran; flushed into the recorder.

    ``begin`` starts a pass, ``add`` takes each sown weight (concrete or tracer), ``finish`` validates
    and records the pass (one :class:`AttentionTrace`), ``discard`` drops it (the pass raised).
    """

    def __init__(self, recorder: Recorder, *, api: str, cross: Callable[[str], bool] | None = None):
        self.recorder = recorder
        self.api = api
        self.cross = cross
        self.active = False
        self.depth = 0  # nesting of root-model calls
        self._reset()

    def _reset(self) -> None:
        self.layers: list[_Layer] = []
        self.traced: dict[str, str] = {}  # name -> tracer type, for layers seen as tracers
        self.input_ids: Any = None

    def begin(self, input_ids: Any = None) -> None:
        self._reset()
        self.active = True
        self.input_ids = input_ids

    def add(self, name: str, weights: Any, *, kind: str | None = None, mask: Any = UNKNOWN,
            is_causal: bool = False) -> None:
        if not self.active:  # attention outside any recognised forward call: one pass until close()
            self.begin()
        if is_tracer(weights):
            self.traced.setdefault(name, type(weights).__name__)
            return
        array, source_dtype = to_numpy(weights)
        if self.cross is not None and self.cross(name):
            kind = "cross"
        elif kind is None:
            kind = "self" if array.shape[-2] == array.shape[-1] else "cross"
        keys, causal = mask_info(mask, is_causal, array.shape)
        self.layers.append(_Layer(name, array, kind, source_dtype, keys, causal))

    def outermost(self, call: Callable[[], Any], input_ids: Any = None) -> Any:
        """Run ``call`` (a root-model call) as one forward pass; nested root calls join the pass.

        The outermost call begins the pass and finishes it, or discards it when the call raises.
        """
        if self.depth == 0:
            self.begin(input_ids)
        self.depth += 1
        finished = False
        try:
            result = call()
            finished = True
        finally:
            self.depth -= 1
            if self.depth == 0 and not finished:
                self.discard()
        if self.depth == 0:
            self.finish()
        return result

    def discard(self) -> None:
        self.active = False
        self._reset()

    def finish(self) -> None:
        """Record the pass; a pass that ran no attention (or only initialised) records nothing."""
        if not self.active:
            return
        self.active = False
        layers, traced, input_ids = self.layers, self.traced, self.input_ids
        self._reset()
        seen = {layer.name for layer in layers}
        only_traced = [name for name in traced if name not in seen]
        if only_traced:
            name = only_traced[0]
            raise AdapterError(
                f"The attention of {name!r} reached attnflow only as a JAX tracer ({traced[name]}), so it "
                "cannot be recorded without leaking the tracer. attnflow records outside compiled code: "
                "while attached, jax.jit and nnx.jit are disabled (jax.disable_jit), so a jitted forward "
                "runs eagerly and its weights are concrete. Other transformations still trace: jax.vmap, "
                "jax.grad, jax.checkpoint / nn.remat / nnx.remat, lax.cond / while_loop, or attach() "
                "entered inside a function that is already being traced. Run the forward pass outside "
                "those (e.g. attach around the call to your jitted function, not inside it; build the "
                "model without remat for the capture)."
            )
        if not layers:
            return
        plan = plan_streams(dict.fromkeys(layer.name for layer in layers), None)
        seen: dict[str, int] = {}
        keys: dict[str | None, list[_Layer]] = {}
        streams = []
        for layer in layers:
            query = plan.streams.get(layer.name)
            key = query
            if layer.kind == "cross":
                key = (pick_key_stream(query, layer.weights.shape[-1], seen) or "memory") if query else "memory"
            else:
                seen.setdefault(query, layer.weights.shape[-1])  # type: ignore[arg-type]
            keys.setdefault(key, []).append(layer)
            streams.append((query, key if (query is not None or layer.kind == "cross") else None))
        described: dict[str | None, dict[str, Any]] = {}
        for stream, seen_by in keys.items():
            mask = next((layer.keys for layer in seen_by if layer.keys is not None), None)
            own = [layer for layer in seen_by if layer.kind == "self"]
            flags = [layer.causal for layer in own]
            causal = True if flags and all(flag is True for flag in flags) else (
                False if any(flag is False for flag in flags) else None)
            described[stream] = {"mask": mask, "causal": causal}
        if input_ids is not None:  # the call's token ids belong to the first stream of their length
            for stream, info in described.items():
                length = seen.get(stream) if stream is not None else layers[0].weights.shape[2]  # type: ignore[arg-type]
                if stream != "memory" and length == input_ids.shape[1]:
                    info["input_ids"] = input_ids
                    break
        single = described.pop(None, {})
        self.recorder.start_call(
            mask=single.get("mask"), input_ids=single.get("input_ids"), causal=single.get("causal"),
            metadata={"flax_api": self.api}, streams={name: info for name, info in described.items() if name},
        )
        for layer, (query, key) in zip(layers, streams):
            self.recorder.record(
                layer.name, layer.weights, kind=layer.kind, source_dtype=layer.source_dtype,
                query_stream=query, key_stream=key if query is not None else None,
                repeat_prefix=layer.name.rsplit("/", 1)[0] if "/" in layer.name else None,
            )
        self.recorder.end_call()
