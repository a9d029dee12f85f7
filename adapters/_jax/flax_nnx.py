"""Flax NNX adapter: attention of an unmodified ``nnx`` model, by per-instance wrapping undone on exit.

Usage::

    trace = attnflow.capture(model, x)                    # runs model(x)
    with attnflow.attach(model) as rec:
        y = model(x)                                      # or a jax.jit / nnx.jit-wrapped forward
    trace = rec.trace

What is recorded: every ``nnx.MultiHeadAttention`` (and subclass) in the model's graph, and every
module of the graph that sows ``'attention_weights'`` itself (passes ``module=self`` to
``nnx.dot_product_attention``). With ``modules=[...]`` (classes, globs over graph paths, regexes) only the
selected modules are recorded: the ``jax.nn.softmax`` over the key axis their ``__call__`` computes
(``nnx.softmax`` is the same function), laid out as ``layout=`` says (default ``"bhqk"``); mask and causality
are read from the probabilities. Layers are named by their graph path (``"encoder/layer/3/attention"``)
and kept in the order they ran. A layer of a stacked module run several times in one pass (``nnx.scan``
over ``nnx.vmap``-created layers: every parameter of the module has the layer axis first) is numbered after
the stacked module's path (``"layers/attn"`` becomes ``"layers/0/attn"``...), as an unrolled ``nnx.List`` of
layers is named, so the two pair in ``attnflow.compare(a, b, align="names")``.

How, for the duration of the block only:

- each ``nnx.MultiHeadAttention`` instance gets its ``attention_fn`` attribute replaced by a wrapper
  that calls the original with ``module=`` set to a small proxy whose ``sow`` hands the weights to
  attnflow (and, when the call asked for ``sow_weights=True`` itself, on to the module as before). The
  wrapper also sees the call's ``mask`` and ``is_causal``, which give the trace's key-validity mask
  and causality.
- every other module of the graph gets an instance attribute ``sow`` that takes
  ``'attention_weights'`` to attnflow and forwards everything to ``Module.sow`` unchanged.
- the root model's class is swapped for a cached subclass whose public methods mark where a forward
  pass begins and ends (one trace per call).
- with ``modules=``, each selected module's class is swapped for a subclass whose ``__call__`` hands the
  softmax outputs computed during the call to attnflow (nothing else is patched then).

Nothing touches a ``Variable``: graph state, graph definition, types and attributes are exactly as
before when the block exits, also when it raises. A call through the proxy makes Flax take its
explicit-weights path instead of ``jax.nn.dot_product_attention`` (the same maths; float results can
differ in the last bits).

jax.jit / nnx.jit: while attached, jit is disabled (``jax.disable_jit``), so a jitted forward runs
eagerly inside the block and its attention is recorded from concrete arrays; nothing is traced with
recording in it, so no jit cache is changed. Weights that are tracers (under ``jax.vmap``, ``jax.grad``,
``nnx.remat``, ``nnx.scan``) are sent out with an ordered ``jax.debug.callback`` and recorded when computed;
an ``attach`` entered inside a traced function raises :class:`attnflow.AdapterError` instead of leaking a
tracer.

Only the attached object graph is wrapped (``nnx.jit`` carries the wrapping through its own
split/merge). Modules rebuilt by ``nnx.merge`` from a graph definition split *before* the block are
new objects attnflow never saw: attach to (or capture) the merged model instead.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

from attnflow import Adapter, AdapterError, HiddenAttentionError, OptionError, Recorder, import_optional
from attnflow.recording import deferred_interrupts, switch

from . import _flax_methods as methods
from ._flax_common import (
    OPTIONS,
    UNKNOWN,
    PassCollector,
    Selection,
    Settings,
    SoftmaxFrame,
    ThreadSlot,
    check_options,
    find_input_ids,
    is_tracer,
    jit_disabled,
    module_listing,
    no_attention_hint,
    no_softmax_error,
    softmax_hook,
    undoing,
    watching_softmax,
)
from .flax_linen import root_module

_ATTENTION_NAME = "attention_weights"


def _nnx() -> Any:
    return import_optional("flax.nnx", "jax")


class _NNXCapture:
    def __init__(self, recorder: Recorder, settings: Settings, modules: dict[str, Any],
                 value_map: methods.FlaxValueMap | None = None):
        self.selection = settings.selection
        self.modules = modules  # graph path -> module
        self.request = recorder.request
        self.value_map = value_map  # values=True: where the model's layers keep values, projection, norm
        extra = self.request.gradients or value_map is not None
        self.collector = PassCollector(
            recorder, api="nnx", cross=settings.cross, repeat_prefix=self._repeat_prefix,
            no_attention=self._no_attention, after_pass=self._after_pass if extra else None,
            metadata={"values_layout": value_map.layout} if value_map is not None and self.request.values else None,
        )
        self.closed = False  # copies made by nnx.split inside the block outlive it: they pass through
        self.call: tuple[Any, Any, tuple, dict] | None = None  # the outermost forward call of the open pass
        self.kept: dict[str, dict[str, list[Any]]] = {}  # values=True: layer -> slot -> arrays, this pass

    def keep(self, layer: str, slot: str, value: Any) -> None:
        """A module input or output a value map names, seen during the pass (tracers are left out: the pass's
        extras then say that values= needs an eager forward pass)."""
        if self.collector.active and not is_tracer(value):
            self.kept.setdefault(layer, {}).setdefault(slot, []).append(value)

    # -- what the methods need beside the weights (target=, values=True) ------------------------------------
    def _after_pass(self, layers: list) -> None:
        try:
            methods.require_eager(self.collector)
            if self.request.values:
                methods.add_value_extras(layers, cast(methods.FlaxValueMap, self.value_map), self.modules, self.kept)
            if self.request.gradients and layers:
                self._gradients(layers)
            if self.request.value_zeroing:
                self._value_zeroing(layers)
        finally:
            self.kept = {}

    def _gradients(self, layers: list) -> None:
        """One more run of the pass's call under ``jax.grad``, nothing recorded, with a zero added to each
        layer's attention probabilities (see ``adapters/_jax/_flax_methods.py``)."""
        if self.call is None:
            raise AdapterError("target=: the forward call of the pass is unknown (attention ran outside a call of "
                               "the captured model); call the model itself inside the block.")
        method, instance, args, kwargs = self.call

        def forward(deltas: list) -> Any:
            injection = _Injection(self, [layer.name for layer in layers], deltas)
            with _injecting(injection):
                output = method(instance, *args, **kwargs)
            injection.check()
            return output

        methods.attention_gradients(layers, self.request, forward,
                                    "no state it mutates, e.g. dropout in training mode: call model.eval() first")

    def _value_zeroing(self, layers: list) -> None:
        """Each value-mapped self-attention layer's block run again per item with each token's values zeroed in
        turn (see ``adapters/_jax/_flax_methods.py``), nothing recorded: extra ``"value_zeroing"``."""
        layout = cast(methods.FlaxValueMap, self.value_map)  # called when there is one
        for layer, path, call in methods.mapped_layers(layers, layout):
            kept = self.kept.get(path, {})
            if len(kept.get(methods.BLOCK_CALL, ())) <= call or len(kept.get(methods.BLOCK_OUTPUT, ())) <= call:
                raise AdapterError(f"value_zeroing=True: the block {path!r} of {layer.name!r} did not run eagerly during "
                                   "the forward pass; call the model directly (not under jax.vmap, jax.grad or nnx.scan).")
            relative = methods.value_alternative(  # the one of the map's | alternatives that ran
                layout, kept, call, path, "a LinearGeneral: nnx.MultiHeadAttention's 'value'"
            )
            block, value = self.modules[path], self.modules[f"{path}/{relative}"]
            args, kwargs = kept[methods.BLOCK_CALL][call]

            def rerun(a: tuple, k: dict, keep: Any, block: Any = block, value: Any = value) -> Any:
                with _injecting(_Rerun(self, value, layout.value_index, keep)):
                    return block(*a, **k)

            layer.extras["value_zeroing"] = methods.value_zeroing(rerun, args, kwargs, kept[methods.BLOCK_OUTPUT][call],
                                                                  layer.keys, layer.causal)

    def _repeat_prefix(self, name: str, count: int) -> str | None:
        """The stacked module on ``name``'s path: every parameter has ``count`` layers on its first axis."""
        jax, nnx = import_optional("jax", "jax"), _nnx()
        parts = name.split("/")
        for end in range(1, len(parts) + 1):
            module = self.modules.get("/".join(parts[:end]))
            if module is None:
                continue
            leaves = jax.tree.leaves(nnx.state(module, nnx.Param))
            if leaves and all(getattr(leaf, "ndim", 0) >= 1 and leaf.shape[0] == count for leaf in leaves):
                return "/".join(parts[:end])
        return None

    def _no_attention(self) -> str:
        ran = module_listing([(name, type(module).__name__) for name, module in self.modules.items()])
        if self.selection is not None:
            return f"No module of the model matches modules={self.selection.selectors!r}; its modules are: {ran}."
        return no_attention_hint(ran, "flax.nnx.MultiHeadAttention (and subclasses)").replace(
            "the modules that ran were", "the model's modules are")

    # -- pass boundaries (called by the root's wrapped methods) -------------------------------------
    def call_root(self, method: Any, instance: Any, args: tuple, kwargs: dict, forward: bool = True) -> Any:
        if self.collector.depth == 0:
            self.call, self.kept = (method, instance, args, kwargs), {}
        return self.collector.outermost(lambda: method(instance, *args, **kwargs), find_input_ids(args, kwargs),
                                        forward=forward)

    def close(self) -> None:
        self.closed = True
        self.collector.close()


