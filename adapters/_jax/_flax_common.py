"""What the JAX adapters share (linen, NNX, and the family adapters built on them; penzai too): turning
attention into numpy, the ``modules=``/``layout=`` selection of custom attention taken at its softmax, the
softmax hook, reading masks, and collecting the layers of one forward pass before handing them to the
:class:`attnflow.Recorder`.

Nothing here imports jax at module level; the adapters import it lazily.

How recording avoids leaking tracers: while an adapter is attached it enters ``jax.disable_jit()``,
so a forward pass wrapped in ``jax.jit`` / ``nnx.jit`` runs op by op and the attention weights are
concrete arrays, copied to numpy at once. Weights that still arrive as tracers, because the pass runs
under ``jax.vmap``, ``jax.grad``, ``jax.checkpoint``/``remat`` (also inside ``scan``), are sent out of the
traced computation with an ordered ``jax.debug.callback``, which hands over concrete values when the
computation runs (under ``vmap`` once per example: the examples are stacked again; under ``grad`` with
``remat`` the backward pass recomputes the layer and calls again after the pass ended: those calls are
dropped, so each layer is recorded once). When the model call itself is traced (``jax.checkpoint`` around
the whole forward call), the pass's end is sent out the same way and the pass is recorded when the
computation reaches it. A layer whose callback never ran while attached (``attach`` entered inside a
function that is being traced, e.g. inside ``jax.jit``) was never computed while recording: the block ends
with an :class:`attnflow.AdapterError` that says what to change. After a block that sent attention out of
traced code, jax's caches of traced functions are emptied, so that no cached trace keeps attnflow's
callbacks (compiled code is kept).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import itertools
import sys
import threading
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from typing import Any, cast

import numpy as np

from attnflow import AdapterError, AdapterOption, HiddenAttentionError, OptionError, Recorder
from attnflow.recording import deferred_interrupts, module_selector, switch

from .._hf_families import pick_key_stream, plan_streams
from .._layout import Layout as Layout

#: Marks "this attention call gave no mask information" (unlike ``None``: "called without a mask").
UNKNOWN = object()

#: Adapter options both Flax adapters accept (checked centrally by attnflow before the adapter runs).
OPTIONS: tuple[AdapterOption, ...] = (
    AdapterOption("cross", None, None, "layer names (or a predicate) to treat as cross-attention"),
    AdapterOption(
        "modules", None, None,
        "module classes, path globs ('layers_*/attn') or regexes of the modules whose call computes attention; "
        "their jax.nn.softmax output is recorded",
    ),
    AdapterOption(
        "layout", str, "bhqk",
        "axis order of the selected modules' probabilities: 'bhqk', 'bqhk' (= 'btns'), 'bgnqk'... (b batch, "
        "q|t query, k|s key, h|n head, g key/value group of grouped-query heads, the major head index)",
    ),
)

# -- options ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Selection:
    """Modules whose call computes attention that attnflow takes at its softmax (or at a tap).

    ``match(path, module)`` selects modules; during a selected module's ``__call__`` the output of every
    ``jax.nn.softmax`` over the key axis of ``layout`` is its attention, or, with ``tap`` (a name, or a
    function of the module giving one or None), the output of its child module of that name (an identity
    layer the library provides, such as Gemma's ``attention_weights``). ``call_mask(args, kwargs)`` reads
    ``(mask, is_causal)`` from the selected call's arguments (``mask`` broadcastable to ``(batch, heads,
    query, key)``, False where masked); without it the mask is read from the probabilities (a key no query
    attends to is padding, nothing above the diagonal is causal). ``kind``: ``"self"`` for decoders whose
    cached steps have fewer queries than keys (default: by shape).
    """

    match: Callable[[str, Any], bool]
    layout: Layout
    selectors: Any = None
    tap: str | Callable[[Any], str | None] | None = None
    call_mask: Callable[[tuple, dict], tuple[Any, bool]] | None = None
    kind: str | None = None

    def tap_of(self, module: Any) -> str | None:
        """The tap of a selected module (None: its softmax)."""
        return self.tap(module) if callable(self.tap) else self.tap

    @property
    def needs_softmax(self) -> bool:
        return self.tap is None or callable(self.tap)


@dataclasses.dataclass(frozen=True)
class Settings:
    cross: Callable[[str], bool] | None = None
    selection: Selection | None = None


def check_options(adapter: str, options: Mapping[str, Any], base: type | None = None) -> Settings:
    """Validate adapter options: the ``cross`` predicate and the ``modules``/``layout`` selection."""
    cross = options.get("cross")
    if cross is not None and not callable(cross):
        if isinstance(cross, str) or not isinstance(cross, Collection):
            raise OptionError(
                "cross must be a callable name -> bool or a collection of layer names (e.g. "
                f"['decoder/layer_0/cross_attention']); got {cross!r}."
            )
        cross = {str(name) for name in cross}.__contains__
    modules, layout = options.get("modules"), options.get("layout")
    if modules is None:
        if layout is not None:
            raise OptionError(f"Adapter {adapter!r}: layout= describes the modules selected with modules=; give both.")
        return Settings(cross, None)
    parsed = Layout.parse(layout or "bhqk", adapter)
    return Settings(cross, Selection(selector_matcher(adapter, modules, base), parsed, modules))


def selector_matcher(adapter: str, modules: Any, base: type | None) -> Callable[[str, Any], bool]:
    """:func:`attnflow.recording.module_selector` over ``/``-separated module paths (``"layers_*/attn"``;
    ``.`` works too)."""
    return module_selector(adapter, modules, base=base, example="layers_*/attn")


# -- undoing --------------------------------------------------------------------------------------------------
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


def patched_attribute(owner: Any, name: str, make: Callable[[Any], Any]) -> Any:
    """A switch that sets ``owner.name`` (a class or module attribute) to ``make(current)`` while held, and
    puts back exactly what was there (or removes it, when ``owner`` only inherited it) when released."""

    def turn_on() -> tuple[bool, Any]:
        own = name in vars(owner)
        previous = vars(owner)[name] if own else getattr(owner, name)
        setattr(owner, name, make(previous))
        return own, previous

    def turn_off(state: tuple[bool, Any]) -> None:
        own, previous = state
        if own:
            setattr(owner, name, previous)
        else:
            delattr(owner, name)

    return switch(("attnflow.patch", id(owner), name), turn_on, turn_off)


class ThreadSlot:
    """A value each thread sets for the duration of a block (an adapter's gradient or re-run pass), None outside."""

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self) -> Any:
        return getattr(self._local, "current", None)

    @contextmanager
    def holding(self, value: Any) -> Iterator[None]:
        previous = self.get()
        self._local.current = value
        try:
            yield
        finally:
            self._local.current = previous


