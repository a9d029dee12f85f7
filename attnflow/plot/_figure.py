"""What every picture shares: lazy matplotlib, colour scales, figure sizes with a cap, thinned tick labels
and saving as PNG, SVG or PDF. matplotlib is imported inside functions only (``import attnflow`` stays light)."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import OptionError

#: The largest figure any view draws, in inches (width, height); long inputs thin their labels instead.
MAX_INCHES = (18.0, 14.0)
#: At most this many tick labels per axis; every k-th token is labelled beyond it.
MAX_LABELS = 64
FORMATS = ("png", "svg", "pdf")


def pyplot() -> Any:
    """matplotlib.pyplot on a file-writing backend unless one was chosen already."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


@dataclasses.dataclass(frozen=True)
class Scale:
    """The colour scale of one picture (shared by all its panels).

    Attributes:
        vmin, vmax: the ends (given, or taken from the data: 0 and the largest value on a linear scale).
        log: logarithmic; values at or below 0 are drawn at ``vmin``.
    """

    vmin: float
    vmax: float
    log: bool

    def norm(self) -> Any:
        from matplotlib.colors import LogNorm, Normalize

        return LogNorm(self.vmin, self.vmax, clip=True) if self.log else Normalize(self.vmin, self.vmax, clip=True)

    def describe(self) -> str:
        return f"{'log' if self.log else 'linear'} scale {self.vmin:.3g} to {self.vmax:.3g}"


def check_view_options(*, log: bool, vmin: float | None, vmax: float | None, dpi: float | None = None) -> None:
    """Refuse nonsense scale settings with the fix."""
    for name, value in (("vmin", vmin), ("vmax", vmax)):
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)):
            raise OptionError(f"{name} must be a finite number, got {value!r}.")
    if vmin is not None and vmax is not None and vmin >= vmax:
        raise OptionError(f"vmin ({vmin}) must be below vmax ({vmax}).")
    if log and vmin is not None and vmin <= 0:
        raise OptionError(f"A log scale needs vmin > 0, got {vmin}; leave vmin out to take it from the data.")
    if log and vmax is not None and vmax <= 0:
        raise OptionError(f"A log scale needs vmax > 0, got {vmax}.")
    if dpi is not None and (not isinstance(dpi, (int, float)) or isinstance(dpi, bool) or not 10 <= dpi <= 2400):
        raise OptionError(f"dpi must be a number between 10 and 2400, got {dpi!r}.")


def make_scale(arrays: Iterable[np.ndarray], *, log: bool = False, vmin: float | None = None,
               vmax: float | None = None) -> Scale:
    """One scale for all ``arrays``: linear from 0 (or the smallest value, if negative) to the largest
    value; log from the smallest positive value (at most 6 decades below the largest) to the largest."""
    check_view_options(log=log, vmin=vmin, vmax=vmax)
    values = np.concatenate([np.ravel(np.asarray(a, dtype=np.float64)) for a in arrays] or [np.zeros(1)])
    values = values[np.isfinite(values)]
    if log:
        positive = values[values > 0]
        top = float(positive.max()) if positive.size else 1.0
        high = vmax if vmax is not None else top
        low = vmin if vmin is not None else max(float(positive.min()) if positive.size else high * 1e-6, high * 1e-6)
        if low >= high:
            low = high / 10
    else:
        high = vmax if vmax is not None else (float(values.max()) if values.size else 1.0)
        low = vmin if vmin is not None else min(0.0, float(values.min()) if values.size else 0.0)
        if high <= low:
            high = low + 1.0
    return Scale(float(low), float(high), bool(log))


def capped_size(width: float, height: float, cap: Sequence[float] = MAX_INCHES) -> tuple[float, float]:
    """``(width, height)`` in inches, shrunk proportionally to fit ``cap``, and at least 3 x 2."""
    factor = min(1.0, cap[0] / max(width, 1e-9), cap[1] / max(height, 1e-9))
    return max(width * factor, 3.0), max(height * factor, 2.0)


def tick_step(count: int, room_inches: float, *, fontsize: float = 8.0, max_labels: int = MAX_LABELS) -> int:
    """Label every k-th of ``count`` ticks so that labels fit ``room_inches`` at ``fontsize`` points."""
    fits = max(int(room_inches * 72 / (fontsize * 1.25)), 1)
    return max(1, math.ceil(count / min(fits, max_labels)))


def label_ticks(axis: Any, labels: Sequence[str], room_inches: float, *, rotation: float = 0, fontsize: float = 8.0,
                max_chars: int = 18) -> None:
    """Tick labels on one axis (``ax.xaxis`` / ``ax.yaxis``), every k-th one when they would overlap; long
    labels are shortened with an ellipsis."""
    step = tick_step(len(labels), room_inches, fontsize=fontsize)
    positions = list(range(0, len(labels), step))
    texts = [_short(labels[i], max_chars) for i in positions]
    axis.set_ticks(positions)
    axis.set_ticklabels(texts, fontsize=fontsize, rotation=rotation)