#: Per module (by id): the captures attached to it and the name each gives it, in the order they attached.
_ON_MODULE: dict[int, list[tuple[_NNXCapture, str]]] = {}


def _listeners(module: Any, selected: bool = False) -> list[tuple[PassCollector, str]]:
    """The captures attached to ``module`` (those with ``modules=`` when ``selected``, else the others)."""
    if _injection() is not None:
        return []
    return [(capture.collector, name) for capture, name in _ON_MODULE.get(id(module), ())
            if not capture.closed and (capture.selection is not None) == selected]


def _selected_listeners(module: Any) -> list[tuple[_NNXCapture, str]]:
    if _injection() is not None:
        return []
    return [(capture, name) for capture, name in _ON_MODULE.get(id(module), ())
            if not capture.closed and capture.selection is not None]


# -- the gradient pass: nothing is recorded, a zero is added to each recorded layer's probabilities ---------------
_INJECTION = ThreadSlot()  # this thread's gradient (or re-run) pass


def _injection() -> _Injection | _Rerun | None:
    return _INJECTION.get()


def _injecting(injection: _Injection | _Rerun) -> Any:
    return _INJECTION.holding(injection)


class _Injection:
    """The gradient pass of one capture: the ``i``-th attention call of the capture's layers adds
    ``deltas[i]`` to its probabilities (layers in the order the recorded pass ran them)."""

    def __init__(self, capture: _NNXCapture, names: list[str], deltas: list[Any]):
        self.capture, self.names, self.deltas = capture, names, deltas
        self.used = 0

    def call(self, owner: Any, original: Any, args: tuple, module: Any, kwargs: dict) -> Any:
        name = next((name for capture, name in _ON_MODULE.get(id(owner), ()) if capture is self.capture), None)
        if name is None:
            return original(*args, module=module, **kwargs)
        index = self.used
        if index >= len(self.names) or self.names[index] != name:
            expected = self.names[index] if index < len(self.names) else "no more attention"
            raise AdapterError(
                f"target=: the gradient pass ran {name!r} where the recorded pass ran {expected!r}; the model's "
                "forward must run the same layers when called again with the same inputs."
            )
        self.used += 1
        # a module= makes Flax compute the probabilities with jax.nn.softmax, as the recorded pass did
        proxy = _SowProxy([], forward=module, mask=None, is_causal=False)
        return methods.perturbed_call(lambda: original(*args, module=proxy, **kwargs), self.deltas[index], name,
                                      "nnx.dot_product_attention")

    def check(self) -> None:
        if self.used != len(self.names):
            missing = self.names[self.used]
            raise AdapterError(
                f"target=: {missing!r} took no part in the gradient pass; gradients are read from "
                "nnx.MultiHeadAttention layers (their attention_fn), not from modules that sow 'attention_weights' "
                "themselves. Capture such models without target=."
            )


