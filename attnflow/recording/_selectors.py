"""``modules=``: which of a model's modules compute attention, chosen by class, path glob or regex."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from typing import Any

from .._errors import OptionError


def module_selector(
    adapter: str, modules: Any, *, base: type | None = None, base_name: str | None = None,
    example: str = "layers.*.attn",
) -> Callable[[str, Any], bool]:
    """A predicate ``(path, module) -> bool`` for an adapter's ``modules=`` option.

    Each selector is a class (matched with isinstance; a subclass of ``base`` where given), a string (an
    fnmatch glob over the module path, tried also with ``/`` read as ``.``, e.g. ``"layers.*.self_attn"``), or
    a compiled ``re.Pattern`` (fullmatch on the path). One selector may be given bare instead of in a list.

    Args:
        adapter: the adapter's name, for errors.
        modules: the selectors.
        base: the framework's module class selectors must subclass (None: any class).
        base_name: how errors name ``base`` (default its qualified name), e.g. ``"torch.nn.Module"``.
        example: a path glob shown in errors, in the framework's path style.

    Raises:
        OptionError: no selectors, or one that is none of the above.
    """
    if isinstance(modules, (str, type, re.Pattern)):
        modules = [modules]
    try:
        selectors = list(modules)
    except TypeError:
        selectors = [modules]
    if not selectors:
        raise OptionError(f"Adapter {adapter!r}: modules= is empty; give module classes or path patterns.")
    for selector in selectors:
        if isinstance(selector, (str, re.Pattern)) or (
            isinstance(selector, type) and (base is None or issubclass(selector, base))
        ):
            continue
        name = base_name or (f"{base.__module__}.{base.__qualname__}" if base is not None else None)
        kind = f"{name} subclasses" if name else "classes"
        raise OptionError(
            f"Adapter {adapter!r}: modules= takes {kind}, glob strings over module paths (e.g. {example!r}) "
            f"or compiled regular expressions; got {selector!r}."
        )

    def match(path: str, module: Any) -> bool:
        dotted = path.replace("/", ".")
        for selector in selectors:
            if isinstance(selector, type):
                if isinstance(module, selector):
                    return True
            elif isinstance(selector, re.Pattern):
                if selector.fullmatch(path):
                    return True
            elif fnmatch.fnmatchcase(path, selector) or fnmatch.fnmatchcase(dotted, selector):
                return True
        return False

    return match
