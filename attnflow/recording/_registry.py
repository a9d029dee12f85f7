"""The adapter registry: built-ins and plugins, both found through the ``attnflow.adapters`` entry points."""

from __future__ import annotations

import inspect
import sys
from collections.abc import Mapping
from typing import Any

from .._errors import AdapterError, AdapterRegistrationError, MissingDependencyError
from .._plugins import Registry
from ._adapter import Adapter

ENTRY_POINT_GROUP = "attnflow.adapters"


def _missing(name: str, registered: tuple[str, ...]) -> AdapterError:
    return AdapterError(f"No adapter named {name!r}. {_installed_text()}")


def _validate_plugin(adapter: Any, source: str) -> Adapter:
    return _validate(adapter, source=source)


#: The adapters: built-ins and plugins, asked to claim a model highest priority first.
ADAPTERS: Registry[Adapter] = Registry(
    group=ENTRY_POINT_GROUP, what="adapter", validate=_validate_plugin, duplicate=AdapterRegistrationError,
    missing=_missing, order=lambda a: (-a.priority, a.name),
)


def register_adapter(adapter: Adapter | type[Adapter], *, replace: bool = False) -> Adapter:
    """Add an adapter to the registry; returns the registered instance.

    Args:
        adapter: an `attnflow.Adapter` subclass or instance.
        replace: allow replacing an adapter registered under the same name (built-ins included).

    Raises:
        AdapterRegistrationError: the adapter breaks the contract (the message says which part), or
            its name is taken and ``replace`` is False.
    """
    return ADAPTERS.register(adapter, replace=replace)


def unregister_adapter(name: str) -> None:
    """Remove an adapter by name (built-ins too; they come back in a new process)."""
    ADAPTERS.unregister(name)


def list_adapters() -> tuple[str, ...]:
    """Names of the registered adapters, in the order they are asked to claim a model (highest priority
    first); [`get_adapter`][attnflow.recording.get_adapter] gives the adapter itself."""
    return ADAPTERS.names()


def get_adapter(name: str) -> Adapter:
    """The adapter registered under ``name``."""
    return ADAPTERS.get(name)


def find_adapter(model: Any, adapter: str | Adapter | None = None, options: Mapping[str, Any] | None = None) -> Adapter:
    """The adapter for ``model``: ``adapter`` if given (a name or instance), else the first that claims it;
    when none claims it but ``options`` are given (e.g. ``modules=[MyAttention]``), the first that declares
    those options and accepts the model.

    Raises:
        AdapterError: no registered adapter claims the model; the message lists them and how to add one.
        MissingDependencyError: the named adapter's framework is not installed.
    """
    if isinstance(adapter, Adapter):
        return adapter
    if adapter is not None:
        chosen = get_adapter(adapter)
        if chosen.framework and chosen.framework not in sys.modules:
            from ._adapter import import_optional

            import_optional(chosen.framework, chosen.extra)
        return chosen
    candidates = [a for a in ADAPTERS.instances() if not a.framework or a.framework in sys.modules]
    # A model of a framework that was never imported cannot exist: those adapters are never asked.
    for candidate in candidates:
        try:
            if candidate.claims(model):
                return candidate
        except MissingDependencyError:
            continue
    if options:
        for candidate in candidates:
            declared = {o.name for o in candidate.options or ()}
            try:
                if set(options) <= declared and candidate.accepts(model):
                    return candidate
            except MissingDependencyError:
                continue
    raise AdapterError(
        f"No adapter recognises a model of type {type(model).__module__}.{type(model).__qualname__}. "
        f"{_installed_text()} Pass adapter='NAME' to force one, or write an adapter: subclass "
        "attnflow.Adapter and call attnflow.register_adapter(MyAdapter()), or publish it under the "
        f"'{ENTRY_POINT_GROUP}' entry-point group."
    )


def _installed_text() -> str:
    rows = ", ".join(f"{a.name} ({a.framework or 'any'})" for a in ADAPTERS.instances()) or "none"
    return f"Installed adapters: {rows}."


