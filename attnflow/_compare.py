"""compare(): is trace B a faithful copy of trace A, layer by layer and head by head?

The question it answers is "is my JAX port faithful to the PyTorch model?" (or fp16 to fp32, or one
attention implementation to another): per layer and head, the max and mean absolute difference of
the attention probabilities; per layer, the max difference of the rollout up to that layer; the max
difference of attention flow from a few source tokens; and the Spearman correlation of the per-token
scores (rollout and flow rows of the source tokens). A verdict compares these with tolerances.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypedDict, cast

import numpy as np

from ._errors import ComparisonError, MethodError, OptionError
from ._ranks import spearman as shared_spearman
from .plot._layers import stream_layer
from .trace import AttentionTrace, LayerAttention

if TYPE_CHECKING:
    from .methods._options import HeadFusion

#: Default max-abs tolerance by the least precise dtype either trace was computed in.
DEFAULT_ATOL = {"float64": 1e-9, "float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}
_PRECISION_ORDER = ("float64", "float32", "float16", "bfloat16")
#: Default lowest acceptable Spearman correlation of per-token scores.
DEFAULT_MIN_SPEARMAN = 0.95
LAYER_ALIGNMENTS = ("index", "names", "numbers")
ALIGN_HELP = (
    "index (default: layer i with layer i; layer, head and token counts, masks and token labels must "
    "match), names (pair layers whose names agree once '.', '/', '_' and '-' are treated alike and "
    "letters are lowercased), numbers (pair layers by the numbers in their names, e.g. "
    "'encoder.layer.3.attention.self' with 'encoder/layer_3/attention'); add '+tokens' (or use "
    "'tokens' alone for index) to ignore token-label differences, e.g. ids against token strings"
)


class Tolerances(TypedDict):
    """The tolerances a [`ComparisonReport`][attnflow.ComparisonReport] judged by (``mean_atol`` and ``min_spearman`` may be None:
    not checked)."""

    atol: float
    mean_atol: float | None
    rollout_atol: float
    flow_atol: float
    min_spearman: float | None
    spearman_tie_tol: float
    methods_atol: float


@dataclasses.dataclass(frozen=True)
class HeadComparison:
    """One head of one paired layer: absolute difference of attention over the real (unmasked) tokens."""

    layer: int
    head: int
    max_abs: float
    mean_abs: float
    ok: bool


@dataclasses.dataclass(frozen=True)
class LayerComparison:
    """One pair of layers. ``rollout_max_abs`` is the max difference of the rollout up to and including
    this layer (None for cross-attention layers, which rollout does not use)."""

    index: int
    name_a: str
    name_b: str
    kind: str
    heads: tuple[HeadComparison, ...]
    rollout_max_abs: float | None
    #: the layer's number from 1 among its query stream's layers (docs/format.md, "Layer numbers"), and that stream
    number: int = 0
    stream: str = ""

    @property
    def label(self) -> str:
        """``"4"``, or ``"decoder 4"`` for a layer of a trace of several streams (the number every output uses)."""
        if not self.number:
            return str(self.index + 1)
        return (f"{self.stream} " if self.stream not in ("", "tokens") else "") + str(self.number)

    @property
    def title(self) -> str:
        """``"layer 4"``, or ``"decoder layer 4"``."""
        words = self.label.split(" ")
        return " ".join([*words[:-1], "layer", words[-1]])

    @property
    def max_abs(self) -> float:
        return max(h.max_abs for h in self.heads)

    @property
    def mean_abs(self) -> float:
        return float(np.mean([h.mean_abs for h in self.heads]))

    @property
    def ok(self) -> bool:
        """Whether every head of this layer is within the attention tolerances."""
        return all(h.ok for h in self.heads)

    @property
    def failing_heads(self) -> list[int]:
        return [h.head for h in self.heads if not h.ok]


class ComparisonReport:
    """What [`compare`][attnflow.compare] found. ``ok`` is the verdict; ``str(report)`` / [`to_table`][attnflow.ComparisonReport.to_table] a readable
    table; [`to_dict`][attnflow.ComparisonReport.to_dict] a JSON-ready dict.

    Attributes:
        layers: one `LayerComparison` per paired layer, in trace A's order.
        rollout_max_abs: max difference of the rollout over all paired self-attention layers.
        flow_max_abs: max difference of the flow from ``sources`` (None when flow was skipped).
        spearman: lowest Spearman correlation over batch items and sources of the rollout row
            (``"rollout"``) and flow row (``"flow"``, absent when flow was skipped).
        sources: the source token positions of the flow and Spearman rows (negative: from the end).
        tolerances: the tolerances the verdict used.
        checks: each check's outcome (``attention``, ``rollout``, ``flow``, ``spearman``, and ``layers``:
            every layer was paired, unless ``allow_unmatched``).
        alignment: how layers were paired; ``unmatched_a`` / ``unmatched_b`` list layers left out.
    """

    def __init__(
        self, *, layers: Sequence[LayerComparison], rollout_max_abs: float, flow_max_abs: float | None,
        spearman: dict[str, float], sources: list[int], tolerances: Tolerances, alignment: str,
        ignore_tokens: bool, unmatched_a: Sequence[str], unmatched_b: Sequence[str], about_a: dict[str, Any],
        about_b: dict[str, Any], batch: int, seq: int, allow_unmatched: bool = False,
        methods: dict[str, float] | None = None,
    ):
        self.layers = tuple(layers)
        self.rollout_max_abs = rollout_max_abs
        self.flow_max_abs = flow_max_abs
        self.spearman = dict(spearman)
        self.sources = list(sources)
        self.tolerances: Tolerances = tolerances.copy()
        self.alignment = alignment
        self.ignore_tokens = ignore_tokens
        self.unmatched_a = tuple(unmatched_a)
        self.unmatched_b = tuple(unmatched_b)
        self.about_a, self.about_b = dict(about_a), dict(about_b)
        self.batch, self.seq = batch, seq
        self.methods = dict(methods or {})
        rollouts = [layer.rollout_max_abs for layer in self.layers if layer.rollout_max_abs is not None]
        min_rho = self.tolerances.get("min_spearman")
        self.checks: dict[str, bool] = {
            "attention": all(layer.ok for layer in self.layers),
            "rollout": all(r <= self.tolerances["rollout_atol"] for r in rollouts),
        }
        if self.flow_max_abs is not None:
            self.checks["flow"] = self.flow_max_abs <= self.tolerances["flow_atol"]
        if min_rho is not None:
            # an undefined correlation (constant scores: no ranking) neither passes nor fails the check
            self.checks["spearman"] = all(rho >= min_rho for rho in self.spearman.values() if not math.isnan(rho))
        if self.methods:
            self.checks["methods"] = all(v <= self.tolerances["methods_atol"] for v in self.methods.values())
        self.allow_unmatched = allow_unmatched
        if not allow_unmatched:
            # a layer only one trace has is a difference, not something to skip silently
            self.checks["layers"] = not (self.unmatched_a or self.unmatched_b)

    @property
    def ok(self) -> bool:
        """True when every check passed: attention of every head, rollout, flow, Spearman."""
        return all(self.checks.values())

    def __bool__(self) -> bool:
        return self.ok

    @property
    def failing_heads(self) -> list[tuple[int, int]]:
        """``(layer, head)`` of every head beyond the attention tolerances (layer = report index)."""
        return [(layer.index, h) for layer in self.layers for h in layer.failing_heads]

    @property
    def attention_max_abs(self) -> float:
        """The largest absolute attention-weight difference over every layer."""
        return max(layer.max_abs for layer in self.layers)

    @property
    def first_rollout_failure(self) -> int | None:
        """Index of the first layer whose rollout is beyond tolerance (rollout accumulates, so every
        later layer usually fails too)."""
        tol = self.tolerances["rollout_atol"]
        for layer in self.layers:
            if layer.rollout_max_abs is not None and layer.rollout_max_abs > tol:
                return layer.index
        return None

    def head_matrix(self) -> np.ndarray:
        """``(layers, max heads)`` max-abs attention difference per layer and head (NaN: no such head)."""
        width = max(len(layer.heads) for layer in self.layers)
        grid = np.full((len(self.layers), width), np.nan)
        for i, layer in enumerate(self.layers):
            for h in layer.heads:
                grid[i, h.head] = h.max_abs
        return grid

    # -- output -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Everything in the report as JSON-serialisable Python values (NaN becomes None)."""
        return {
            "ok": self.ok,
            "checks": dict(self.checks),
            "tolerances": dict(self.tolerances),
            "a": self.about_a,
            "b": self.about_b,
            "batch": self.batch,
            "seq": self.seq,
            "alignment": self.alignment,
            "ignore_tokens": self.ignore_tokens,
            "unmatched_a": list(self.unmatched_a),
            "unmatched_b": list(self.unmatched_b),
            "attention_max_abs": _num(self.attention_max_abs),
            "rollout_max_abs": _num(self.rollout_max_abs),
            "flow_max_abs": _num(self.flow_max_abs),
            "sources": list(self.sources),
            "spearman": {k: _num(v) for k, v in self.spearman.items()},
            "methods": {k: _num(v) for k, v in self.methods.items()},
            "failing_heads": [list(x) for x in self.failing_heads],
            "layers": [
                {
                    # index: the pair's Python index; layer: the number from 1 among the layers of its stream
                    "index": layer.index, "layer": layer.number, "stream": layer.stream, "label": layer.label,
                    "name_a": layer.name_a, "name_b": layer.name_b, "kind": layer.kind,
                    "ok": layer.ok, "max_abs": _num(layer.max_abs), "mean_abs": _num(layer.mean_abs),
                    "rollout_max_abs": _num(layer.rollout_max_abs),
                    "heads": [
                        {"head": h.head, "max_abs": _num(h.max_abs), "mean_abs": _num(h.mean_abs), "ok": h.ok}
                        for h in layer.heads
                    ],
                }
                for layer in self.layers
            ],
        }

    def to_table(self) -> str:
        """A plain-text report: one row per layer, the per-head grid, the summary and the verdict."""
        tol = self.tolerances
        lines = [
            f"A: {_about_text(self.about_a)}",
            f"B: {_about_text(self.about_b)}",
            f"{len(self.layers)} layer(s) paired by {self.alignment}"
            + (" (token labels ignored)" if self.ignore_tokens else "")
            + f"; batch {self.batch}, {self.seq} tokens",
            "tolerances: attention max|diff| <= {}{}, rollout <= {}, flow <= {}, spearman >= {}".format(
                _fmt(tol["atol"]),
                f" (mean <= {_fmt(tol['mean_atol'])})" if tol.get("mean_atol") is not None else "",
                _fmt(tol["rollout_atol"]), _fmt(tol["flow_atol"]),
                "-" if tol.get("min_spearman") is None else f"{tol['min_spearman']:g}",
            ),
        ]
        if self.unmatched_a or self.unmatched_b:
            lines.append(f"unmatched layers: A {list(self.unmatched_a)}, B {list(self.unmatched_b)}")
        name_a = max([len("layer A")] + [len(layer.name_a) for layer in self.layers])
        name_b = max([len("layer B")] + [len(layer.name_b) for layer in self.layers])
        lines.append("")
        label_width = max([3] + [len(layer.label) for layer in self.layers])
        lines.append(
            f"{'#':>{label_width}}  {'layer A':<{name_a}}  {'layer B':<{name_b}}  {'heads':>5}  {'max|diff|':>9}  "
            f"{'mean|diff|':>10}  {'rollout':>9}  status"
        )
        rollout_tol = tol["rollout_atol"]
        for layer in self.layers:
            status = "ok" if layer.ok else f"FAIL heads {layer.failing_heads}"
            if layer.rollout_max_abs is not None and layer.rollout_max_abs > rollout_tol:
                status += " / rollout FAIL" if not layer.ok else " (rollout FAIL)"
            lines.append(
                f"{layer.label:>{label_width}}  {layer.name_a:<{name_a}}  {layer.name_b:<{name_b}}  {len(layer.heads):>5}  "
                f"{_fmt(layer.max_abs):>9}  {_fmt(layer.mean_abs):>10}  {_fmt(layer.rollout_max_abs):>9}  {status}"
            )
        lines.append("(#: each layer's number from 1 among its stream's layers, as every output numbers them; rollout: "
                     "max|diff| of the rollout up to and including the layer)")
        grid = self.head_matrix()
        lines.append("")
        lines.append("max|diff| per head (* = beyond tolerance):")
        # Each cell: the value right-aligned, then one column for the flag, then a space: a flagged value can
        # never run into the next one.
        width = max([9] + [len(_fmt(v)) for v in grid.flat if not math.isnan(v)])
        lines.append((f"{'#':>{label_width}}  " + " ".join(f"{'h' + str(h):>{width}} " for h in range(grid.shape[1]))).rstrip())
        for i, layer in enumerate(self.layers):
            cells = []
            for h in range(grid.shape[1]):
                value = grid[i, h]
                bad = not math.isnan(value) and h in layer.failing_heads
                cells.append(f"{'' if math.isnan(value) else _fmt(value):>{width}}{'*' if bad else ' '}")
            lines.append(f"{layer.label:>{label_width}}  " + " ".join(cells).rstrip())
        lines.append("")
        summary = [f"rollout max|diff| {_fmt(self.rollout_max_abs)}"]
        if self.flow_max_abs is not None:
            summary.append(f"flow max|diff| {_fmt(self.flow_max_abs)} (sources {self.sources})")
        else:
            summary.append("flow skipped")
        for key, value in self.spearman.items():
            summary.append(f"spearman {key} " + ("undefined (constant scores)" if math.isnan(value) else f"{value:.4f}"))
        lines.append("; ".join(summary))
        if self.methods:
            lines.append("methods max|diff| (after the last layer, every token; tolerance "
                         f"{_fmt(tol['methods_atol'])}): " + ", ".join(f"{k} {_fmt(v)}" for k, v in self.methods.items()))
        failed = [name for name, passed in self.checks.items() if not passed]
        if self.ok:
            lines.append("verdict: OK, the traces agree within tolerance")
        else:
            detail = []
            if self.failing_heads:
                titles = {layer.index: layer.title for layer in self.layers}
                detail.append("heads " + ", ".join(f"{titles[li]} head {h}" for li, h in self.failing_heads))
            first = self.first_rollout_failure
            if first is not None:
                detail.append(f"rollout from layer {first + 1}")
            if not self.checks.get("layers", True):
                detail.append("layers only one trace has (allow_unmatched=True / --allow-unmatched to accept)")
            lines.append(f"verdict: DIFFERENT ({', '.join(failed)} beyond tolerance"
                         + (f": {'; '.join(detail)}" if detail else "") + ")")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_table()

    def __repr__(self) -> str:
        return (
            f"ComparisonReport(ok={self.ok}, layers={len(self.layers)}, attention_max_abs="
            f"{_fmt(self.attention_max_abs)}, failing_heads={self.failing_heads})"
        )