_SUBSCRIPTS = str.maketrans("0123456789", "₀₁₂₃₄₅₆₇₈₉")


def positioned(labels: Sequence[str], positions: Any = None) -> list[str]:
    """``labels`` with the token's position (from 0, as subscript digits: ``"the₃"``) added to every label
    whose text appears more than once, so that no axis or list reads "the, the, the"."""
    from collections import Counter

    where = range(len(labels)) if positions is None else [int(p) for p in positions]
    counts = Counter(labels)
    return [f"{label}{str(p).translate(_SUBSCRIPTS)}" if counts[label] > 1 else label
            for label, p in zip(labels, where)]


def _short(label: str, limit: int) -> str:
    if len(label) <= limit:
        return label
    tail = len(label) - len(label.rstrip("₀₁₂₃₄₅₆₇₈₉"))  # a position subscript survives the ellipsis
    return label[: limit - 1 - tail] + "…" + label[len(label) - tail:] if tail else label[: limit - 1] + "…"


def save(figure: Any, path: str | os.PathLike[str], *, formats: str | Sequence[str] | None = None,
         dpi: float | None = None) -> list[Path]:
    """Save ``figure`` as PNG, SVG and/or PDF; returns the files written.

    Args:
        figure: a matplotlib Figure (every ``attnflow.plot`` view returns one).
        path: the file (its suffix picks the format), or the stem when ``formats`` is given
            (``save(fig, "out/flow", formats=["png", "pdf"])`` writes ``out/flow.png`` and ``out/flow.pdf``).
        formats: any of ``"png"``, ``"svg"``, ``"pdf"`` (a list, or one comma-separated string).
        dpi: resolution of PNGs (default: the figure's own, which each view sets from its ``dpi=``).

    Text stays text in SVG and PDF (TrueType fonts embedded), so labels can be edited and searched.
    """
    path = Path(path)
    if formats is None:
        wanted = [path.suffix.lstrip(".").lower()]
        stems = [path]
    else:
        wanted = parse_formats(formats)
        stems = [path.with_name(path.name + "." + fmt) if path.suffix.lower() != "." + fmt else path for fmt in wanted]
    bad = [fmt for fmt in wanted if fmt not in FORMATS]
    if bad:
        raise OptionError(f"Cannot save as {bad[0]!r}; attnflow saves pictures as {', '.join(FORMATS)}.")
    written = []
    for fmt, target in zip(wanted, stems):
        write_figure(figure, target, fmt, dpi)
        written.append(target)
    return written


def write_figure(figure: Any, target: Any, fmt: str, dpi: float | None = None) -> None:
    """One file (a path or a binary file object) in format ``fmt``; text kept as text in SVG/PDF."""
    import matplotlib

    with matplotlib.rc_context({"svg.fonttype": "none", "pdf.fonttype": 42}):
        figure.savefig(target, format=fmt, dpi=dpi if dpi is not None else figure.dpi, bbox_inches="tight")


def parse_formats(formats: str | Sequence[str]) -> list[str]:
    """``"png,svg"`` or ``["png", "svg"]`` as a checked, de-duplicated list."""
    items = formats.split(",") if isinstance(formats, str) else list(formats)
    wanted = []
    for item in items:
        fmt = str(item).strip().lower().lstrip(".")
        if not fmt:
            continue
        if fmt not in FORMATS:
            raise OptionError(f"Unknown picture format {fmt!r}; choose from {', '.join(FORMATS)} (e.g. png,svg,pdf).")
        if fmt not in wanted:
            wanted.append(fmt)
    if not wanted:
        raise OptionError(f"No picture format given; choose from {', '.join(FORMATS)}.")
    return wanted


def new_figure(width: float, height: float, *, dpi: float | None, panels: tuple[int, int] = (1, 1),
               **kwargs: Any) -> tuple[Any, Any]:
    """A figure of at most `MAX_INCHES` with ``panels`` (rows, columns) of axes (a 2-D array)."""
    check_view_options(log=False, vmin=None, vmax=None, dpi=dpi)
    plt = pyplot()
    size = capped_size(width, height)
    figure, axes = plt.subplots(*panels, figsize=size, dpi=dpi or 150, squeeze=False, **kwargs)
    return figure, axes


def colorbar(figure: Any, mappable: Any, axes: Any, label: str) -> Any:
    bar = figure.colorbar(mappable, ax=axes, fraction=0.046, pad=0.03, shrink=0.9)
    bar.set_label(label, fontsize=8)
    bar.ax.tick_params(labelsize=7)
    return bar
