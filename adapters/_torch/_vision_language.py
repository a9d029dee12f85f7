"""Vision-language models: which vision patches feed each image token of the language model.

A vision-language model runs a vision tower over an image, projects (some of) its output tokens into the
language model's embedding space and puts them where the prompt has image tokens. attnflow records that as
a fixed :class:`attnflow.Link` from the ``vision`` stream (at the depth whose output is projected) into the
``text`` stream, so rollout and flow from a text token reach the patches. How a family's projector maps
patches to image tokens is a fixed map per family, written here as data (:class:`ImageMap`) and described
in every trace's metadata (``metadata["image_links"]``):

* ``one_to_one``: each patch feature is projected on its own into one image token (LLaVA at its
  ``vision_feature_layer``, without CLS under the ``default`` strategy; PaliGemma at SigLIP's output).
* ``pixel_shuffle``: Idefics3 and SmolVLM concatenate each ``s x s`` block of neighbouring patches
  (``scale_factor`` s) into one token before the projector; the token is linked to the ``s**2`` patches of
  its block with weight ``1 / s**2`` each (the block's patches enter the projector as equal parts of one
  input vector; attnflow does not weigh them by the projector's parameters).
* ``merge_window``: Qwen2-VL's and Qwen2.5-VL's ``PatchMerger`` concatenates each ``m x m`` block of
  neighbouring patches (``spatial_merge_size`` m; the image processor hands them to the tower block by block,
  and attnflow's vision stream holds them in row-major order, see :mod:`._qwen_vision`) into one token, row-major
  over the blocks: linked with weight ``1 / m**2`` each, as pixel shuffle.
* ``anyres_tiles`` (LLaVA-Next): the vision tower runs on several crops of each image (the whole image
  resized, then the tiles of its best-fitting grid), a crop per row of the tower's batch. attnflow's vision
  stream holds one item per image: its crops one after another, each crop attending within itself (a
  block-diagonal layer, 0 between crops), CLS of each crop special. Each image token is linked (weight 1) to the
  one patch of one crop it is projected from (the projector maps patches one to one), found by running the
  model's own ``pack_image_features`` on patch indices: the base crop's patches first, then the tiles' patches
  row by row over the tile grid, unpadded to the image's aspect ratio. The learned newline token closing each
  row of tiles is fed by nothing (an input of its own).
* ``anyres`` (LLaVA-OneVision, LLaVA-Next-Video): not linked. Their packing adds pooling and video frames that
  attnflow does not map; one trace holds one vision item per text item, so attnflow refuses with that reason
  (capture the language model alone with ``adapter_options={"modules": [...]}``).

Private to attnflow.adapters; imports no framework (torch is passed in).
"""

from __future__ import annotations

import dataclasses
import sys
import weakref
from typing import Any

import numpy as np

import attnflow

from .. import _hf_families as families
from . import _qwen_vision

ONE_TO_ONE, PIXEL_SHUFFLE, MERGE_WINDOW, ANYRES = "one_to_one", "pixel_shuffle", "merge_window", "anyres"
ANYRES_TILES = "anyres_tiles"

_WHY = {
    ONE_TO_ONE: "the projector maps each vision patch to one image token",
    PIXEL_SHUFFLE: (
        "pixel shuffle: the connector concatenates each {s}x{s} block of patches into one image token; each "
        "token is linked to its block's {n} patches with weight 1/{n}"
    ),
    MERGE_WINDOW: (
        "patch merger: each {s}x{s} block of neighbouring patches becomes one image token (row-major over the "
        "blocks); each token is linked to its block's {n} patches with weight 1/{n}"
    ),
    ANYRES: (
        "anyres: the vision tower runs on several crops of each image (vision batch = crops, not prompts) and the "
        "projected tiles are pooled or unpadded and joined by learned newline tokens in a way attnflow does not map "
        "for this family; not linked"
    ),
    ANYRES_TILES: (
        "anyres: the vision tower runs on the whole image resized and on the tiles of its grid; the vision stream "
        "holds each image's crops one after another (each attends within itself), and each image token is linked "
        "to the one crop patch it is projected from, as the model's pack_image_features places it (tiles unpadded "
        "to the image's aspect ratio); the newline token closing each row of tiles is fed by nothing"
    ),
}


