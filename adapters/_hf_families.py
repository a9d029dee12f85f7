"""Model families as data: which submodules hold which token stream, and how streams are linked.

Used by the PyTorch and the Flax adapters alike (module paths with ``.`` or ``/``).

Private to attnflow.adapters; imports no framework. A Hugging Face model (or a plain ``torch.nn.Module``
such as ``nn.Transformer``) runs one or more *towers*: ``encoder``/``decoder``, ``text_model``/
``vision_model``, LLaVA's ``vision_tower``/``language_model``... An attention module belongs to the stream
of the outermost tower on its module path. A model with fewer than two towers is a single-stream model
(its stream is attnflow's default ``"tokens"``), so BERT's ``encoder`` or OPT's ``decoder`` is no stream
of its own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

#: Tower attribute name -> stream name, for every family.
TOWERS: Mapping[str, str] = {
    "encoder": "encoder",
    "decoder": "decoder",
    "text_model": "text",
    "text_encoder": "text",
    "text_decoder": "text",
    "language_model": "text",
    "vision_model": "vision",
    "vision_tower": "vision",
    "vision_encoder": "vision",
    "audio_tower": "audio",
}
#: Per ``config.model_type``: tower names that differ from :data:`TOWERS`.
FAMILY_TOWERS: Mapping[str, Mapping[str, str]] = {
    "whisper": {"encoder": "audio"},
    "qwen2_vl": {"visual": "vision"},
    "qwen2_5_vl": {"visual": "vision"},
}
#: Path components that mark a cross-attention module when the model declares nothing.
CROSS_NAMES = ("encoder_attn", "crossattention", "cross_attn", "EncDecAttention", "multihead_attn", "cross_attention")


def towers_for(model_type: str | None) -> dict[str, str]:
    towers = dict(TOWERS)
    towers.update(FAMILY_TOWERS.get(model_type or "", {}))
    return towers


def stream_of(path: str, towers: Mapping[str, str]) -> tuple[str | None, str | None]:
    """``(stream, tower path)`` of the outermost tower on ``path`` (``"model.encoder.layers.0"`` ->
    ``("encoder", "model.encoder")``; Flax paths use ``/``), or ``(None, None)``."""
    separator = "/" if "/" in path else "."
    parts = path.split(separator)
    for i, part in enumerate(parts):
        if part in towers:
            return towers[part], separator.join(parts[: i + 1])
    return None, None


@dataclasses.dataclass
class StreamPlan:
    """Which stream each attention module's queries belong to, and the towers to watch for inputs."""

    streams: dict[str, str | None]  # module path -> stream (None: the single stream)
    towers: dict[str, str]  # tower path -> stream

    @property
    def multi(self) -> bool:
        return len(set(self.towers.values())) > 1


def plan_streams(paths: Iterable[str], model_type: str | None) -> StreamPlan:
    """Assign attention module ``paths`` to streams; fewer than two streams means a single-stream model."""
    towers = towers_for(model_type)
    streams: dict[str, str | None] = {}
    tower_paths: dict[str, str] = {}
    for path in paths:
        stream, tower = stream_of(path, towers)
        streams[path] = stream
        if stream is not None and tower is not None:
            tower_paths[tower] = stream
    if len(set(tower_paths.values())) < 2 or any(s is None for s in streams.values()):
        return StreamPlan({path: None for path in streams}, {})
    return StreamPlan(streams, tower_paths)


def is_cross_path(path: str) -> bool:
    return any(part in CROSS_NAMES for part in path.replace("/", ".").split("."))


def pick_key_stream(query: str, key_length: int, seen: Mapping[str, int]) -> str | None:
    """The stream a cross-attention layer of ``query`` attends to: the earliest other stream that ran with
    ``key_length`` tokens (the encoder of an encoder-decoder, BLIP's vision tower), else None."""
    for stream, length in seen.items():
        if stream != query and length == key_length:
            return stream
    return None


def vision_layout(length: int, pixel_shape: tuple[int, ...] | None, patch_size: Any) -> tuple[np.ndarray, tuple[int, int]] | None:
    """``(special (length,), grid)`` of a ViT-style stream: prefix tokens (CLS, registers) then the patches,
    row-major, from the pixel input's height and width and the patch size; None when they do not fit."""
    if pixel_shape is None or len(pixel_shape) < 2 or patch_size is None:
        return None
    patch = patch_size if isinstance(patch_size, (tuple, list)) else (patch_size, patch_size)
    try:
        rows, cols = int(pixel_shape[-2]) // int(patch[0]), int(pixel_shape[-1]) // int(patch[1])
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    prefix = length - rows * cols
    if rows <= 0 or cols <= 0 or prefix < 0:
        return None
    special = np.zeros(length, bool)
    special[:prefix] = True
    return special, (rows, cols)


def feature_depth(layer: Any, num_layers: int) -> int:
    """The vision depth LLaVA's ``vision_feature_layer`` selects (``hidden_states[layer]``: 0 = embeddings)."""
    if isinstance(layer, (list, tuple)):
        raise ValueError(
            f"vision_feature_layer={list(layer)} concatenates several vision layers; attnflow links one layer"
        )
    layer = int(layer)
    depth = layer if layer >= 0 else num_layers + 1 + layer
    if not 0 <= depth <= num_layers:
        raise ValueError(f"vision_feature_layer={layer} is outside the {num_layers}-layer vision tower")
    return depth
