"""The verdict of a faithfulness run: a ranked leaderboard per reference, with bootstrap intervals.

Framework-free (numpy only). Every figure is a mean over items with ``n`` (the items where it is defined)
and a 95% **percentile bootstrap** interval over items, computed the same way everywhere:

1. ``x``: the figure's finite per-item values (``n`` of them);
2. ``rng = numpy.random.default_rng(seed)``, drawn afresh for every figure (so each figure's interval is
   reproducible on its own), and ``index = rng.integers(0, n, size=(resamples, n))``: ``resamples`` samples
   of ``n`` items drawn with replacement;
3. the interval is ``numpy.percentile(x[index].mean(axis=1), [2.5, 97.5])`` (numpy's default linear
   interpolation).

Paired differences (the lead of the first method over the second) resample the items where both methods
have a value, the difference taken per item before the means.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import OptionError

#: Resamples of the bootstrap intervals.
RESAMPLES = 2000
#: The interval's coverage.
LEVEL = 0.95
#: Columns of the leaderboard table (``OUT/leaderboard.csv`` and ``.parquet`` of ``attnflow evaluate``).
LEADERBOARD_COLUMNS = (
    "reference", "rank", "method", "layer", "n",
    "rho_last", "rho_last_low", "rho_last_high",
    "rho_layers", "rho_layers_low", "rho_layers_high",
    "comprehensiveness", "comprehensiveness_low", "comprehensiveness_high",
    "sufficiency", "sufficiency_low", "sufficiency_high", "n_aopc",
)
"""Columns of the leaderboard table (``OUT/leaderboard.csv`` and ``.parquet`` of ``attnflow evaluate``)."""
#: What each column means (docs/faithfulness.md repeats it).
LEADERBOARD_DOC = {
    "reference": "the reference importance the ranks are compared with (blankout, grad_norm, ...)",
    "rank": "1 = highest rho_last (the random baseline is ranked too)",
    "method": "the method (random: a random ranking of each item's tokens, the baseline to beat)",
    "layer": "the layer of rho_last, 1-based (layer 1 = after the first layer): the method's last",
    "n": "items with a last-layer correlation",
    "rho_last": "mean over items of Spearman's rho at the last layer (higher is better)",
    "rho_last_low, rho_last_high": "its 95% percentile-bootstrap interval over items",
    "rho_layers": "per item the mean of rho over the method's layers, then the mean over items (higher is better)",
    "comprehensiveness": "ERASER's AOPC comprehensiveness at the last layer, mean over items (higher is better)",
    "sufficiency": "ERASER's AOPC sufficiency at the last layer, mean over items (lower is better)",
    "n_aopc": "items with AOPC values (0 when the run skipped the curves)",
}


def bootstrap_interval(values: Any, *, seed: int = 0, resamples: int = RESAMPLES,
                       level: float = LEVEL) -> tuple[float, float, float, int]:
    """``(mean, low, high, n)`` of the finite entries of ``values`` with a percentile-bootstrap interval
    (see the module docstring for the exact scheme); NaNs when no entry is finite. One value gives a
    zero-width interval."""
    check_seed(seed)
    if not isinstance(resamples, int) or isinstance(resamples, bool) or resamples < 1:
        raise OptionError(f"resamples must be a positive int, got {resamples!r}.")
    if not 0.0 < level < 1.0:
        raise OptionError(f"level must be in (0, 1), got {level!r}.")
    x = np.asarray(values, dtype=np.float64).ravel()
    x = x[np.isfinite(x)]
    n = int(x.size)
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    rng = np.random.default_rng(seed)
    index = rng.integers(0, n, size=(resamples, n))
    means = x[index].mean(axis=1)
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return float(x.mean()), float(low), float(high), n


def check_seed(seed: Any) -> int:
    """``seed`` as a non-negative int (numpy's generators refuse negative seeds), else an OptionError."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise OptionError(f"seed must be an integer >= 0, got {seed!r}.")
    return int(seed)


def per_item_layer_mean(array: np.ndarray) -> np.ndarray:
    """``(items,)``: each item's mean over the layers (rows) where its correlation is defined; NaN if none."""
    array = np.asarray(array, dtype=np.float64)
    finite = np.isfinite(array)
    count = finite.sum(axis=0)
    total = np.where(finite, array, 0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def leaderboard_rows(
    correlations: Mapping[str, np.ndarray], layers: Mapping[str, Sequence[int]], reference: str, *,
    comprehensiveness: Mapping[str, np.ndarray] | None = None, sufficiency: Mapping[str, np.ndarray] | None = None,
    seed: int = 0, resamples: int = RESAMPLES,
) -> list[dict[str, Any]]:
    """The ranked rows of one reference (columns `LEADERBOARD_COLUMNS`), from per-method
    ``(layers, items)`` correlations with that reference and 0-based layer indices; best first, ties and NaN
    means ordered by name (NaN last)."""
    rows = []
    for method, array in correlations.items():
        array = np.asarray(array, dtype=np.float64)
        last = bootstrap_interval(array[-1], seed=seed, resamples=resamples) if array.shape[0] else (math.nan,) * 3 + (0,)
        over = bootstrap_interval(per_item_layer_mean(array), seed=seed, resamples=resamples)
        comp = bootstrap_interval((comprehensiveness or {}).get(method, []), seed=seed, resamples=resamples)
        suff = bootstrap_interval((sufficiency or {}).get(method, []), seed=seed, resamples=resamples)
        layer = int(layers[method][-1]) + 1 if len(layers[method]) else 0
        rows.append({
            "reference": reference, "rank": 0, "method": method, "layer": layer, "n": last[3],
            "rho_last": last[0], "rho_last_low": last[1], "rho_last_high": last[2],
            "rho_layers": over[0], "rho_layers_low": over[1], "rho_layers_high": over[2],
            "comprehensiveness": comp[0], "comprehensiveness_low": comp[1], "comprehensiveness_high": comp[2],
            "sufficiency": suff[0], "sufficiency_low": suff[1], "sufficiency_high": suff[2], "n_aopc": comp[3],
        })
    def key(row: dict[str, Any]) -> tuple[bool, float, str]:
        value = float(row["rho_last"])
        return (math.isnan(value), 0.0 if math.isnan(value) else -value, str(row["method"]))

    rows.sort(key=key)
    for rank, row in enumerate(rows, start=1):
        row["rank"] = rank
    return rows


def lead(
    correlations: Mapping[str, np.ndarray], rows: Sequence[Mapping[str, Any]], *, baseline: str, seed: int = 0,
    resamples: int = RESAMPLES,
) -> dict[str, Any]:
    """The most faithful method of ranked ``rows`` (the baseline left out) and whether its lead is clear: the
    paired per-item difference of last-layer correlations, first minus second, has a bootstrap interval that
    excludes 0. Keys: ``best, second, difference, low, high, n, clear`` (``second`` None with one method)."""
    ranked = [row["method"] for row in rows if row["method"] != baseline and not math.isnan(row["rho_last"])]
    if not ranked:
        return {"best": None, "second": None, "difference": math.nan, "low": math.nan, "high": math.nan, "n": 0,
                "clear": False}
    if len(ranked) == 1:
        return {"best": ranked[0], "second": None, "difference": math.nan, "low": math.nan, "high": math.nan, "n": 0,
                "clear": True}
    best, second = ranked[0], ranked[1]
    a = np.asarray(correlations[best], dtype=np.float64)[-1]
    b = np.asarray(correlations[second], dtype=np.float64)[-1]
    difference, low, high, n = bootstrap_interval(a - b, seed=seed, resamples=resamples)
    clear = bool(n > 0 and (low > 0.0 or high < 0.0))
    return {"best": best, "second": second, "difference": difference, "low": low, "high": high, "n": n,
            "clear": clear}


def format_leaderboard(rows: Sequence[Mapping[str, Any]], verdict: Mapping[str, Any], *, special: bool | None = None,
                       level: float = LEVEL) -> str:
    """The leaderboard of one reference as text: a ranked table, which direction is better, and the verdict."""
    if not rows:
        return ""
    reference = rows[0]["reference"]
    pct = f"{level * 100:.0f}%"
    header = ["rank", "method", "n", f"ρ last layer [{pct} CI]", f"mean ρ over layers [{pct} CI]",
              "comprehensiveness ↑", "sufficiency ↓"]
    lines = [header]
    for row in rows:
        lines.append([
            str(row["rank"]), row["method"], str(row["n"]),
            _interval(row["rho_last"], row["rho_last_low"], row["rho_last_high"]),
            _interval(row["rho_layers"], row["rho_layers_low"], row["rho_layers_high"]),
            _interval(row["comprehensiveness"], row["comprehensiveness_low"], row["comprehensiveness_high"], 3, ""),
            _interval(row["sufficiency"], row["sufficiency_low"], row["sufficiency_high"], 3, ""),
        ])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    table = "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)
    layer = rows[0]["layer"]
    title = (f"Leaderboard against {reference} (Spearman ρ of each method's token ranking with {reference}'s, "
             f"ranked by the last layer, layer {layer}; higher ρ and comprehensiveness are better, lower "
             "sufficiency is better")
    if special is not None:
        title += "; special tokens " + ("included in" if special else "excluded from") + " rankings and removal curves"
    parts = [title + "):", table, verdict_text(verdict, reference, level=level)]
    return "\n".join(parts)


def verdict_text(verdict: Mapping[str, Any], reference: str, *, level: float = LEVEL) -> str:
    """One sentence: the most faithful method against ``reference`` and whether its lead is clear."""
    pct = f"{level * 100:.0f}%"
    best, second = verdict.get("best"), verdict.get("second")
    if best is None:
        return f"No method has a last-layer correlation with {reference} on this data."
    if second is None:
        return f"Most faithful to {reference} on this data: {best} (the only method compared)."
    gap = (f"{best} − {second} = {verdict['difference']:+.3f} per item, {pct} CI "
           f"[{verdict['low']:+.3f}, {verdict['high']:+.3f}], n={verdict['n']}")
    if verdict["clear"]:
        return f"Most faithful to {reference} on this data: {best}; its lead over {second} is clear ({gap})."
    return (f"Most faithful to {reference} on this data: {best}, but its lead over {second} is not clear: the "
            f"interval of the paired difference includes 0 ({gap}).")


def plot_leaderboard(rows: Sequence[Mapping[str, Any]], path: str | Path, *, title: str | None = None) -> Path:
    """One panel per reference: each method's last-layer ρ (dot) with its bootstrap interval, best on top,
    and the mean ρ over layers (open circle)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    references = list(dict.fromkeys(row["reference"] for row in rows))
    count = max((sum(1 for r in rows if r["reference"] == ref) for ref in references), default=1)
    figure, axes = plt.subplots(1, max(len(references), 1), figsize=(4.4 * max(len(references), 1), 0.9 + 0.42 * count),
                                squeeze=False, sharex=True)
    for axis, reference in zip(axes[0], references):
        ranked = sorted((r for r in rows if r["reference"] == reference), key=lambda r: r["rank"])
        y = np.arange(len(ranked))[::-1]
        for position, row in zip(y, ranked):
            color = "0.5" if row["method"] == "random" else "C0"
            if not math.isnan(row["rho_last"]):
                axis.errorbar(row["rho_last"], position, color=color, fmt="o",
                              xerr=[[row["rho_last"] - row["rho_last_low"]], [row["rho_last_high"] - row["rho_last"]]],
                              capsize=3)
            if not math.isnan(row["rho_layers"]):
                axis.plot(row["rho_layers"], position, marker="o", markerfacecolor="none", color=color, linestyle="")
        axis.set_yticks(y, [f"{r['method']} (n={r['n']})" for r in ranked])
        axis.axvline(0.0, color="0.8", linewidth=0.8)
        axis.set_xlim(-1.0, 1.0)
        layer = ranked[0]["layer"] if ranked else 0
        axis.set_title(f"against {reference}")
        axis.set_xlabel(f"Spearman ρ, layer {layer} (●, 95% CI) and over layers (○)")
    return save_figure(figure, path, title)


def save_figure(figure: Any, path: str | Path, title: str | None) -> Path:
    """Title, lay out, write (the format from the name) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    if title:
        figure.suptitle(title)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _interval(mean: float, low: float, high: float, digits: int = 2, sign: str = "+") -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:{sign}.{digits}f} [{low:{sign}.{digits}f}, {high:{sign}.{digits}f}]"