def compare(
    trace_a: AttentionTrace,
    trace_b: AttentionTrace,
    *,
    atol: float | None = None,
    mean_atol: float | None = None,
    rollout_atol: float | None = None,
    flow_atol: float | None = None,
    min_spearman: float | None = DEFAULT_MIN_SPEARMAN,
    spearman_tie_tol: float | None = None,
    flow: bool = True,
    flow_sources: Sequence[int] | None = None,
    align: str = "index",
    allow_unmatched: bool = False,
    head_fusion: HeadFusion | None = None,
    residual: float = 0.5,
    max_seconds: float = 120.0,
    methods: Sequence[str] = (),
    methods_atol: float | None = None,
) -> ComparisonReport:
    """Compare two traces of the same input, layer by layer and head by head.

    Attention differences are taken over the real tokens only (query and key both unmasked; padding
    rows and columns are ignored); cross-attention layers over all positions.

    Args:
        trace_a: the first trace, e.g. the PyTorch model's.
        trace_b: the second trace of the same input, e.g. the JAX port's.
        atol: max absolute attention difference allowed per head. Default: by the least precise dtype
            either model computed in (``source_dtype``): float32 1e-5, float16 2e-3, bfloat16 1e-2,
            float64 1e-9.
        mean_atol: optional limit on each head's mean absolute difference (not checked when None).
        rollout_atol: max difference of the rollout up to every layer (default: ``atol``).
        flow_atol: max difference of the flow from ``flow_sources`` (default: ``atol``).
        min_spearman: lowest Spearman correlation accepted between the two traces' per-token scores
            (each source token's rollout row and flow row, per batch item); None: not checked.
        spearman_tie_tol: scores closer than this count as tied when ranking, so rounding noise does
            not reorder (nearly) equal scores; flow often gives several tokens exactly equal values.
            Default: the dtype default of ``atol`` (1e-5 for float32), whatever ``atol`` is set to.
        flow: compute attention flow (max-flow per source, the costly part); False skips it.
        flow_sources: token positions whose rollout/flow rows are compared (negative: from each item's
            last real token). Default ``[0]`` (the first token, e.g. [CLS]), ``[-1]`` for causal traces.
        align: how to pair layers, and whether token labels must match: ``"index"`` (default),
            ``"names"``, ``"numbers"``, optionally with ``"+tokens"``; ``"tokens"`` = index ignoring
            labels. See `ALIGN_HELP`.
        allow_unmatched: with ``align="names"``/``"numbers"``, layers that only one trace has are listed
            in the report and fail the verdict (check ``layers``) unless this is True.
        head_fusion: as in [`attnflow.rollout`][attnflow.rollout] / [`attnflow.flow`][attnflow.flow].
        residual: as in [`attnflow.rollout`][attnflow.rollout] / [`attnflow.flow`][attnflow.flow].
        max_seconds: passed to [`attnflow.flow`][attnflow.flow].
        methods: further registered methods to compare (e.g. ``["grad_rollout", "norm", "alti"]``, or ``"all"``:
            every method both traces support; for traces
            captured with ``target=``/``values=``): each method's scores after the last layer, for every
            token, computed on both traces with the same options; their max difference is check ``methods``.
        methods_atol: tolerance of those differences (default: ``rollout_atol``).

    Returns:
        A [`ComparisonReport`][attnflow.ComparisonReport]; ``report.ok`` is the verdict.

    Raises:
        ComparisonError: the traces cannot be compared; the message names the first mismatch (batch
            size, token count, layer count, layer kind, head count, shape, mask, token label).

    Examples:
        >>> import numpy as np
        >>> import attnflow
        >>> w = np.array([[[[1.0, 0.0], [0.5, 0.5]]]])  # (batch, heads, query, key)
        >>> trace = attnflow.AttentionTrace.from_arrays([w, w], tokens=["a", "b"])
        >>> report = attnflow.compare(trace, trace.replace(framework="jax"))
        >>> report.ok
        True
    """
    from .methods import flow as attention_flow
    from .methods import rollout

    for name, trace in (("trace_a", trace_a), ("trace_b", trace_b)):
        if not isinstance(trace, AttentionTrace):
            raise ComparisonError(f"{name} must be an AttentionTrace, got {type(trace).__name__}.")
    layer_align, ignore_tokens = _parse_align(align)
    if trace_a.batch_size != trace_b.batch_size:
        raise ComparisonError(f"Batch sizes differ: A has {trace_a.batch_size} item(s), B has {trace_b.batch_size}.")
    _check_streams(trace_a, trace_b, ignore_tokens)
    pairs, unmatched_a, unmatched_b = _pair_layers(trace_a, trace_b, layer_align)
    for index, (i, j) in enumerate(pairs):
        _check_pair(index, i, j, trace_a.layers[i], trace_b.layers[j])

    dtype_atol = _default_atol(trace_a, trace_b)
    atol = _tolerance("atol", atol, dtype_atol)
    rollout_tol = _tolerance("rollout_atol", rollout_atol, atol)
    tolerances: Tolerances = {
        "atol": atol,
        "mean_atol": None if mean_atol is None else _tolerance("mean_atol", mean_atol, atol),
        "rollout_atol": rollout_tol,
        "flow_atol": _tolerance("flow_atol", flow_atol, atol),
        "min_spearman": None if min_spearman is None else float(min_spearman),
        "spearman_tie_tol": _tolerance("spearman_tie_tol", spearman_tie_tol, dtype_atol),
        "methods_atol": _tolerance("methods_atol", methods_atol, rollout_tol),
    }
    if min_spearman is not None and not -1.0 <= float(min_spearman) <= 1.0:
        raise OptionError(f"min_spearman must be in [-1, 1] or None, got {min_spearman!r}.")

    heads_rows = []
    for index, (i, j) in enumerate(pairs):
        la, lb = trace_a.layers[i], trace_b.layers[j]
        diff = np.abs(la.weights.astype(np.float64) - lb.weights.astype(np.float64))
        query_mask = trace_a.streams[la.query_stream].mask  # type: ignore[index]
        key_mask = trace_a.streams[la.key_stream].mask  # type: ignore[index]
        grid = np.broadcast_to(query_mask[:, None, :, None] & key_mask[:, None, None, :], diff.shape)  # type: ignore[index]
        heads = []
        for h in range(diff.shape[1]):
            values = diff[:, h][grid[:, h]]
            max_abs = float(values.max()) if values.size else 0.0
            mean_abs = float(values.mean()) if values.size else 0.0
            ok = max_abs <= atol and (tolerances["mean_atol"] is None or mean_abs <= tolerances["mean_atol"])
            heads.append(HeadComparison(layer=index, head=h, max_abs=max_abs, mean_abs=mean_abs, ok=ok))
        heads_rows.append(heads)

    paired_a = _subtrace(trace_a, [i for i, _ in pairs])
    paired_b = _subtrace(trace_b, [j for _, j in pairs])
    rollout_per_layer: dict[int, float] = {}
    spearman: dict[str, float] = {}
    rollout_max = float("nan")
    flow_max: float | None = None
    tie_tol = tolerances["spearman_tie_tol"]
    for stream in _output_streams(paired_a):
        causal = bool(paired_a.streams[stream].causal and paired_b.streams[stream].causal)
        sources = list(flow_sources) if flow_sources is not None else ([-1] if causal else [0])
        own = [index for index, (i, _) in enumerate(pairs) if trace_a.layers[i].query_stream == stream]
        ra = _by_input(rollout(paired_a, all_layers=True, stream=stream, head_fusion=head_fusion, residual=residual),
                       paired_a, stream)
        rb = _by_input(rollout(paired_b, all_layers=True, stream=stream, head_fusion=head_fusion, residual=residual),
                       paired_b, stream)
        for k, index in enumerate(own):
            rollout_per_layer[index] = max(float(np.abs(ra[name][k] - rb[name][k]).max()) for name in ra)
        last = max(float(np.abs(ra[name][-1] - rb[name][-1]).max()) for name in ra)
        rollout_max = last if np.isnan(rollout_max) else max(rollout_max, last)
        rows = _source_rows(paired_a, stream, sources)
        label = "rollout" if len(_output_streams(paired_a)) == 1 else f"rollout[{stream}]"
        spearman[label] = _min_spearman(
            {name: value[-1] for name, value in ra.items()}, {name: value[-1] for name, value in rb.items()},
            rows, paired_a, tie_tol,
        )
        if flow:
            fa = _by_input(attention_flow(paired_a, sources=sources, stream=stream, max_seconds=max_seconds,
                                          progress=False, head_fusion=head_fusion, residual=residual), paired_a, stream)
            fb = _by_input(attention_flow(paired_b, sources=sources, stream=stream, max_seconds=max_seconds,
                                          progress=False, head_fusion=head_fusion, residual=residual), paired_b, stream)
            diff_flow = max(float(np.abs(fa[name] - fb[name]).max()) for name in fa)
            flow_max = diff_flow if flow_max is None else max(flow_max, diff_flow)
            spearman[label.replace("rollout", "flow")] = _min_spearman(
                fa, fb, _source_rows(paired_a, stream, sources, flow_rows=True), paired_a, tie_tol
            )
    method_diffs = _method_differences(paired_a, paired_b, methods, head_fusion, residual)
    layers = [
        LayerComparison(  # a trace sets every layer's kind ("self" or "cross")
            index=index, name_a=trace_a.layers[i].name, name_b=trace_b.layers[j].name, kind=cast(str, trace_a.layers[i].kind),
            heads=tuple(heads_rows[index]), rollout_max_abs=rollout_per_layer.get(index),
            number=stream_layer(trace_a, i)[0], stream=str(stream_layer(trace_a, i)[2]),
        )
        for index, (i, j) in enumerate(pairs)
    ]
    return ComparisonReport(
        layers=layers, rollout_max_abs=rollout_max, flow_max_abs=flow_max, spearman=spearman, sources=sources,
        tolerances=tolerances, alignment=layer_align, ignore_tokens=ignore_tokens, unmatched_a=unmatched_a,
        unmatched_b=unmatched_b, about_a=_about(trace_a), about_b=_about(trace_b), batch=trace_a.batch_size,
        seq=sum(s.length for s in trace_a.streams.values()), allow_unmatched=allow_unmatched, methods=method_diffs,
    )


