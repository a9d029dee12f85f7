"""Swin Transformers: windowed attention placed at its global token positions, stages linked by patch merging.

Private to attnflow.adapters; torch is passed in, never imported here. A Swin stage runs blocks of
attention inside windows of ``window_size x window_size`` patches (every other block with the grid
cyclically shifted by ``shift_size``), then merges each 2 x 2 neighbourhood of patches into one token of
the next stage. attnflow records each block as self-attention over all of its stage's tokens (zero
outside the window; exactly the block's weights inside), gives each stage a stream (``"stage0"``,
``"stage1"``...) with its patch grid, and links each stage's tokens to the four tokens they merge, each
with weight 1/4 (the merge is a linear map of the four; attnflow shares it evenly).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

import attnflow

from . import _torch_common as common

_BLOCK = re.compile(r"(?P<stage>.*\.layers\.(?P<index>\d+))\.blocks\.\d+$")


def swin_blocks(model: Any) -> list[tuple[str, Any, str]]:
    """``(path, block, stream)`` of every Swin block (a module that sets its own shift and window size and
    returns its attention weights), or ``[]`` for other models."""
    found = []
    for path, module in model.named_modules():
        match = _BLOCK.fullmatch(path)
        if match and hasattr(module, "set_shift_and_window_size") and hasattr(module, "attention"):
            found.append((path, module, f"stage{int(match.group('index'))}"))
    return found


def window_to_global(attn: Any, batch: int, height: int, width: int, window: int, shift: int, torch: Any) -> Any:
    """``(batch * windows, heads, w², w²)`` windowed weights -> ``(batch, heads, H·W, H·W)`` over the stage's
    tokens (row-major), undoing the window partition and the cyclic shift."""
    rows_w, cols_w = height // window, width // window
    hh = torch.arange(height).view(rows_w, window)
    ww = torch.arange(width).view(cols_w, window)
    grid_h = hh[:, None, :, None].expand(rows_w, cols_w, window, window)
    grid_w = ww[None, :, None, :].expand(rows_w, cols_w, window, window)
    token = (((grid_h + shift) % height) * width + (grid_w + shift) % width).reshape(rows_w * cols_w, window * window)
    heads = attn.shape[1]
    windows = attn.reshape(batch, rows_w * cols_w, heads, window * window, window * window).transpose(1, 2)
    out = attn.new_zeros(batch, heads, height * width, height * width)
    out[:, :, token[:, :, None], token[:, None, :]] = windows
    return out


def merge_link(batch: int, height: int, width: int) -> np.ndarray:
    """Patch merging as link weights ``(batch, H/2·W/2, H·W)``: token ``(i, j)`` of the next stage draws 1/4
    on each of ``(2i + r, 2j + c)``."""
    out = np.zeros((height // 2 * (width // 2), height * width))
    for i in range(height // 2):
        for j in range(width // 2):
            for r in (0, 1):
                for c in (0, 1):
                    out[i * (width // 2) + j, (2 * i + r) * width + 2 * j + c] = 0.25
    return np.broadcast_to(out, (batch, *out.shape)).copy()


def block_hook(path: str, stream: str, passes: common.TorchPass, torch: Any) -> Any:
    """A Swin block's forward hook: its attention placed at global positions, recorded for its stage."""

    def hook(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        dimensions = kwargs.get("input_dimensions", args[1] if len(args) > 1 else None)
        weights = output[1] if isinstance(output, (tuple, list)) and len(output) > 1 else None
        if weights is None or dimensions is None:
            raise attnflow.HiddenAttentionError(
                f"{path} ({type(module).__name__}) returned no attention weights; load the model with "
                "attn_implementation='eager'."
            )
        height, width = (int(x) for x in dimensions)
        window, shift = int(module.window_size), int(module.shift_size)
        if height % window or width % window:
            raise attnflow.AdapterError(
                f"{path}: stage {stream!r} has {height}x{width} patches, not a multiple of its window size "
                f"{window}; Swin pads such stages with tokens it does not mask, so the attention over the real "
                "tokens does not sum to 1. Use an image size whose patch grid at every stage is a multiple of "
                "window_size (e.g. 224 with patch 4 and window 7)."
            )
        batch = int(args[0].shape[0])
        passes.add(path, window_to_global(weights, batch, height, width, window, shift, torch),
                   training=module.training)
        stages = passes.state.swin
        stages.setdefault(stream, (batch, height, width))

    return hook


def finish(passes: common.TorchPass) -> None:
    """Patch grids of the stages, and the patch-merging links between them."""
    stages = passes.state.swin
    names = sorted(stages, key=lambda name: int(name.removeprefix("stage")))
    for name in names:
        batch, height, width = stages[name]
        passes.recorder.describe_stream(name, grid=(height, width))
    for before, after in zip(names, names[1:]):
        batch, height, width = stages[before]
        if height % 2 or width % 2:
            raise attnflow.AdapterError(
                f"Swin stage {before!r} has {height}x{width} patches; patch merging pads odd grids with tokens that "
                "carry nothing, which attnflow does not link. Use an image size whose patch grid halves evenly."
            )
        depth = passes.layer_counts.get(before, 0)
        passes.recorder.link(after, before, depth, merge_link(batch, height, width))
