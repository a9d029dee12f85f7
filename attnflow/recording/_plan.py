"""From the methods a user asks for to what a capture records: one path for every door.

[`capture_plan`][attnflow.recording.capture_plan] turns method names (or ``"all"``) into the capture kinds they need (rows of
`attnflow._kinds.KINDS`) and checks them against what an adapter declares. An explicit list that an
adapter cannot serve is refused in one message naming every missing need; ``"all"`` keeps the methods the
adapter can serve and says why the others are skipped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from .._errors import AdapterError, OptionError
from .._kinds import KINDS, request_keywords
from ..methods._registry import ALL, SKIPPED, Method, get_method, list_methods, method_names
from ._adapter import Adapter


@dataclasses.dataclass(frozen=True)
class CapturePlan:
    """What a capture records for a set of methods.

    Attributes:
        methods: the methods to compute, in the registry's order for ``"all"``, else as asked.
        kinds: the capture kinds they need that are recorded into the trace (``"weights"`` always).
        skipped: methods of ``"all"`` left out -> the reason (empty for an explicit list).
        everything: the plan was made for ``"all"`` (kinds a model turns out not to support are dropped
            at capture time, their methods skipped, instead of failing).
    """

    methods: tuple[str, ...]
    kinds: frozenset[str]
    skipped: Mapping[str, str] = dataclasses.field(default_factory=dict)
    everything: bool = False

    def keywords(self, target: Any = None) -> dict[str, Any]:
        """The [`attnflow.capture`][attnflow.recording.capture] keywords that record `kinds` (``target``: the score whose
        attention gradients are recorded, when a method needs them)."""
        return request_keywords(self.kinds, target)

    def without(self, kind: str, reason: str) -> CapturePlan:
        """This plan with ``kind`` dropped and the methods that need it moved to `skipped`."""
        dropped = {m: reason for m in self.methods if kind in get_method(m).needs}
        kept = tuple(m for m in self.methods if m not in dropped)
        kinds = frozenset({"weights"}.union(*(get_method(m).needs for m in kept)) & _recorded())
        return CapturePlan(kept, kinds, {**self.skipped, **dropped}, self.everything)


def capture_plan(methods: Iterable[str | Method] | str, adapter: Adapter | None = None) -> CapturePlan:
    """The capture kinds ``methods`` need, checked against what ``adapter`` declares it captures.

    Args:
        methods: registered method names (or [`attnflow.Method`][attnflow.Method] instances), a comma-separated string of
            them, or ``"all"``: every registered method whose needs the adapter declares.
        adapter: the adapter that will capture; None: check nothing (every kind is assumed available).

    Returns:
        A [`CapturePlan`][attnflow.recording.CapturePlan].

    Raises:
        OptionError: an unknown method name (the message lists the registered ones), or an empty list.
        AdapterError: an explicit list needs kinds the adapter does not capture; the message names every
            missing need, the methods that need it and the adapters that can.
    """
    names = method_names(methods)
    everything = names == [ALL]
    if everything:
        resolved = [get_method(name) for name in list_methods()]
    else:
        if not names:
            raise OptionError(f"methods names no method; choose from {', '.join(list_methods())}, or 'all'.")
        if ALL in names:
            raise OptionError(f"'all' stands alone; got {names!r}.")
        resolved = [get_method(name) for name in names]
        if len({m.name for m in resolved}) != len(resolved):
            raise OptionError(f"methods names a method twice ({[m.name for m in resolved]}); name each once.")
    captures = set(adapter.captures) if adapter is not None else set(KINDS)
    missing = {m.name: sorted(set(m.needs) - captures) for m in resolved if set(m.needs) - captures}
    if everything:
        skipped = {name: _reason(adapter, needs) for name, needs in missing.items()}
        kept = [m for m in resolved if m.name not in skipped]
    else:
        if missing:
            raise AdapterError(missing_message(missing, adapter))
        skipped, kept = {}, resolved
    kinds = frozenset({"weights"}.union(*(m.needs for m in kept)) & _recorded())
    return CapturePlan(tuple(m.name for m in kept), kinds, skipped, everything)


def missing_message(missing: Mapping[str, list[str]], adapter: Adapter | None) -> str:
    """One message for every method whose needs ``adapter`` cannot capture: per need, the methods that need
    it, how to get it, and the adapters that capture it."""
    from ._registry import ADAPTERS

    by_need: dict[str, list[str]] = {}
    for method, needs in missing.items():
        for need in needs:
            by_need.setdefault(need, []).append(method)
    lines = []
    for need, methods in sorted(by_need.items()):
        able = sorted(a.name for a in ADAPTERS.instances() if need in a.captures)
        where = f"adapters that capture it: {', '.join(able)}" if able else "no installed adapter captures it"
        lines.append(f"  - {need!r} ({', '.join(methods)}): {where}")
    who = f"Adapter {adapter.name!r} cannot capture" if adapter is not None else "Nothing captures"
    return (f"{who} what {len(missing)} of the methods asked for need:\n" + "\n".join(lines)
            + "\nDrop those methods, use one of the adapters named, or ask for methods='all' to run every method "
              "this adapter can serve.")


def _reason(adapter: Adapter | None, needs: list[str]) -> str:
    name = adapter.name if adapter is not None else "the adapter"
    return f"adapter {name!r} cannot capture {', '.join(repr(n) for n in needs)}"


def _recorded() -> frozenset[str]:
    return frozenset(name for name, kind in KINDS.items() if kind.in_trace)


__all__ = ["SKIPPED", "CapturePlan", "capture_plan", "missing_message"]