def _method_differences(
    a: AttentionTrace, b: AttentionTrace, methods: Sequence[str], head_fusion: HeadFusion | None, residual: float
) -> dict[str, float]:
    """Per registered method: the max difference of its final scores on the two traces (every output stream,
    every token)."""
    if isinstance(methods, str):
        methods = [methods]
    if not methods:
        return {}
    from ._explanation import explain
    from .methods._options import Options
    from .methods._registry import ALL, list_methods

    if list(methods) == [ALL]:  # every method both traces support, beside the rollout and flow compared above
        methods = [m for m in list_methods() if m not in ("raw", "rollout", "flow") and _supports(a, m) and _supports(b, m)]
        if not methods:
            return {}

    options = Options(head_fusion=head_fusion, residual=residual)
    out: dict[str, float] = {}
    for stream in _output_streams(a):
        ea = explain(a, list(methods), stream=stream, options=options, all_layers=False)
        eb = explain(b, list(methods), stream=stream, options=options, all_layers=False)
        for name in methods:
            sa, sb = _by_input(ea[name], a, stream), _by_input(eb[name], b, stream)
            diff = max(float(np.abs(sa[k] - sb[k]).max()) for k in sa)
            out[name] = max(out.get(name, 0.0), diff)
    return out


def _supports(trace: AttentionTrace, method: str) -> bool:
    from .methods._registry import get_method

    try:
        get_method(method).check(trace)
    except MethodError:
        return False
    return True


