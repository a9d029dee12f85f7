"""Flax linen adapter: attention of an unmodified linen model, through ``flax.linen.intercept_methods``.

Usage (the model and its ``apply`` call stay as written)::

    trace = attnflow.capture(model, variables, x)          # runs model.apply(variables, x)
    trace = attnflow.capture(model, variables, ids, mask=m, tokens=tokenizer)

    with attnflow.attach(model) as rec:
        y = model.apply(variables, x)                       # no mutable=[...] needed
    trace = rec.trace

    # attention written by hand (the module computes jax.nn.softmax itself):
    trace = attnflow.capture(model, variables, x, adapter_options={"modules": [MyAttention], "layout": "bqhk"})

What is recorded: every ``nn.MultiHeadDotProductAttention`` (``nn.MultiHeadAttention``,
``nn.SelfAttention`` and subclasses) called during the pass, and every module that sows
``'attention_weights'`` into ``'intermediates'`` itself, i.e. passes ``module=self`` to
``nn.dot_product_attention`` / ``nn.dot_product_attention_weights``. With ``modules=[...]`` (classes,
globs over module paths such as ``"layers_*/attn"``, or regexes) only the selected modules are recorded:
the output of the ``jax.nn.softmax`` over the key axis that each selected module's call computes
(``flax.linen.softmax`` and ``nnx.softmax`` are the same function), laid out as ``layout=`` says
(``"bhqk"`` by default, ``"bqhk"``/``"btns"``, or with a ``g`` axis for grouped-query heads, flattened
group-major); their mask and causality are read from the probabilities. Layers are named by their module
path (``"encoder/layer_3/attention"``) and kept in the order they ran.

Names of repeated layers follow the recorder's one rule: a layer that runs several times in one pass
inside ``nn.scan`` is numbered after the scanned module's path (``"layers/attn"`` becomes ``"layers/0/attn"``,
``"layers/1/attn"``...), so a scanned model and its unrolled twin (``"layers_0/attn"``) pair in
``attnflow.compare(a, b, align="names")``; a shared module called twice is numbered at the end.

Beside the weights: ``target=`` (extra ``"attn_grad"``: after the recorded pass the root call runs once more
as ``apply`` on the root module's own variables under ``jax.grad``, nothing recorded, with a zero added to the
``jax.nn.softmax`` output of each recorded layer's call; the target rules are the other JAX adapters', see
``adapters/_jax/_flax_methods.py``) and ``values=True`` (value vectors, output projection, residual and norms, read
from the module inputs, outputs and parameters a Flax value map names, ``register_flax_value_map``) and
``value_zeroing=True`` (extra ``"value_zeroing"``, Mohebbi et al., 2023: through the same map, each layer's block,
the module the map's paths are relative to, is kept with its call and output during the pass; afterwards an unbound
copy of it is ``apply``-ed on its own variables and the kept call, per item, once per token with that token's
value vectors, the output of the map's value module, zeroed; nothing is recorded during these runs).

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
jitted function runs compiled as before. Under ``jax.vmap``, ``jax.grad`` and ``nn.remat`` (also inside
``nn.scan``) the weights are tracers: they are sent out with an ordered ``jax.debug.callback`` and
recorded when computed (once per layer, also under ``grad`` through ``remat``). Enter ``attach`` around the
call to a jitted function, not inside it: an ``attach`` inside a traced function raises
:class:`attnflow.AdapterError` explaining this instead of leaking a tracer.
"""

from __future__ import annotations

import functools
import inspect
import sys
import threading
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from typing import Any, cast

import numpy as np

from attnflow import Adapter, AdapterError, HiddenAttentionError, Recorder, import_optional
from attnflow.recording import deferred_interrupts, switch

