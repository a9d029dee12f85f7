"""Spatial-reduction attention (SegFormer): patch queries over pooled keys, the pooling as fixed links.

Private to attnflow.adapters; torch is passed in, never imported here. A SegFormer stage embeds its input
with an overlapping strided convolution, then runs blocks whose attention takes its queries from the
stage's ``H x W`` patches and its keys from those patches pooled by a convolution with kernel = stride =
``sr`` (the block's ``sequence_reduction_ratio``): ``H/sr x W/sr`` pooled keys. attnflow records:

* each stage as a stream ``"stage{i}"`` with its patch grid;
* each block with ``sr > 1`` as cross-attention from ``"stage{i}"`` to a stream of its own pooled keys,
  ``"stage{i}.keys{j}"`` (``j``: the block within the stage), exactly the probabilities the model computes,
  and that stream linked to the stage at depth ``j`` (the patches the block pools): each pooled key draws
  ``1/sr²`` on each of the ``sr x sr`` patches its convolution covers (the convolution is a linear map of
  them; attnflow shares it evenly, the convention Swin's patch merging and Idefics3's pixel shuffle use);
  a block with ``sr = 1`` is self-attention over the stage;
* stage ``i+1`` linked to stage ``i``'s output: each patch of stage ``i+1`` draws equally on the stage-``i``
  patches inside its overlapping patch embedding's receptive field (kernel ``patch_sizes[i+1]``, stride
  ``strides[i+1]``, padding ``kernel // 2``; positions in the padding are left out).

``values=True`` (SegFormer's map in ``attnflow.adapters._torch._values``) records a reduced block as it does a
cross-attention block: the pooled keys' values and the patches' residual stream; norm-based methods then give
each patch its pooled keys plus its own residual as sources, routed to the patches through the pooling links.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

import attnflow

from . import _torch_common as common

BLOCK = re.compile(r"(?:.*\.)?stages\.(?P<stage>\d+)\.blocks\.(?P<block>\d+)\.attention$")


def ratio_of(module: Any) -> int:
    """The spatial-reduction ratio of a SegFormer-style attention module (1: its keys are its tokens)."""
    for name in ("sequence_reduction_ratio", "sr_ratio"):
        ratio = getattr(module, name, None)
        if isinstance(ratio, int):
            return ratio
    return 1


def segformer_blocks(model: Any) -> list[tuple[str, Any, int, int, int]]:
    """``(path, attention module, stage, block, ratio)`` of every SegFormer attention, or ``[]`` when no
    module of the model reduces its keys."""
    found = []
    for path, module in model.named_modules():
        match = BLOCK.fullmatch(path)
        if match and hasattr(module, "sequence_reduction_ratio"):
            found.append((path, module, int(match.group("stage")), int(match.group("block")), ratio_of(module)))
    return found if any(ratio > 1 for *_, ratio in found) else []


def stream_of(stage: int) -> str:
    return f"stage{stage}"


def keys_stream(stage: int, block: int) -> str:
    return f"stage{stage}.keys{block}"


def pool_link(batch: int, height: int, width: int, ratio: int) -> np.ndarray:
    """The pooling as link weights ``(batch, H/sr·W/sr, H·W)``: pooled key ``(i, j)`` draws ``1/sr²`` on each
    patch ``(sr·i + r, sr·j + c)`` (row-major; patches past the last whole ``sr`` are pooled by no key)."""
    rows, cols = height // ratio, width // ratio
    out = np.zeros((rows * cols, height * width))
    for i in range(rows):
        for j in range(cols):
            for r in range(ratio):
                for c in range(ratio):
                    out[i * cols + j, (ratio * i + r) * width + ratio * j + c] = 1.0 / ratio**2
    return np.broadcast_to(out, (batch, *out.shape)).copy()


def embedding_link(batch: int, before: tuple[int, int], after: tuple[int, int], kernel: int, stride: int) -> np.ndarray:
    """The overlapping patch embedding between two stages as link weights ``(batch, H'·W', H·W)``: patch
    ``(a, b)`` of the next stage draws equally on the patches of the stage before inside its receptive field
    (rows ``a·stride - kernel//2 ... + kernel - 1``, the same for columns, clipped to the grid)."""
    (height, width), (rows, cols) = before, after
    pad = kernel // 2
    out = np.zeros((rows * cols, height * width))
    for a in range(rows):
        hs = [h for h in range(a * stride - pad, a * stride - pad + kernel) if 0 <= h < height]
        for b in range(cols):
            ws = [w for w in range(b * stride - pad, b * stride - pad + kernel) if 0 <= w < width]
            for h in hs:
                for w in ws:
                    out[a * cols + b, h * width + w] = 1.0 / (len(hs) * len(ws))
    return np.broadcast_to(out, (batch, *out.shape)).copy()


def attention_hook(path: str, stage: int, block: int, passes: common.TorchPass, torch: Any) -> Any:
    """A SegFormer attention's forward hook: its probabilities recorded from the stage's patches to its
    pooled keys (or to the stage itself where it reduces nothing)."""

    def hook(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        if passes.paused or passes.muted:  # value zeroing re-running the block, or a muted call
            return
        weights = output[1] if isinstance(output, (tuple, list)) and len(output) > 1 else None
        height = kwargs.get("height", args[1] if len(args) > 1 else None)
        width = kwargs.get("width", args[2] if len(args) > 2 else None)
        if not isinstance(weights, torch.Tensor) or height is None or width is None:
            implementation = getattr(getattr(module, "config", None), "_attn_implementation", "unknown")
            raise attnflow.HiddenAttentionError(
                f"{path} ({type(module).__name__}) returned no attention weights under attn_implementation="
                f"{implementation!r}; load the model with attn_implementation='eager'."
            )
        ratio = ratio_of(module)
        batch = int(weights.shape[0])
        if ratio > 1:
            recorded = passes.add(path, weights, kind="cross", key_stream=keys_stream(stage, block),
                                  training=module.training)
        else:
            recorded = passes.add(path, weights, kind="self", training=module.training)
        if recorded >= 0:  # where values=True and value_zeroing=True add their extras
            passes.state.indices.setdefault(path, []).append(recorded)
        stages = passes.state.segformer
        stages.setdefault(stage, {"batch": batch, "grid": (int(height), int(width)), "pooled": []})
        if ratio > 1:
            stages[stage]["pooled"].append((block, ratio))

    return hook


def finish(passes: common.TorchPass, config: Any) -> None:
    """Patch grids of the stages and of the pooled keys, the pooling links and the links between stages."""
    stages = passes.state.segformer
    recorder = passes.recorder
    order = sorted(stages)
    for stage in order:
        info = stages[stage]
        batch, (height, width) = info["batch"], info["grid"]
        name = stream_of(stage)
        labels = [f"r{r}c{c}" for r in range(height) for c in range(width)]
        recorder.describe_stream(name, grid=(height, width), tokens=[labels] * batch)
        for block, ratio in info["pooled"]:
            rows, cols = height // ratio, width // ratio
            pooled = [f"r{r}c{c}" for r in range(rows) for c in range(cols)]
            recorder.describe_stream(keys_stream(stage, block), grid=(rows, cols), tokens=[pooled] * batch)
            recorder.link(keys_stream(stage, block), name, block, pool_link(batch, height, width, ratio))
    for before, after in zip(order, order[1:]):
        if after != before + 1:
            continue
        kernel, stride = int(config.patch_sizes[after]), int(config.strides[after])
        depth = passes.layer_counts.get(stream_of(before), 0)
        link = embedding_link(stages[after]["batch"], stages[before]["grid"], stages[after]["grid"], kernel, stride)
        recorder.link(stream_of(after), stream_of(before), depth, link)