def spearman(x: np.ndarray, y: np.ndarray, *, tie_tol: float = 0.0) -> float:
    """Spearman rank correlation of two 1-D arrays: the one faithfulness uses (`attnflow._ranks.spearman`,
    ties given their average rank, as in scipy).

    ``tie_tol``: values of one array closer than this to their sorted neighbour count as tied, so that rounding
    noise between two frameworks does not reorder tokens whose scores are (nearly) equal. A constant array has
    no ranking: the correlation is NaN, which [`compare`][attnflow.compare] reports as undefined.
    """
    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise OptionError(f"spearman needs arrays of equal length, got {x.size} and {y.size}.")
    return float(shared_spearman(x, y, tie_tol=tie_tol))


# -- helpers ------------------------------------------------------------------------------------------
def _parse_align(align: str) -> tuple[str, bool]:
    if not isinstance(align, str):
        raise OptionError(f"align must be a string, got {align!r}. Options: {ALIGN_HELP}.")
    parts = [p.strip().lower() for p in align.replace(",", "+").split("+") if p.strip()]
    ignore_tokens = "tokens" in parts
    layer_parts = [p for p in parts if p != "tokens"]
    if len(layer_parts) > 1 or any(p not in LAYER_ALIGNMENTS for p in layer_parts) or not parts:
        raise OptionError(f"align={align!r} is not understood. Options: {ALIGN_HELP}.")
    return (layer_parts[0] if layer_parts else "index"), ignore_tokens