from . import _flax_methods as methods
from ._flax_common import (
    OPTIONS,
    UNKNOWN,
    Layout,
    PassCollector,
    Selection,
    Settings,
    SoftmaxFrame,
    ThreadSlot,
    check_options,
    entered,
    find_input_ids,
    is_tracer,
    jit_disabled,
    left,
    module_listing,
    no_attention_hint,
    no_softmax_error,
    outermost_prefix,
    softmax_hook,
    undoing,
    watching_softmax,
)

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
    def __init__(self, recorder: Recorder, settings: Settings, adapter: LinenAdapter,
                 value_map: methods.FlaxValueMap | None = None):
        self.adapter = adapter
        self.selection = settings.selection
        self.request = recorder.request
        self.value_map = value_map  # values=True, value_zeroing=True: where the model's layers keep values...
        self.collector = PassCollector(
            recorder, api="linen", cross=settings.cross, repeat_prefix=self._repeat_prefix,
            no_attention=self._no_attention,
            after_pass=self._after_pass if self.request.gradients or value_map is not None else None,
            metadata={"values_layout": value_map.layout} if value_map is not None and self.request.values else None,
        )
        self.call: tuple[Any, str, tuple, dict] | None = None  # the root call of the open pass (target=)
        self.kept: dict[str, dict[str, list[Any]]] = {}  # values=, value_zeroing=: layer -> slot -> kept, this pass
        self.parameters: dict[str, dict[str, Any]] = {}  # values=True: path -> params of projections and norms
        self.keeping: set[int] = set()  # modules whose outermost call is running (values=True)
        self.calls: dict[int, _CallInfo] = {}
        self.selected: set[int] = set()  # selected modules whose call is running
        self.taps: list[tuple[str, str, SoftmaxFrame]] = []  # selected calls (path, tap) waiting for the tap's output
        self.ran: dict[str, str] = {}  # module path -> class, in the current pass
        self.scopes: dict[str, list[Any]] = {}  # path -> scopes of a lifted (scanned) body, in the current pass

    # -- the interceptor ----------------------------------------------------------------------------
    def intercept(self, next_fun: Any, args: tuple, kwargs: dict, context: Any) -> Any:
        module = context.module
        if module.scope is None or context.method_name == "setup" or module.is_initializing():
            return next_fun(*args, **kwargs)
        injection = _injection()
        if injection is not None:  # attnflow's gradient pass or value-zeroing re-run: nothing is recorded
            if injection.capture is self and module.scope.path:
                return injection.call(module, _name(module), next_fun, args, kwargs, context)
            return next_fun(*args, **kwargs)
        if module.scope.path:
            if self.value_map is None or id(module) in self.keeping or context.method_name != "__call__":
                return self._call(module, next_fun, args, kwargs, context)
            self.keeping.add(id(module))
            try:
                result = self._call(module, next_fun, args, kwargs, context)
            finally:
                self.keeping.discard(id(module))
            self._keep(module, args, kwargs, result)
            return result
        if self.collector.depth == 0:
            self.ran.clear()
            self.scopes.clear()
            self.call, self.kept, self.parameters = (module, context.method_name, args, kwargs), {}, {}
        ids = self.adapter.input_ids(args, kwargs)
        return self.collector.outermost(
            lambda: self._call(module, next_fun, args, kwargs, context), ids,
            forward=context.method_name == "__call__",
        )

    def _call(self, module: Any, next_fun: Any, args: tuple, kwargs: dict, context: Any) -> Any:
        path = _name(module)
        self.ran.setdefault(path, type(module).__name__)
        scope = module.scope
        if scope.parent is None and scope.path:  # the body of a lifted transform (nn.scan, nn.remat...)
            scopes = self.scopes.setdefault(path, [])
            if not any(s is scope for s in scopes):
                scopes.append(scope)
        if self.selection is not None:
            return self._selected_call(module, path, next_fun, args, kwargs, context)
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
                f"{path!r} ({type(module).__name__}) ran with sow_weights=True but its attention_fn "
                f"{module.attention_fn!r} sowed no attention weights; an attention_fn must pass module= on "
                "to nn.dot_product_attention for its weights to be visible."
            )
        return result

    def _selected_call(self, module: Any, path: str, next_fun: Any, args: tuple, kwargs: dict, context: Any) -> Any:
        selection: Selection = self.selection  # type: ignore[assignment]
        if self.taps and context.method_name == "__call__":
            parent, waiting, frame = self.taps[-1]
            if module.name == waiting and path.rpartition("/")[0] == parent:
                result = next_fun(*args, **kwargs)
                frame.accept(result)
                return result
        if context.method_name != "__call__" or id(module) in self.selected or not selection.match(path, module):
            return next_fun(*args, **kwargs)
        mask, is_causal = selection.call_mask(args, kwargs) if selection.call_mask is not None else (UNKNOWN, False)
        collector = self.collector

        def take(probabilities: Any) -> None:
            collector.add(path, probabilities, kind=selection.kind, mask=mask, is_causal=is_causal,
                          layout=selection.layout, infer=selection.call_mask is None)

        frame = SoftmaxFrame(self, path, selection.layout, take)
        tap = selection.tap_of(module)
        self.selected.add(id(module))
        try:
            with ExitStack() as watching:
                if tap is not None:
                    self.taps.append((path, tap, frame))
                    watching.callback(self.taps.pop)
                else:
                    watching.enter_context(watching_softmax(frame))
                result = next_fun(*args, **kwargs)
        finally:
            self.selected.discard(id(module))
        if frame.count == 0:
            if tap is not None:
                raise HiddenAttentionError(
                    f"{path!r} ({type(module).__name__}) ran, but its {tap!r} submodule, where attnflow takes its "
                    "attention probabilities, did not run."
                )
            raise no_softmax_error(path, type(module).__name__, frame)
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
            parameters: Mapping[str, Any]
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

    # -- what the methods need beside the weights (target=, values=True) -------------------------------------
    def _keep(self, module: Any, args: tuple, kwargs: dict, result: Any) -> None:
        """Keep the module inputs and outputs, and the parameters, that the value map names."""
        layout = cast(methods.FlaxValueMap, self.value_map)  # called when there is one
        path = _name(module)
        for slot, (relative, which) in layout.taps().items():
            layer = _layer_path(path, relative)
            if layer is None:
                continue
            value = result if which == "output" else (args[0] if args else next(iter(kwargs.values()), None))
            if value is not None and not is_tracer(value):
                self.kept.setdefault(layer, {}).setdefault(slot, []).append(value)
        if self.request.values and any(_layer_path(path, relative) is not None
                                       for relative in (layout.out, layout.norm) if relative):
            params = dict(module.variables.get("params", {}))
            if not any(is_tracer(value) for value in params.values()):
                self.parameters[path] = {**params, "epsilon": getattr(module, "epsilon", None),
                                         "class": type(module).__name__}
        if self.request.value_zeroing and f"{path}/{layout.attention}" in self.ran:  # a layer's block
            self._keep_block(module, path, args, kwargs, result)

    def _keep_block(self, module: Any, path: str, args: tuple, kwargs: dict, result: Any) -> None:
        """value_zeroing=True: a layer block's call, the bound module with its arguments, and its output (a call
        that ran as JAX tracers is left out: the re-run then says that it needs an eager forward pass)."""
        jax = import_optional("jax", "jax")
        if not any(is_tracer(leaf) for leaf in jax.tree.leaves((args, kwargs, result))):
            kept = self.kept.setdefault(path, {})
            kept.setdefault(methods.BLOCK_CALL, []).append((module, args, kwargs))
            kept.setdefault(methods.BLOCK_OUTPUT, []).append(result)

    def _after_pass(self, layers: list) -> None:
        try:
            methods.require_eager(self.collector)
            if self.request.values:
                methods.add_value_extras(layers, cast(methods.FlaxValueMap, self.value_map), self.parameters, self.kept)
            if self.request.gradients and layers:
                methods.attention_gradients(layers, self.request, functools.partial(self._rerun, layers),
                                            _DETERMINISTIC)
            if self.request.value_zeroing and layers:
                self._value_zeroing(layers)
        finally:
            self.kept, self.parameters = {}, {}

    def _rerun(self, layers: list, deltas: list) -> Any:
        """The pass's root call again (``apply`` of the root module on its own variables), nothing recorded, with
        ``deltas[i]`` added to the probabilities of recorded layer ``i``."""
        if self.call is None:
            raise AdapterError("target=: the forward call of the pass is unknown (attention ran outside a call of "
                               "the captured model); call the model itself inside the block.")
        root, method, args, kwargs = self.call
        layout = self.selection.layout if self.selection is not None else None
        injection = _Injection(self, [layer.name for layer in layers], deltas, layout)
        unbound, variables = root.unbind()
        with _injecting(injection):
            output = unbound.apply(variables, *args, method=method, **kwargs)
        injection.check()
        return output

    def _value_zeroing(self, layers: list) -> None:
        """Extra ``"value_zeroing"`` ``(batch, queries, keys)`` of each value-mapped self-attention layer: its block
        run again per item with each token's values zeroed in turn (``adapters/_jax/_flax_methods.py``)."""
        layout = cast(methods.FlaxValueMap, self.value_map)  # called when there is one
        matched = 0
        for layer, path, call in methods.mapped_layers(layers, layout):
            layer.extras["value_zeroing"] = self._zero_block(layout, layer, path, call)
            matched += 1
        if not matched:
            raise methods.unmapped_error("value_zeroing", layers, layout)

    def _zero_block(self, layout: methods.FlaxValueMap, layer: Any, path: str, call: int) -> np.ndarray:
        """The value-zeroing distances of call ``call`` of the block at ``path``: an unbound copy of the bound block
        ``apply``-ed on its own variables and the kept call, the map's value module's output zeroed per token."""
        kept = self.kept.get(path, {})
        if len(kept.get(methods.BLOCK_CALL, ())) <= call or len(kept.get(methods.BLOCK_OUTPUT, ())) <= call:
            raise AdapterError(
                f"value_zeroing=True: the block {path!r} of {layer.name!r} was not seen as one eager __call__ during "
                "the forward pass: it ran as JAX tracers (under jax.vmap, jax.grad, nn.scan or nn.remat) or through "
                "another method than __call__. Call the model directly, each layer as a module (layer(x, ...)); "
                "value zeroing runs that call again."
            )
        value = methods.value_alternative(
            layout, kept, call, path, "a Dense or DenseGeneral: nn.MultiHeadDotProductAttention's 'value'"
        )
        block, args, kwargs = kept[methods.BLOCK_CALL][call]
        unbound, variables = block.unbind()

        def rerun(a: tuple, k: dict, keep: Any) -> Any:
            zeroing = _Rerun(self, value, layout.value_index, keep)
            try:
                with _injecting(zeroing):
                    result = unbound.apply(variables, *a, **k)
            except Exception as exc:
                if type(exc).__module__.startswith("attnflow"):
                    raise
                raise AdapterError(
                    f"value_zeroing=True: running the block {path!r} again alone (an unbound copy apply-ed on its own "
                    f"variables, with its recorded arguments) failed: {type(exc).__name__}: {str(exc).rstrip('.')}. Value "
                    "zeroing runs each block again alone, the output of its value module zeroed per token: the block "
                    f"must be {_DETERMINISTIC}, and callable again with the arguments it got; check also the value "
                    "map's value and value_index (an output (batch, keys, ...), or several stacked on its first axis)."
                ) from exc
            zeroing.check(path)
            return _hidden(result, path)

        return methods.value_zeroing(rerun, args, kwargs, _hidden(kept[methods.BLOCK_OUTPUT][call], path), layer.keys,
                                     layer.causal)

    # -- naming and errors -----------------------------------------------------------------------------
    def _repeat_prefix(self, name: str, count: int) -> str | None:
        return outermost_prefix(name, {path: len(scopes) for path, scopes in self.scopes.items()})

    def _no_attention(self) -> str:
        ran = module_listing(list(self.ran.items()))
        if self.selection is not None:
            return (f"No module that ran matches modules={self.selection.selectors!r}; the modules that ran were: "
                    f"{ran}.")
        return no_attention_hint(ran, "flax.linen.MultiHeadDotProductAttention (and subclasses)")

    def close(self) -> None:
        self.collector.close()


