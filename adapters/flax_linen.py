"""Flax linen adapter: attention of an unmodified linen model, through ``flax.linen.intercept_methods``.

Usage (the model and its ``apply`` call stay as written)::

    trace = attnflow.capture(model, variables, x)          # runs model.apply(variables, x)
    trace = attnflow.capture(model, variables, ids, mask=m, tokens=tokenizer)

    with attnflow.attach(model) as rec:
        y = model.apply(variables, x)                       # no mutable=[...] needed
    trace = rec.trace

What is recorded: every ``nn.MultiHeadDotProductAttention`` (``nn.MultiHeadAttention``,
``nn.SelfAttention`` and subclasses) called during the pass, and every module that sows
``'attention_weights'`` into ``'intermediates'`` itself, i.e. passes ``module=self`` to
``nn.dot_product_attention`` / ``nn.dot_product_attention_weights``. Layers are named by their module
path (``"encoder/layer_3/attention"``) and kept in the order they ran.

How: an interceptor (``nn.intercept_methods``) sees every module method call. For attention modules
it passes ``sow_weights=True``; for the duration of each module call it shadows that module's
``sow`` with a function that takes the ``'attention_weights'`` value to attnflow (and hands every
other ``sow``, and any the model asked for itself, on to Flax unchanged). The weights never enter a
variable collection, so ``apply`` needs no ``mutable=`` and returns exactly what it returns without
attnflow. Calls during ``init`` are not recorded. A forward pass is one call of a method of the root
module (``apply``, or a bound module's method); the mask of the first self-attention layer gives the
trace's key-validity mask (a key is valid when any query may attend to it) and causality.

jax.jit: while attached, jit is disabled (``jax.disable_jit``), so a forward you wrapped in
``jax.jit`` runs eagerly inside the block and its attention is recorded from concrete arrays; the
jit cache is not touched (nothing is traced with recording in it), and after the block the same
jitted function runs compiled as before. Enter ``attach`` around the call to the jitted function,
not inside it: weights seen only as tracers (inside ``jax.vmap``, ``jax.grad``, ``nn.remat``, or an
``attach`` inside a traced function) are never stored, and the pass raises
:class:`attnflow.AdapterError` explaining this instead of leaking a tracer.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from attnflow import Adapter, AdapterError, HiddenAttentionError, Recorder, import_optional
from attnflow._switches import deferred_interrupts, switch

from ._flax_common import UNKNOWN, PassCollector, check_options, find_input_ids, undoing

_ATTENTION_NAME = "attention_weights"


def _linen() -> Any:
    return import_optional("flax.linen", "jax")


def root_module(model: Any, base: type) -> Any:
    """The module behind ``model``: the module itself, a bound method of one (``model.apply``), a
    ``functools.partial`` of those, or a function wrapped by ``jax.jit``/``functools.wraps``."""
    for _ in range(16):
        if isinstance(model, base):
            return model
        owner = getattr(model, "__self__", None)
        if inspect.ismethod(model) and isinstance(owner, base):
            return owner
        if isinstance(model, functools.partial):
            model = model.func
        elif hasattr(model, "__wrapped__"):
            model = model.__wrapped__
        else:
            return None
    return None


class _CallInfo:
    """What the interceptor learned about one attention module call."""

    __slots__ = ("forced", "user_sow", "mask", "kind", "seen", "depth")

    def __init__(self) -> None:
        self.forced = False  # attnflow passed sow_weights=True
        self.user_sow = False  # the caller asked for sow_weights itself
        self.mask: Any = UNKNOWN
        self.kind: str | None = None
        self.seen = False
        self.depth = 0


class _LinenCapture:
    def __init__(self, recorder: Recorder, cross: Any):
        self.collector = PassCollector(recorder, api="linen", cross=cross)
        self.calls: dict[int, _CallInfo] = {}

    # -- the interceptor ----------------------------------------------------------------------------
    def intercept(self, next_fun: Any, args: tuple, kwargs: dict, context: Any) -> Any:
        module = context.module
        if module.scope is None or context.method_name == "setup" or module.is_initializing():
            return next_fun(*args, **kwargs)
        if module.scope.path:
            return self._call(module, next_fun, args, kwargs, context)
        return self.collector.outermost(
            lambda: self._call(module, next_fun, args, kwargs, context), find_input_ids(args, kwargs)
        )

    def _call(self, module: Any, next_fun: Any, args: tuple, kwargs: dict, context: Any) -> Any:
        nn = _linen()
        is_attention = isinstance(module, nn.MultiHeadDotProductAttention) and context.method_name == "__call__"
        info = self.calls.get(id(module))
        if info is not None:  # a nested call on the same instance (e.g. a subclass's __call__ -> super())
            if is_attention and not info.forced:  # the outer signature had no sow_weights; this one may
                args, kwargs = self._prepare_attention(module, context, args, kwargs, info)
            info.depth += 1
            try:
                return next_fun(*args, **kwargs)
            finally:
                info.depth -= 1
        info = _CallInfo()
        if is_attention:
            args, kwargs = self._prepare_attention(module, context, args, kwargs, info)
        previous = module.__dict__.get("sow", UNKNOWN)
        try:
            with deferred_interrupts():
                object.__setattr__(module, "sow", self._sow_for(module, info, previous))
                self.calls[id(module)] = info
            result = next_fun(*args, **kwargs)
        finally:
            with deferred_interrupts():
                self.calls.pop(id(module), None)
                if previous is not UNKNOWN:
                    object.__setattr__(module, "sow", previous)
                elif "sow" in module.__dict__:
                    object.__delattr__(module, "sow")
        if info.forced and not info.seen:
            raise HiddenAttentionError(
                f"{_name(module)!r} ({type(module).__name__}) ran with sow_weights=True but its attention_fn "
                f"{module.attention_fn!r} sowed no attention weights; an attention_fn must pass module= on "
                "to nn.dot_product_attention for its weights to be visible."
            )
        return result

    def _prepare_attention(self, module: Any, context: Any, args: tuple, kwargs: dict,
                           info: _CallInfo) -> tuple[tuple, dict]:
        signature = inspect.signature(context.orig_method)
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            return args, kwargs  # let the call itself raise its own error
        given = bound.arguments
        info.mask = given.get("mask", None) if "mask" in signature.parameters else UNKNOWN
        inputs_q = given.get("inputs_q")
        inputs_k = given.get("inputs_k", given.get("inputs_kv"))
        info.kind = "self" if inputs_k is None or inputs_k is inputs_q else "cross"
        if "sow_weights" not in signature.parameters:
            return args, kwargs  # a subclass with its own signature: rely on its own module= sowing
        info.user_sow = bool(given.get("sow_weights", False))
        if not info.user_sow:
            try:
                parameters = inspect.signature(module.attention_fn).parameters
            except (TypeError, ValueError):  # no signature to read: try, and check that it sowed afterwards
                parameters = {"module": None}
            takes_module = "module" in parameters or any(
                getattr(p, "kind", None) is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
            )
            if not takes_module:
                raise HiddenAttentionError(
                    f"{_name(module)!r} ({type(module).__name__}) uses attention_fn={module.attention_fn!r}, "
                    "which takes no module= argument, so its attention weights cannot be sown. Use "
                    "nn.dot_product_attention (or an attention_fn that passes module= on to it)."
                )
            bound.arguments["sow_weights"] = True
        info.forced = True
        return bound.args, bound.kwargs

    def _sow_for(self, module: Any, info: _CallInfo, previous: Any) -> Any:
        collector = self.collector

        def sow(col: str, name: str, value: Any, *args: Any, **kwargs: Any) -> bool:
            if col == "intermediates" and name == _ATTENTION_NAME:
                info.seen = True
                collector.add(_name(module), value, kind=info.kind, mask=info.mask)
                if info.forced and not info.user_sow:
                    return False  # attnflow asked for it, not the model: keep it out of 'intermediates'
            if previous is not UNKNOWN:
                return previous(col, name, value, *args, **kwargs)
            return type(module).sow(module, col, name, value, *args, **kwargs)

        return sow

    def close(self) -> None:
        self.collector.finish()


def _name(module: Any) -> str:
    """The module path, ``"encoder/layer_3/attention"``; the class name for the root module."""
    return "/".join(str(part) for part in module.path) or type(module).__name__


class LinenAdapter(Adapter):
    """Captures ``flax.linen`` models; see the module docstring for what is recorded and the jit story.

    Options (``attach(model, cross=...)``): ``cross`` marks layers as cross-attention by name (a
    collection of names or a predicate); by default a layer is ``"cross"`` when its keys come from a
    different input than its queries.
    """

    name = "flax_linen"
    framework = "flax"
    array_library = "jax"
    extra = "jax"
    priority = 0

    def claims(self, model: Any) -> bool:
        return root_module(model, _linen().Module) is not None

    def run(self, model: Any, *args: Any, **kwargs: Any) -> Any:
        """``capture(model, variables, *args)`` runs ``model.apply(variables, *args)`` for an unbound
        module; a bound module, ``model.apply`` partial or function is called as given."""
        nn = _linen()
        if isinstance(model, nn.Module) and model.scope is None:
            return model.apply(*args, **kwargs)
        return model(*args, **kwargs)

    def model_name(self, model: Any) -> str:
        root = root_module(model, _linen().Module)
        return type(root if root is not None else model).__name__

    @contextmanager
    def hooks(self, model: Any, recorder: Recorder, **options: Any) -> Iterator[None]:
        nn = _linen()
        jax = import_optional("jax", "jax")
        if not callable(model):
            raise AdapterError(f"The flax_linen adapter needs a linen Module or a callable, got {type(model).__name__}.")
        capture = _LinenCapture(recorder, check_options(self.name, options))
        with undoing() as undo:
            with deferred_interrupts():
                undo.enter_context(jit_disabled(jax))
                undo.enter_context(_intercepting(nn))
                captures = _active_captures()
                captures.append(capture)
                undo.callback(captures.remove, capture)
            yield
        capture.close()


# Flax's interceptor stack and jax.disable_jit are per thread and strictly last-in, first-out. Every linen attach
# of a thread shares one interceptor (which runs each call through all the thread's active captures) and one
# jit switch, both reference-counted: attaches may then end in any order.
_threads = threading.local()


def thread_stack(local: threading.local) -> list[Any]:
    """``local.stack``: this thread's own list, made on first use."""
    stack = getattr(local, "stack", None)
    if stack is None:
        stack = local.stack = []
    return stack