class _Rerun:
    """A value-zeroing re-run of one block (``value_zeroing=True``): nothing is recorded, attention is computed
    as in the recorded pass, and the output of the ``value`` module is multiplied by ``keep`` ``(variants, keys)``,
    at ``index`` of a stacked output (:attr:`FlaxValueMap.value_index`)."""

    def __init__(self, capture: _NNXCapture, value: Any, index: int | None, keep: Any):
        self.capture, self.value, self.index, self.keep = capture, value, index, keep

    def call(self, owner: Any, original: Any, args: tuple, module: Any, kwargs: dict) -> Any:
        # a module= makes Flax compute the probabilities as the recorded pass did (its explicit-weights path)
        return original(*args, module=_SowProxy([], forward=module, mask=None, is_causal=False), **kwargs)


def _selected_class(module: Any) -> type:
    """A subclass of ``type(module)`` for this instance alone, whose ``__call__`` hands the softmax computed
    during the call to every capture that selected the module (copies made by ``nnx.merge`` inside
    ``nnx.scan`` or ``nnx.vmap`` keep the class, so they report for the original)."""
    cls = type(module)
    owner = module

    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        listeners = _selected_listeners(owner)
        if not listeners:
            return cls.__call__(self, *args, **kwargs)
        frames = []
        with contextlib.ExitStack() as watching:
            for capture, name in listeners:
                layout = cast(Selection, capture.selection).layout  # listeners have a selection

                def take(probabilities: Any, collector: PassCollector = capture.collector, name: str = name,
                         layout: Any = layout) -> None:
                    collector.add(name, probabilities, layout=layout, infer=True)

                frames.append(watching.enter_context(watching_softmax(SoftmaxFrame(capture, name, layout, take))))
            result = cls.__call__(self, *args, **kwargs)
        for frame in frames:
            if frame.count == 0:
                raise no_softmax_error(frame.name, cls.__name__, frame)
        return result

    namespace = {"__module__": cls.__module__, "__qualname__": cls.__qualname__, "__call__": __call__,
                 "__attnflow_selected__": cls}
    # misc ignored: mypy cannot type a call of the metaclass (nnx's, which takes pytree=)
    return type(cls)(cls.__name__, (cls,), namespace,  # type: ignore[misc]
                     pytree=getattr(cls, "_pytree__is_pytree", True))