# -- the softmax hook -----------------------------------------------------------------------------------------
#: Where jax.nn.softmax is implemented: jax.nn.softmax, flax.linen.softmax and nnx.softmax are re-exports of
#: one function, which calls one of these module globals at call time.
_SOFTMAX_MODULE = "jax._src.nn.functions"
_SOFTMAX_NAMES = ("_softmax", "_softmax_deprecated")
_softmax_local = threading.local()


class SoftmaxFrame:
    """One selected module call: the softmax outputs over its key axis computed during the call go to
    ``take(output)``. Frames of one ``owner`` nest: the innermost selected call takes the softmax."""

    __slots__ = ("owner", "name", "layout", "take", "count", "other")

    def __init__(self, owner: Any, name: str, layout: Layout, take: Callable[[Any], None]):
        self.owner, self.name, self.layout, self.take = owner, name, layout, take
        self.count = 0  # softmaxes taken
        self.other: list[tuple[int, ...]] = []  # shapes of softmaxes that did not fit the layout

    def accept(self, output: Any) -> None:
        """The probabilities themselves (from a tap, or a softmax over the key axis)."""
        self.count += 1
        if self.count > 1:
            raise AdapterError(
                f"{self.name!r}, selected with modules=, computed more than one attention (softmax over the key "
                f"axis of layout={self.layout.text!r}) in one call; select the modules that each compute one "
                "(the innermost attention modules)."
            )
        self.take(output)

    def offer(self, output: Any, axis: Any) -> None:
        shape = tuple(getattr(output, "shape", ()))
        if isinstance(axis, (tuple, list)) and len(axis) == 1:
            axis = axis[0]
        key = self.layout.key_axis(len(shape))
        if key is None or not isinstance(axis, (int, np.integer)) or int(axis) % len(shape) != key:
            self.other.append(shape)
            return
        self.accept(output)