#: What the gradient pass and the value-zeroing re-runs need of a model's call, for their errors.
_DETERMINISTIC = ("deterministic: dropout off (deterministic=True), no mutable collections such as batch_stats "
                  "updated in training mode, no rngs")


def _hidden(output: Any, block: str) -> Any:
    """The hidden states ``(batch, tokens, width)`` a block returned: its output, or the first 3-D array of the
    tuple it returned (gemma's Block returns ``(cache, x)``)."""
    found = next((item for item in (output if isinstance(output, (tuple, list)) else (output,))
                  if getattr(item, "ndim", None) == 3), None)
    if found is None:
        raise AdapterError(
            f"value_zeroing=True: the block {block!r} returned {type(output).__name__}, not hidden states "
            "(batch, tokens, width) or a tuple holding them; value zeroing compares the block's output per token, so "
            "the value map's layer (its paths' common prefix) must be the module that returns them."
        )
    return found


def _layer_path(path: str, relative: str) -> str | None:
    """The layer path of a module at ``path`` that is ``relative`` to its layer (None: it is not)."""
    if path == relative:
        return ""
    return path[: -len(relative) - 1] if path.endswith("/" + relative) else None


# -- the gradient pass: nothing is recorded, a zero is added to each recorded layer's probabilities ---------------
_INJECTION = ThreadSlot()  # this thread's gradient (or re-run) pass


