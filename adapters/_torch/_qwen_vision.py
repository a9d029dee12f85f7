"""Vision towers whose attention returns no weights: Qwen2-VL's and Qwen2.5-VL's, recorded from what they compute.

Their blocks' attention (``VisionAttention``, ``Qwen2_5_VLVisionAttention``) returns only its output, under eager
too. The patches of every image of a batch are packed into one sequence, which the module splits at ``cu_seqlens``
(one span per image; per window in Qwen2.5-VL's windowed blocks) and attends over span by span, calling
transformers' ``eager_attention_forward`` (or SDPA) once per span. While attached, attnflow records the softmax each
of those calls computes (the torch adapter's softmax-level capture, issue 21 point 4) and assembles the spans
block-diagonally (0 between windows) into one ``(images, heads, patches, patches)`` layer of the ``vision`` stream
per block.

The stream is in row-major patch order with the image's patch grid: the image processor orders the patches merge
window by merge window (``spatial_merge_size**2`` neighbours in a row), and Qwen2.5-VL's blocks run them permuted
window by window (``get_vision_window_index``); both orders are undone. The merge-window link
(:mod:`._vision_language`) then feeds each image token from its ``m x m`` block of patches.

Limits, each refused with its reason: one image per batch item, every image of one size (one patch grid for the
stream), images only (a video's frames are no patch grid), and no attention gradients for these layers (the
assembled layer is not a tensor the model computes with).

Private to attnflow.adapters; torch is passed in.
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np

import attnflow
from attnflow.recording import deferred_interrupts

from .._layout import Layout
from . import _torch_common as common
from . import torch_hooks

_LAYOUT = Layout("bhqk", ("b", "h", "q", "k"))


def windowed(targets: list[tuple[str, Any, str, int]], streams: dict[str, str | None]) -> dict[str, Any]:
    """``path -> module`` of the vision stream's self-attention modules that split a packed patch sequence at
    ``cu_seqlens`` (their forward takes it) and so return no weights."""
    found = {}
    for path, module, kind, _ in targets:
        if kind == "self" and streams.get(path) == "vision" and packs_windows(module):
            found[path] = module
    return found


def packs_windows(module: Any) -> bool:
    """Whether ``module``'s forward takes ``cu_seqlens``: the patches of several images (or windows) packed into
    one sequence, attended over span by span."""
    signature = common.forward_signature(module)
    return signature is not None and "cu_seqlens" in signature.parameters


class Tower:
    """One attach's view of a packed vision tower: the images of its current call, and the order its blocks see
    the patches in."""

    def __init__(self, tower: Any, torch: Any):
        self.tower, self.torch = tower, torch
        self.grid: list[tuple[int, int, int]] = []  # (frames, rows, columns) of each image, in patches
        self.order: Any = None  # block position -> row-major position over the whole packed sequence

    def before(self, module: Any, args: tuple, kwargs: dict) -> None:
        """The tower's forward pre-hook: its images' patch grids (``grid_thw``) and the order of their patches."""
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        if not isinstance(grid, self.torch.Tensor):
            self.grid, self.order = [], None
            return
        self.grid = [(int(t), int(h), int(w)) for t, h, w in grid.tolist()]
        self.order = self._order(grid)

    def _order(self, grid: Any) -> Any:
        torch, tower = self.torch, self.tower
        merge = int(getattr(tower, "spatial_merge_size", 1) or 1)
        rows_major = []  # processor position -> row-major position, image by image
        offset = 0
        for t, h, w in self.grid:
            # the processor's order: (frame, block row, block column, row in block, column in block)
            r = np.arange(t * h * w).reshape(t, h // merge, merge, w // merge, merge)
            rows_major.append(offset + r.transpose(0, 1, 3, 2, 4).reshape(-1))
            offset += t * h * w
        order = np.concatenate(rows_major) if rows_major else np.zeros(0, int)
        if getattr(tower, "window_size", None) is not None:  # Qwen2.5-VL: blocks see the merge units window by window
            from transformers.vision_utils import get_vision_window_index

            window_index, _ = get_vision_window_index(
                grid, spatial_merge_size=merge, window_size=int(tower.window_size), patch_size=int(tower.patch_size),
            )
            unit = merge * merge
            units = window_index.detach().cpu().numpy().astype(int)
            order = order[(units[:, None] * unit + np.arange(unit)).reshape(-1)]
        return torch.as_tensor(np.argsort(order))  # row-major position -> block position

    def layer(self, path: str, found: list[Any], cu_seqlens: Any) -> Any:
        """The block's ``(images, heads, patches, patches)`` layer from its per-span probabilities."""
        bounds = [int(x) for x in cu_seqlens.tolist()]
        spans = list(zip(bounds[:-1], bounds[1:]))
        sizes = [(t * h * w) for t, h, w in self.grid]
        if any(t != 1 for t, _, _ in self.grid):
            raise attnflow.AdapterError(
                f"{path}: the vision tower ran a video ({[list(g) for g in self.grid]} frames x rows x columns of "
                "patches); attnflow records its images only, one patch grid each. Capture a video's language model "
                "alone: adapter_options={'modules': ['model.language_model.layers.*.self_attn']}."
            )
        if len(found) != len(spans) or not sizes or bounds[-1] != sum(sizes):
            raise attnflow.HiddenAttentionError(
                f"{path} split its {bounds[-1]} patches into {len(spans)} windows (cu_seqlens) but computed "
                f"{len(found)} attention probabilities under eager; attnflow records one softmax per window. Load the "
                "model with attn_implementation='eager' or 'sdpa' (a fused kernel such as flash attention hides them)."
            )
        if len({g[1:] for g in self.grid}) != 1:
            raise attnflow.AdapterError(
                f"{path}: the images have different patch grids ({[list(g[1:]) for g in self.grid]} rows x columns); "
                "attnflow's vision stream holds one grid. Resize the images to one size (the image processor's "
                "min_pixels = max_pixels) or capture them one at a time."
            )
        heads, size = int(found[0].shape[1]), sizes[0]
        # one (heads, patches, patches) block per image, never one over the whole batch (images² times larger)
        images = found[0].new_zeros(len(sizes), heads, size, size)
        for (start, end), probabilities in zip(spans, found):
            if tuple(probabilities.shape) != (1, heads, end - start, end - start):
                raise attnflow.AdapterError(
                    f"{path}: the window over patches {start}..{end - 1} computed probabilities of shape "
                    f"{tuple(probabilities.shape)}, expected {(1, heads, end - start, end - start)}."
                )
            image, first = divmod(start, size)
            if (end - 1) // size != image:
                raise attnflow.AdapterError(
                    f"{path}: the window over patches {start}..{end - 1} spans two images of {size} patches each; "
                    "attnflow assembles each image's windows within that image."
                )
            images[image, :, first:first + end - start, first:first + end - start] = probabilities[0]
        index = self.order.to(images.device)
        for image in range(len(sizes)):
            local = index[image * size:(image + 1) * size] - image * size
            if bool((local < 0).any() or (local >= size).any()):
                raise attnflow.AdapterError(f"{path}: the patch order mixes the patches of different images.")
            images[image] = images[image][:, local][:, :, local]
        return images

    def pixel_shape(self) -> tuple[int, ...] | None:
        """``(images, channels, height, width)`` of the images as the tower sees them (rows and columns of patches
        times the patch size), for the stream's grid; None without images."""
        if not self.grid:
            return None
        patch = int(getattr(getattr(self.tower, "config", None), "patch_size", 1) or 1)
        _, h, w = self.grid[0]
        return (len(self.grid), 3, h * patch, w * patch)


