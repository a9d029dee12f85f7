"""Ranks and Spearman's correlation: the one implementation faithfulness and compare share."""

from __future__ import annotations

import numpy as np


def rankdata(values: np.ndarray, *, tie_tol: float = 0.0) -> np.ndarray:
    """Ranks ``1..n`` along the last axis, ties given their average rank (scipy's ``method="average"``).

    ``values``: ``(..., n)`` finite numbers. ``tie_tol``: sorted neighbours at most this far apart share a
    rank (chained), so that rounding noise between two frameworks does not reorder equal scores (attention
    flow often gives several tokens exactly equal values); 0 ties only equal values. Returns float64
    ``(..., n)``.
    """
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, axis=-1, kind="stable")
    ordered = np.take_along_axis(values, order, axis=-1)
    n = values.shape[-1]
    ranks = np.empty_like(values)
    flat_ordered, flat_order, flat_ranks = ordered.reshape(-1, n), order.reshape(-1, n), ranks.reshape(-1, n)
    for row in range(flat_ordered.shape[0]):
        sorted_row = flat_ordered[row]
        # starts of runs of tied values; each run gets the mean of the ranks it spans
        starts = np.flatnonzero(np.r_[True, np.diff(sorted_row) > tie_tol])
        ends = np.r_[starts[1:], n]
        average = (starts + ends + 1) / 2.0  # mean of (start+1 .. end)
        flat_ranks[row, flat_order[row]] = np.repeat(average, ends - starts)
    return ranks


def spearman(x: np.ndarray, y: np.ndarray, *, tie_tol: float = 0.0) -> np.ndarray:
    """Spearman's rank correlation along the last axis: Pearson's correlation of average ranks.

    ``x``, ``y``: ``(..., n)`` (broadcast against each other). ``tie_tol``: see [`rankdata`][attnflow.evaluate.rankdata]. Returns
    ``(...)`` float64 (a 0-d array for 1-D input); NaN where either side is constant or ``n < 2`` — there is
    no ranking to compare — as ``scipy.stats.spearmanr`` does.
    """
    x, y = np.broadcast_arrays(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))
    if x.shape[-1] < 2:
        return np.full(x.shape[:-1], np.nan)
    rx = rankdata(x, tie_tol=tie_tol)
    ry = rankdata(y, tie_tol=tie_tol)
    rx -= rx.mean(axis=-1, keepdims=True)
    ry -= ry.mean(axis=-1, keepdims=True)
    denominator = np.sqrt((rx * rx).sum(axis=-1) * (ry * ry).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (rx * ry).sum(axis=-1) / denominator
    out = np.where(denominator > 0, out, np.nan)
    return np.clip(out, -1.0, 1.0)