def _normalise_name(name: str) -> str:
    return ".".join(p for p in re.split(r"[^0-9a-z]+", name.lower()) if p)


def _layer_key(layer: LayerAttention, how: str) -> Any:
    if how == "names":
        return _normalise_name(layer.name)
    return (layer.kind, tuple(int(n) for n in re.findall(r"\d+", layer.name)))


def _pair_layers(a: AttentionTrace, b: AttentionTrace, how: str) -> tuple[list[tuple[int, int]], list[str], list[str]]:
    if how == "index":
        if a.num_layers != b.num_layers:
            raise ComparisonError(
                f"Layer counts differ: A has {a.num_layers} attention layers, B has {b.num_layers}. Capture "
                "the same layers, or pair them with align='names' or align='numbers'."
            )
        return [(i, i) for i in range(a.num_layers)], [], []
    keys_a = [_layer_key(layer, how) for layer in a.layers]
    keys_b = [_layer_key(layer, how) for layer in b.layers]
    for label, keys, trace in (("A", keys_a, a), ("B", keys_b, b)):
        seen: dict[Any, int] = {}
        for i, key in enumerate(keys):
            if key in seen:
                raise ComparisonError(
                    f"align={how!r} is ambiguous: layers {seen[key]} ({trace.layers[seen[key]].name!r}) and {i} "
                    f"({trace.layers[i].name!r}) of {label} get the same key {key!r}."
                )
            seen[key] = i
    index_b = {key: j for j, key in enumerate(keys_b)}
    pairs = [(i, index_b[key]) for i, key in enumerate(keys_a) if key in index_b]
    if not pairs:
        raise ComparisonError(
            f"align={how!r} pairs no layer: A's layers {a.layer_names[:3]}... and B's {b.layer_names[:3]}... "
            "share no key."
        )
    js = [j for _, j in pairs]
    if js != sorted(js):
        raise ComparisonError(f"align={how!r} pairs layers in a different order in A and B; pairs {pairs}.")
    unmatched_a = [a.layers[i].name for i in range(a.num_layers) if i not in {p for p, _ in pairs}]
    unmatched_b = [b.layers[j].name for j in range(b.num_layers) if j not in set(js)]
    return pairs, unmatched_a, unmatched_b


