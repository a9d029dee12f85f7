"""Flax NNX adapter: attention of an unmodified ``nnx`` model, by per-instance wrapping undone on exit.

Usage::

    trace = attnflow.capture(model, x)                    # runs model(x)
    with attnflow.attach(model) as rec:
        y = model(x)                                      # or a jax.jit / nnx.jit-wrapped forward
    trace = rec.trace

What is recorded: every ``nnx.MultiHeadAttention`` (and subclass) in the model's graph, and every
module of the graph that sows ``'attention_weights'`` itself (passes ``module=self`` to
``nnx.dot_product_attention``). Layers are named by their graph path (``"encoder/layer/3/attention"``)
and kept in the order they ran.

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

Nothing touches a ``Variable``: graph state, graph definition, types and attributes are exactly as
before when the block exits, also when it raises. A call through the proxy makes Flax take its
explicit-weights path instead of ``jax.nn.dot_product_attention`` (the same maths; float results can
differ in the last bits).

jax.jit / nnx.jit: while attached, jit is disabled (``jax.disable_jit``), so a jitted forward runs
eagerly inside the block and its attention is recorded from concrete arrays; nothing is traced with
recording in it, so no jit cache is changed. Weights seen only as tracers (under ``jax.vmap``,
``jax.grad``, ``nnx.remat``, or an ``attach`` entered inside a traced function) are never stored:
the pass raises :class:`attnflow.AdapterError` instead of leaking a tracer.

Only the attached object graph is wrapped (``nnx.jit`` carries the wrapping through its own
split/merge). Modules rebuilt by ``nnx.merge`` from a graph definition split *before* the block are
new objects attnflow never saw: attach to (or capture) the merged model instead.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from attnflow import Adapter, AdapterError, HiddenAttentionError, Recorder, import_optional
from attnflow._switches import deferred_interrupts, switch

from ._flax_common import UNKNOWN, PassCollector, check_options, find_input_ids, undoing
from .flax_linen import jit_disabled, root_module, thread_stack

_ATTENTION_NAME = "attention_weights"
#: Attribute of attnflow's wrappers: what the wrapper replaced (and calls).
_BELOW = "__attnflow_below__"


def _nnx() -> Any:
    return import_optional("flax.nnx", "jax")


class _NNXCapture:
    def __init__(self, recorder: Recorder, cross: Any):
        self.collector = PassCollector(recorder, api="nnx", cross=cross)
        self.closed = False  # copies made by nnx.split inside the block outlive it: they pass through

    # -- pass boundaries (called by the root's wrapped methods) -------------------------------------
    def call_root(self, method: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
        return self.collector.outermost(lambda: method(instance, *args, **kwargs), find_input_ids(args, kwargs))

    # -- attention ----------------------------------------------------------------------------------
    def attention_fn(self, name: str, original: Any) -> Any:
        collector = self.collector

        @functools.wraps(original)
        def attention_fn(*args: Any, module: Any = None, **kwargs: Any) -> Any:
            original = getattr(attention_fn, _BELOW)  # read at call time: see _set
            if self.closed:
                return original(*args, module=module, **kwargs)
            proxy = _SowProxy(collector, name, forward=module, mask=kwargs.get("mask"),
                              is_causal=bool(kwargs.get("is_causal", False)))
            result = original(*args, module=proxy, **kwargs)
            if not proxy.seen:
                raise HiddenAttentionError(
                    f"{name!r} uses attention_fn={original!r}, which did not sow its attention weights "
                    "through module=; use nnx.dot_product_attention (or an attention_fn that passes module= "
                    "on to it) so the weights can be recorded."
                )
            return result

        setattr(attention_fn, _BELOW, original)
        return attention_fn

    def sow(self, name: str, module: Any, previous: Any) -> Any:
        collector = self.collector

        def sow(variable_type: Any, sow_name: str, value: Any, *args: Any, **kwargs: Any) -> bool:
            if not self.closed and sow_name == _ATTENTION_NAME and _is_intermediate(variable_type):
                collector.add(name, value)
            below = getattr(sow, _BELOW)  # read at call time: see _set
            if below is not UNKNOWN:
                return below(variable_type, sow_name, value, *args, **kwargs)
            return type(module).sow(module, variable_type, sow_name, value, *args, **kwargs)

        setattr(sow, _BELOW, previous)
        return sow

    def close(self) -> None:
        self.closed = True
        self.collector.finish()


class _SowProxy:
    """What an ``nnx.MultiHeadAttention`` passes as ``module=`` while attached: takes the sown weights."""

    def __init__(self, collector: PassCollector, name: str, *, forward: Any, mask: Any, is_causal: bool):
        self.collector, self.name, self.forward = collector, name, forward
        self.mask, self.is_causal, self.seen = mask, is_causal, False

    def __bool__(self) -> bool:
        return True

    def sow(self, variable_type: Any, name: str, value: Any, *args: Any, **kwargs: Any) -> bool:
        if name == _ATTENTION_NAME and _is_intermediate(variable_type):
            self.seen = True
            self.collector.add(self.name, value, mask=self.mask, is_causal=self.is_causal)
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
    return thread_stack(_active)


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
    if not captures:
        return method(instance, *args, **kwargs)

    def inner(obj: Any, *a: Any, **k: Any) -> Any:
        return _call_through(captures[1:], method, obj, a, k)

    return captures[0].call_root(inner, instance, args, kwargs)


class NNXAdapter(Adapter):
    """Captures ``flax.nnx`` models; see the module docstring for how and for the jit story.

    Options: ``cross`` marks layers as cross-attention by name (a collection of names or a
    predicate); by default a layer whose query and key lengths differ is ``"cross"``.
    """

    name = "flax_nnx"
    framework = "flax"
    array_library = "jax"
    extra = "jax"
    priority = 0

    def claims(self, model: Any) -> bool:
        return root_module(model, _nnx().Module) is not None

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
        capture = _NNXCapture(recorder, check_options(self.name, options))
        with undoing() as undo:
            with deferred_interrupts():
                for path, module in nnx.iter_modules(root):
                    name = "/".join(str(part) for part in path) or type(module).__name__
                    if isinstance(module, nnx.MultiHeadAttention):
                        _set(undo, module, "attention_fn", capture.attention_fn(name, module.attention_fn))
                    else:
                        previous = module.__dict__.get("sow", UNKNOWN)
                        _set(undo, module, "sow", capture.sow(name, module, previous))
                undo.enter_context(_root_marked(root))
                stack = _active_captures()
                stack.append(capture)
                undo.callback(stack.remove, capture)
                undo.callback(setattr, capture, "closed", True)
                undo.enter_context(jit_disabled(jax))
            yield
        capture.close()


def _root_marked(root: Any) -> Any:
    """The root's class swapped for its pass-marking subclass, shared by overlapping attaches of the root
    (reference-counted: the last one to leave puts the original class back)."""

    def turn_on() -> type:
        original_class = type(root)
        object.__setattr__(root, "__class__", _root_class(original_class))
        return original_class

    return switch(("flax.nnx.root_class", id(root)), turn_on, lambda cls: object.__setattr__(root, "__class__", cls))


def _set(undo: ExitStack, module: Any, attribute: str, value: Any) -> None:
    """Set an instance attribute without NNX's checks, and register taking it back exactly.

    ``value`` is a wrapper that calls what it replaced through its ``_BELOW`` attribute. When the block
    ends while a later attach has wrapped ``value`` in turn (attaches left out of order), ``value`` is
    unlinked from that chain instead: the later attach's wrapper then calls what ``value`` replaced, and
    restores that when it ends.
    """
    previous = module.__dict__.get(attribute, UNKNOWN)
    object.__setattr__(module, attribute, value)

    def take_back() -> None:
        link = module.__dict__.get(attribute, UNKNOWN)
        if link is value:
            below = getattr(value, _BELOW, previous)  # not ``previous`` if an earlier attach unlinked itself
            if below is UNKNOWN:
                object.__delattr__(module, attribute)
            else:
                object.__setattr__(module, attribute, below)
            return
        while link is not UNKNOWN and getattr(link, _BELOW, UNKNOWN) is not value:
            link = getattr(link, _BELOW, UNKNOWN)
        if link is not UNKNOWN:
            setattr(link, _BELOW, previous)

    undo.callback(take_back)