@contextmanager
def watching_softmax(frame: SoftmaxFrame) -> Iterator[SoftmaxFrame]:
    """Hand ``frame`` the softmax outputs computed in this thread for the duration of the block (the hook
    itself must be installed: :func:`softmax_hook`)."""
    frames = getattr(_softmax_local, "frames", None)
    if frames is None:
        frames = _softmax_local.frames = []
    frames.append(frame)
    try:
        yield frame
    finally:
        frames.remove(frame)


def softmax_hook() -> Any:
    """A switch (shared by every attach, process-wide) that makes jax.nn.softmax report its outputs to the
    frames of the calling thread; when no frame is open a call costs one attribute lookup."""
    return switch(("jax.nn.softmax hook",), _hook_softmax, _unhook_softmax)


def _hook_softmax() -> tuple[Any, dict[str, Any]]:
    try:
        module = importlib.import_module(_SOFTMAX_MODULE)
    except ImportError:  # pragma: no cover - a jax without the module
        module = None
    originals = {name: getattr(module, name) for name in _SOFTMAX_NAMES if hasattr(module, name)}
    if not originals:
        raise AdapterError(
            f"This jax version computes jax.nn.softmax without {_SOFTMAX_MODULE}.{_SOFTMAX_NAMES[0]}, which attnflow "
            "hooks to record the attention of modules selected with modules=; select modules that sow their "
            "weights instead, or use a jax version of 0.4.30 to 0.10."
        )
    for name, original in originals.items():
        setattr(module, name, _reporting_softmax(original))
    return module, originals


def _unhook_softmax(state: tuple[Any, dict[str, Any]]) -> None:
    module, originals = state
    for name, original in originals.items():
        setattr(module, name, original)


@contextmanager
def perturbing_softmax(perturb: Callable[[Any, Any], Any]) -> Iterator[None]:
    """While the block runs (in this thread), the output of every jax.nn.softmax becomes ``perturb(output,
    axis)`` (the hook itself must be installed: :func:`softmax_hook`). Gradients of the attention
    probabilities are read through an additive zero perturbation passed in this way."""
    previous = getattr(_softmax_local, "perturb", None)
    _softmax_local.perturb = perturb
    try:
        yield
    finally:
        _softmax_local.perturb = previous


def _reporting_softmax(original: Any) -> Callable[..., Any]:
    def softmax(x: Any, axis: Any = -1, *args: Any, **kwargs: Any) -> Any:
        perturb = getattr(_softmax_local, "perturb", None)
        if perturb is not None and not getattr(_softmax_local, "busy", False):
            _softmax_local.busy = True
            try:
                output = original(x, axis, *args, **kwargs)
            finally:
                _softmax_local.busy = False
            return perturb(output, axis)
        frames = getattr(_softmax_local, "frames", None)
        if not frames or getattr(_softmax_local, "busy", False):  # the softmax's own jvp rule calls it again
            return original(x, axis, *args, **kwargs)
        _softmax_local.busy = True
        try:
            output = original(x, axis, *args, **kwargs)
        finally:
            _softmax_local.busy = False
        owners: set[int] = set()
        for frame in reversed(frames):
            if id(frame.owner) not in owners:
                owners.add(id(frame.owner))
                frame.offer(output, axis)
        return output

    softmax.__attnflow_original__ = original  # type: ignore[attr-defined]
    return softmax


def no_softmax_error(name: str, cls: str, frame: SoftmaxFrame) -> HiddenAttentionError:
    other = f" (it computed softmaxes of shapes {frame.other[:3]}, over another axis or of another rank)" if \
        frame.other else ""
    return HiddenAttentionError(
        f"{name!r} ({cls}) was selected with modules= but computed no jax.nn.softmax over the key axis of "
        f"layout={frame.layout.text!r}{other}. Select the module that computes the attention probabilities, give "
        "the layout= of its softmax output, or make it compute them with jax.nn.softmax (a fused kernel such "
        "as jax.nn.dot_product_attention(implementation='cudnn') hides them)."
    )


# -- arrays -----------------------------------------------------------------------------------------------------
def is_tracer(value: Any) -> bool:
    jax = sys.modules.get("jax")
    return jax is not None and isinstance(value, jax.core.Tracer)


