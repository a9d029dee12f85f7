"""FaithfulnessReport: per-item correlations, AOPC and curves, with the tables and the plot made from them."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import OptionError
from ._leaderboard import RESAMPLES, lead, leaderboard_rows, save_figure
from ._stats import summarize

#: The name of the random-ranking baseline among a report's methods.
RANDOM = "random"
"""The name of the random-ranking baseline among a report's methods."""
#: The AOPC metrics (ERASER): the mean drop when the top tokens are removed, and when only they are kept.
AOPC_METRICS = ("comprehensiveness", "sufficiency")
CURVE_KINDS = ("deletion", "insertion")


class FaithfulnessReport:
    """How well each method's scores agree with the model's own sensitivity to its input tokens.

    All per-item arrays have the items of the explanation (or of every report merged by [`concat`][attnflow.evaluate.FaithfulnessReport.concat])
    along one axis. A correlation is NaN where it is undefined (an item with fewer than two tokens
    compared, or constant scores); means skip NaN and ``n`` counts what was averaged.

    Attributes:
        methods: the methods compared, in the explanation's order, then ``"random"`` (a random ranking of
            each item's tokens, the baseline: its correlations are near 0 and its AOPC is what chance gives).
        references: the reference importances compared against (``"blankout"``, ``"grad_norm"``,
            ``"grad_x_input"``).
        layers: per method, the layer indices (among the explained stream's layers, 0-based, as
            [`attnflow.Explanation.layer_indices`][attnflow.Explanation.layer_indices]) of its correlations.
        correlations: ``correlations[method][reference]``: ``(layers, items)`` Spearman correlation per item.
        comprehensiveness, sufficiency: per method ``(items,)``: ERASER's AOPC per item, from the method's
            scores at its last layer.
        item_curves: ``item_curves[method]["deletion" | "insertion"]``: ``(items, len(grid))`` target scores
            with the top ``ceil(f * n)`` tokens blanked (deletion), or all but them (insertion).
        grid: the fractions ``f`` of the curves; bins: ERASER's fractions.
        importances: per reference ``(items, tokens)``: the reference importance of each token (signed as
            computed; NaN where a token was not compared: padding, and special tokens with special=False).
        base: ``(items,)`` each item's unablated target score.
        settings: how the report was made (target, blank, source, special, signed, seed, model).
    """

    def __init__(
        self, *, layers: Mapping[str, Sequence[int]], references: Sequence[str],
        correlations: Mapping[str, Mapping[str, np.ndarray]], comprehensiveness: Mapping[str, np.ndarray],
        sufficiency: Mapping[str, np.ndarray], item_curves: Mapping[str, Mapping[str, np.ndarray]],
        grid: Sequence[float], bins: Sequence[float], importances: Mapping[str, np.ndarray], base: np.ndarray,
        settings: Mapping[str, Any] | None = None,
    ):
        self.layers = {m: tuple(int(i) for i in v) for m, v in layers.items()}
        self.methods = tuple(self.layers)
        self.references = tuple(references)
        self.correlations = {m: {r: np.asarray(a, dtype=np.float64) for r, a in by.items()} for m, by in correlations.items()}
        self.comprehensiveness = {m: np.asarray(a, dtype=np.float64) for m, a in comprehensiveness.items()}
        self.sufficiency = {m: np.asarray(a, dtype=np.float64) for m, a in sufficiency.items()}
        self.item_curves = {m: {k: np.asarray(a, dtype=np.float64) for k, a in by.items()} for m, by in item_curves.items()}
        self.grid = tuple(float(f) for f in grid)
        self.bins = tuple(float(f) for f in bins)
        self.importances = {r: np.asarray(a, dtype=np.float64) for r, a in importances.items()}
        self.base = np.asarray(base, dtype=np.float64)
        self.settings = dict(settings or {})
        self._check()

    def _check(self) -> None:
        items = self.base.shape[0]
        for method, by in self.correlations.items():
            for reference, array in by.items():
                if array.shape != (len(self.layers[method]), items):
                    raise OptionError(
                        f"correlations[{method!r}][{reference!r}] has shape {array.shape}, expected "
                        f"({len(self.layers[method])} layers, {items} items)."
                    )

    # -- reading ------------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        """The number of items (examples) in the report."""
        return int(self.base.shape[0])

    @property
    def spearman(self) -> dict[str, dict[str, np.ndarray]]:
        """``spearman[method][reference]``: ``(layers,)`` mean Spearman correlation over the items, per layer
        of `layers` (NaN where no item has one)."""
        return {
            method: {ref: np.array([summarize(row)[0] for row in array]) for ref, array in by.items()}
            for method, by in self.correlations.items()
        }

    @property
    def aopc(self) -> dict[str, dict[str, float]]:
        """``aopc[method]["comprehensiveness" | "sufficiency"]``: the mean over items (higher comprehensiveness
        and lower sufficiency mean a more faithful ranking; compare with ``aopc["random"]``)."""
        return {
            method: {"comprehensiveness": summarize(self.comprehensiveness[method])[0],
                     "sufficiency": summarize(self.sufficiency[method])[0]}
            for method in self.comprehensiveness
        }

    @property
    def curves(self) -> dict[str, dict[str, np.ndarray]]:
        """``curves[method]["deletion" | "insertion"]``: ``(len(grid),)`` the mean target score over items at
        each fraction of `grid` (per item: `item_curves`)."""
        return {
            method: {kind: np.array([summarize(col)[0] for col in array.T]) for kind, array in by.items()}
            for method, by in self.item_curves.items()
        }

    def rows(self) -> list[dict[str, Any]]:
        """The long per-layer table as dicts: ``method, reference, layer, mean, std, n``; ``layer`` is 1-based
        (layer 1: after the explained stream's first layer, i.e. `layers` index 0 + 1)."""
        out = []
        for method, by in self.correlations.items():
            for reference, array in by.items():
                for layer, row in zip(self.layers[method], array):
                    mean, std, n = summarize(row)
                    out.append({"method": method, "reference": reference, "layer": layer + 1, "mean": mean,
                                "std": std, "n": n})
        return out

    def leaderboard(self, reference: str = "blankout", *, seed: int = 0,
                    resamples: int = RESAMPLES) -> list[dict[str, Any]]:
        """The methods ranked by how well their last-layer token ranking agrees with ``reference``.

        One row per method (the random baseline included), best first, with the columns of
        `attnflow.evaluate.LEADERBOARD_COLUMNS`: ``rho_last`` (the item mean of the last-layer Spearman ρ,
        the ranking key), ``rho_layers`` (per item the mean over layers, then the mean over items), AOPC
        comprehensiveness (higher is better) and sufficiency (lower is better), each with ``n`` and a 95%
        percentile-bootstrap interval over items (``resamples`` resamples drawn from
        ``numpy.random.default_rng(seed)`` afresh for each figure; see `attnflow.evaluate._leaderboard`).
        ``layer`` is 1-based.
        """
        self._check_reference(reference)
        return leaderboard_rows(
            {m: by[reference] for m, by in self.correlations.items()}, self.layers, reference,
            comprehensiveness=self.comprehensiveness, sufficiency=self.sufficiency, seed=seed, resamples=resamples,
        )

    def lead(self, reference: str = "blankout", *, seed: int = 0, resamples: int = RESAMPLES) -> dict[str, Any]:
        """The most faithful method against ``reference`` (the first of [`leaderboard`][attnflow.evaluate.FaithfulnessReport.leaderboard] that is not the
        random baseline) and whether its lead over the second is clear: ``{"best", "second", "difference",
        "low", "high", "n", "clear"}``, the paired per-item difference of last-layer ρ (first minus second)
        with its 95% bootstrap interval; ``clear`` when the interval excludes 0."""
        rows = self.leaderboard(reference, seed=seed, resamples=resamples)
        return lead({m: by[reference] for m, by in self.correlations.items()}, rows, baseline=RANDOM, seed=seed,
                    resamples=resamples)

    def _check_reference(self, reference: str) -> None:
        if reference not in self.references:
            raise OptionError(f"This report compares with {list(self.references)}, not {reference!r}.")

    def aopc_rows(self) -> list[dict[str, Any]]:
        """AOPC as dicts: ``method, metric, mean, std, n`` (metric ``comprehensiveness`` or ``sufficiency``)."""
        out = []
        for method in self.comprehensiveness:
            for metric, values in (("comprehensiveness", self.comprehensiveness[method]),
                                   ("sufficiency", self.sufficiency[method])):
                mean, std, n = summarize(values)
                out.append({"method": method, "metric": metric, "mean": mean, "std": std, "n": n})
        return out

    def to_frame(self) -> Any:
        """The long per-layer table as a pandas DataFrame: ``method, reference, layer, mean, std, n``."""
        from ..recording._adapter import import_optional

        pandas = import_optional("pandas", "dask")
        return pandas.DataFrame(self.rows(), columns=["method", "reference", "layer", "mean", "std", "n"])

    def table(self, reference: str, *, methods: Sequence[str] | None = None, digits: int = 2) -> str:
        """Abnar & Zuidema's Table-1 layout for one reference: a row per method, a column per layer
        (``L1`` is layer index 0), cells ``mean±std`` over the items."""
        self._check_reference(reference)
        methods = list(methods or self.methods)
        layers = sorted({layer for m in methods for layer in self.layers[m]})
        header = ["", *(f"L{layer + 1}" for layer in layers)]
        lines = [header]
        for method in methods:
            cells = {layer: summarize(row)[:2] for layer, row in zip(self.layers[method], self.correlations[method][reference])}
            lines.append([method, *(_cell(cells.get(layer), digits) for layer in layers)])
        widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
        return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in lines)

    def __repr__(self) -> str:
        return (f"FaithfulnessReport(items={self.batch_size}, methods={list(self.methods)}, "
                f"references={list(self.references)}, target={self.settings.get('target')!r})")

    def __str__(self) -> str:
        parts = [repr(self)]
        for reference in self.references:
            parts.append(f"Spearman with {reference}:\n{self.table(reference)}")
        if self.comprehensiveness:
            parts.append("AOPC (last layer): " + "; ".join(
                f"{m} comprehensiveness {v['comprehensiveness']:.3f} sufficiency {v['sufficiency']:.3f}"
                for m, v in self.aopc.items()))
        return "\n\n".join(parts)

    # -- combining and files ------------------------------------------------------------------------
    @classmethod
    def concat(cls, reports: Iterable[FaithfulnessReport]) -> FaithfulnessReport:
        """One report over the items of several (same methods, layers, references, grid and bins), e.g. the
        batches of a data set. Token axes are padded with NaN to the longest."""
        reports = list(reports)
        if not reports:
            raise OptionError("concat() needs at least one report.")
        first = reports[0]
        for other in reports[1:]:
            if (other.layers, other.references, other.grid, other.bins) != (first.layers, first.references,
                                                                         first.grid, first.bins):
                raise OptionError(
                    "Reports to concatenate must compare the same methods, layers and references with the same "
                    f"curve grid and bins; got {first.layers}/{first.references} and {other.layers}/{other.references}."
                )
        width = max(r.importances[ref].shape[1] for r in reports for ref in r.references) if first.references else 0

        def pad(array: np.ndarray) -> np.ndarray:
            out = np.full((array.shape[0], width), np.nan)
            out[:, : array.shape[1]] = array
            return out

        return cls(
            layers=first.layers, references=first.references,
            correlations={m: {r: np.concatenate([x.correlations[m][r] for x in reports], axis=1) for r in by}
                          for m, by in first.correlations.items()},
            comprehensiveness={m: np.concatenate([x.comprehensiveness[m] for x in reports]) for m in first.comprehensiveness},
            sufficiency={m: np.concatenate([x.sufficiency[m] for x in reports]) for m in first.sufficiency},
            item_curves={m: {k: np.concatenate([x.item_curves[m][k] for x in reports]) for k in by}
                         for m, by in first.item_curves.items()},
            grid=first.grid, bins=first.bins,
            importances={r: np.concatenate([pad(x.importances[r]) for x in reports]) for r in first.references},
            base=np.concatenate([x.base for x in reports]), settings=first.settings,
        )

    def with_methods(self, other: FaithfulnessReport) -> FaithfulnessReport:
        """This report with the methods of ``other`` that it lacks added, e.g. methods computed later for the
        same items. ``other`` must cover the same items and references with the same curve grid and bins;
        this report's importances, base scores, settings and random baseline are kept."""
        if (other.batch_size, other.references, other.grid, other.bins) != (self.batch_size, self.references,
                                                                            self.grid, self.bins):
            raise OptionError(
                "with_methods() needs a report of the same items, references, grid and bins; got "
                f"{other.batch_size} items/{list(other.references)} for {self.batch_size}/{list(self.references)}."
            )
        new = [m for m in other.methods if m not in self.layers and m != RANDOM]
        order = [m for m in self.methods if m != RANDOM] + new + [m for m in self.methods if m == RANDOM]

        def pick(mine: Mapping[str, Any], theirs: Mapping[str, Any]) -> dict[str, Any]:
            return {m: (mine[m] if m in mine else theirs[m]) for m in order if m in mine or m in theirs}

        return FaithfulnessReport(
            layers=pick(self.layers, other.layers), references=self.references,
            correlations=pick(self.correlations, other.correlations),
            comprehensiveness=pick(self.comprehensiveness, other.comprehensiveness),
            sufficiency=pick(self.sufficiency, other.sufficiency),
            item_curves=pick(self.item_curves, other.item_curves), grid=self.grid, bins=self.bins,
            importances=self.importances, base=self.base, settings=self.settings,
        )

    def select(self, items: Sequence[int]) -> FaithfulnessReport:
        """The report of some items only (e.g. one example of a batch)."""
        index = np.asarray(items, dtype=np.int64)
        return FaithfulnessReport(
            layers=self.layers, references=self.references,
            correlations={m: {r: a[:, index] for r, a in by.items()} for m, by in self.correlations.items()},
            comprehensiveness={m: a[index] for m, a in self.comprehensiveness.items()},
            sufficiency={m: a[index] for m, a in self.sufficiency.items()},
            item_curves={m: {k: a[index] for k, a in by.items()} for m, by in self.item_curves.items()},
            grid=self.grid, bins=self.bins, importances={r: a[index] for r, a in self.importances.items()},
            base=self.base[index], settings=self.settings,
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (NaN as None) that [`from_dict`][attnflow.evaluate.FaithfulnessReport.from_dict] reads back."""
        return {
            "format": "attnflow.faithfulness", "version": 1,
            "layers": {m: list(v) for m, v in self.layers.items()}, "references": list(self.references),
            "correlations": {m: {r: _json(a) for r, a in by.items()} for m, by in self.correlations.items()},
            "comprehensiveness": {m: _json(a) for m, a in self.comprehensiveness.items()},
            "sufficiency": {m: _json(a) for m, a in self.sufficiency.items()},
            "item_curves": {m: {k: _json(a) for k, a in by.items()} for m, by in self.item_curves.items()},
            "grid": list(self.grid), "bins": list(self.bins),
            "importances": {r: _json(a) for r, a in self.importances.items()},
            "base": _json(self.base), "settings": self.settings,
        }

    @classmethod
    def from_dict(cls, document: Mapping[str, Any]) -> FaithfulnessReport:
        """The report [`to_dict`][attnflow.evaluate.FaithfulnessReport.to_dict] wrote; a document of another kind is an [`OptionError`][attnflow.OptionError]."""
        if not isinstance(document, Mapping) or document.get("format") != "attnflow.faithfulness":
            raise OptionError("This is not an attnflow faithfulness document (no format 'attnflow.faithfulness').")
        try:
            return cls(
                layers=document["layers"], references=document["references"],
                correlations={m: {r: _array(a) for r, a in by.items()} for m, by in document["correlations"].items()},
                comprehensiveness={m: _array(a) for m, a in document["comprehensiveness"].items()},
                sufficiency={m: _array(a) for m, a in document["sufficiency"].items()},
                item_curves={m: {k: _array(a) for k, a in by.items()} for m, by in document["item_curves"].items()},
                grid=document["grid"], bins=document["bins"],
                importances={r: _array(a) for r, a in document["importances"].items()},
                base=_array(document["base"]), settings=document.get("settings") or {},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise OptionError(f"A damaged faithfulness document: {type(exc).__name__}: {exc}.") from exc

    def plot(self, path: str | Path, *, title: str | None = None) -> Path:
        """Correlation by layer, one line per method and one panel per reference (as the paper's figures);
        the random baseline dashed. Written as PNG (or any format matplotlib infers from ``path``)."""
        return plot_rows(self.rows(), path, title=title)


def plot_rows(rows: Sequence[Mapping[str, Any]], path: str | Path, *, title: str | None = None) -> Path:
    """The correlation-by-layer figure from long-table rows (``method, reference, layer, mean, std, n``; layers
    1-based, as [`FaithfulnessReport.rows`][attnflow.evaluate.FaithfulnessReport.rows] writes them)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    references = list(dict.fromkeys(row["reference"] for row in rows))
    methods = list(dict.fromkeys(row["method"] for row in rows))
    figure, axes = plt.subplots(1, max(len(references), 1), figsize=(4.2 * max(len(references), 1), 3.4),
                                squeeze=False, sharey=True)
    for axis, reference in zip(axes[0], references):
        for method in methods:
            points = sorted((row["layer"], row["mean"], row["std"]) for row in rows
                            if row["reference"] == reference and row["method"] == method)
            if not points:
                continue
            layers = [p[0] for p in points]  # rows() numbers layers from 1
            means = np.array([p[1] for p in points], dtype=float)
            style = {"linestyle": "--", "color": "0.5"} if method == RANDOM else {"marker": "o"}
            axis.plot(layers, means, label=method, **style)
        axis.axhline(0.0, color="0.8", linewidth=0.8)
        axis.set_title(f"Spearman with {reference}")
        axis.set_xlabel("layer (1 = after the first layer)")
        axis.set_ylim(-1.0, 1.0)
    axes[0][0].set_ylabel("mean Spearman ρ over examples")
    axes[0][-1].legend(loc="best", fontsize="small")
    return save_figure(figure, path, title)


def _cell(stats: tuple[float, float] | None, digits: int) -> str:
    if stats is None or math.isnan(stats[0]):
        return "-"
    return f"{stats[0]:.{digits}f}±{stats[1]:.{digits}f}"


def _json(array: np.ndarray) -> Any:
    """Nested lists of floats with NaN (and infinities) as None: strict JSON."""

    def convert(value: Any) -> Any:
        if isinstance(value, list):
            return [convert(v) for v in value]
        return float(value) if math.isfinite(value) else None

    return convert(np.asarray(array, dtype=np.float64).tolist())


def _array(value: Any) -> np.ndarray:
    return np.array(value, dtype=np.float64)  # None -> nan