def _check_pair(index: int, i: int, j: int, la: LayerAttention, lb: LayerAttention) -> None:
    where = f"Layer {index} (A {la.name!r}, B {lb.name!r})"
    if la.kind != lb.kind:
        raise ComparisonError(f"{where}: kinds differ, {la.kind!r} in A and {lb.kind!r} in B.")
    if (la.query_stream, la.key_stream) != (lb.query_stream, lb.key_stream):
        raise ComparisonError(
            f"{where}: streams differ, ({la.query_stream!r}, {la.key_stream!r}) in A and ({lb.query_stream!r}, "
            f"{lb.key_stream!r}) in B (query, key)."
        )
    ha, hb = la.weights.shape[1], lb.weights.shape[1]
    if ha != hb:
        raise ComparisonError(f"{where}: head counts differ, {ha} in A and {hb} in B.")
    if la.weights.shape != lb.weights.shape:
        raise ComparisonError(
            f"{where}: shapes differ, {la.weights.shape} in A and {lb.weights.shape} in B (batch, heads, query, key)."
        )


def _check_streams(a: AttentionTrace, b: AttentionTrace, ignore_tokens: bool) -> None:
    if list(a.streams) != list(b.streams):
        raise ComparisonError(
            f"Streams differ: A has {list(a.streams)}, B has {list(b.streams)}. Compare traces of the same model "
            "family on the same inputs."
        )
    for name, sa in a.streams.items():
        sb = b.streams[name]
        what = "" if len(a.streams) == 1 else f" of stream {name!r}"
        if sa.length != sb.length:
            raise ComparisonError(
                f"Token counts{what} differ: A has {sa.length} tokens, B has {sb.length}. Capture both on the same "
                "tokenised input (same padding)."
            )
        mask_a, mask_b = sa._completed(), sb._completed()  # a trace's streams always have their mask
        if not np.array_equal(mask_a, mask_b):
            item, p = (int(x) for x in np.argwhere(mask_a != mask_b)[0])
            raise ComparisonError(
                f"Masks{what} differ: batch item {item}, position {p} is "
                f"{'real' if mask_a[item, p] else 'padding'} in A but {'real' if mask_b[item, p] else 'padding'} "
                "in B. Both traces need the same padding."
            )
        if ignore_tokens:
            continue
        for item in range(a.batch_size):
            for p in sa.valid_index(item):
                ta, tb = sa.tokens[item][p], sb.tokens[item][p]  # type: ignore[index]
                if ta != tb:
                    raise ComparisonError(
                        f"Token labels{what} differ: batch item {item}, position {int(p)} is {ta!r} in A but {tb!r} "
                        "in B. Compare traces of the same input, or pass align='tokens' (or '...+tokens') to ignore "
                        "label differences (e.g. token ids against token strings)."
                    )