#: Per module (by id), for values=True: (capture, layer, slot, "input" or "output") to keep at each call.
_TAPS: dict[int, list[tuple[_NNXCapture, str, str, str]]] = {}


def _tap_class(module: Any) -> type:
    """A subclass of ``type(module)`` for this instance alone, whose ``__call__`` hands its first input or its
    output to the captures that keep them (values=True); nothing is kept during the gradient pass."""
    cls = type(module)
    owner = module

    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = cls.__call__(self, *args, **kwargs)
        injection = _injection()
        if injection is None:
            for capture, layer, slot, which in _TAPS.get(id(owner), ()):
                if capture.closed:
                    continue
                if which == "output":
                    capture.keep(layer, slot, result)
                elif which == "call":
                    capture.keep(layer, slot, (args, kwargs))
                elif args or kwargs:
                    capture.keep(layer, slot, args[0] if args else next(iter(kwargs.values())))
        elif isinstance(injection, _Rerun) and injection.value is owner:
            result = methods.zeroed(result, injection.keep, injection.index)
        return result

    namespace = {"__module__": cls.__module__, "__qualname__": cls.__qualname__, "__call__": __call__,
                 "__attnflow_tapped__": cls}
    # misc ignored: mypy cannot type a call of the metaclass (nnx's, which takes pytree=)
    return type(cls)(cls.__name__, (cls,), namespace,  # type: ignore[misc]
                     pytree=getattr(cls, "_pytree__is_pytree", True))


