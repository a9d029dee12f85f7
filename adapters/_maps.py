"""Checks shared by the value-map registries of the PyTorch, Flax and penzai adapters.

Private to attnflow.adapters; no framework.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from attnflow import OptionError


def require_paths(value_map: Any, fields: Iterable[str], where: str, what: str) -> None:
    """An `OptionError` naming the first of ``fields`` of ``value_map`` that is not a non-empty string (``where``
    opens the message, ``what`` says what the field must be, e.g. ``"a module path"``)."""
    for field in fields:
        path = getattr(value_map, field)
        if not isinstance(path, str) or not path:
            raise OptionError(f"{where}: {field} must be {what}, got {path!r}.")