def _subtrace(trace: AttentionTrace, indices: list[int]) -> AttentionTrace:
    if indices == list(range(trace.num_layers)):
        return trace
    layers = [trace.layers[i] for i in indices]
    used = {name for layer in layers for name in (layer.query_stream, layer.key_stream)}
    links = [link for link in trace.links if link.stream in used and link.source in used]
    return trace.replace(layers=layers, streams=[s for n, s in trace.streams.items() if n in used], links=links)


def _output_streams(trace: AttentionTrace) -> list[str]:
    """The streams no other stream draws on: each is explained on its own."""
    drawn = {layer.key_stream for layer in trace.layers if layer.kind == "cross"} | {link.source for link in trace.links}
    return [name for name in trace.streams if name not in drawn and trace.stream_layers(name)]


def _by_input(result: Any, trace: AttentionTrace, stream: str) -> dict[str, np.ndarray]:
    """rollout/flow results as a dict by input stream, whether they came as a dict or one array."""
    if isinstance(result, dict):
        return result
    return {trace.input_streams(stream)[0]: result}


def _source_rows(
    trace: AttentionTrace, stream: str, sources: list[int], flow_rows: bool = False
) -> list[tuple[int, int, int]]:
    """``(batch item, row in the result, position)`` for every source that is a real token."""
    found = []
    s_info = trace.streams[stream]
    for b in range(trace.batch_size):
        valid = s_info.valid_index(b)
        for row, s in enumerate(sources):
            if not isinstance(s, (int, np.integer)):
                raise OptionError(f"flow_sources must hold ints, got {s!r}.")
            if s < 0:
                if -s > valid.size:
                    continue
                position = int(valid[s])
            elif s < s_info.length and s_info.mask[b, s]:  # type: ignore[index]
                position = int(s)
            else:
                continue
            found.append((b, row if flow_rows else position, position))
    return found