def _install_taps(capture: _NNXCapture, layout: methods.FlaxValueMap, undo: Any) -> None:
    """Keep, for values=True, the inputs and outputs the value map names, for every layer of the map."""
    nnx = _nnx()
    layers = [path for path in (methods.layer_of(name, layout) for name, module in capture.modules.items()
                                if isinstance(module, nnx.MultiHeadAttention)) if path is not None]
    keyword = "values" if capture.request.values else "value_zeroing"  # the keyword the user gave, for errors
    if not layers:
        raise AdapterError(
            f"{keyword}=True: no nnx.MultiHeadAttention of the model is at the path its value map names "
            f"('<layer>/{layout.attention}'); attention modules are at {list(capture.modules)[:8]}..."
        )
    taps = layout.taps()
    if capture.request.value_zeroing:  # the block's call and output, to run it again with values zeroed
        taps.update({methods.BLOCK_CALL: ("", "call"), methods.BLOCK_OUTPUT: ("", "output")})
    values = layout.value_taps()  # the slots of the value module's | alternatives
    for layer in layers:  # each layer has one of the alternatives (at least): the absent ones are not tapped
        if not any(f"{layer}/{relative}" in capture.modules for relative in values.values()):
            raise AdapterError(
                f"{keyword}=True: layer {layer!r} has no value module the value map names ({layout.value!r}); "
                "FlaxValueMap.value must name the module, relative to the layer, whose output is the values (a "
                "LinearGeneral: nnx.MultiHeadAttention's 'value'), or '|'-separated alternatives of which each "
                "layer has one."
            )
        for slot, (relative, which) in taps.items():
            module = capture.modules.get(f"{layer}/{relative}" if relative else layer)
            if module is None and slot in values:
                continue  # another alternative is this layer's value module
            if module is None:
                raise AdapterError(f"{keyword}=True: layer {layer!r} has no module {relative!r} where its value map keeps {slot!r}.")
            for extra in (layout.out, layout.norm):
                if extra is not None and f"{layer}/{extra}" not in capture.modules:
                    raise AdapterError(f"{keyword}=True: layer {layer!r} has no module {extra!r} that its value map names.")
            if id(module) not in _TAPS:
                undo.enter_context(switch(("flax_nnx.tap_class", id(module)),
                                          # misc ignored: no type inferred for a lambda whose default binds the module
                                          lambda m=module: _swap_class(m, _tap_class(m)),  # type: ignore[misc]
                                          _unswap(module)))
            entries = _TAPS.setdefault(id(module), [])
            entry = (capture, layer, slot, which)
            entries.append(entry)
            undo.callback(_untap, module, entry)


def _untap(module: Any, entry: tuple) -> None:
    entries = _TAPS.get(id(module), [])
    if entry in entries:
        entries.remove(entry)
    if not entries:
        _TAPS.pop(id(module), None)


def _dispatching_attention_fn(module: Any, original: Any) -> Any:
    """The ``attention_fn`` an ``nnx.MultiHeadAttention`` gets while attached (once, however many attaches):
    it calls the original with ``module=`` a proxy whose ``sow`` hands the weights to every attached capture."""

    @functools.wraps(original)
    def attention_fn(*args: Any, module: Any = None, **kwargs: Any) -> Any:
        injection = _injection()
        if injection is not None:
            return injection.call(owner, original, args, module, kwargs)
        listeners = _listeners(owner)
        if not listeners:
            return original(*args, module=module, **kwargs)
        proxy = _SowProxy(listeners, forward=module, mask=kwargs.get("mask"),
                          is_causal=bool(kwargs.get("is_causal", False)))
        result = original(*args, module=proxy, **kwargs)
        if not proxy.seen:
            raise HiddenAttentionError(
                f"{listeners[0][1]!r} uses attention_fn={original!r}, which did not sow its attention weights "
                "through module=; use nnx.dot_product_attention (or an attention_fn that passes module= "
                "on to it) so the weights can be recorded."
            )
        return result

    owner = module
    attention_fn.__attnflow_original__ = original  # type: ignore[attr-defined]
    return attention_fn


def _dispatching_sow(module: Any, previous: Any) -> Any:
    """The ``sow`` any other module gets while attached: ``'attention_weights'`` go to every attached
    capture, and everything goes on to the module's own ``sow`` unchanged."""

    def sow(variable_type: Any, sow_name: str, value: Any, *args: Any, **kwargs: Any) -> bool:
        if sow_name == _ATTENTION_NAME and _is_intermediate(variable_type):
            for collector, name in _listeners(module):
                collector.add(name, value)
        if previous is not UNKNOWN:
            return previous(variable_type, sow_name, value, *args, **kwargs)
        return type(module).sow(module, variable_type, sow_name, value, *args, **kwargs)

    return sow