def to_numpy(weights: Any, layout: Layout | None = None) -> tuple[np.ndarray, str]:
    """Concrete attention weights as ``(batch, heads, q, k)`` numpy, and the dtype the model used.

    bfloat16 is upcast to float32 (numpy has no bfloat16 arithmetic); the source dtype says so. With a
    ``layout``, axes are reordered by it; without, extra leading batch axes are flattened into one and a
    missing batch axis becomes batch 1.
    """
    import jax

    source_dtype = str(weights.dtype)
    array = np.asarray(jax.device_get(weights))
    if source_dtype == "bfloat16" or not np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32)
    if layout is not None:
        return layout.to_bhqk(array), source_dtype
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
    keys = cast(np.ndarray, m.any(axis=(1, 2)))  # an array: m is 4-d
    causal = q == k and q >= 2 and not np.triu(m, k=1).any()
    return keys, bool(causal) if q == k else False


def weights_mask(weights: np.ndarray) -> tuple[np.ndarray, bool]:
    """Key validity and causality read from probabilities ``(batch, heads, q, k)`` themselves: a key no query
    of any head attends to is padding; nothing above the diagonal (two or more tokens) is causal."""
    q, k = weights.shape[-2:]
    keys = cast(np.ndarray, (weights > 0).any(axis=(1, 2)))  # an array: weights is 4-d
    causal = q == k and q >= 2 and not np.triu(weights, k=1).any()
    return keys, bool(causal)


def find_input_ids(args: tuple[Any, ...], kwargs: Mapping[str, Any], names: tuple[str, ...] = ("input_ids",)) -> Any:
    """The token ids of a forward call, if it looks like it takes them: ``input_ids=`` (or another of
    ``names``) or a first positional 2-D integer array."""
    candidate = next((kwargs[name] for name in names if kwargs.get(name) is not None), None)
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


# -- one forward pass -----------------------------------------------------------------------------------------
class _Layer:
    __slots__ = ("name", "weights", "kind", "source_dtype", "keys", "causal", "extras")

    def __init__(self, name, weights, kind, source_dtype, keys, causal):
        self.name, self.weights, self.kind = name, weights, kind
        self.source_dtype, self.keys, self.causal = source_dtype, keys, causal
        self.extras: dict[str, np.ndarray] = {}  # per-layer arrays beside the weights (attn_grad, values)


class _Pass:
    """One forward pass: its layers as they ran, and the traced layers still to call back."""

    __slots__ = ("serial", "layers", "pending", "input_ids", "forward")

    def __init__(self, serial: int, input_ids: Any, forward: bool):
        self.serial, self.input_ids, self.forward = serial, input_ids, forward
        self.layers: list[_Layer] = []
        self.pending: list[_Emission] = []


class _Emission:
    """Attention that reached attnflow as a tracer, sent out with ``jax.debug.callback``."""

    __slots__ = ("serial", "name", "kind", "mask", "is_causal", "layout", "infer", "tracer", "fired", "layer")

    def __init__(self, serial, name, kind, mask, is_causal, layout, infer, tracer):
        self.serial, self.name, self.kind = serial, name, kind
        self.mask, self.is_causal, self.layout, self.infer = mask, is_causal, layout, infer
        self.tracer, self.fired = tracer, False
        self.layer: _Layer | None = None  # the layer this execution of the traced code fills


