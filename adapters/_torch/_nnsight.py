"""nnsight: its wrappers (``NNsight``, ``LanguageModel``, ``TransformersModel``... every ``nnsight.Envoy``) are
captured as the module they hold.

``attnflow.capture(lm, ...)`` and ``attnflow.attach(lm)`` find the adapter of the wrapped module (``transformers``
for a Hugging Face model, ``transformer_lens``, ``torch``...), hand it the module and its options, and record what
it records: the trace names that adapter, and equals a capture of the module itself. Inside ``attach(lm)``, run
the model any way nnsight does, ``with lm.trace(...)`` (interventions included) or ``lm.generate(...)``; nnsight
runs the module's own forward, which the wrapped module's hooks see. ``capture(lm, inputs)`` runs one forward
pass through nnsight's input preparation (``lm.trace(inputs, trace=False)``), so text works where the wrapper
tokenises it.

nnsight replaces every wrapped module's ``forward`` with a controller whose reported signature is the class's
unbound function (it starts with ``self``): a positional first argument would be bound to ``self`` and token ids
missed. While attached, each such controller reports the real signature (``__signature__``, put back on exit), so
the adapter of the module binds positional token ids as the model does. A module nnsight instrumented is
claimed here too when passed without its wrapper.

Refused: ``capture``/``attach`` called inside a trace body (the model is already running, under nnsight's
interleaving); enter ``attach`` around ``lm.trace(...)`` instead.
"""

from __future__ import annotations

import inspect
import sys
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import attnflow
from attnflow.recording import CAPABILITIES, CaptureUnavailableError, deferred_interrupts, switch
from attnflow.recording._adapter import check_adapter_options
from attnflow.recording._registry import find_adapter

from . import _torch_common as common

_STATE = "__nnsight__"  # where nnsight keeps a wrapped module's controller state (nnsight.intervention.source.STATE)


class NNsightAdapter(attnflow.Adapter):
    """nnsight wrappers and the modules they instrumented, captured by the adapter of the module they hold."""

    name = "nnsight"
    framework = "nnsight"
    array_library = "torch"
    extra = "interop"
    priority = 40
    options = None  # passed on to the wrapped module's adapter, which checks them
    captures = frozenset(CAPABILITIES)  # what the wrapped module's adapter lacks is refused when attaching

    def __init__(self) -> None:
        self._local = threading.local()

    def claims(self, model: Any) -> bool:
        if getattr(self._local, "resolving", False):  # finding the adapter of the module held: not this one
            return False
        return _held(model) is not None

    def model_name(self, model: Any) -> str:
        inner = _held(model)
        if inner is None:
            return type(model).__name__
        try:
            return self._inner_adapter(inner, None).model_name(inner)
        except attnflow.AdapterError:
            return type(inner).__name__

    def run(self, model: Any, *args: Any, **kwargs: Any) -> Any:
        torch = attnflow.import_optional("torch", "torch")
        if _is_envoy(model):  # through nnsight's input preparation (tokenising text), as a trace would run it
            with torch.no_grad():
                return model.trace(*args, trace=False, **kwargs)
        inner = _held(model)
        return self._inner_adapter(inner, None).run(inner, *args, **kwargs)

    @contextmanager
    def hooks(self, model: Any, recorder: attnflow.Recorder, **options: Any) -> Iterator[None]:
        inner = _held(model)
        if inner is None:
            raise attnflow.AdapterError(
                f"Adapter 'nnsight' captures nnsight wrappers (NNsight, LanguageModel...) and the modules they wrap; "
                f"got {type(model).__module__}.{type(model).__qualname__}. Leave adapter= out to find its adapter."
            )
        if _tracing(model, inner):
            raise attnflow.AdapterError(
                f"attnflow.capture()/attach() was called inside an nnsight trace body of {type(model).__name__}: the "
                "model is already running under nnsight's interleaving, so its attention cannot be recorded from "
                "there. Enter `with attnflow.attach(lm) as rec:` around `with lm.trace(...):` (or lm.generate(...)) "
                "and read rec.trace after the trace."
            )
        delegate = self._inner_adapter(inner, options)
        options = check_adapter_options(delegate, options)
        missing = sorted(recorder.request.needs() - set(delegate.captures))
        if missing:
            raise CaptureUnavailableError(
                f"Adapter {delegate.name!r}, which captures the {type(inner).__name__} this nnsight wrapper holds, "
                f"cannot capture {missing} (it captures {sorted(delegate.captures)}); capture the attention weights "
                "alone, or leave the methods that need them out.", kind=missing[0],
            )
        recorder.adapter = delegate.name  # the trace is the wrapped module's adapter's, as a plain capture's
        with _true_signatures(inner), delegate.hooks(inner, recorder, **options):
            yield

    def _inner_adapter(self, inner: Any, options: Any) -> attnflow.Adapter:
        self._local.resolving = True
        try:
            return find_adapter(inner, None, options or None)
        except attnflow.AdapterError as exc:
            raise attnflow.AdapterError(f"nnsight wraps a {type(inner).__name__}, and {exc}") from exc
        finally:
            self._local.resolving = False


def _is_envoy(model: Any) -> bool:
    nnsight = sys.modules.get("nnsight")
    envoy = getattr(nnsight, "Envoy", None) if nnsight is not None else None
    return envoy is not None and isinstance(model, envoy)


def _instrumented(module: Any) -> bool:
    """Whether nnsight put its controller in ``module``'s ``forward`` slot."""
    forward = getattr(module, "__dict__", {}).get("forward")
    return forward is not None and type(forward).__module__.startswith("nnsight.")


def _held(model: Any) -> Any:
    """The torch module an nnsight wrapper holds, a module nnsight instrumented itself; else None."""
    if _is_envoy(model):
        return common.unwrap(model)
    return model if _instrumented(model) else None


def _tracing(model: Any, inner: Any) -> bool:
    """Whether an nnsight trace of ``model`` (or of any wrapper of ``inner``) is running now."""
    interleaver = model.__dict__.get("interleaver") if _is_envoy(model) else None
    if interleaver is not None and getattr(interleaver, "interleaving", False):
        return True
    state = inner.__dict__.get(_STATE)
    active = getattr(state, "active", None)
    try:
        return callable(active) and active()[0] is not None
    except Exception:  # another nnsight version's state: assume no trace
        return False


@contextmanager
def _true_signatures(inner: Any) -> Iterator[None]:
    """While attached, each instrumented module's controller reports the module's real ``forward`` signature."""
    with ExitStack() as stack:
        with deferred_interrupts():
            for module in inner.modules():
                if not _instrumented(module):
                    continue
                forward = module.__dict__["forward"]
                real = common.forward_signature(module)
                try:
                    reported = inspect.signature(forward)
                except (TypeError, ValueError):
                    continue
                if real is not None and real != reported:
                    stack.enter_context(_reporting(forward, real))
        yield


def _reporting(forward: Any, signature: inspect.Signature) -> Any:
    def turn_on() -> tuple[bool, Any]:
        own = "__signature__" in vars(forward)
        before = vars(forward).get("__signature__")
        forward.__signature__ = signature
        return own, before

    def turn_off(state: tuple[bool, Any]) -> None:
        own, before = state
        if own:
            forward.__signature__ = before
        else:
            vars(forward).pop("__signature__", None)

    return switch(("attnflow.nnsight.signature", id(forward)), turn_on, turn_off)