def _injection() -> _Injection | _Rerun | None:
    return _INJECTION.get()


def _injecting(injection: _Injection | _Rerun) -> Any:
    return _INJECTION.holding(injection)


class _Injection:
    """The gradient pass of one capture: the ``i``-th call of a recorded layer's module adds ``deltas[i]`` to the
    one ``jax.nn.softmax`` it computes (layers in the order the recorded pass ran them; ``layout``: that of the
    modules selected with ``modules=``, None for Flax's attention and modules that sow their weights)."""

    def __init__(self, capture: _LinenCapture, names: list[str], deltas: list[Any], layout: Layout | None):
        self.capture, self.names, self.deltas, self.layout = capture, names, deltas, layout
        self.used = 0
        self.running: set[int] = set()

    def call(self, module: Any, path: str, next_fun: Any, args: tuple, kwargs: dict, context: Any) -> Any:
        if (context.method_name != "__call__" or id(module) in self.running or self.used >= len(self.names)
                or self.names[self.used] != path):
            return next_fun(*args, **kwargs)
        delta = self.deltas[self.used]
        self.used += 1
        self.running.add(id(module))
        try:
            return methods.perturbed_call(lambda: next_fun(*args, **kwargs), delta, path, "nn.dot_product_attention",
                                          self.layout)
        finally:
            self.running.discard(id(module))

    def check(self) -> None:
        if self.used != len(self.names):
            raise AdapterError(
                f"target=: {self.names[self.used]!r} did not run in the gradient pass (the root call again with the "
                "same inputs); the model's forward must run the same layers each time it is called."
            )


