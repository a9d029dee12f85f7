"""Pictures for people: heatmaps of token-by-token matrices and bar charts of per-token scores."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def heatmap(
    matrix: np.ndarray, tokens: Sequence[str], path: str | Path, *, title: str, columns: Sequence[str] | None = None
) -> Path:
    """Save a ``(rows, columns)`` matrix as a labelled heatmap (rows: output tokens ``tokens``, columns: input
    tokens ``columns``, the same tokens by default)."""
    plt = _pyplot()
    columns = tokens if columns is None else columns
    n, m = len(tokens), len(columns)
    size = min(4 + 0.35 * max(n, m), 24)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(matrix, cmap="viridis", aspect="equal")
    ax.set_xticks(range(m), labels=columns, rotation=90, fontsize=8)
    ax.set_yticks(range(n), labels=tokens, fontsize=8)
    ax.set_xlabel("input token (key)")
    ax.set_ylabel("output token (query)")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def score_bars(scores: Mapping[str, np.ndarray], tokens: Sequence[str], path: str | Path, *, title: str) -> Path:
    """Save grouped bars: one group per input token, one bar per method (``scores[method]`` is ``(n,)``)."""
    plt = _pyplot()
    n = len(tokens)
    methods = list(scores)
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(min(4 + 0.45 * n, 28), 4.5))
    x = np.arange(n)
    for i, method in enumerate(methods):
        ax.bar(x + (i - (len(methods) - 1) / 2) * width, scores[method], width, label=method)
    ax.set_xticks(x, labels=tokens, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("share of the explained token")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
