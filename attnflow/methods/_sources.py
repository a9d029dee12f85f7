"""Which output tokens are explained: positions, or ``"generated"`` for a trace of a ``generate()`` call."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .._errors import OptionError
from ..trace import AttentionTrace

GENERATED = "generated"


class GeneratedSources(list):
    """The positions of the nodes that predict each generated token of a generation trace: position
    ``t`` predicts token ``t + 1``, so the first generated token is predicted by the prompt's last position.
    Rows of tokens an item did not generate (after its end of sequence) are zeros, not an error."""

    lengths: list[int] | None = None  # per item, how many tokens it generated (its end of sequence included)

    def explains(self, b: int, row: int) -> bool:
        return self.lengths is None or row < self.lengths[b]


def resolve_sources(trace: AttentionTrace, stream: str, sources: Any) -> Sequence[int] | None:
    """``sources`` as positions: ``"generated"`` becomes `GeneratedSources`; anything else is returned
    as given (checked where it is used)."""
    if sources is None:
        return None
    if not isinstance(sources, str):
        if isinstance(sources, bytes) or not hasattr(sources, "__iter__") or not hasattr(sources, "__len__"):
            raise OptionError(f"sources must be a list of token positions (e.g. [0]) or 'generated', got {sources!r}.")
        return sources
    if sources != GENERATED:
        raise OptionError(f"sources must be a list of token positions or 'generated', got {sources!r}.")
    info = trace.metadata.get("generation")
    if not info:
        raise OptionError(
            "sources='generated' explains the tokens a generate() call produced, but this trace is not of a "
            "generate() call. Record one with `with attnflow.attach(model) as rec: model.generate(...)`, then use "
            "rec.trace; or pass positions, e.g. sources=[-1] for each item's last real token."
        )
    if info.get("stream") != stream:
        raise OptionError(
            f"sources='generated' refers to stream {info.get('stream')!r} (the generated one), but stream "
            f"{stream!r} is explained; pass stream={info.get('stream')!r}."
        )
    first = int(info["first_generated"])
    out = GeneratedSources(range(max(first - 1, 0), trace.streams[stream].length))
    lengths = info.get("lengths")
    if lengths is not None and len(lengths) == trace.batch_size:
        out.lengths = [int(n) for n in lengths]
    return out
