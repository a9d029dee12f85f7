"""One registry implementation behind adapters and methods: built-ins and plugins found through entry points.

A `Registry` holds named objects of one kind. Built-ins register exactly as a third party does, through
an entry-point group (``attnflow.adapters``, ``attnflow.methods``). Entry points are read once, under a
re-entrant lock (a plugin's import may register something itself), into local tables published all at once:
an interrupted load publishes nothing and the next call loads again. A broken plugin, a plugin whose entry
point name differs from its object's name, or one that tries to shadow a built-in is skipped with a warning
naming it; it never breaks attnflow. Each kind supplies its own validation (checked once, at registration)
and its errors.
"""

from __future__ import annotations

import operator
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

from ._switches import deferred_interrupts

_DISTRIBUTION = "attnflow"


T = TypeVar("T")
_name: Callable[[Any], str] = operator.attrgetter("name")  # adapters and methods name themselves (a ClassVar)


class Registry(Generic[T]):
    """Named objects of one kind (adapters, methods), from code and from an entry-point group.

    Args:
        group: the entry-point group read once, on first use.
        what: the kind's name in messages (``"adapter"``).
        validate: ``validate(obj, source)`` returns the instance to register or raises the kind's registration
            error naming ``source`` and the bad part.
        duplicate: the exception class for a name taken without ``replace=True``.
        missing: ``missing(name, registered_names)`` returns the exception for an unknown name.
        order: the sort key of `names` and `instances`.
    """

    def __init__(
        self, *, group: str, what: str, validate: Callable[[Any, str], T], duplicate: type[Exception],
        missing: Callable[[str, tuple[str, ...]], Exception], order: Callable[[T], Any],
    ):
        self.group, self.what = group, what
        self._validate, self._duplicate, self._missing, self._order = validate, duplicate, missing, order
        self._items: dict[str, T] = {}
        self._builtin: set[str] = set()
        self._loaded = False
        self._loading = False
        self._lock = threading.RLock()

    # -- reading ----------------------------------------------------------------------------------------
    def instances(self) -> list[T]:
        """The registered objects, in order."""
        self.load()
        with self._lock:
            items = list(self._items.values())
        return sorted(items, key=self._order)

    def names(self) -> tuple[str, ...]:
        """The registered names, in order."""
        return tuple(_name(item) for item in self.instances())

    def get(self, name: str) -> T:
        """The object registered under ``name``."""
        self.load()
        with self._lock:
            item = self._items.get(name) if isinstance(name, str) else None
        if item is None:
            raise self._missing(name, self.names())
        return item

    def is_builtin(self, name: str) -> bool:
        self.load()
        with self._lock:
            return name in self._builtin

    # -- writing ----------------------------------------------------------------------------------------
    def register(self, obj: Any, *, replace: bool = False) -> T:
        """Validate ``obj`` (a class or an instance) and add it; returns the registered instance."""
        self.load()
        instance = self._validate(obj, f"{self.what} {obj!r}")
        with self._lock:
            name = _name(instance)
            if name in self._items and not replace:
                raise self._duplicate(
                    f"A {self.what} named {name!r} is already registered ({self._items[name]!r}); "
                    "choose another name, or pass replace=True to override it on purpose."
                )
            with deferred_interrupts():
                self._items[name] = instance
                self._builtin.discard(name)
        return instance

    def unregister(self, name: str) -> None:
        """Remove ``name`` (built-ins too: they come back in a new process)."""
        self.load()
        with self._lock:
            if name not in self._items:
                raise self._missing(name, tuple(sorted(self._items)))
            with deferred_interrupts():
                del self._items[name]
                self._builtin.discard(name)

    @contextmanager
    def fresh(self) -> Iterator[None]:
        """For tests: an empty registry that re-reads its entry points, the real one put back afterwards."""
        with self._lock:
            saved = (dict(self._items), set(self._builtin), self._loaded)
            self._items.clear()
            self._builtin.clear()
            self._loaded = False
        try:
            yield
        finally:
            with self._lock:
                self._items.clear()
                self._items.update(saved[0])
                self._builtin.clear()
                self._builtin.update(saved[1])
                self._loaded = saved[2]

    # -- entry points -----------------------------------------------------------------------------------
    def load(self) -> None:
        """Read the entry-point group once (see the module docstring)."""
        if self._loaded:
            return
        with self._lock:
            if self._loaded or self._loading:  # _loading: a plugin's import registering something itself
                return
            self._loading = True
            try:
                found, builtin = self._read()
                with deferred_interrupts():  # all or nothing
                    for name, item in found.items():
                        self._items.setdefault(name, item)
                    self._builtin.update(builtin)
                    self._loaded = True
            finally:
                self._loading = False

    def _read(self) -> tuple[dict[str, T], set[str]]:
        found: dict[str, T] = {}
        builtin: set[str] = set()
        for ep in sorted(entry_points(group=self.group), key=lambda ep: not _is_builtin(ep)):
            source = f"entry point {ep.name!r} ({ep.value}) of {_dist_name(ep) or 'an unknown distribution'}"
            try:
                instance = self._validate(ep.load(), source)
            except Exception as exc:  # a broken plugin must not break attnflow
                _skip(f"{source}: {exc}")
                continue
            name = _name(instance)
            if name != ep.name:
                _skip(f"{source}: the entry point is named {ep.name!r} but the {self.what}'s name is {name!r}; make "
                      "them equal.")
                continue
            if name in found or name in self._items:
                if name in builtin or name in self._builtin:
                    _skip(f"{source}: it tries to override the built-in {self.what} {name!r}. Give the plugin another "
                          f"name, or call attnflow.register_{self.what}(..., replace=True).")
                else:
                    _skip(f"{source}: the name {name!r} is taken.")
                continue
            found[name] = instance
            if _is_builtin(ep):
                builtin.add(name)
        return found, builtin


def _skip(text: str) -> None:
    warnings.warn(f"attnflow skipped {text}", RuntimeWarning, stacklevel=5)


def _dist_name(ep: Any) -> str:
    dist = getattr(ep, "dist", None)
    return getattr(dist, "name", "") or ""


def _is_builtin(ep: Any) -> bool:
    return _dist_name(ep).replace("_", "-").lower() == _DISTRIBUTION
