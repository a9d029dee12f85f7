"""attnflow.save and attnflow.load: one pair for every kind of attnflow file."""

from __future__ import annotations

import os
from typing import Any

from ._errors import TraceFileError
from ._explanation import FORMAT as EXPLANATION_FORMAT
from ._explanation import Explanation, load_explanation
from ._tensorfile import peek_format
from .trace import AttentionTrace
from .trace._file import load as load_trace


def save(obj: AttentionTrace | Explanation, path: str | os.PathLike[str]) -> None:
    """Save a trace or an explanation to ``path`` (safetensors + checksummed JSON; no pickle)."""
    if not isinstance(obj, (AttentionTrace, Explanation)):
        raise TraceFileError(f"attnflow.save() writes attnflow traces and explanations; got {type(obj).__name__}.")
    obj.save(path)


def load(path: str | os.PathLike[str]) -> Any:
    """Read a file written by [`save`][attnflow.save] (or ``AttentionTrace.save`` / ``Explanation.save``, or an
    ``attnflow batch`` example file): an [`AttentionTrace`][attnflow.AttentionTrace] or an [`Explanation`][attnflow.Explanation].

    Raises:
        TraceFileError: the file is missing, truncated, corrupted, edited, or not an attnflow file.
    """
    if peek_format(path) == EXPLANATION_FORMAT:
        return load_explanation(path)
    return load_trace(path)
