"""The numpy-only statistics of faithfulness: ranks, Spearman's correlation, ablation orders and AOPC."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

#: ERASER's bins (DeYoung et al., 2020): the fractions of an item's tokens removed (comprehensiveness) or kept
#: (sufficiency), averaged into AOPC.
ERASER_BINS = (0.01, 0.05, 0.10, 0.20, 0.50)
#: Fractions of the tokens at which deletion and insertion curves are read.
CURVE_GRID = tuple(i / 10 for i in range(11))


def rankdata(values: np.ndarray) -> np.ndarray:
    """Ranks ``1..n`` along the last axis, ties given their average rank (scipy's ``method="average"``).

    ``values``: ``(..., n)`` finite numbers. Returns float64 ``(..., n)``.
    """
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, axis=-1, kind="stable")
    ordered = np.take_along_axis(values, order, axis=-1)
    n = values.shape[-1]
    ranks = np.empty_like(values)
    flat_ordered = ordered.reshape(-1, n)
    flat_order = order.reshape(-1, n)
    flat_ranks = ranks.reshape(-1, n)
    for row in range(flat_ordered.shape[0]):
        sorted_row = flat_ordered[row]
        # starts of runs of equal values; each run gets the mean of the ranks it spans
        starts = np.flatnonzero(np.r_[True, sorted_row[1:] != sorted_row[:-1]])
        ends = np.r_[starts[1:], n]
        average = (starts + ends + 1) / 2.0  # mean of (start+1 .. end)
        flat_ranks[row, flat_order[row]] = np.repeat(average, ends - starts)
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's rank correlation along the last axis: Pearson's correlation of average ranks.

    ``x``, ``y``: ``(..., n)`` (broadcast against each other). Returns ``(...)``; NaN where either side is
    constant or ``n < 2`` (no ranking to compare), as scipy.stats.spearmanr does.
    """
    x, y = np.broadcast_arrays(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))
    if x.shape[-1] < 2:
        return np.full(x.shape[:-1], np.nan)
    rx = rankdata(x)
    ry = rankdata(y)
    rx -= rx.mean(axis=-1, keepdims=True)
    ry -= ry.mean(axis=-1, keepdims=True)
    denominator = np.sqrt((rx * rx).sum(axis=-1) * (ry * ry).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (rx * ry).sum(axis=-1) / denominator
    out = np.where(denominator > 0, out, np.nan)
    return np.clip(out, -1.0, 1.0)


def ranking(scores: np.ndarray, positions: np.ndarray, tiebreak: np.ndarray | None = None) -> np.ndarray:
    """``positions`` ordered by ``scores`` at them, highest first; ties ordered by ``tiebreak`` (ascending; e.g.
    a random key per token, so that a method's ties do not fall in position order), else by position.

    ``scores``, ``tiebreak``: ``(tokens,)``; ``positions``: ``(n,)`` indices into them. Returns ``(n,)`` positions.
    """
    positions = np.asarray(positions)
    values = np.asarray(scores, dtype=np.float64)[positions]
    keys = np.arange(positions.size) if tiebreak is None else np.asarray(tiebreak)[positions]
    return positions[np.lexsort((keys, -values))]


def snap(values: np.ndarray, digits: int = 12) -> np.ndarray:
    """``values`` rounded to ``digits`` significant decimals of the largest magnitude along the last axis, so
    that scores equal up to floating-point noise (attention flow saturates at equal values) tie exactly."""
    values = np.asarray(values, dtype=np.float64)
    scale = np.max(np.abs(values), axis=-1, keepdims=True)
    scale = np.where(scale > 0, scale, 1.0)
    return np.round(values / scale, digits) * scale


def steps(count: int, fractions: Sequence[float], *, at_least_one: bool = False) -> list[int]:
    """How many of ``count`` tokens each fraction removes: ``ceil(f * count)`` (exact for fractions such as
    0.3 of 10, which floating point would round up), at least 1 for a positive fraction with
    ``at_least_one`` (ERASER's 1% of a ten-token sentence is one token), at most ``count``."""
    out = []
    for fraction in fractions:
        k = math.ceil(round(fraction * count, 9))
        if at_least_one and fraction > 0:
            k = max(k, 1)
        out.append(min(max(k, 0), count))
    return out


def aopc(base: float, blanked: Sequence[float]) -> float:
    """ERASER's area over the perturbation curve: the mean drop ``base - f(x')`` over the bins' inputs."""
    values = np.asarray(blanked, dtype=np.float64)
    if values.size == 0:
        return float("nan")
    return float(np.mean(base - values))


def summarize(values: np.ndarray) -> tuple[float, float, int]:
    """``(mean, std, n)`` of the finite entries (population std, as numpy's default; NaN when n is 0)."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return float("nan"), float("nan"), 0
    return float(finite.mean()), float(finite.std()), int(finite.size)