class PassCollector:
    """The attention layers of one forward pass, in the order they ran; flushed into the recorder.

    ``begin`` starts a pass, ``add`` takes each layer's weights (concrete, or a tracer sent out through a
    debug callback), ``finish`` validates and records the pass (one :class:`AttentionTrace`), ``discard``
    drops it (the pass raised), ``close`` ends the block.

    A pass whose model call is itself being traced (``jax.checkpoint`` or ``jax.grad`` of a function around
    the whole forward call) returns before its attention is computed: its end is then sent out as one more
    ordered callback, and the pass is recorded when the traced computation reaches it (a recomputation of
    it in the backward pass is not recorded again). One whose callbacks never run while attached (``attach``
    entered inside a function under ``jax.jit``) is an error when the block ends.

    Args:
        recorder: where the pass goes.
        api: stored in the trace's metadata (under ``metadata_key``).
        cross: names of cross-attention layers (a predicate), or None.
        repeat_prefix: ``repeat_prefix(name, count)``: the path of the scanned (stacked) module a layer
            recorded ``count`` times in the pass belongs to, for the recorder's naming rule; None: no such
            module (a shared module called again: the index is appended).
        no_attention: ``no_attention()`` -> the text that says what ran, for the error of a pass that
            recorded no attention.
        after_pass: ``after_pass(layers)``, called when a forward call returned and before its pass is
            recorded: it may add ``extras`` to the layers (attention gradients, value-side tensors).
        metadata: more entries for the traces' metadata.
    """

    def __init__(
        self, recorder: Recorder, *, api: str, cross: Callable[[str], bool] | None = None,
        repeat_prefix: Callable[[str, int], str | None] | None = None,
        no_attention: Callable[[], str] | None = None, metadata_key: str = "flax_api",
        after_pass: Callable[[list[_Layer]], None] | None = None, metadata: Mapping[str, Any] | None = None,
    ):
        self.recorder = recorder
        self.after_pass = after_pass
        self.metadata = dict(metadata or {})
        self.api = api
        self.metadata_key = metadata_key
        self.cross = cross
        self.repeat_prefix = repeat_prefix
        self.no_attention = no_attention
        self.current: _Pass | None = None
        self.staged: dict[int, _Pass] = {}  # passes whose traced computation has not reached their end
        self.depth = 0  # nesting of root-model calls
        self.serial = 0  # which pass (callbacks of a finished pass are dropped)
        self.recorded = 0  # passes handed to the recorder
        self.empty = 0  # passes of other methods than the forward that ran no attention
        self.emitted = False  # some attention was sent out of traced code
        self.lock = threading.RLock()  # callbacks may arrive from the runtime's threads

    @property
    def active(self) -> bool:
        return self.current is not None

    def begin(self, input_ids: Any = None, *, forward: bool = True) -> None:
        with self.lock:
            self.serial += 1
            self.current = _Pass(self.serial, input_ids, forward)

    def add(self, name: str, weights: Any, *, kind: str | None = None, mask: Any = UNKNOWN,
            is_causal: bool = False, layout: Layout | None = None, infer: bool = False) -> None:
        """One layer's attention. ``layout``: how ``weights`` are laid out (default: (batch..., heads, q, k));
        ``infer``: read the mask and causality from the weights (softmax-level capture)."""
        with self.lock:
            if self.current is None:  # attention outside any recognised forward call: one pass until close()
                self.begin()
            current: _Pass = self.current  # type: ignore[assignment]
            if is_tracer(weights):
                self._emit(current, name, weights, kind, mask, is_causal, layout, infer)
                return
            self._append(current, name, weights, kind, mask, is_causal, layout, infer, None)

    def _append(self, into: _Pass, name, weights, kind, mask, is_causal, layout, infer, emission) -> None:
        array, source_dtype = to_numpy(weights, layout)
        if self.cross is not None and self.cross(name):
            kind = "cross"
        elif kind is None:
            kind = "self" if array.shape[-2] == array.shape[-1] else "cross"
        keys: np.ndarray | None
        causal: bool | None
        if infer:
            keys, causal = weights_mask(array)
        else:
            keys, causal = mask_info(mask, is_causal, array.shape)
        last = emission.layer if emission is not None else None
        if last is not None:  # the same execution calls back again: jax.vmap calls back once per example
            last.weights = np.concatenate([last.weights, array])
            last.keys = None if last.keys is None or keys is None else np.concatenate([last.keys, keys])
            last.causal = last.causal if last.causal == causal else None
            return
        layer = _Layer(name, array, kind, source_dtype, keys, causal)
        into.layers.append(layer)
        if emission is not None:
            emission.layer = layer

    def _emit(self, into: _Pass, name, weights, kind, mask, is_causal, layout, infer) -> None:
        import jax

        traced_mask = mask if is_tracer(mask) else None
        emission = _Emission(into.serial, name, kind, UNKNOWN if traced_mask is not None else mask, is_causal,
                             layout, infer, type(weights).__name__)
        into.pending.append(emission)
        self.emitted = True
        try:
            # Two ordered callbacks: the first takes no array, so it runs once each time the traced code runs
            # (a scan over a cached remat jaxpr runs the same callbacks once per layer); the second runs once
            # per example under jax.vmap. Between two runs of the first, the second's calls are one layer.
            jax.debug.callback(functools.partial(self._started, emission), ordered=True)
            jax.debug.callback(functools.partial(self._fired, emission), weights, traced_mask, ordered=True)
        except Exception as exc:  # a transformation that cannot call back (pmap, shard_map...)
            emission.tracer = f"{emission.tracer}; jax.debug.callback failed there: {type(exc).__name__}: {exc}"

    def _started(self, emission: _Emission) -> None:
        emission.layer = None

    def _fired(self, emission: _Emission, weights: Any, traced_mask: Any) -> None:
        with self.lock:
            into = self.current if self.current is not None and self.current.serial == emission.serial else \
                self.staged.get(emission.serial)
            if into is None:
                return  # recomputed after its pass was recorded (grad through remat): recorded already
            emission.fired = True
            mask = traced_mask if traced_mask is not None else emission.mask
            self._append(into, emission.name, weights, emission.kind, mask, emission.is_causal, emission.layout,
                         emission.infer, emission)

    def outermost(self, call: Callable[[], Any], input_ids: Any = None, *, forward: bool = True) -> Any:
        """Run ``call`` (a root-model call) as one forward pass; nested root calls join the pass.

        The outermost call begins the pass and finishes it, or discards it when the call raises.
        ``forward``: the call is the model's forward (a pass of another method that runs no attention,
        e.g. building a cache, records nothing and is no error, unless no pass of the block recorded
        anything: see :meth:`close`).
        """
        if self.depth == 0:
            self.begin(input_ids, forward=forward)
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
            if self.after_pass is not None and self.current is not None:
                try:
                    self.after_pass(self.current.layers)
                except BaseException:
                    self.discard()
                    raise
            self.finish()
        return result

    def discard(self) -> None:
        with self.lock:
            self.current = None

    def finish(self) -> None:
        """Record the pass; a forward pass that recorded no attention is an error that says what ran."""
        with self.lock:
            done, self.current = self.current, None
            if done is None:
                return
            if not done.layers and _unfired(done):  # the model call itself is traced: end it when it runs
                import jax

                self.staged[done.serial] = done
                try:
                    jax.debug.callback(functools.partial(self._staged_end, done.serial), ordered=True)
                    return
                except Exception:  # pragma: no cover - a transformation that cannot call back
                    del self.staged[done.serial]
        self._complete(done)

    def _staged_end(self, serial: int) -> None:
        with self.lock:
            done = self.staged.pop(serial, None)
        if done is not None:  # recorded from within the computation; a recomputation finds it gone
            self._complete(done)

    def _complete(self, done: _Pass) -> None:
        never = _unfired(done)
        if never:
            raise _tracer_error(never[0])
        if not done.layers:
            if done.forward:
                self._no_attention()
            self.empty += 1
            return
        self._record(done.layers, done.input_ids)
        self.recorded += 1

    def close(self) -> None:
        """The block ends: finish an open pass; raise for a pass whose traced computation never ran while
        attached; a block whose passes all ran without attention is the error of a forward pass without
        attention (capture() of a model's method other than its forward)."""
        self.finish()
        with self.lock:
            staged, self.staged = list(self.staged.values()), {}
        if self.emitted:
            forget_traced_callbacks()
        for done in staged:
            self._complete(done)
        if self.empty and not self.recorded:
            self.empty = 0
            self._no_attention()

    def _no_attention(self) -> None:
        """Reach the recorder's own "recorded no attention" error, with what this adapter saw added."""
        self.recorder.start_call(metadata={self.metadata_key: self.api})
        try:
            self.recorder.end_call()
        except AdapterError as exc:
            detail = self.no_attention() if self.no_attention is not None else ""
            raise AdapterError(f"{exc}{' ' + detail if detail else ''}") from None

    def _record(self, layers: list[_Layer], input_ids: Any) -> None:
        plan = plan_streams(dict.fromkeys(layer.name for layer in layers), None)
        lengths: dict[str, int] = {}
        keys: dict[str | None, list[_Layer]] = {}
        streams = []
        for layer in layers:
            query = plan.streams.get(layer.name)
            key = query
            if layer.kind == "cross":
                key = (pick_key_stream(query, layer.weights.shape[-1], lengths) or "memory") if query else "memory"
            else:
                lengths.setdefault(query, layer.weights.shape[-1])  # type: ignore[arg-type]
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
                length = lengths.get(stream) if stream is not None else layers[0].weights.shape[2]
                if stream != "memory" and length == input_ids.shape[1]:
                    info["input_ids"] = input_ids
                    break
        single = described.pop(None, {})
        counts: dict[str, int] = {}
        for layer in layers:
            counts[layer.name] = counts.get(layer.name, 0) + 1
        prefixes = {
            name: (self.repeat_prefix(name, count) if self.repeat_prefix is not None else None)
            for name, count in counts.items() if count > 1
        }
        self.recorder.start_call(
            mask=single.get("mask"), input_ids=single.get("input_ids"), causal=single.get("causal"),
            metadata={self.metadata_key: self.api, **self.metadata},
            streams={name: info for name, info in described.items() if name},
        )
        try:
            for layer, (query, key) in zip(layers, streams):
                self.recorder.record(
                    layer.name, layer.weights, kind=layer.kind, source_dtype=layer.source_dtype,
                    query_stream=query, key_stream=key if query is not None else None,
                    repeat_prefix=prefixes.get(layer.name), extras=layer.extras,
                )
        except BaseException:
            self.recorder.abort_call()
            raise
        self.recorder.end_call()