def _min_spearman(
    ma: dict[str, np.ndarray], mb: dict[str, np.ndarray], rows: list[tuple[int, int, int]], trace: AttentionTrace,
    tie_tol: float,
) -> float:
    values = []
    for b, row, _ in rows:
        xa = np.concatenate([ma[name][b, row, trace.valid_index(b, name)] for name in ma])
        xb = np.concatenate([mb[name][b, row, trace.valid_index(b, name)] for name in mb])
        values.append(spearman(xa, xb, tie_tol=tie_tol))
    defined = [value for value in values if not math.isnan(value)]
    return min(defined) if defined else math.nan  # every row constant: no ranking to compare


def _default_atol(a: AttentionTrace, b: AttentionTrace) -> float:
    worst = 0
    for layer in (*a.layers, *b.layers):
        dtype = layer.source_dtype or str(layer.weights.dtype)
        if dtype in _PRECISION_ORDER:
            worst = max(worst, _PRECISION_ORDER.index(dtype))
        else:
            worst = max(worst, _PRECISION_ORDER.index("float32"))
    return DEFAULT_ATOL[_PRECISION_ORDER[worst]]


def _tolerance(name: str, value: float | None, default: float) -> float:
    if value is None:
        return float(default)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
        raise OptionError(f"{name} must be a non-negative number, got {value!r}.")
    return float(value)


def _about(trace: AttentionTrace) -> dict[str, Any]:
    dtypes = sorted({layer.source_dtype or str(layer.weights.dtype) for layer in trace.layers})
    return {"framework": trace.framework, "model": trace.model_name, "layers": trace.num_layers, "dtypes": dtypes}


def _about_text(about: dict[str, Any]) -> str:
    return f"{about['model'] or '?'} ({about['framework']}, {about['layers']} layers, {'/'.join(about['dtypes'])})"


def _num(value: float | None) -> float | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return float(value)


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.2e}"