def _validate(adapter: Any, *, source: str) -> Adapter:
    if inspect.isclass(adapter):
        if not issubclass(adapter, Adapter):
            raise AdapterRegistrationError(f"{source}: {adapter.__qualname__} is not a subclass of attnflow.Adapter.")
        if inspect.isabstract(adapter):
            missing = sorted(getattr(adapter, "__abstractmethods__", ()))
            raise AdapterRegistrationError(
                f"{source}: {adapter.__qualname__} does not implement {missing}; an adapter needs claims() and hooks()."
            )
        try:
            adapter = adapter()
        except Exception as exc:
            raise AdapterRegistrationError(
                f"{source}: {adapter.__qualname__}() failed ({exc}); an adapter class must build with no arguments."
            ) from exc
    if not isinstance(adapter, Adapter):
        raise AdapterRegistrationError(
            f"{source}: expected an attnflow.Adapter subclass or instance, got {type(adapter).__name__}."
        )
    cls = type(adapter).__qualname__
    if not isinstance(adapter.name, str) or not adapter.name.isidentifier():
        raise AdapterRegistrationError(
            f"{source}: {cls}.name must be a non-empty identifier-like string, got {adapter.name!r}."
        )
    if not isinstance(adapter.framework, str):
        raise AdapterRegistrationError(f"{source}: {cls}.framework must be a module name string.")
    if not isinstance(adapter.priority, int):
        raise AdapterRegistrationError(f"{source}: {cls}.priority must be an int, got {adapter.priority!r}.")
    hooks_params = inspect.signature(adapter.hooks).parameters
    if len([p for p in hooks_params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]) < 2:
        raise AdapterRegistrationError(
            f"{source}: {cls}.hooks must take (model, recorder, **options); got {inspect.signature(adapter.hooks)}."
        )
    _validate_declarations(adapter, cls, source, hooks_params)
    return adapter


def _validate_declarations(adapter: Adapter, cls: str, source: str, hooks_params: Mapping[str, Any]) -> None:
    """The optional declarations (options, captures), checked once, naming the adapter and the bad part."""
    from ._adapter import CAPABILITIES, AdapterOption

    captures = adapter.captures
    if isinstance(captures, str) or not isinstance(captures, (set, frozenset, tuple, list)):
        raise AdapterRegistrationError(f"{source}: {cls}.captures must be a set of names, got {captures!r}.")
    unknown = sorted(set(captures) - CAPABILITIES)
    if unknown or "weights" not in captures:
        raise AdapterRegistrationError(
            f"{source}: {cls}.captures must include 'weights' and name only {sorted(CAPABILITIES)}; got "
            f"{sorted(captures)}."
        )
    options = adapter.options
    if options is None:
        return
    if isinstance(options, (str, AdapterOption)) or not isinstance(options, (tuple, list)):
        raise AdapterRegistrationError(f"{source}: {cls}.options must be a tuple of attnflow.AdapterOption, got {options!r}.")
    names: set[str] = set()
    takes_any = any(p.kind is p.VAR_KEYWORD for p in hooks_params.values())
    for option in options:
        if not isinstance(option, AdapterOption) or not isinstance(option.name, str) or not option.name.isidentifier():
            raise AdapterRegistrationError(
                f"{source}: {cls}.options holds {option!r}; each must be an AdapterOption with an identifier name."
            )
        if option.name in names:
            raise AdapterRegistrationError(f"{source}: {cls}.options declares {option.name!r} twice.")
        names.add(option.name)
        if not takes_any and option.name not in hooks_params:
            raise AdapterRegistrationError(
                f"{source}: {cls}.options declares {option.name!r}, but {cls}.hooks takes no such keyword."
            )
        types = option.types
        if types is not None and not (isinstance(types, type) or (
            isinstance(types, tuple) and all(isinstance(t, type) for t in types)
        )):
            raise AdapterRegistrationError(f"{source}: {cls}.options[{option.name!r}].types must be a type or tuple of types.")
