"""Image overlays for ViT-family explanations: the explained token's scores over the image patches,
upsampled bilinearly to the image and laid over it."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from .._errors import OptionError
from ._figure import capped_size, check_view_options, colorbar, make_scale, new_figure
from ._matrices import _wrap
from ._scores import METHOD_TITLES, check_batch_index, describe, layer_position, method_names, source_row


def load_image(image: Any) -> np.ndarray:
    """``(height, width, 3)`` float RGB in [0, 1] from a path, a PIL image or an array (``(H, W)``,
    ``(H, W, 3|4)``, uint8 or float in [0, 1])."""
    if isinstance(image, (str, os.PathLike)):
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(image) as opened:
                image = opened.convert("RGB")
        except (OSError, UnidentifiedImageError) as exc:
            raise OptionError(f"Cannot read the image {os.fspath(image)!r}: {exc}. Give a PNG or JPEG file.") from exc
    if hasattr(image, "convert") and hasattr(image, "size"):
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (3, 4) or min(array.shape[:2]) < 1:
        raise OptionError(f"An image must be (height, width[, 3 or 4]); got an array of shape {array.shape}.")
    array = array[..., :3]
    if array.dtype == np.uint8:
        return array.astype(np.float64) / 255.0
    array = array.astype(np.float64)
    if array.min() < 0 or array.max() > 1:
        raise OptionError("A float image must hold values in [0, 1]; pass uint8 for 0..255.")
    return array


def upsample_bilinear(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``(rows, cols)`` -> ``(height, width)`` by bilinear interpolation between patch centres (edges held),
    the convention of ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``."""
    grid = np.asarray(grid, dtype=np.float64)
    rows, cols = grid.shape
    height, width = int(size[0]), int(size[1])

    def axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        centre = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
        centre = np.clip(centre, 0, n_in - 1)
        low = np.floor(centre).astype(np.int64)
        high = np.minimum(low + 1, n_in - 1)
        return low, high, centre - low

    r0, r1, fr = axis(rows, height)
    c0, c1, fc = axis(cols, width)
    top = grid[r0][:, c0] * (1 - fc) + grid[r0][:, c1] * fc
    bottom = grid[r1][:, c0] * (1 - fc) + grid[r1][:, c1] * fc
    return top * (1 - fr[:, None]) + bottom * fr[:, None]


def patch_scores(explanation: Any, method: str, *, batch_index: int = 0, source: int | str | None = None,
                 stream: str | None = None, layer: int | None = None) -> np.ndarray:
    """``(rows, cols)`` scores of one explained token over the image patches of a vision stream (its special
    tokens, CLS and registers, left out), renormalised to sum 1 over the patches."""
    b = check_batch_index(explanation, batch_index)
    name = stream or next((s for s in explanation.input_streams if explanation.streams[s].grid is not None), None)
    if name is None or explanation.streams.get(name) is None or explanation.streams[name].grid is None:
        raise OptionError(
            "This explanation has no image patches: none of its input streams has a patch grid. Capture a "
            "ViT-family model (its trace records the grid and its CLS/register tokens as special)."
        )
    if name not in explanation.input_streams:
        raise OptionError(f"The scores are over {explanation.input_streams}, not {name!r}.")
    grid = explanation.streams[name].grid
    row = source_row(explanation, b, source)
    depth = layer_position(explanation, method, layer)
    full = explanation.layers(method)
    values = (full[name] if isinstance(full, dict) else full)[depth, b, row]
    patches = explanation.streams[name].patch_positions(b)
    scores = np.asarray(values, dtype=np.float64)[patches]
    total = scores.sum()
    if total > 0:
        scores = scores / total
    return scores.reshape(grid)


def image_overlay(
    image: Any, explanation: Any, methods: str | Sequence[str] | None = None, *, batch_index: int = 0,
    source: int | str | None = None, stream: str | None = None, layer: int | None = None, alpha: float = 0.5,
    cmap: str = "jet", shared_scale: bool = True, log: bool = False, vmin: float | None = None,
    vmax: float | None = None, dpi: float = 150, title: str | None = None,
) -> Any:
    """The explained token's scores over the image: one panel per method, side by side.

    Each panel is the image with the patch grid's scores (special tokens such as CLS and registers left
    out, the rest renormalised to sum 1) upsampled bilinearly to the image's size and laid over it.
    The grid is stretched over the whole image: pass the image as the model saw it (after any centre
    crop), or the overlay is misplaced.

    Args:
        image: a path, PIL image or ``(H, W, 3)`` array.
        explanation: an explanation of a ViT-family trace (a stream with a patch grid).
        methods: one or several methods (default all).
        source: the explained token (default the first explained: CLS).
        stream: the vision stream (default the input stream with a grid).
        alpha: opacity of the heatmap over the image (0 to 1).
        cmap: as in `heatmap`.
        shared_scale: as in `heatmap`.
        log: as in `heatmap`.
        vmin: as in `heatmap`.
        vmax: as in `heatmap`.
        dpi: as in `heatmap`.
        title: as in `heatmap`.

    Returns:
        A matplotlib Figure.
    """
    check_view_options(log=log, vmin=vmin, vmax=vmax, dpi=dpi)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise OptionError(f"alpha must be between 0 and 1, got {alpha!r}.")
    picture = load_image(image)
    names = method_names(explanation, methods)
    b = check_batch_index(explanation, batch_index)
    maps = [upsample_bilinear(patch_scores(explanation, m, batch_index=b, source=source, stream=stream, layer=layer),
                              picture.shape[:2]) for m in names]
    aspect = picture.shape[0] / picture.shape[1]
    width, height = capped_size(0.6 + 3.6 * len(names), 1.3 + 3.6 * aspect)
    figure, axes = new_figure(width, height, dpi=dpi, panels=(1, len(names)), layout="constrained")
    shared = make_scale(maps, log=log, vmin=vmin, vmax=vmax) if shared_scale else None
    image_artist = None
    for i, (method, heat) in enumerate(zip(names, maps)):
        ax = axes[0, i]
        ax.imshow(picture, interpolation="bilinear")
        scale = shared or make_scale([heat], log=log, vmin=vmin, vmax=vmax)
        shown = np.where(heat > 0, heat, np.nan) if log else heat
        image_artist = ax.imshow(shown, cmap=cmap, norm=scale.norm(), alpha=alpha, interpolation="nearest")
        ax.set_axis_off()
        if len(names) > 1:  # one panel: the figure's title names the method already
            ax.set_title(METHOD_TITLES.get(method, method), fontsize=9)
        if shared is None:
            colorbar(figure, image_artist, ax, "share of the patches")
    if shared is not None and image_artist is not None:
        colorbar(figure, image_artist, axes, f"share of the patches ({shared.describe()})")
    row = source_row(explanation, b, source)
    label = explanation.source_tokens(b)[row]
    layer_index = explanation.layer_indices(names[0])[layer_position(explanation, names[0], layer)]
    settings = describe(explanation, names[0], layer=layer_index, renormalised=False, log=log)
    if len(names) > 1:
        settings = settings.replace(METHOD_TITLES.get(names[0], names[0]), " | ".join(names), 1)
    heading = title or (f"{explanation.model_name or 'model'}: what {label!r} draws on among the image patches; "
                        f"{settings}; CLS/register tokens excluded, patches renormalised; bilinear upsampling, "
                        f"alpha {alpha:g}")
    figure.suptitle(_wrap(heading, width, 9), fontsize=9)
    return figure
