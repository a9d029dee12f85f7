"""The numpy-only statistics of faithfulness: ranks, Spearman's correlation, ablation orders and AOPC."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .._ranks import rankdata as rankdata
from .._ranks import spearman as spearman

#: ERASER's bins (DeYoung et al., 2020): the fractions of an item's tokens removed (comprehensiveness) or kept
#: (sufficiency), averaged into AOPC.
ERASER_BINS = (0.01, 0.05, 0.10, 0.20, 0.50)
"""ERASER's bins (DeYoung et al., 2020): the fractions of an item's tokens removed (comprehensiveness) or kept
(sufficiency), averaged into AOPC."""
#: Fractions of the tokens at which deletion and insertion curves are read.
CURVE_GRID = tuple(i / 10 for i in range(11))
"""Fractions of the tokens at which deletion and insertion curves are read."""


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