@dataclasses.dataclass(frozen=True)
class ImageMap:
    """How one family's projector feeds image tokens from vision tokens.

    Attributes:
        kind: ``one_to_one``, ``pixel_shuffle``, ``merge_window``, ``anyres_tiles`` or ``anyres`` (not linked).
        image_token: the id of the language model's image placeholder token.
        layer: the vision layer whose output is projected, as ``hidden_states[layer]`` (negative from the
            end); None: the tower's last layer.
        prefix: vision tokens before the patches that are not projected (LLaVA's CLS under ``default``).
        scale: patches per side of one token's block (pixel shuffle, merge window); 1 for one to one.
    """

    kind: str
    image_token: int | None
    layer: Any = None
    prefix: int = 0
    scale: int = 1

    def describe(self) -> dict[str, Any]:
        """The trace metadata entry ``image_links``."""
        n = self.scale * self.scale
        out: dict[str, Any] = {
            "map": self.kind, "linked": self.kind != ANYRES,
            "why": _WHY[self.kind].format(s=self.scale, n=n),
        }
        if self.kind != ANYRES:
            out.update(patches_per_token=1 if self.kind == ANYRES_TILES else n, skipped_prefix=self.prefix)
            out["vision_layer"] = "last" if self.layer is None else (
                list(self.layer) if isinstance(self.layer, (list, tuple)) else int(self.layer))
        return out


