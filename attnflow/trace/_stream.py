"""Token streams: the sequences a model's attention runs over, and the fixed links between them."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from .._errors import TraceError
from ._arrays import bool_mask, frozen, is_int

#: The name of the stream of a single-stream trace.
DEFAULT_STREAM = "tokens"
#: The key stream given to cross-attention layers of a trace built without streams (e.g. a decoder
#: attending to ``encoder_hidden_states`` it was handed, or a format-1 file with cross layers).
MEMORY_STREAM = "memory"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")


def check_name(name: Any, what: str = "stream") -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise TraceError(
            f"A {what} name must be a string of letters, digits, '_', '.', '-' starting with a letter or '_' "
            f"(at most 64 characters); got {name!r}."
        )
    return name


@dataclasses.dataclass(frozen=True, eq=False)
class Stream:
    """One token stream of a trace: the tokens one side of the model runs over.

    Build one to pass to [`AttentionTrace`][attnflow.AttentionTrace] / [`AttentionTrace.from_arrays`][attnflow.AttentionTrace.from_arrays] (only ``name`` is
    required); the trace completes and validates it. In a trace every field is set and read-only.

    Attributes:
        name: ``"tokens"`` for a single-stream model; ``"encoder"``/``"decoder"``, ``"text"``/``"vision"``,
            ``"audio"`` and so on where a model has several.
        mask: ``(batch, length)`` bool, True where the token is real (not padding).
        tokens: per batch item, ``length`` token labels.
        causal: queries of this stream's self-attention see only themselves and earlier keys
            (None when building: detected from the weights).
        special: ``(batch, length)`` bool, True on special tokens (CLS, SEP, BOS, EOS, registers).
        grid: ``(rows, columns)`` of image patches for a vision stream: its non-special tokens, in
            order, are the patches in row-major order. None for text.
    """

    name: str
    mask: np.ndarray | None = None
    tokens: Sequence[Sequence[str]] | None = None
    causal: bool | None = None
    special: np.ndarray | None = None
    grid: tuple[int, int] | None = None

    @property
    def batch_size(self) -> int:
        """The number of batch items."""
        return int(self._completed().shape[0])

    @property
    def length(self) -> int:
        """Positions per batch item, padding included."""
        return int(self._completed().shape[1])

    def lengths(self) -> np.ndarray:
        """``(batch,)`` number of real tokens per batch item."""
        return self._completed().sum(axis=1)

    def valid_index(self, batch_index: int) -> np.ndarray:
        """Positions of the real tokens of one batch item, ``(n_valid,)`` int."""
        mask = self._completed()
        if not is_int(batch_index) or not -mask.shape[0] <= batch_index < mask.shape[0]:
            raise TraceError(
                f"batch_index {batch_index!r} is out of range for a batch of {mask.shape[0]} (stream {self.name!r})."
            )
        return np.flatnonzero(mask[batch_index])

    def patch_positions(self, batch_index: int = 0) -> np.ndarray:
        """Positions of the image patches (row-major) of one item of a vision stream, ``(rows * columns,)``."""
        if self.grid is None:
            raise TraceError(f"Stream {self.name!r} has no patch grid; only vision streams have patches.")
        self.valid_index(batch_index)
        special = self.special if self.special is not None else np.zeros_like(self._completed())
        return np.flatnonzero(~special[batch_index])

    def _completed(self) -> np.ndarray:
        if self.mask is None:
            raise TraceError(f"Stream {self.name!r} is not part of a trace yet; its sizes are known once it is.")
        return self.mask

    def __repr__(self) -> str:
        if self.mask is None:
            return f"Stream({self.name!r})"
        grid = f", grid={self.grid}" if self.grid is not None else ""
        return f"Stream({self.name!r}, batch={self.batch_size}, length={self.length}, causal={self.causal}{grid})"


def complete_stream(stream: Stream, batch: int, length: int, causal: bool) -> Stream:
    """A validated, read-only copy of ``stream`` for a trace of ``batch`` items of ``length`` tokens."""
    where = f"Stream {stream.name!r}"
    shape = (batch, length)
    mask = np.ones(shape, bool) if stream.mask is None else bool_mask(stream.mask, shape, f"{where}: mask")
    empty = np.flatnonzero(~mask.any(axis=1))
    if empty.size:
        raise TraceError(f"{where}: the mask marks no real token in batch item {int(empty[0])}; every item needs one.")
    special = np.zeros(shape, bool) if stream.special is None else bool_mask(
        stream.special, shape, f"{where}: special"
    )
    tokens = _tokens(stream.tokens, batch, length, where)
    grid = _grid(stream.grid, special, where)
    if stream.causal is not None and not isinstance(stream.causal, (bool, np.bool_)):
        raise TraceError(f"{where}: causal must be True, False or None (detect), got {stream.causal!r}.")
    return Stream(
        name=stream.name, mask=frozen(mask), tokens=tokens, causal=bool(causal), special=frozen(special), grid=grid
    )


def _tokens(tokens: Any, batch: int, length: int, where: str) -> tuple[tuple[str, ...], ...]:
    if tokens is None:
        return tuple(tuple(f"#{i}" for i in range(length)) for _ in range(batch))
    if isinstance(tokens, (str, bytes)) or not isinstance(tokens, Sequence) and not hasattr(tokens, "__iter__"):
        raise TraceError(f"{where}: tokens must be a list of label lists, one per batch item; got {tokens!r}.")
    items = list(tokens)
    if len(items) != batch:
        raise TraceError(f"{where}: tokens has {len(items)} items but the batch has {batch}; give labels per item.")
    out = []
    for b, item in enumerate(items):
        if isinstance(item, (str, bytes)) or not hasattr(item, "__iter__"):
            raise TraceError(f"{where}: tokens[{b}] must be a list of {length} labels, got {item!r}.")
        labels = tuple(item)
        if not all(isinstance(label, str) for label in labels):
            bad = next(label for label in labels if not isinstance(label, str))
            raise TraceError(f"{where}: token labels must be strings; tokens[{b}] holds {bad!r}.")
        if len(labels) != length:
            raise TraceError(
                f"{where}: tokens[{b}] has {len(labels)} labels but the attention covers {length} tokens; pad the "
                "labels to the sequence length (padding positions are ignored)."
            )
        out.append(labels)
    return tuple(out)


def _grid(grid: Any, special: np.ndarray, where: str) -> tuple[int, int] | None:
    if grid is None:
        return None
    if isinstance(grid, (str, bytes)) or len(grid) != 2 or not all(is_int(x) and x > 0 for x in grid):
        raise TraceError(f"{where}: grid must be (rows, columns) of positive ints, got {grid!r}.")
    rows, cols = int(grid[0]), int(grid[1])
    patches = (~special).sum(axis=1)
    if not (patches == rows * cols).all():
        raise TraceError(
            f"{where}: a {rows}x{cols} patch grid needs {rows * cols} non-special tokens per item, but items have "
            f"{sorted(set(patches.tolist()))}. Mark CLS and register tokens in special=."
        )
    return rows, cols


@dataclasses.dataclass(frozen=True, eq=False)
class Link:
    """Fixed edges that feed some input tokens of one stream from another stream's tokens.

    LLaVA-style models project vision patches into the language model's image-token positions: those
    positions are then no input of their own but carry what the vision tower computed at a given depth.

    Attributes:
        stream: the stream whose input tokens are fed (e.g. ``"text"``).
        source: the stream they are fed from (e.g. ``"vision"``).
        depth: the source's depth, the number of the source stream's layers applied (0 = its inputs;
            LLaVA's ``vision_feature_layer=-2`` of a 24-layer tower is depth 23).
        weights: ``(batch, stream length, source length)``, non-negative; row ``i`` of item ``b`` sums to 1
            where token ``i`` is fed, and is all 0 where it is an input of its own.
    """

    stream: str
    source: str
    depth: int
    weights: np.ndarray

    def fed(self, batch_index: int) -> np.ndarray:
        """``(stream length,)`` bool: which tokens of ``stream`` this link feeds in one batch item."""
        return self.weights[batch_index].sum(axis=-1) > 0

    def __repr__(self) -> str:
        return f"Link({self.stream!r} <- {self.source!r} at depth {self.depth}, weights {tuple(self.weights.shape)})"