def _active_captures() -> list[_LinenCapture]:
    return thread_stack(_threads)


def _dispatch(next_fun: Any, args: tuple, kwargs: dict, context: Any) -> Any:
    """The one interceptor: the call goes through every active capture of this thread, oldest outermost."""
    captures = tuple(_active_captures())

    def through(i: int, *a: Any, **k: Any) -> Any:
        if i == len(captures):
            return next_fun(*a, **k)
        return captures[i].intercept(functools.partial(through, i + 1), a, k, context)

    return through(0, *args, **kwargs)


def _intercepting(nn: Any) -> Any:
    """This thread's dispatching interceptor, installed while any linen attach of the thread is active."""

    def turn_on() -> ExitStack:
        with ExitStack() as stack:
            stack.enter_context(nn.intercept_methods(_dispatch))
            return stack.pop_all()

    return switch(("flax.linen.intercept_methods", threading.get_ident()), turn_on, ExitStack.close)


def jit_disabled(jax: Any) -> Any:
    """``jax.disable_jit()`` for this thread, shared (reference-counted) by the Flax attaches active in it."""

    def turn_on() -> ExitStack:
        with ExitStack() as stack:
            stack.enter_context(jax.disable_jit())
            return stack.pop_all()

    return switch(("jax.disable_jit", threading.get_ident()), turn_on, ExitStack.close)