class _Rerun:
    """A value-zeroing re-run of one block (``value_zeroing=True``), nothing recorded: the output of the module at
    ``value`` (its path in the block) multiplied by ``keep`` ``(variants, keys)``, at ``index`` of a stacked output."""

    def __init__(self, capture: _LinenCapture, value: str, index: int | None, keep: Any):
        self.capture, self.value, self.index, self.keep = capture, value, index, keep
        self.seen = False

    def call(self, module: Any, path: str, next_fun: Any, args: tuple, kwargs: dict, context: Any) -> Any:
        result = next_fun(*args, **kwargs)
        if context.method_name != "__call__" or path != self.value:
            return result
        self.seen = True  # a nested call of the same module multiplies by keep again: the same zeros
        return methods.zeroed(result, self.keep, self.index)

    def check(self, block: str) -> None:
        if not self.seen:
            raise AdapterError(
                f"value_zeroing=True: the value module {self.value!r} ran in the forward pass but not when the block "
                f"{block!r} ran again alone; the block must run the same modules when called again with the same "
                "arguments."
            )


def _name(module: Any) -> str:
    """The module path, ``"encoder/layer_3/attention"``; the class name for the root module."""
    return "/".join(str(part) for part in module.path) or type(module).__name__


class LinenAdapter(Adapter):
    """Captures ``flax.linen`` models; see the module docstring for what is recorded and the jit story.

    Options (``attach(model, cross=...)``): ``cross`` marks layers as cross-attention by name (a
    collection of names or a predicate); by default a layer is ``"cross"`` when its keys come from a
    different input than its queries. ``modules`` selects the modules whose call computes attention
    (classes, path globs, regexes) and ``layout`` says how their softmax output is laid out.

    Family adapters (``gemma``, ``flaxmodels``) subclass it (:class:`LinenFamilyAdapter`): they override
    :meth:`settings` (which modules compute attention, where its probabilities are taken, how the mask is
    read) and :meth:`input_ids`.
    """

    name = "flax_linen"
    framework = "flax"
    array_library = "jax"
    extra = "jax"
    priority = 0
    options = OPTIONS
    captures = Adapter.captures | {"input_gradients", "ablation", "attn_grad", "values", "value_zeroing"}

    def claims(self, model: Any) -> bool:
        return root_module(model, _linen().Module) is not None

    def probe(self, model: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        """Blank-out and input gradients in JAX for :func:`attnflow.faithfulness` (``adapters/_jax/_faithfulness_flax.py``)."""
        from ._faithfulness_flax import probe

        return probe(model, request, args, kwargs)

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

    def settings(self, options: dict[str, Any]) -> Settings:
        """What to record, from the (centrally checked) options."""
        return check_options(self.name, options, _linen().Module)

    def input_ids(self, args: tuple, kwargs: dict) -> Any:
        """The token ids of a root call, for labels."""
        return find_input_ids(args, kwargs)

    @contextmanager
    def hooks(self, model: Any, recorder: Recorder, **options: Any) -> Iterator[None]:
        nn = _linen()
        jax = import_optional("jax", "jax")
        if not callable(model):
            raise AdapterError(f"The {self.name} adapter needs a linen Module or a callable, got {type(model).__name__}.")
        settings = self.settings(options)
        request = recorder.request
        value_map = None
        if request.values or request.value_zeroing:
            root = root_module(model, nn.Module)
            value_map = methods.value_map(type(root if root is not None else model).__name__,
                                          "values" if request.values else "value_zeroing")
        capture = _LinenCapture(recorder, settings, self, value_map)
        with undoing() as undo:
            with deferred_interrupts():
                undo.enter_context(jit_disabled(jax))
                if request.gradients or (settings.selection is not None and settings.selection.needs_softmax):
                    undo.enter_context(softmax_hook())
                # one interceptor per thread for every attach, so that attaches may end in any order
                thread = threading.get_ident()
                undo.enter_context(switch(
                    ("flax_linen.interceptor", thread), lambda: entered(nn.intercept_methods(_dispatch)), left
                ))
                captures = _ACTIVE.setdefault(thread, [])
                captures.append(capture)
                undo.callback(captures.remove, capture)
            yield
        capture.close()


class LinenFamilyAdapter(LinenAdapter):
    """A model family of a linen library, as data: the adapter claims root modules whose class is defined in
    ``package`` and records the modules of ``attention`` (``"module.path:ClassName"``, from an already
    imported library), each taken at its ``tap`` (a child module's output) or else at its softmax, laid out
    as ``layout``; ``call_mask`` reads the mask from each attention call's arguments (see
    :class:`~attnflow.adapters._jax._flax_common.Selection`). Takes no options."""

    priority = 10
    options = ()
    array_library = "jax"
    # a family's token embedding is its own module, which the Flax probe does not find by itself
    captures = Adapter.captures
    #: Top-level package (or module) whose linen modules the family claims.
    package: str = ""
    #: ``{"module.path:ClassName": tap or None}``: the attention classes and where their probabilities are taken.
    attention: dict[str, str | None] = {}
    layout: str = "bhqk"
    kind: str | None = "self"
    #: Keyword names of the root call's token ids, for labels.
    ids: tuple[str, ...] = ("input_ids",)

    @staticmethod
    def call_mask(args: tuple, kwargs: dict) -> tuple[Any, bool]:
        """``(mask, is_causal)`` from an attention call's arguments."""
        return UNKNOWN, False

    def attention_classes(self) -> dict[type, str | None]:
        found = {}
        for where, tap in self.attention.items():
            module, _, name = where.partition(":")
            cls = getattr(sys.modules.get(module), name, None)
            if isinstance(cls, type):
                found[cls] = tap
        return found

    def claims(self, model: Any) -> bool:
        root = root_module(model, _linen().Module)
        if root is None or not self.attention_classes():
            return False
        module = type(root).__module__
        return module == self.package or module.startswith(self.package + ".")

    def settings(self, options: dict[str, Any]) -> Settings:
        classes = self.attention_classes()
        kinds = tuple(classes)

        def match(path: str, module: Any) -> bool:
            return isinstance(module, kinds)

        def tap(module: Any) -> str | None:
            return next((name for cls, name in classes.items() if isinstance(module, cls)), None)

        return Settings(selection=Selection(
            match, Layout.parse(self.layout, self.name), selectors=[cls.__qualname__ for cls in kinds],
            tap=tap if any(classes.values()) else None, call_mask=self.call_mask, kind=self.kind,
        ))

    def input_ids(self, args: tuple, kwargs: dict) -> Any:
        return find_input_ids(args, kwargs, self.ids)


#: The captures attached in each thread, in the order they were attached.
_ACTIVE: dict[int, list[_LinenCapture]] = {}


def _dispatch(next_fun: Any, args: tuple, kwargs: dict, context: Any) -> Any:
    """The one interceptor: passes each module call through every attached capture of this thread."""
    captures = tuple(_ACTIVE.get(threading.get_ident(), ()))

    def call(index: int, a: tuple, k: dict) -> Any:
        if index == len(captures):
            return next_fun(*a, **k)
        return captures[index].intercept(lambda *a2, **k2: call(index + 1, a2, k2), a, k, context)

    return call(0, args, kwargs)
