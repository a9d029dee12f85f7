"""The one options object every method takes."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from .._errors import OptionError
from ..network._solvers import METHODS as FLOW_SOLVERS
from ._fusion import check_head_fusion, check_options, is_int, is_number

HeadFusion = Literal["mean", "max", "min"]
FlowSolver = Literal["auto", "dinic", "dinic-v1", "pruned", "igraph"]
#: Heads to keep: one list for every layer, or per layer (an index among the explained stream's layers).
HeadSelection = Sequence[int] | Mapping[int, Sequence[int]] | None


@dataclasses.dataclass(frozen=True)
class Options:
    """Settings shared by all methods; each method reads the ones it uses.

    Attributes:
        head_fusion: how heads are fused into one matrix per layer: ``"mean"`` (the paper's), ``"max"``,
            ``"min"``; None: ``"mean"``, or the fusion a trace was captured with
            (``capture(..., head_fusion=...)``), which an explicitly different value contradicts.
        residual: ``r`` in ``Â = (1 - r) A + r I``; 0.5 is the paper's.
        discard_ratio: fraction in ``[0, 1)`` of each layer's lowest fused weights to drop (vit-explain).
        layers: which of the explained stream's layers take part: None (all), ``(start, end)``, a slice or a
            list of indices in model order; left-out layers are skipped (identity).
        heads: which heads are fused: a list of head indices for every layer, or a mapping from layer index
            (among the explained stream's layers) to its list; layers not named keep all heads. A single
            head per layer gives per-head rollout and flow.
        weights: the edge weights rollout and flow route through: ``"attention"`` (raw attention, the
            paper's), or the name of a contribution method (e.g. ``"alti"``, ``"norm"``) whose per-layer
            matrices replace attention.
        normalize: divide flow rows by their sum over the input tokens (the paper's code does).
        flow_solver: the max-flow solver (see [`attnflow.flow`][attnflow.flow]).
        n_jobs: workers for flow.
        max_seconds: flow refuses problems estimated to take longer.
    """

    # ``metadata["help"]`` is the command line's help for the field's flag (``--head-fusion`` ...): every
    # subcommand generates its option flags from these fields (attnflow.cli._common.add_option_flags).
    head_fusion: HeadFusion | None = dataclasses.field(default=None, metadata={
        "help": "how the heads of a layer are fused into one matrix: mean (the paper's), max or min (default: the "
        "fusion the trace was captured with, else mean)"})
    residual: float = dataclasses.field(default=0.5, metadata={
        "help": "residual weight r in (1-r)A + rI (default 0.5, the paper's)"})
    discard_ratio: float = dataclasses.field(default=0.0, metadata={
        "help": "drop this fraction in [0, 1) of each layer's lowest fused weights (default 0)"})
    layers: Any = dataclasses.field(default=None, metadata={
        "help": "which layers of the explained stream take part, numbered from 1 as every output numbers them "
        "(layer l = after the l-th layer): A..B (inclusive; either end may be left out; negatives count from the "
        "end: -2.. is the last two), or comma-separated layer numbers (default: all); the scores shown are after "
        "the last layer taking part", "metavar": "A..B|L1,L2"})
    heads: HeadSelection = dataclasses.field(default=None, metadata={"cli": False})
    weights: str = dataclasses.field(default="attention", metadata={"cli": False})
    normalize: bool = dataclasses.field(default=True, metadata={
        "help": "divide flow rows by their sum over the input tokens, as the paper's code does (default: on)"})
    flow_solver: FlowSolver = dataclasses.field(default="auto", metadata={
        "help": "the max-flow solver (default auto)"})
    n_jobs: int = dataclasses.field(default=1, metadata={"help": "worker threads for flow (default 1)"})
    max_seconds: float = dataclasses.field(default=1800.0, metadata={
        "help": "refuse flow problems estimated to take longer than this many seconds (default 1800)"})

    def __post_init__(self) -> None:
        check_head_fusion(self.head_fusion)
        check_options(self.residual, self.discard_ratio)
        object.__setattr__(self, "heads", _heads(self.heads))
        if not isinstance(self.weights, str) or not self.weights:
            raise OptionError(f"weights must be a method name such as 'attention' or 'alti', got {self.weights!r}.")
        if not isinstance(self.normalize, bool):
            raise OptionError(f"normalize must be True or False, got {self.normalize!r}.")
        if not isinstance(self.flow_solver, str) or self.flow_solver not in FLOW_SOLVERS:
            raise OptionError(f"flow_solver must be one of {FLOW_SOLVERS}, got {self.flow_solver!r}.")
        if not (is_int(self.n_jobs) and self.n_jobs >= 1):
            raise OptionError(f"n_jobs must be a positive int, got {self.n_jobs!r}.")
        if not is_number(self.max_seconds) or math.isnan(float(self.max_seconds)) or self.max_seconds < 0:
            raise OptionError(f"max_seconds must be a non-negative number, got {self.max_seconds!r}.")

    def fusion(self, trace: Any) -> str:
        """The head fusion for ``trace``: the one it was captured with (its heads fused in the hook), else
        ``head_fusion`` (``"mean"`` when None)."""
        fused = trace.metadata.get("head_fusion")
        if not fused:
            return self.head_fusion or "mean"
        if self.head_fusion is not None and self.head_fusion != fused:
            raise OptionError(
                f"The trace was captured with head_fusion={fused!r} (one fused map per layer), so it cannot be fused "
                f"with {self.head_fusion!r}; leave head_fusion unset, or capture again with "
                f"head_fusion={self.head_fusion!r}."
            )
        if self.heads is not None:
            raise OptionError(
                f"heads= selects heads, but the trace was captured with head_fusion={fused!r} and keeps one fused "
                "map per layer; capture without head_fusion to select heads."
            )
        return str(fused)

    def replace(self, **changes: Any) -> Options:
        """A copy with some settings changed (validated again)."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise OptionError(f"Options has no settings {unknown}; it has {[f.name for f in dataclasses.fields(self)]}.")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings (a slice or ``(start, end)`` pair of layers is kept apart from a list)."""
        out = dataclasses.asdict(self)
        layers = self.layers
        if isinstance(layers, slice):
            out["layers"] = {"slice": [layers.start, layers.stop, layers.step]}
        elif isinstance(layers, tuple) and len(layers) == 2:
            out["layers"] = {"pair": list(layers)}
        elif layers is not None:
            out["layers"] = list(layers)
        if isinstance(self.heads, Mapping):
            out["heads"] = {str(k): list(v) for k, v in self.heads.items()}
        elif self.heads is not None:
            out["heads"] = list(self.heads)
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Options:
        """The inverse of [`to_dict`][attnflow.Options.to_dict]."""
        values = dict(values)
        layers = values.get("layers")
        if isinstance(layers, Mapping) and "slice" in layers:
            values["layers"] = slice(*layers["slice"])
        elif isinstance(layers, Mapping) and "pair" in layers:
            values["layers"] = tuple(layers["pair"])
        heads = values.get("heads")
        if isinstance(heads, Mapping):
            values["heads"] = {int(k): v for k, v in heads.items()}
        try:
            return cls(**values)
        except TypeError as exc:
            raise OptionError(f"Cannot read options {sorted(values)}: {exc}") from exc

    def describe(self) -> str:
        """The settings that differ from the defaults, as ``key=value`` text (for titles and tables)."""
        default = Options()
        parts = [
            f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
            if f.name not in ("n_jobs", "max_seconds", "flow_solver") and getattr(self, f.name) != getattr(default, f.name)
        ]
        return ", ".join(parts) or "paper defaults (mean heads, residual 0.5)"


def _heads(heads: Any) -> Any:
    if heads is None:
        return None
    if is_int(heads):
        return (int(heads),)
    if isinstance(heads, Mapping):
        out = {}
        for layer, chosen in heads.items():
            if not is_int(layer):
                raise OptionError(f"heads maps layer indices to head lists; got the key {layer!r}.")
            out[int(layer)] = _head_list(chosen)
        return dict(sorted(out.items()))
    return _head_list(heads)


def _head_list(chosen: Any) -> tuple[int, ...]:
    if is_int(chosen):
        return (int(chosen),)
    if isinstance(chosen, (str, bytes)) or not isinstance(chosen, Sequence) or not chosen:
        raise OptionError(f"heads must be a non-empty list of head indices, got {chosen!r}.")
    if not all(is_int(h) for h in chosen):
        raise OptionError(f"heads must hold ints, got {chosen!r}.")
    if len(set(chosen)) != len(chosen):
        raise OptionError(f"heads lists a head twice: {chosen!r}.")
    return tuple(int(h) for h in chosen)