class _SowProxy:
    """What an ``nnx.MultiHeadAttention`` passes as ``module=`` while attached: takes the sown weights."""

    def __init__(self, listeners: list[tuple[PassCollector, str]], *, forward: Any, mask: Any, is_causal: bool):
        self.listeners, self.forward = listeners, forward
        self.mask, self.is_causal, self.seen = mask, is_causal, False

    def __bool__(self) -> bool:
        return True

    def sow(self, variable_type: Any, name: str, value: Any, *args: Any, **kwargs: Any) -> bool:
        if name == _ATTENTION_NAME and _is_intermediate(variable_type):
            self.seen = True
            for collector, layer in self.listeners:
                collector.add(layer, value, mask=self.mask, is_causal=self.is_causal)
        if self.forward is not None:  # the caller asked for sow_weights=True itself
            return self.forward.sow(variable_type, name, value, *args, **kwargs)
        return False


def _is_intermediate(variable_type: Any) -> bool:
    nnx = _nnx()
    if isinstance(variable_type, str):
        return variable_type in ("intermediates", "Intermediate")
    return isinstance(variable_type, type) and issubclass(variable_type, nnx.Intermediate)


# Root classes are swapped for a subclass that marks pass boundaries; one subclass per class, made once.
_ROOT_CLASSES: dict[type, type] = {}
_ROOT_LOCK = threading.Lock()
_active = threading.local()


def _active_captures() -> list[_NNXCapture]:
    stack = getattr(_active, "stack", None)
    if stack is None:
        stack = _active.stack = []
    return stack


def _root_class(cls: type) -> type:
    """A subclass of ``cls`` whose ``__call__`` and public methods (those not from ``nnx.Module``)
    mark forward-pass boundaries; made once per class."""
    nnx = _nnx()
    with _ROOT_LOCK:
        if cls in _ROOT_CLASSES:
            return _ROOT_CLASSES[cls]
        framework_classes = set(nnx.Module.__mro__)
        framework_names = {name for klass in framework_classes for name in vars(klass)}
        names = set()
        for klass in cls.__mro__:
            if klass in framework_classes:
                continue
            for name, value in vars(klass).items():
                if (name.startswith("_") and name != "__call__") or name in framework_names:
                    continue
                if callable(value) and not isinstance(value, (staticmethod, classmethod, type)):
                    names.add(name)
        namespace: dict[str, Any] = {
            "__module__": cls.__module__, "__qualname__": cls.__qualname__, "__attnflow_root__": cls,
        }
        for name in sorted(names):
            method = getattr(cls, name, None)
            if callable(method):
                namespace[name] = _root_method(method)
        subclass = type(cls)(cls.__name__, (cls,), namespace, pytree=getattr(cls, "_pytree__is_pytree", True))
        _ROOT_CLASSES[cls] = subclass
        return subclass


def _root_method(method: Any) -> Any:
    @functools.wraps(method)
    def wrapped(self: Any, *args: Any, **kwargs: Any) -> Any:
        return _call_through(tuple(_active_captures()), method, self, args, kwargs)

    return wrapped