def image_map(model: Any) -> ImageMap | None:
    """The family's :class:`ImageMap`, or None for a model that has no image tokens to link."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    model_type = str(getattr(config, "model_type", "") or "")
    token = getattr(config, "image_token_id", None)
    if token is None:
        token = getattr(config, "image_token_index", None)
    if token is None:
        return None
    token = int(token)
    if getattr(config, "image_grid_pinpoints", None) is not None:
        if model_type != "llava_next":
            return ImageMap(ANYRES, token)
        strategy = getattr(config, "vision_feature_select_strategy", "default")
        return ImageMap(ANYRES_TILES, token, layer=getattr(config, "vision_feature_layer", -1),
                        prefix=1 if strategy == "default" else 0)
    if model_type in ("idefics3", "smolvlm"):
        return ImageMap(PIXEL_SHUFFLE, token, scale=int(getattr(config, "scale_factor", 2) or 1))
    if model_type in ("qwen2_vl", "qwen2_5_vl"):
        merge = getattr(getattr(config, "vision_config", None), "spatial_merge_size", 2)
        return ImageMap(MERGE_WINDOW, token, scale=int(merge))
    layer = getattr(config, "vision_feature_layer", None)
    if layer is not None:  # LLaVA and its relatives
        strategy = getattr(config, "vision_feature_select_strategy", "default")
        return ImageMap(ONE_TO_ONE, token, layer=layer, prefix=1 if strategy == "default" else 0)
    if model_type.startswith("paligemma"):
        return ImageMap(ONE_TO_ONE, token)
    return None


def describe(model: Any) -> dict[str, Any]:
    """``{"image_links": ...}`` for the trace metadata of a vision-language model, else ``{}``."""
    found = image_map(model)
    return {} if found is None else {"image_links": found.describe()}


def token_sources(found: ImageMap, patches: int, grid: tuple[int, int] | None) -> np.ndarray:
    """``(image tokens, vision tokens per image token)`` indices (after the prefix) of the patches feeding
    each image token of one image of ``patches`` patches (``grid``: its rows and columns)."""
    s = found.scale
    if found.kind == ONE_TO_ONE:
        return np.arange(patches)[:, None]
    if grid is None:  # Idefics3's connector assumes a square grid
        side = int(round(patches ** 0.5))
        grid = (side, side)
    rows, cols = grid
    if rows * cols != patches or rows % s or cols % s:
        raise ValueError(f"the image's {rows}x{cols} patch grid is not made of whole {s}x{s} blocks")
    r = np.arange(rows).reshape(rows // s, s)  # block row i holds patch rows s*i .. s*i+s-1
    c = np.arange(cols).reshape(cols // s, s)
    # token (i, j), row-major over blocks, fed by patches (s*i + a, s*j + b)
    return (r[:, None, :, None] * cols + c[None, :, None, :]).reshape((rows // s) * (cols // s), s * s)


def link_weights(
    found: ImageMap, input_ids: np.ndarray, vision_length: int, vision_batch: int, grid: tuple[int, int] | None = None,
) -> np.ndarray:
    """Link weights ``(batch, text length, vision length)``: the k-th image token of item b is fed by the
    vision tokens of image b that :func:`token_sources` gives for token k, equally. Raises ``ValueError`` with
    the reason when the images do not fit the prompts (one image per item, the model's number of image
    tokens)."""
    batch, length = input_ids.shape
    if vision_batch != batch:
        raise ValueError(
            f"the batch has {batch} text items but the vision tower ran {vision_batch} images; attnflow links one "
            "image per item"
        )
    patches = vision_length - found.prefix
    sources = token_sources(found, patches, grid)
    weights = np.zeros((batch, length, vision_length))
    for b in range(batch):
        positions = np.flatnonzero(input_ids[b] == found.image_token)
        if positions.size != sources.shape[0]:
            raise ValueError(
                f"item {b} has {positions.size} image tokens but its image gives {sources.shape[0]} ({patches} "
                "patches); attnflow links one image per item"
            )
        weights[b, positions[:, None], found.prefix + sources] = 1.0 / sources.shape[1]
    return weights


def link_image_tokens(passes: Any, model: Any, input_ids: Any) -> None:
    """At the end of a pass (a ``TorchPass`` finisher): link the image tokens of ``input_ids`` (the root call's)
    to the vision patches, per the family's :class:`ImageMap`. Nothing where the pass ran no vision layer (a
    generation step after the prefill) or has no image tokens."""
    found = image_map(model)
    if found is None or input_ids is None or not {"vision", "text"} <= set(passes.seen):
        return
    ids = np.asarray(input_ids)
    if not (ids == found.image_token).any():
        return
    pixels = passes.state.pixels.get("vision")
    shape = pixels[0] if pixels is not None else (ids.shape[0],)
    tower = pixels[1] if pixels is not None else None
    vision_layers, vision_length = passes.layer_counts.get("vision", 0), passes.seen["vision"]
    if not vision_layers:
        earlier = _encoded_before(passes)
        if earlier is None:
            return  # a step of generate() that reused the cache: the prefill linked the image
        vision_layers, batch, vision_length = earlier
        shape, tower = (batch,), None
        seen = _qwen_vision.images_seen(passes)
        if seen is not None and seen[0][0] == batch:
            shape, tower = seen
    name = type(model).__name__
    if found.kind == ANYRES:
        raise attnflow.AdapterError(
            f"Cannot link {name}'s image tokens to its vision patches: {_WHY[ANYRES]}. attnflow's trace holds one "
            "vision item per text item. Capture the language model alone, e.g. adapter_options={'modules': "
            "['model.language_model.layers.*.self_attn']}, or use a LLaVA-style model."
        )
    try:
        depth = vision_layers if found.layer is None else families.feature_depth(found.layer, vision_layers)
        crops = _CROPS.get(passes)
        if found.kind == ANYRES_TILES and crops is not None:
            weights = crops.link_weights(found, ids, vision_length)
        else:
            grid = None
            config = getattr(tower, "config", None) or getattr(model.config, "vision_config", None)
            layout = families.vision_layout(vision_length, shape, getattr(config, "patch_size", None))
            if layout is not None and int(layout[0].sum()) == found.prefix:
                grid = layout[1]
            weights = link_weights(found, ids, vision_length, int(shape[0]), grid)
    except ValueError as exc:
        raise attnflow.AdapterError(
            f"Cannot link {name}'s image tokens to its vision patches: {exc}. Capture one image per batch item, "
            "with the model's own number of image tokens."
        ) from exc
    passes.recorder.link("text", "vision", depth, weights)


def _encoded_before(passes: Any) -> tuple[int, int, int] | None:
    """``(vision layers, images, vision length)`` of the vision tower run that a ``generate()`` call made before its
    prefill (transformers encodes the images first, through ``get_image_features``, outside any forward call of
    the model), when the current pass is that prefill; else None."""
    recorder = passes.recorder
    if not passes.generating or not getattr(recorder, "generating", False):
        return None
    steps = recorder.steps
    layers = [layer for step in steps for layer in step.layers]
    if any(layer.query_stream == "text" for layer in layers):
        return None  # a later step: the prefill (the first pass with text) linked the image
    vision = [layer for layer in layers if layer.query_stream == "vision"]
    if not vision:
        return None
    return len(vision), int(vision[0].weights.shape[0]), int(vision[0].weights.shape[-1])


class Crops:
    """LLaVA-Next's anyres crops for one attach: how many crops the model runs for each image of the current call
    (from the call's ``image_sizes``, by the model's own ``image_size_to_num_patches``), to group the vision tower's
    crop batch into one vision item per image and to link image tokens to crop patches."""

    def __init__(self, model: Any, torch: Any):
        self.model, self.torch = model, torch
        self.sizes: Any = None
        self.crops: list[int] | None = None

    @classmethod
    def install(cls, model: Any, passes: Any, torch: Any) -> Crops | None:
        """A ``Crops`` for an anyres model linked by its tiles (kept for this attach's passes), else None."""
        found = image_map(model)
        if found is None or found.kind != ANYRES_TILES:
            return None
        crops = _CROPS[passes] = cls(model, torch)
        return crops

    def start(self, image_sizes: Any) -> None:
        """The root call's ``image_sizes`` (None: the call encodes no images, or generate() encoded them before)."""
        if not isinstance(image_sizes, self.torch.Tensor):
            self.sizes = self.crops = None
            return
        config = self.model.config
        count = sys.modules[type(self.model).__module__].image_size_to_num_patches
        self.sizes = image_sizes
        self.crops = [
            int(count(image_size=size, grid_pinpoints=config.image_grid_pinpoints,
                      patch_size=config.vision_config.image_size))
            for size in image_sizes
        ]

    def group(self, path: str, weights: Any, gradients: bool) -> Any:
        """``(crops, heads, L, L)`` from the vision tower as ``(images, heads, crops per image * L, ...)``, each
        crop's block on the diagonal."""
        name = type(self.model).__name__
        if self.crops is None:
            raise attnflow.AdapterError(
                f"{path}: {name} ran its vision tower on {int(weights.shape[0])} anyres crops without the call's "
                "image_sizes (generate() encodes the images before its first forward call), so attnflow cannot group "
                "them into images. Attach with generation='rerun' (the generated sequence is captured again in one "
                "call), or capture the prompt with attnflow.capture(model, input_ids=..., pixel_values=..., "
                "image_sizes=...)."
            )
        if gradients:
            raise attnflow.AdapterError(
                f"Attention gradients (target=...) are not available for {name}'s vision tower ({path}): attnflow "
                "groups its crops into images, and the grouped layer is no tensor the model computes with. Capture "
                "the language model's gradients alone: adapter_options={'modules': "
                "['model.language_model.layers.*.self_attn']}."
            )
        if len(set(self.crops)) != 1 or int(weights.shape[0]) != sum(self.crops):
            raise attnflow.AdapterError(
                f"{path}: the images of this call run {self.crops} crops each (their image_sizes pick different anyres "
                "grids) while attnflow's vision stream holds one length for every image. Capture images whose sizes "
                "pick one grid (e.g. resize them to one size), or capture them one at a time."
            )
        images, crops = len(self.crops), self.crops[0]
        heads, length = int(weights.shape[1]), int(weights.shape[-1])
        grouped = weights.new_zeros(images, heads, crops * length, crops * length)
        split = weights.reshape(images, crops, heads, length, length)
        for c in range(crops):
            grouped[:, :, c * length:(c + 1) * length, c * length:(c + 1) * length] = split[:, c]
        return grouped

    def describe(self, passes: Any, tower: Any) -> None:
        """The vision stream's special tokens (each crop's prefix: CLS) and labels ``crop{c}:r{row}c{col}``."""
        length = passes.seen.get("vision")
        if self.crops is None or not length or length % self.crops[0]:
            return
        crops = self.crops[0]
        per_crop = length // crops
        config = getattr(tower, "config", None) or self.model.config.vision_config
        side = int(config.image_size) // int(config.patch_size)
        prefix = per_crop - side * side
        if prefix < 0:
            return
        labels = [
            f"crop{c}:" + ("[CLS]" if i < prefix else f"r{(i - prefix) // side}c{(i - prefix) % side}")
            for c in range(crops) for i in range(per_crop)
        ]
        special = np.zeros(length, bool)
        special[[c * per_crop + i for c in range(crops) for i in range(prefix)]] = True
        images = len(self.crops)
        passes.recorder.describe_stream(
            "vision", special=np.broadcast_to(special, (images, length)), tokens=[labels] * images, overwrite=True,
        )

    def link_weights(self, found: ImageMap, input_ids: np.ndarray, vision_length: int) -> np.ndarray:
        """``(batch, text length, vision length)``: each image token's source patch, found by running the model's
        own ``pack_image_features`` on the patches' positions in the vision stream (plus 1; newline tokens 0)."""
        torch, crops = self.torch, self.crops or []
        batch, length = input_ids.shape
        if len(crops) != batch:
            raise ValueError(
                f"the batch has {batch} text items but the call has {len(crops)} images; attnflow links one image "
                "per item"
            )
        per_crop = vision_length // crops[0]
        positions = torch.arange(vision_length, dtype=torch.float64).reshape(crops[0], per_crop, 1)
        features = [positions[:, found.prefix:] + 1 for _ in range(batch)]
        strategy = getattr(self.model.config, "vision_feature_select_strategy", "default")
        packed, _ = self.model.pack_image_features(
            features, self.sizes, strategy, image_newline=torch.zeros(1, dtype=torch.float64),
        )
        weights = np.zeros((batch, length, vision_length))
        for b in range(batch):
            tokens = np.flatnonzero(input_ids[b] == found.image_token)
            sources = packed[b][:, 0].detach().cpu().numpy().astype(int) - 1
            if tokens.size != sources.size:
                raise ValueError(
                    f"item {b} has {tokens.size} image tokens but its image gives {sources.size}; attnflow links one "
                    "image per item"
                )
            fed = sources >= 0
            weights[b, tokens[fed], sources[fed]] = 1.0
        return weights


#: Each attach's anyres crops, by its pass state.
_CROPS: weakref.WeakKeyDictionary[Any, Crops] = weakref.WeakKeyDictionary()