def watch() -> Any:
    """The torch adapter's probability watch (softmax-level capture) for one attach: a ``closing()`` context for
    the attach, ``push``/``pop`` of a module call's frame."""
    return torch_hooks._Watch()


#: Each attach's packed vision tower, by its pass state.
_TOWERS: weakref.WeakKeyDictionary[Any, Tower] = weakref.WeakKeyDictionary()


def images_seen(passes: Any) -> tuple[tuple[int, ...], Any] | None:
    """``(pixel shape, tower)`` of the images the packed vision tower of this attach ran last (generate() encodes
    them before its prefill, outside the pass that links them); None for other models."""
    state = _TOWERS.get(passes)
    shape = None if state is None else state.pixel_shape()
    return None if state is None or shape is None else (shape, state.tower)


def install(
    windowed_modules: dict[str, Any], tower: Any, passes: common.TorchPass, torch: Any, handles: list,
    watch: Any,
) -> None:
    """Hooks that record each windowed module's per-span probabilities as one layer of the vision stream."""
    if not windowed_modules:
        return
    state = _TOWERS[passes] = Tower(tower, torch)

    def tower_hook(module: Any, args: tuple, kwargs: dict) -> None:
        state.before(module, args, kwargs)
        shape = state.pixel_shape()
        if passes.active and shape is not None:
            passes.state.pixels["vision"] = (shape, module)

    with deferred_interrupts():
        common.register(handles, tower.register_forward_pre_hook, tower_hook, with_kwargs=True)
        for path, module in windowed_modules.items():
            _hook(path, module, state, passes, torch, handles, watch)


def _hook(
    path: str, module: Any, state: Tower, passes: common.TorchPass, torch: Any, handles: list, watch: Any,
) -> None:
    calls: list[tuple[Any, Any]] = []  # (frame, cu_seqlens) of this module's running calls, innermost last

    def pre_hook(mod: Any, args: tuple, kwargs: dict) -> None:
        frame = torch_hooks._Frame(path, _LAYOUT)
        calls.append((frame, kwargs.get("cu_seqlens", args[1] if len(args) > 1 else None)))
        watch.push(torch, frame)

    def hook(mod: Any, args: tuple, kwargs: dict, output: Any) -> None:
        if not calls:
            return
        frame, cu_seqlens = calls.pop()
        watch.pop(frame)
        if output is None:
            return
        if passes.request.gradients:
            raise attnflow.AdapterError(
                f"Attention gradients (target=...) are not available for {path} ({type(mod).__name__}): it returns no "
                "weights, and attnflow assembles its layer from the probabilities of each window it attends over, "
                "which is no tensor the model computes with. Capture the language model's gradients alone: "
                "adapter_options={'modules': ['model.language_model.layers.*.self_attn']}."
            )
        weights = state.layer(path, frame.found, cu_seqlens)
        recorded = passes.add(path, weights, kind="self", training=frame.dropout or mod.training)
        if recorded >= 0:
            passes.state.indices.setdefault(path, []).append(recorded)

    common.register(handles, module.register_forward_pre_hook, pre_hook, with_kwargs=True)
    common.register(handles, module.register_forward_hook, hook, with_kwargs=True, always_call=True)