#: jax's caches of traced (not compiled) functions: a function traced while attached holds attnflow's callbacks
#: there (a long-lived ``jax.checkpoint``-wrapped forward), and would call them instead of running the Python
#: code a later attach watches.
_TRACE_CACHES = (
    ("jax._src.interpreters.partial_eval", "trace_to_jaxpr"),
    ("jax._src.ad_checkpoint", "_trace_to_jaxpr"),
    ("jax._src.ad_checkpoint", "_dyn_args_fun_cached"),
)


def forget_traced_callbacks() -> None:
    """Empty jax's caches of traced functions after a block that sent attention out of traced code, so that
    no cached trace keeps (and calls) attnflow's callbacks. Compiled executables are left alone: a jitted
    function traces again, and finds its compiled code."""
    for module, name in _TRACE_CACHES:
        cache_clear = getattr(getattr(sys.modules.get(module), name, None), "cache_clear", None)
        if cache_clear is not None:
            cache_clear()


def _unfired(done: _Pass) -> list[_Emission]:
    """Traced layers of a pass that never called back and that the pass did not record otherwise (a layer
    ``nn.scan`` traced once before running it concretely is recorded all the same)."""
    seen = {layer.name for layer in done.layers}
    return [emission for emission in done.pending if not emission.fired and emission.name not in seen]