def _call_through(captures: tuple, method: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    """Call ``method`` inside the pass boundaries of every capture active in this thread."""
    if not captures or _injection() is not None:  # the gradient pass opens no pass
        return method(instance, *args, **kwargs)

    def inner(obj: Any, *a: Any, **k: Any) -> Any:
        return _call_through(captures[1:], method, obj, a, k)

    return captures[0].call_root(inner, instance, args, kwargs, forward=method.__name__ == "__call__")


class NNXAdapter(Adapter):
    """Captures ``flax.nnx`` models; see the module docstring for how and for the jit story.

    Options: ``cross`` marks layers as cross-attention by name (a collection of names or a
    predicate); by default a layer whose query and key lengths differ is ``"cross"``. ``modules`` selects
    the modules whose call computes attention (classes, path globs, regexes) and ``layout`` says how their
    softmax output is laid out.
    """

    name = "flax_nnx"
    framework = "flax"
    array_library = "jax"
    extra = "jax"
    priority = 0
    options = OPTIONS
    captures = Adapter.captures | {"input_gradients", "ablation", "attn_grad", "values", "value_zeroing"}

    def claims(self, model: Any) -> bool:
        return root_module(model, _nnx().Module) is not None

    def probe(self, model: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        """Blank-out and input gradients in JAX for :func:`attnflow.faithfulness` (``adapters/_jax/_faithfulness_flax.py``)."""
        from ._faithfulness_flax import probe

        return probe(model, request, args, kwargs)

    def model_name(self, model: Any) -> str:
        root = root_module(model, _nnx().Module)
        return type(root if root is not None else model).__name__

    @contextmanager
    def hooks(self, model: Any, recorder: Recorder, **options: Any) -> Iterator[None]:
        nnx = _nnx()
        jax = import_optional("jax", "jax")
        root = root_module(model, nnx.Module)
        if root is None:
            raise AdapterError(
                f"The flax_nnx adapter needs an nnx.Module (or a bound method of one), got {type(model).__name__}."
            )
        settings = check_options(self.name, options, nnx.Module)
        selection = settings.selection
        modules = {
            "/".join(str(part) for part in path) or type(module).__name__: module
            for path, module in nnx.iter_modules(root)
        }
        request = recorder.request
        if selection is not None and (request.gradients or request.values or request.value_zeroing):
            raise OptionError(
                "target=, values= and value_zeroing= read nnx.MultiHeadAttention layers (the Flax BERT port in "
                "examples/flax_bert.py and models like it); they cannot be combined with modules=. Capture the "
                "selected modules' weights alone, or leave out modules=."
            )
        value_map = None
        if request.values or request.value_zeroing:
            value_map = methods.value_map(getattr(type(root), "__attnflow_root__", type(root)).__name__,
                                          "value_zeroing" if not request.values else "values")
        capture = _NNXCapture(recorder, settings, modules, value_map)
        # the switch undoes everything even when an exception (a signal handler's) arrives as undoing() ends
        with undoing() as undo, switch(("flax_nnx.undo", id(undo)), lambda: undo, contextlib.ExitStack.close):
            with deferred_interrupts():
                if request.gradients:
                    undo.enter_context(softmax_hook())
                if value_map is not None:
                    _install_taps(capture, value_map, undo)
                # the root's class swap is shared by overlapping attaches: the last to leave puts it back
                undo.enter_context(switch(("flax_nnx.root_class", id(root)), lambda: _swap_class(root), _unswap(root)))
                if selection is not None and selection.needs_softmax:
                    undo.enter_context(softmax_hook())
                for name, module in modules.items():
                    # one patch per module, shared by overlapping attaches: they may end in any order
                    if selection is not None:
                        if not selection.match(name, module):
                            continue
                        undo.enter_context(switch(("flax_nnx.selected_class", id(module)),
                                                  # misc ignored: no type inferred for a lambda whose default
                                                  # binds the module
                                                  lambda m=module: _swap_class(m, _selected_class(m)),  # type: ignore[misc]
                                                  _unswap(module)))
                    elif isinstance(module, nnx.MultiHeadAttention):
                        undo.enter_context(_patched(module, "attention_fn", _dispatching_attention_fn))
                    else:
                        undo.enter_context(_patched(module, "sow", _dispatching_sow))
                    attached = _ON_MODULE.setdefault(id(module), [])
                    attached.append((capture, name))
                    undo.callback(_detach, module, attached, capture)
                stack = _active_captures()
                stack.append(capture)
                undo.callback(stack.remove, capture)
                undo.callback(setattr, capture, "closed", True)
                undo.enter_context(jit_disabled(jax))
            yield
        capture.close()


def _swap_class(module: Any, to: type | None = None) -> type:
    original = type(module)
    object.__setattr__(module, "__class__", to if to is not None else _root_class(original))
    return original


def _unswap(module: Any) -> Any:
    return lambda original: object.__setattr__(module, "__class__", original)


def _patched(module: Any, attribute: str, make: Any) -> Any:
    """Set an instance attribute (``make(module, previous)``) without NNX's checks while any attach holds it,
    and put back exactly what was there (or nothing) when the last one leaves."""

    def turn_on() -> Any:
        previous = module.__dict__.get(attribute, UNKNOWN)
        current = previous if previous is not UNKNOWN else getattr(module, attribute)
        object.__setattr__(module, attribute, make(module, current if attribute == "attention_fn" else previous))
        return previous

    def turn_off(previous: Any) -> None:
        if previous is UNKNOWN:
            object.__delattr__(module, attribute)
        else:
            object.__setattr__(module, attribute, previous)

    return switch(("flax_nnx", attribute, id(module)), turn_on, turn_off)


def _detach(module: Any, attached: list, capture: _NNXCapture) -> None:
    attached[:] = [entry for entry in attached if entry[0] is not capture]
    if not attached:
        _ON_MODULE.pop(id(module), None)