def _tracer_error(emission: _Emission) -> AdapterError:
    return AdapterError(
        f"The attention of {emission.name!r} reached attnflow only as a JAX tracer ({emission.tracer}), and the "
        "traced computation did not run while attached, so its values cannot be recorded. attnflow records "
        "traced attention (under jax.vmap, jax.grad, jax.checkpoint / remat, scan) through jax.debug.callback "
        "as it is computed, and disables jax.jit while attached; this computation is compiled or run only "
        "after the block (attach() entered inside a function under jax.jit), or runs under a transformation "
        "that cannot call back (pmap, shard_map). Enter attach() outside the traced function: around the call "
        "to your jitted function, not inside it."
    )


def outermost_prefix(name: str, boundaries: Mapping[str, int]) -> str | None:
    """The outermost of ``boundaries`` (module paths of scanned bodies, with how often each was entered) on
    ``name``'s path (itself included) that was entered more than once: the scanned module a repeated layer
    belongs to."""
    parts = name.split("/")
    for end in range(1, len(parts) + 1):
        prefix = "/".join(parts[:end])
        if boundaries.get(prefix, 0) > 1:
            return prefix
    return None


def module_listing(entries: Collection[tuple[str, str]], limit: int = 10) -> str:
    """``"path (Class), ..."`` for an error message."""
    shown = [f"{path or '<root>'} ({cls})" for path, cls in itertools.islice(entries, limit)]
    more = len(entries) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def no_attention_hint(ran: str, framework_attention: str) -> str:
    return (
        f"attnflow recognises {framework_attention} and modules that sow 'attention_weights'; the modules "
        f"that ran were: {ran}. Select the modules that compute attention with modules=[MyAttention] or "
        "modules=['layers_*/attn'] (attnflow then records the jax.nn.softmax they compute; give layout='bqhk' "
        "or similar when their probabilities are not laid out (batch, heads, query, key))."
    )
